"""`adapters import`: every format unsloth and PEFT have written for GPT-OSS is read right (the expert
lora_B layout, per-expert LoRA), converted to the one layout Tandem serves, and anything broken is refused
before it enters the store."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.store.adapter_format import GROUPED, RANK_MAJOR, expert_layouts, fuse_per_expert
from engine.store.adapters import AdapterError, AdapterStore
from engine.train.targets import ATTENTION, FUSED_EXPERTS

E = 8  # the demo model's experts


@pytest.fixture(scope="module")
def demo(demo_model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
    return model, AutoConfig.from_pretrained(demo_model_dir)


def peft_folder(model, folder, modules=ATTENTION, params=FUSED_EXPERTS, rank=4, seed=0):
    """A folder as PEFT's save_pretrained writes it (rank-major lora_B)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(modules), target_parameters=list(params),
                     init_lora_weights=False)
    get_peft_model(copy.deepcopy(model), cfg).save_pretrained(folder)
    return folder


def grouped(b):
    """PEFT's rank-major lora_B [out, r * E] (column j * E + e) in unsloth's old order (column e * r + j),
    written from the format's definition, independently of Tandem's conversion."""
    width = b.shape[1]
    r = width // E
    g = torch.empty_like(b)
    for e in range(E):
        for j in range(r):
            g[:, e * r + j] = b[:, j * E + e]
    return g


def regroup(folder, marker):
    """Rewrite `folder` as an unsloth save in the grouped layout, with the marker style `marker`."""
    weights = load_file(folder / "adapter_model.safetensors")
    save_file({k: grouped(v) if ".mlp.experts." in k and ".lora_B." in k else v for k, v in weights.items()},
              folder / "adapter_model.safetensors")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    detail = {"lora_A_layout": GROUPED, "lora_B_layout": GROUPED,
              "parameters": {p: {"lora_B_layout": GROUPED, "num_experts": E} for p in ("gate_up_proj", "down_proj")}}
    if marker == "flat":
        cfg["lora_B_layout"] = GROUPED
    elif marker == "nested":
        cfg["unsloth_fused_expert_lora"] = {**detail}
        del cfg["unsloth_fused_expert_lora"]["lora_B_layout"]
    elif marker == "auto_mapping":
        cfg["auto_mapping"] = {"unsloth_fixed": True, "lora_B_layout": GROUPED, "unsloth_fused_expert_lora": detail}
    else:  # an unsloth save from before the marker existed
        cfg["auto_mapping"] = {"unsloth_fixed": True}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def store(tmp_path, demo_model_dir):
    return AdapterStore(tmp_path / "adapters", base_model=f"demo:{demo_model_dir.name}")


@pytest.mark.parametrize("marker", ["flat", "nested", "auto_mapping", "none"])
def test_grouped_expert_lora_is_converted_to_rank_major(tmp_path, demo, demo_model_dir, marker, monkeypatch):
    """Regression: the layout key was never read, so a grouped adapter was served with its lora_B columns
    permuted. unsloth-zoo's own reader of the markers agrees with Tandem's on which layout each is."""
    import unsloth  # noqa: F401  (before unsloth_zoo, as it asks)

    monkeypatch.setenv("UNSLOTH_IS_PRESENT", "1")  # set by that import; a test may have reset the environment
    from unsloth_zoo.temporary_patches.moe_utils import saved_lora_b_layouts

    model, config = demo
    original = peft_folder(model, tmp_path / "made")
    want = load_file(original / "adapter_model.safetensors")
    regroup(original, marker)
    cfg = json.loads((original / "adapter_config.json").read_text())
    theirs = saved_lora_b_layouts(cfg)
    assert set(theirs.values()) == {GROUPED} and set(expert_layouts(cfg).values()) == {GROUPED}
    a = store(tmp_path, demo_model_dir).import_folder(original, name="imported", task="misc", base_config=config)
    got = load_file(a.weights)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    saved = json.loads((a.path / "adapter_config.json").read_text())
    assert saved["lora_B_layout"] == RANK_MAJOR and set(expert_layouts(saved).values()) == {RANK_MAJOR}
    assert "grouped_by_expert to rank_major" in a.manifest.description


