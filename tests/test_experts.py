"""Recorded expert routing, checked against a direct computation from the router weights."""

import json
import subprocess
import sys

import torch

from engine.serve.experts import router_modules, usage_shift
from tests.test_tui import app_for, ready, send, until


def direct_routing(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the top-k experts of every position, computed by hand from each router's weights and
    the hidden states that reach it (one full forward pass, no KV cache)."""
    inputs: list[torch.Tensor] = []
    hooks = [r.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach())) for r in
             router_modules(model)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    out = []
    for router, h in zip(router_modules(model), inputs, strict=True):
        logits = h.reshape(-1, h.shape[-1]) @ router.weight.T + router.bias
        out.append(torch.topk(logits, router.top_k, dim=-1).indices)
    return out


def test_recorded_routing_matches_the_router_weights(engine):
    done = engine.trace_experts("Translate to German: the house", "base", max_new_tokens=20)
    trace = done.reply.experts
    assert trace.num_layers == 2 and trace.num_experts == 8 and trace.top_k == 2
    tok = engine.lm.tokenizer
    from engine.harmony import Turn, render_prompt

    prompt_ids = tok(render_prompt([Turn("user", "Translate to German: the house")]), add_special_tokens=False,
                     return_tensors="pt").input_ids
    reply_ids = tok("".join(done.reply.token_texts), add_special_tokens=False, return_tensors="pt").input_ids
    ids = torch.cat([prompt_ids, reply_ids], dim=1)
    assert trace.prompt_tokens == prompt_ids.shape[1]
    direct = direct_routing(engine.lm.model, ids)
    assert len(trace.indices) == reply_ids.shape[1] - 1  # the last token (end of turn) is never fed back
    for i, token in enumerate(trace.indices):
        for layer, chosen in enumerate(token):
            expected = direct[layer][prompt_ids.shape[1] + i].tolist()
            assert sorted(chosen) == sorted(expected), (i, layer)
    for row in trace.usage():
        assert abs(sum(row) - trace.top_k) < 1e-6  # every token picks top_k experts per layer
    for token in trace.weights:
        for w in token:
            assert abs(sum(w) - 1) < 1e-3


def test_adapter_changes_routing_and_shift_sums_to_zero(engine, make_adapter):
    make_adapter("big", ["x"], seed=3, scale=20.0)
    engine.live.refresh()
    a = engine.trace_experts("Hello!", "base").reply.experts
    b = engine.trace_experts("Hello!", "big").reply.experts
    shift = usage_shift(a, b)
    assert any(abs(v) > 0 for row in shift for v in row)
    for row in shift:
        assert abs(sum(row)) < 1e-6  # traffic moves between experts; the total per layer is fixed


def test_reference_decoder_removes_its_hooks(engine):
    from engine.serve.decoder import ReferenceDecoder

    model = engine.lm.model
    before = sum(len(r._forward_hooks) for r in router_modules(model))
    decoder = ReferenceDecoder(model, 64)
    decoder.record(True)
    assert sum(len(r._forward_hooks) for r in router_modules(model)) == before + 2
    decoder.release()
    assert sum(len(r._forward_hooks) for r in router_modules(model)) == before


def test_cli_experts_json(settings_path, demo_model_dir):
    r = subprocess.run([sys.executable, "-m", "engine.cli", "experts", "What is 3 plus 4?", "--json",
                        "--adapter", "base", "--compare", "base"], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["num_layers"] == 2 and len(out["usage"]) == 2 and len(out["usage"][0]) == 8
    assert out["tokens"] and len(out["tokens"][0]["experts"]) == 2
    assert all(v == 0 for row in out["compare"]["shift"] for v in row)  # same adapter: no shift


async def test_expert_view_in_the_app(settings, make_adapter, demo_model_dir):
    make_adapter("math", ["What is 2 plus 2?"], seed=1, scale=20.0)
    app = app_for(settings)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        reply = await send(pilot, "What is 2 plus 2?")
        assert reply.experts is not None, app.log_lines  # a failed reply says why in the log
        await pilot.press("f6")
        await pilot.pause()
        screen = app.screen
        assert type(screen).__name__ == "ExpertsScreen"
        assert "layer" in str(screen.query_one("#heatmap").render())
        await pilot.press("down")
        assert "layer  0:" in str(screen.query_one("#token-experts").render())
        await pilot.press("c")
        await until(pilot, lambda: "vs" in str(screen.query_one("#shift").render()), timeout=60)