@pytest.mark.parametrize("value", ["mixed", "expert_major", 3])
def test_mixed_or_unknown_layouts_are_refused(tmp_path, demo, demo_model_dir, value):
    model, config = demo
    folder = peft_folder(model, tmp_path / "made")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["unsloth_fused_expert_lora"] = {"parameters": {"gate_up_proj": {"lora_B_layout": value}}}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="lora_B_layout"):
        store(tmp_path, demo_model_dir).import_folder(folder, name="x", task="x", base_config=config)


def _truncate(folder):
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])


def _rank(folder):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "r": 100000}))


def _module(folder):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj", "qq_proj"]}))


def _drop_a(folder):
    weights = load_file(folder / "adapter_model.safetensors")
    weights = {k: v for k, v in weights.items() if "layers.1.self_attn.k_proj.lora_A" not in k}
    save_file(weights, folder / "adapter_model.safetensors")


def _shapes(folder):
    weights = load_file(folder / "adapter_model.safetensors")
    key = next(k for k in weights if "q_proj.lora_B" in k)
    weights[key] = torch.zeros(weights[key].shape[0] * 2, weights[key].shape[1])
    save_file(weights, folder / "adapter_model.safetensors")


@pytest.mark.parametrize("damage, reason", [
    (_truncate, "unreadable or incomplete"), (_rank, "r = 100000"), (_module, "qq_proj"),
    (_drop_a, "lacks 1 tensor"), (_shapes, "this base needs"),
])
def test_broken_adapters_are_refused_before_entering_the_store(tmp_path, demo, demo_model_dir, damage, reason):
    """Regression: each of these was imported and then silently ignored (the base answered under its name)."""
    model, config = demo
    folder = peft_folder(model, tmp_path / "made")
    damage(folder)
    s = store(tmp_path, demo_model_dir)
    with pytest.raises(AdapterError, match=reason):
        s.import_folder(folder, name="broken", task="x", base_config=config)
    assert s.scan() == ([], []) and not any((s.root / ".staging").glob("*"))


def test_links_and_loops_are_refused_and_a_manifestless_folder_gets_the_engine_base(tmp_path, demo, demo_model_dir):
    model, config = demo
    s = store(tmp_path, demo_model_dir)
    folder = peft_folder(model, tmp_path / "made")
    (tmp_path / "secret").write_text("outside")
    (folder / "notes.txt").symlink_to(tmp_path / "secret")
    with pytest.raises(AdapterError, match="symbolic link"):
        s.import_folder(folder, name="linked", task="x", base_config=config)
    (folder / "notes.txt").unlink()
    (tmp_path / "alias").symlink_to(folder)
    with pytest.raises(AdapterError, match="symbolic link"):
        s.import_folder(tmp_path / "alias", name="alias", task="x", base_config=config)
    (tmp_path / "alias").unlink()
    a = s.import_folder(folder, name="plain", task="x", base_config=config)
    assert a.manifest.base_model == f"demo:{demo_model_dir.name}"  # not the config's base_model_name_or_path
    with pytest.raises(AdapterError, match="inside the adapter store"):
        s.import_folder(a.path, name="again", task="x", base_config=config)
    holding = AdapterStore(folder / "store", base_model=s.base_model)  # a store inside the source folder
    with pytest.raises(AdapterError, match="inside the adapter store"):
        holding.import_folder(folder, name="whole", task="x", base_config=config)
    with pytest.raises(AdapterError, match="base model it was trained for is unknown"):
        AdapterStore(tmp_path / "other").import_folder(folder, name="nobase", task="x")


def test_per_expert_lora_is_fused_into_the_same_deltas(demo):
    """unsloth's bitsandbytes GPT-OSS has one Linear per expert; its LoRA becomes PEFT's fused-expert LoRA
    with the same delta for every expert (checked against the per-expert products directly)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    model, config = demo
    gen = torch.Generator().manual_seed(0)
    h, i, r = config.hidden_size, config.intermediate_size, 4
    state, deltas = {}, {}
    for kind, (inp, out) in (("gate_up_projs", (h, 2 * i)), ("down_projs", (i, h))):
        for e in range(E):
            a, b = torch.randn(r, inp, generator=gen), torch.randn(out, r, generator=gen)
            state[f"base_model.model.model.layers.0.mlp.experts.{kind}.{e}.lora_A.weight"] = a
            state[f"base_model.model.model.layers.0.mlp.experts.{kind}.{e}.lora_B.weight"] = b
            deltas[(kind[:-1], e)] = (b @ a).T  # [in, out], as the fused weights are stored
    cfg, fused = fuse_per_expert({"r": r, "target_modules": ["q_proj", "gate_proj", "up_proj", "down_proj"]}, state, E)
    assert cfg["target_parameters"] == list(FUSED_EXPERTS) and cfg["target_modules"] == ["q_proj"]
    lora = LoraConfig(r=r, lora_alpha=r, target_modules=[], target_parameters=list(FUSED_EXPERTS),
                      layers_to_transform=[0])
    peft = get_peft_model(copy.deepcopy(model), lora)
    result = set_peft_model_state_dict(peft, fused)
    assert not [k for k in result.unexpected_keys if "lora_" in k]
    wrapper = peft.base_model.model.model.layers[0].mlp.experts
    for w in (wrapper, wrapper.base_layer):
        got = w.get_delta_weight("default")
        for e in range(E):
            torch.testing.assert_close(got[e], deltas[(w.parameter_name, e)])


RECIPE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def recipe_adapter(demo_model_dir, folder):
    """unsloth's 2025 GPT-OSS recipe (get_peft_model: attention and the MLP names, r=16, alpha=32, rsLoRA),
    built by the installed unsloth on the demo model, with trained-looking (non-zero) lora_B."""
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(model_name=str(demo_model_dir), max_seq_length=256,
                                                 load_in_4bit=False, dtype=torch.float32)
    peft = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0, use_rslora=True,
                                            target_modules=RECIPE, random_state=3407,
                                            use_gradient_checkpointing=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    peft.save_pretrained(folder)
    return folder


def test_unsloth_2025_recipe_imports_and_serves_on_the_fast_path_over_mxfp4(tmp_path, demo, demo_model_dir,
                                                                           monkeypatch):
    from peft import get_peft_model, set_peft_model_state_dict

    from engine.serve import selfcheck
    from engine.serve.decoder import ReferenceDecoder
    from engine.serve.fast_decode import FastDecoder
    from engine.store.adapter_format import read_weights
    from tests.test_adapter_shapes import mxfp4_pair
    from tests.tolerance import logits, relative, rounding_bound

    dense, config = demo
    monkeypatch.chdir(tmp_path)  # unsloth writes its compiled modules into the working folder
    folder = recipe_adapter(demo_model_dir, tmp_path / "recipe")
    a = store(tmp_path, demo_model_dir).import_folder(folder, name="recipe", task="misc", base_config=config)
    lora, state = read_weights(a.path, "cpu", E)
    mx, deq = mxfp4_pair(dense)
    served, truth = (get_peft_model(m, copy.deepcopy(lora), adapter_name="recipe").eval() for m in (mx, deq))
    for m in (served, truth):
        assert not [k for k in set_peft_model_state_dict(m, state, adapter_name="recipe").unexpected_keys
                    if "lora_" in k]
    fast = FastDecoder(served, max_len=256)
    assert fast.select("recipe"), fast.reason
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(2))
    want = logits(truth, ids)[:, -1]
    with truth.disable_adapter():
        assert relative(want, logits(truth, ids)[:, -1]) > 1e-3  # the adapter matters
    assert relative(fast.prefill(ids), want) < rounding_bound(truth, ids)
    from transformers import AutoTokenizer

    verdict = selfcheck.compare(fast, ReferenceDecoder(served, 256), AutoTokenizer.from_pretrained(demo_model_dir),
                                "recipe")
    assert verdict.ok, verdict


def test_the_trainer_pins_the_layout_it_writes(tmp_path, monkeypatch):
    """Whatever UNSLOTH_MOE_LORA_B_LAYOUT the user's environment holds, the training process writes
    rank-major expert lora_B: the layout the store, the gate and the server read."""
    import os

    from engine.train import trainer

    monkeypatch.setenv("UNSLOTH_MOE_LORA_B_LAYOUT", GROUPED)
    with pytest.raises(Exception):  # noqa: B017  (no such run: only the pin before it matters here)
        trainer.main(str(tmp_path / "no-run"))
    assert os.environ["UNSLOTH_MOE_LORA_B_LAYOUT"] == RANK_MAJOR
