"""Fast GPT-OSS decoding: a static KV cache, expert LoRA on the routed experts only, CUDA graphs.

Why not the model's own forward: PEFT adapts fused experts (`target_parameters`) by adding the LoRA
delta of all 32 experts to the weights on every forward (6.5 tok/s with a specialist on the 20B shape),
and transformers' forward spends most of a decode step in Python. This decoder reads the weights of a
loaded GptOssForCausalLM (PEFT-wrapped or not) and runs the same math itself: experts as grouped
matmuls over the routed (token, expert) pairs, an adapter's expert LoRA the same way over its
per-expert factors, and on CUDA each one-token step compiled (torch.compile fuses the element-wise
kernels) and replayed as a CUDA graph. Tests compare its logits with the PEFT model's.

An adapter's factors are packed once, when it is loaded; each adapter gets its own CUDA graphs. Its
attention LoRA is merged into one copy of q/k/v and o_proj (W + (A·B)ᵀ, shared by all adapters and
refilled when another one is selected: ~1.3 GB at the 20B shape, ~1.5 ms a switch), so that a step with a
specialist runs attention as the base does, with no LoRA products and no extra launches. Experts in MXFP4
(engine/serve/mxfp4.py) stay 4-bit: their routed pairs run through mxfp4_kernels.py, with the adapter's
expert LoRA folded into the kernels. Adapters that adapt
anything else (DoRA, bias, other modules), other quantized weights (bitsandbytes) and non-GPT-OSS models
are refused with a reason, and the engine uses the reference path for them.

A prompt is prefilled layer by layer over all its tokens: attention over only the live part of the cache
(engine/serve/attention.py: flash attention on CUDA, sinks exact via its log-sum-exp; elsewhere in chunks;
a one-token step reads its position from the device, so one graph serves every position), the experts
as grouped matmuls over every routed pair at once, MXFP4 experts dequantized into a transient bf16 copy
once per layer (10x faster than running the decode kernels per pair, from 2k tokens). The cache
outlives a reply: the next prompt reuses the keys and values of the longest prefix it shares with what
was decoded, when the same adapter computed them (attention LoRA makes them adapter-specific), so
a conversation's next turn computes only its new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.train.targets import ATTENTION, FUSED_EXPERTS

EXPERT_PARAMS = tuple(p.rsplit(".", 1)[1] for p in FUSED_EXPERTS)  # gate_up_proj, down_proj
PREFILL_CHUNK = 512  # prompt tokens per attention chunk of a prefill: bounds the scores' memory
MOE_ROWS = 4096  # prompt rows per grouped expert pass of a prefill: bounds the routed activations' memory
GROUPED_ROWS = 64  # from this many prompt rows, a prefill dequantizes MXFP4 experts for grouped matmuls
SCORES_BYTES = 256 * 2**20  # and at long contexts fewer: one layer's fp32 scores stay under this
NOT_ATTACHED = " is not attached to the model"
MERGED = ("qkv", "o_proj")  # the weights an adapter's attention LoRA is merged into (`FastDecoder._merge`)


def _unwrap(module: Any) -> Any:
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def _hf_model(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unsupported(model: Any) -> str | None:
    """Why the fast path cannot run `model`, or None when it can."""
    import torch

    hf = _hf_model(model)
    if getattr(hf.config, "model_type", "") != "gpt_oss":
        return f"model type {getattr(hf.config, 'model_type', '?')!r} is not gpt_oss"
    qc = getattr(hf.config, "quantization_config", None) or {}
    if (qc if isinstance(qc, dict) else qc.to_dict()).get("quant_method") == "bitsandbytes":
        from engine.serve.mxfp4_load import MXFP4_CHECKPOINT

        return (f"a bitsandbytes 4-bit checkpoint: the fast decoder serves 4-bit experts in MXFP4; set [model] name "
                f"to {MXFP4_CHECKPOINT!r} (MXFP4 experts, ~13 GB)")
    layer = hf.model.layers[0]
    experts = _unwrap(layer.mlp.experts)
    w = getattr(experts, "gate_up_proj", None)
    if _is_mxfp4(experts):
        return _attention_unsupported(layer)
    if not isinstance(w, torch.Tensor) or w.dim() != 3:
        return "experts are not fused 3-D tensors (a quantized or per-expert checkpoint)"
    if w.device.type == "cuda" and w.dtype != torch.bfloat16:
        return f"grouped matmuls on CUDA need bf16 weights, these are {w.dtype}"
    return _attention_unsupported(layer)


def _attention_unsupported(layer: Any) -> str | None:
    import torch

    q = _unwrap(layer.self_attn.q_proj)
    if type(q) is not torch.nn.Linear or q.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"attention weights are {type(q).__name__}/{q.weight.dtype}, not plain floating point"
    return None


def _is_mxfp4(experts: Any) -> bool:
    return hasattr(experts, "gate_up_proj_blocks")


@dataclass
class _Pack:
    """One adapter's LoRA factors in the decoder's layout, per layer: "qkv.A"/"qkv.B" (q, k and v fused:
    A side by side, B block-diagonal), "o_proj.A"/"o_proj.B", and per expert parameter its PEFT
    factors; the LoRA scaling is folded into each B. "qkv.W"/"o_proj.W" are the decoder's shared buffers
    that the attention factors are merged into while this adapter is selected."""

    name: str
    layers: list[dict[str, Any]]


class FastDecoder:
    """Prefill and one-token steps for one GPT-OSS model, batch rows in lockstep. Not thread-safe:
    the engine calls it under the model's lock."""

    def __init__(self, model: Any, max_len: int, graphs: bool | None = None, compile: bool | None = None,
                 prefill_chunk: int = PREFILL_CHUNK, lm_head_8bit: bool = False):
        import torch

        reason = unsupported(model)
        if reason:
            raise ValueError(f"fast decoding does not apply: {reason}")
        self.hf = _hf_model(model)
        cfg = self.hf.config
        emb = self.hf.model.embed_tokens.weight
        self.device, self.dtype = emb.device, _unwrap(self.hf.model.layers[0].mlp.experts).gate_up_proj.dtype
        self.max_len = max_len
        self.prefill_chunk = prefill_chunk
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        self.compiled: Any = None  # the layer compiled for graph steps, built on the first one
        self.compile = self.graphs if compile is None else compile
        self.note = ""  # what went wrong with compiling, if anything (the steps then run uncompiled)
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.top_k, self.num_experts = cfg.num_experts_per_tok, cfg.num_local_experts
        self.layers = [self._layer_weights(layer) for layer in self.hf.model.layers]
        # the opt-in 8-bit lm_head (lm_head8.py), or None for the checkpoint's own; the bench may swap it
        self.head8: Any = None
        if lm_head_8bit:
            from engine.serve.lm_head8 import Int8Head

            self.head8 = Int8Head.of(_unwrap(self.hf.lm_head))
        self.dims = (self.heads, self.kv_heads, self.head_dim, self.top_k, self.num_experts)
        with torch.inference_mode():
            pos = torch.arange(max_len, device=self.device)
            cos, sin = self.hf.model.rotary_emb(emb[:1].to(self.dtype), pos[None])
            self.cos, self.sin = cos[0], sin[0]
            self.arange = pos
        self.batch = 0
        self.length = 0  # tokens in the cache
        # prefix reuse: the tokens whose keys and values the cache holds ([batch, max_len], the first `length`
        # valid), valid only for the adapter that computed them (`_owner`, a pack or None for the base)
        self.history: Any = None
        self._owner: _Pack | None = None
        self._valid = False
        self.reuse = True  # prefix reuse on (the bench turns it off to measure what it saves)
        self.reused = 0  # prompt tokens the last prefill found already in the cache
        self.packs: dict[str, _Pack | str] = {}  # adapter name -> pack, or why it cannot be packed
        self.active: _Pack | None = None
        self.reason: str | None = None  # set while the selected adapter is one the fast path refuses
        self.routes: tuple[Any, Any] | None = None  # last forward's (indices, weights): [layer, row, k]
        self._graphs: dict[tuple, tuple[Any, Any]] = {}
        self._pool = None
        # q/k/v and o_proj with the active adapter's attention LoRA merged in (`_merge`), a buffer per layer shared
        # by every adapter's pack ("qkv.W"/"o_proj.W"), allocated when the first adapter with one is packed
        self._merged: list[dict[str, Any]] = []
        self._merged_for: _Pack | None = None  # the adapter whose LoRA the buffers hold

    # ----- weights
    def _layer_weights(self, layer: Any) -> dict[str, Any]:
        import torch

        attn, mlp = layer.self_attn, layer.mlp
        experts, router = _unwrap(mlp.experts), _unwrap(mlp.router)
        w: dict[str, Any] = {
            "ln1": layer.input_layernorm.weight, "eps1": layer.input_layernorm.variance_epsilon,
            "ln2": layer.post_attention_layernorm.weight, "eps2": layer.post_attention_layernorm.variance_epsilon,
            "sinks": attn.sinks, "window": attn.sliding_window or 0, "scaling": attn.scaling,
            "router_w": router.weight, "router_b": router.bias, "alpha": experts.alpha, "limit": experts.limit,
        }
        # q/k/v stacked (one GEMV computes them), and o_proj; named as the pack names their LoRA ("qkv", "o_proj")
        qkv = [_unwrap(getattr(attn, p)) for p in ATTENTION[:3]]
        for key, linears in (("qkv", qkv), ("o_proj", [_unwrap(attn.o_proj)])):
            w[f"{key}_w"] = _rows_of_one(linears)
            w[f"{key}_b"] = None if linears[0].bias is None else torch.cat([m.bias.detach() for m in linears])
        for p in EXPERT_PARAMS:
            w[f"{p}_bias"] = getattr(experts, f"{p}_bias")
            if _is_mxfp4(experts):  # stays 4-bit: the kernels read blocks and scales as the checkpoint has them
                from engine.serve.mxfp4_kernels import routed_experts

                w[f"{p}_blocks"], w[f"{p}_scales"] = getattr(experts, f"{p}_blocks"), getattr(experts, f"{p}_scales")
                w["routed"] = routed_experts
            else:
                w[p] = getattr(experts, p)
        # loaders keep some small tensors in fp32 (unsloth: the biases); a copy in the compute dtype keeps
        # every matmul in one dtype
        for k in ("qkv_b", "o_proj_b", "router_b", "gate_up_proj_bias", "down_proj_bias", "router_w"):
            if w[k] is not None and w[k].dtype != self.dtype:
                w[k] = w[k].detach().to(self.dtype)
        return w

    def _merge(self) -> None:
        """Merge the active adapter's attention LoRA into the buffers its graphs read ("qkv.W"/"o_proj.W":
        W + (A·B)ᵀ, accumulated in fp32 and rounded once, as PEFT's merge does), unless they hold it already.
        Every prefill and step calls this first."""
        import torch

        pack = self.active
        if pack is None or self._merged_for is pack:
            return
        with torch.inference_mode():  # the buffers were made under it, with the pack (`prepare`)
            for w, layer in zip(self.layers, pack.layers, strict=True):
                for key in MERGED:
                    if f"{key}.W" in layer:  # one GEMM each: fp32 accumulation, the sum rounded once
                        torch.addmm(w[f"{key}_w"], layer[f"{key}.B"].t(), layer[f"{key}.A"].t(), out=layer[f"{key}.W"])
        self._merged_for = pack

    def _merged_weight(self, i: int, key: str) -> Any:
        """Layer `i`'s buffer for q/k/v ("qkv") or o_proj ("o_proj") with an adapter merged in."""
        import torch

        if not self._merged:
            self._merged = [{k: torch.empty_like(w[f"{k}_w"]) for k in MERGED} for w in self.layers]
        return self._merged[i][key]

    def _pack(self, name: str) -> _Pack | str:
        """Read adapter `name`'s factors from the PEFT layers. A string says why it cannot be packed."""
        import torch

        layers: list[dict[str, Any]] = []
        seen = 0
        for i, layer in enumerate(self.hf.model.layers):
            parts: dict[str, Any] = {}
            qkv: list[tuple[Any, Any] | int] = []  # (A^T, s*B^T) per q/k/v, or its output width when not adapted
            for p in ATTENTION:
                m = getattr(layer.self_attn, p)
                if name not in getattr(m, "lora_A", {}):
                    qkv.append(_unwrap(m).out_features)
                    continue
                if m.use_dora.get(name) or m.lora_B[name].bias is not None:
                    return f"{name} uses DoRA or a LoRA bias on {p}"
                a, b = m.lora_A[name].weight.t(), m.lora_B[name].weight.t() * m.scaling[name]
                if p == "o_proj":
                    parts["o_proj.A"], parts["o_proj.B"] = a, b
                else:
                    qkv.append((a, b))
                seen += 1
            adapted = [f for f in qkv[:3] if isinstance(f, tuple)]
            if adapted:
                widths = [f[1].shape[1] if isinstance(f, tuple) else f for f in qkv[:3]]
                parts["qkv.A"] = torch.cat([a for a, _ in adapted], dim=1)
                parts["qkv.B"] = torch.zeros(parts["qkv.A"].shape[1], sum(widths), dtype=adapted[0][1].dtype,
                                             device=adapted[0][1].device)
                row = col = 0
                for f, width in zip(qkv[:3], widths, strict=True):
                    if isinstance(f, tuple):
                        parts["qkv.B"][row:row + f[1].shape[0], col:col + width] = f[1]
                        row += f[1].shape[0]
                    col += width
            wrapper = layer.mlp.experts
            while hasattr(wrapper, "base_layer"):
                if name in getattr(wrapper, "lora_A", {}):
                    param = getattr(wrapper, "parameter_name", None)
                    if param not in EXPERT_PARAMS or wrapper._did_swap_in_out_features:
                        return f"{name} adapts experts.{param} in a layout the fast path does not know"
                    lhs, rhs, scale = wrapper.get_delta_factors(name)
                    seen += 1
                    if not rhs.any():  # a weight the adapter leaves alone (adapter_format.complete_experts)
                        wrapper = wrapper.base_layer
                        continue
                    # grouped matmuls want 16-byte strides, the MXFP4 kernels a power of two: zero-pad the
                    # rank (exact: the padding adds 0)
                    pad = max(16, 1 << (lhs.shape[-1] - 1).bit_length()) - lhs.shape[-1]
                    parts[f"{param}.A"] = torch.nn.functional.pad(lhs, (0, pad))
                    parts[f"{param}.B"] = torch.nn.functional.pad(rhs * scale, (0, 0, 0, pad))
                    if param == "gate_up_proj" and "routed" in self.layers[0]:
                        from engine.serve.mxfp4_kernels import pack_gate_up_a

                        parts[f"{param}.A"] = pack_gate_up_a(parts[f"{param}.A"])
                wrapper = wrapper.base_layer
            parts = self._with_router({k: t.to(self.dtype).contiguous() for k, t in parts.items()}, i)
            for key in MERGED:
                if f"{key}.A" in parts:
                    parts[f"{key}.W"] = self._merged_weight(i, key)
            layers.append(parts)
        total = sum(1 for m in self.hf.modules() if name in (getattr(m, "lora_A", None) or {}))
        if total != seen:
            return f"{name} adapts {total - seen} module(s) besides attention and experts"
        if not seen:
            return f"{name}{NOT_ATTACHED}"
        return _Pack(name, layers)

    def _with_router(self, parts: dict[str, Any], i: int) -> dict[str, Any]:
        """MXFP4 experts with gate_up LoRA: its packed A ([experts * r, hidden]) and layer `i`'s router
        weight stacked as "router.W"/"router.b", so that one GEMV gives every expert's x·A and the
        router's logits (they read the same x); "gate_up_proj.A" becomes a view of it."""
        import torch

        a = parts.get("gate_up_proj.A")
        if a is None or a.dim() != 2:
            return parts
        w = self.layers[i]
        parts["router.W"] = torch.cat([a, w["router_w"].to(a.dtype)])
        parts["gate_up_proj.A"] = parts["router.W"][:a.shape[0]]
        if w["router_b"] is not None:
            parts["router.b"] = torch.cat([a.new_zeros(a.shape[0]), w["router_b"].to(a.dtype)])
        return parts

    def select(self, name: str | None) -> bool:
        """Apply adapter `name` (attached to the PEFT model) from the next token on; None for the base.
        Each adapter has its own CUDA graphs, reading its own tensors; its attention LoRA is merged into
        the shared buffers now (`_merge`). False (with `reason` set) when this decoder cannot run that
        adapter."""
        self.reason = None
        pack = None if name is None else self.prepare(name)
        if isinstance(pack, str):
            self.active, self.reason = None, pack
            if pack.endswith(NOT_ATTACHED):  # not a verdict on the adapter: it may be attached later
                self.packs.pop(name, None)
            return False
        self.active = pack
        self._merge()
        return True

    def record(self, on: bool) -> None:
        """Routes are kept on every forward anyway (they are outputs of the graphs): nothing to do."""

    def release(self) -> None:
        """Nothing to free: the static cache, and what it holds, stay for the next prompt (prefix reuse)."""

    def prepare(self, name: str) -> _Pack | str:
        """Pack adapter `name` now (when it is loaded), so that selecting it later costs nothing."""
        import torch

        if name not in self.packs:
            with torch.inference_mode():
                self.packs[name] = self._pack(name)
            if isinstance(self.packs[name], _Pack):
                self.warm_up(name)
        return self.packs[name]

    def warm_up(self, name: str | None = None) -> None:
        """Compile and capture the step graph for adapter `name` (None: the base) now, while the model or
        adapter loads, so that the first reply does not pay tens of seconds for it. Overwrites the cache:
        only between replies (the engine holds the model lock)."""
        import torch

        if not self.graphs:
            return
        active, self.active = self.active, self.packs.get(name) if name else None
        try:
            token = torch.zeros((1, 1), dtype=torch.long, device=self.device)
            self.prefill(token)
            self.step(token[:, 0])
        finally:
            self.active = active

    def pack_estimate(self, state: dict[str, Any]) -> int:
        """Device memory the packed copy of an adapter with PEFT state dict `state` will take, before it
        is loaded (the residency budget counts it first): each factor in the compute dtype, expert ranks
        padded as `_pack` pads them, q/k/v's B as the block-diagonal product of the three, and with MXFP4
        experts a copy of the router beside gate_up's A (`_with_router`; counted for every layer with an
        expert LoRA, so at most one router too many when only down is adapted)."""
        import re

        size = torch_size(self.dtype)
        qkv_rank: dict[str, int] = {}
        expert_rank: dict[str, int] = {}
        total = 0
        for key, t in state.items():
            if t.dim() != 2 or "lora_" not in key:
                continue
            layer = re.search(r"layers\.(\d+)\.", key)
            if ".experts." in key:  # A [experts * r, in], B [out, r * experts]
                rank = (t.shape[0] if ".lora_A." in key else t.shape[1]) // self.num_experts
                padded = max(16, 1 << (rank - 1).bit_length())
                width = t.shape[1] if ".lora_A." in key else t.shape[0]
                total += self.num_experts * padded * width
                if layer and ".lora_A." in key:
                    expert_rank[layer.group(1)] = max(expert_rank.get(layer.group(1), 0), padded)
            elif re.search(r"\.[qkv]_proj\.lora_A\.", key) and layer:
                qkv_rank[layer.group(1)] = qkv_rank.get(layer.group(1), 0) + t.shape[0]
                total += t.numel()
            elif not re.search(r"\.[qkv]_proj\.lora_B\.", key):
                total += t.numel()
        qkv_width = (self.heads + 2 * self.kv_heads) * self.head_dim
        total += sum(rank * qkv_width for rank in qkv_rank.values())
        if "routed" in self.layers[0]:  # router.W [experts * r + experts, hidden] and router.b
            hidden = self.hf.config.hidden_size
            total += sum(self.num_experts * (hidden + rank + 1) for rank in expert_rank.values())
        return total * size

    def pack_bytes(self, name: str) -> int:
        """Device memory held by adapter `name`'s packed copy (it counts in the residency budget)."""
        pack = self.packs.get(name)
        if not isinstance(pack, _Pack):
            return 0
        shared = {t.untyped_storage().data_ptr() for layer in self._merged for t in layer.values()}
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for layer in pack.layers for t in layer.values()}
        return sum(n for ptr, n in storages.items() if ptr not in shared)

    @property
    def merged_bytes(self) -> int:
        """Device memory of the buffers the selected adapter's attention LoRA is merged into (shared by all
        adapters, allocated with the first one that adapts attention)."""
        return sum(t.numel() * t.element_size() for layer in self._merged for t in layer.values())

    def forget(self, name: str) -> None:
        """Drop the packed copy of `name` and its graphs (unloaded or replaced on disk), and the cache it
        filled: its keys and values are that adapter's."""
        pack = self.packs.pop(name, None)
        if pack is not None and self._owner is pack:
            self._valid, self._owner = False, None
        if pack is not None and self._merged_for is pack:
            self._merged_for = None
        for key in [k for k in self._graphs if k[1] == name]:
            del self._graphs[key]

    @property
    def usable(self) -> bool:
        return self.reason is None

    # ----- the forward pass
    def _forward(self, ids: Any, pos: Any, lora: _Pack | None, block: Any = None) -> tuple[Any, Any, Any]:
        """Logits of each row's last position for `ids` [batch, 1] at position `pos` [1] (a device tensor:
        attention reads the live slots up to it); also the routing [layer, batch, k]."""
        import torch
        import torch.nn.functional as F

        block = block or _block
        h = F.embedding(ids, self.hf.model.embed_tokens.weight).to(self.dtype)
        routes_i, routes_w = [], []
        cos, sin = self.cos[pos], self.sin[pos]  # once for every layer (a gather each)
        for i, w in enumerate(self.layers):
            h, top_i, top_w = block(h, pos, None, None, self.k_cache[i], self.v_cache[i], cos, sin, w,
                                    lora.layers[i] or None if lora is not None else None, self.dims)
            routes_i.append(top_i)
            routes_w.append(top_w)
        norm = self.hf.model.norm
        last = _rms(h[:, -1], norm.weight, norm.variance_epsilon)
        return self._logits(last), torch.stack(routes_i), torch.stack(routes_w)

    def _logits(self, last: Any) -> Any:
        """Logits of the final hidden states: the 8-bit lm_head when it is on, else the checkpoint's own."""
        return (self.head8 or _unwrap(self.hf.lm_head))(last)

    # ----- prefill and steps
    def reusable(self, ids: Any) -> int:
        """How many of prompt `ids`' first tokens the cache already holds for the selected adapter: the
        longest prefix every row shares with what was fed since the last prefill, the prompt's last token
        excepted (its logits are needed)."""
        b, t = ids.shape
        if not (self.reuse and self._valid) or b != self.batch or self._owner is not self.active or self.length == 0:
            return 0
        n = min(self.length, t - 1)
        same = (self.history[:, :n] == ids[:, :n].to(self.device)).all(0)
        return int(same.long().cumprod(0).sum()) if n > 0 else 0

    def prefill(self, ids: Any) -> Any:
        """Prompts `ids` [batch, t] (equal lengths); logits [batch, vocab] of the last. The keys and values
        of the longest prefix that the cache already holds for the same adapter are kept (`reused`): a
        conversation's next turn computes only its new tokens."""
        import torch

        b, t = ids.shape
        if t >= self.max_len:
            raise ValueError(f"prompt of {t} tokens does not fit the {self.max_len}-token cache")
        self._merge()
        with torch.inference_mode():
            if b != self.batch:
                shape = (b, self.kv_heads, self.max_len, self.head_dim)
                self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
                self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
                self.history = torch.zeros((b, self.max_len), dtype=torch.long, device=self.device)
                self._graphs.clear()
                self._pool = None  # a pool outlives its graphs badly: start a fresh one with the new shapes
                self.batch, self._valid = b, False
            kept = self.reusable(ids)
            self._valid, self._owner = False, self.active  # until the forward below has written the cache
            new = ids[:, kept:].to(self.device)
            logits, *routes = self._prefill_forward(new, kept)
            self.history[:, kept:t] = new
        self.length, self.reused, self._valid = t, kept, True
        self.routes = tuple(routes)
        return logits

    def _prefill_forward(self, ids: Any, start: int) -> tuple[Any, Any, Any]:
        """Prompt tokens `ids` [batch, t] at positions `start`...: layer by layer over the whole prompt, so
        that a layer's experts are read (MXFP4: dequantized into a transient bf16 copy for grouped
        matmuls) once however long the prompt is; attention over only the live part of the cache (on
        sliding layers, the window): flash attention on CUDA, else in chunks that bound its scores' memory."""
        import torch
        import torch.nn.functional as F

        from engine.serve.attention import flash_applies

        b, t = ids.shape
        end = start + t
        h = F.embedding(ids, self.hf.model.embed_tokens.weight).to(self.dtype)
        flash = t > 1 and flash_applies(h.device, h.dtype, self.head_dim)
        flat = h.view(1, b * t, -1)  # the experts see rows, batch-major
        routes_i, routes_w = [], []
        for i, w in enumerate(self.layers):
            lora = self.active.layers[i] or None if self.active is not None else None
            window = w["window"]
            # flash attention holds no scores: the whole prompt at once; the reference in chunks
            step = t if flash else self._chunk(b, self.prefill_chunk + window if window else end)
            for s in range(0, t, step):
                e = min(t, s + step)
                first = max(0, start + s - window + 1) if window else 0
                pos = self.arange[start + s:start + e]
                h[:, s:e] = _attend(h[:, s:e], pos, self.arange[first:start + e], first, self.k_cache[i],
                                    self.v_cache[i], self.cos[pos], self.sin[pos], w, lora, self.dims)
            dense = self._dequantized(w) if "routed" in w and b * t >= GROUPED_ROWS else None
            layer_i, layer_w = [], []
            for r in range(0, b * t, MOE_ROWS):
                flat[:, r:r + MOE_ROWS], top_i, top_w = _moe(flat[:, r:r + MOE_ROWS], w, lora, self.dims, dense)
                layer_i.append(top_i)
                layer_w.append(top_w)
            dense = None  # freed before the next layer's copy is made
            routes_i.append(torch.cat(layer_i))
            routes_w.append(torch.cat(layer_w))
        norm = self.hf.model.norm
        last = _rms(h[:, -1], norm.weight, norm.variance_epsilon)
        return self._logits(last), torch.stack(routes_i), torch.stack(routes_w)

    def _chunk(self, b: int, span: int) -> int:
        """Prompt tokens per attention chunk: one layer's fp32 scores over `span` keys stay under SCORES_BYTES."""
        return max(16, min(self.prefill_chunk, SCORES_BYTES // (b * self.heads * span * 4)))

    def _dequantized(self, w: dict) -> dict[str, Any]:
        """A layer's MXFP4 experts as [experts, in, out] views of a transient copy in the compute dtype."""
        from engine.serve.mxfp4_kernels import dequantized

        return {p: dequantized(w[f"{p}_blocks"], w[f"{p}_scales"], self.dtype).transpose(1, 2) for p in EXPERT_PARAMS}

    @property
    def full(self) -> bool:
        return self.length >= self.max_len

    def step(self, tokens: Any) -> Any:
        """Feed one token per row ([batch]); logits [batch, vocab]. On CUDA the returned tensors are the
        graph's static outputs: read them before the next step."""
        import torch

        if self.full:
            raise ValueError(f"the {self.max_len}-token cache is full")
        valid, self._valid = self._valid, False  # until the step has written its keys and values
        self._merge()
        with torch.inference_mode():
            if not self.graphs:
                pos = self.arange[self.length:self.length + 1]
                logits, *routes = self._forward(tokens.view(-1, 1).to(self.device), pos, self.active)
            else:  # a graph reads the position from a device tensor: one graph for every position
                logits, *routes = self._replay(tokens)
            self.history[:, self.length] = tokens.view(-1)
        self.length += 1
        self._valid = valid
        self.routes = tuple(routes)
        return logits

    def _step_block(self) -> Any:
        """The layer function graph steps run: compiled once (fixed shapes: one token per row, the
        position a device tensor, so one compilation serves every position)."""
        import torch

        if not self.compile:
            return _block
        if self.compiled is None:
            # one compilation per (adapter or not, window, batch): more than dynamo's default 8 in a process
            # that runs several decoders (the bench), and past the limit a step silently runs eagerly
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.compiled = torch.compile(_block, dynamic=False, fullgraph=True)
        return self.compiled

    def _replay(self, tokens: Any) -> tuple[Any, Any, Any]:
        import torch

        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            self._tok = torch.zeros((self.batch, 1), dtype=torch.long, device=self.device)
            self._pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self._tok.copy_(tokens.view(-1, 1))
        self._pos.fill_(self.length)
        lora = self.active
        key = (self.batch, lora.name if lora is not None else None, self.head8 is not None)
        if key not in self._graphs:
            block = self._step_block()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), _compile_config():  # warm-up outside capture: compiles, sets up cuBLAS
                try:
                    self._forward(self._tok, self._pos, lora, block)
                except Exception as e:  # a torch.compile failure must cost speed, not the reply
                    self.compile, self.compiled, block = False, None, _block
                    self.note = f"torch.compile failed, steps run uncompiled: {type(e).__name__}: {e}"[:500]
                    self._forward(self._tok, self._pos, lora, block)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                outputs = self._forward(self._tok, self._pos, lora, block)
            self._graphs[key] = (graph, outputs)
        graph, outputs = self._graphs[key]
        graph.replay()
        return outputs


def _rows_of_one(linears: list[Any]) -> Any:
    """The weights of `linears` (same input) stacked as one [sum of outputs, in] tensor, so that one GEMV
    computes them all; the modules' own weights become views of it: the stack costs no memory."""
    import torch

    weights = [m.weight for m in linears]
    with torch.no_grad():
        stacked = torch.cat([wt.detach() for wt in weights])
        row = 0
        for wt in weights:
            wt.data = stacked[row:row + wt.shape[0]]
            row += wt.shape[0]
    return stacked


def torch_size(dtype: Any) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def _compile_config() -> Any:
    """Inductor settings for compiling the decode layer: unsloth sets global ones for training (one
    compile thread, autotuning) that make this compile take minutes; these take tens of seconds."""
    import os

    import torch._inductor.config as inductor

    return inductor.patch(compile_threads=max(1, min(16, os.cpu_count() or 1)), max_autotune=False,
                          max_autotune_gemm=False, coordinate_descent_tuning=False, epilogue_fusion=True)


# ----- one decoder layer, as plain functions of tensors: the same code runs eagerly (prefill, CPU) and
# compiled (CUDA decode steps), where torch.compile fuses the many small element-wise kernels.
def _rms(x: Any, weight: Any, eps: float) -> Any:
    import torch

    h = x.float()
    return (weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)


def _lin(x: Any, w: dict, lora: dict | None, key: str) -> Any:
    """x · W^T + b for q/k/v (`key` "qkv") or o_proj ("o_proj"): W the base weight, or the buffer that the
    active adapter's LoRA is merged into (`FastDecoder._merge`)."""
    import torch.nn.functional as F

    merged = lora.get(f"{key}.W") if lora is not None else None
    return F.linear(x, w[f"{key}_w"] if merged is None else merged, w[f"{key}_b"])


def _top_k(logits: Any, k: int) -> tuple[Any, Any]:
    """torch.topk(logits, k) for a step's few rows, as k max-reductions over the experts: compiled, one
    small fused kernel where torch.topk launches two (a gather and a sort). Ties go to the lower index."""
    import torch

    values, indices = [], []
    experts = torch.arange(logits.shape[-1], device=logits.device)
    for _ in range(k):
        v, i = logits.max(-1, keepdim=True)
        values.append(v)
        indices.append(i)
        logits = logits.masked_fill(experts == i, float("-inf"))
    return torch.cat(values, -1), torch.cat(indices, -1)


def _block(h: Any, pos: Any, kpos: Any, first: int | None, k_cache: Any, v_cache: Any, cos: Any, sin: Any,
           w: dict, lora: dict | None, dims: tuple[int, int, int, int, int]) -> tuple[Any, Any, Any]:
    """One GPT-OSS decoder layer for `h` [batch, t, hidden] at positions `pos` [t]: writes this chunk's
    keys and values into the caches and attends to cache slots `kpos` (see `_attend`). Returns (h,
    top-k experts, their weights)."""
    return _moe(_attend(h, pos, kpos, first, k_cache, v_cache, cos, sin, w, lora, dims), w, lora, dims)


def _attend(h: Any, pos: Any, kpos: Any, first: int | None, k_cache: Any, v_cache: Any, cos: Any, sin: Any,
            w: dict, lora: dict | None, dims: tuple[int, int, int, int, int]) -> Any:
    """The attention half of a layer (residual added): writes the keys and values of positions `pos` into
    the caches and attends to slots `kpos` starting at slot `first`, or (`kpos` None: a one-token step,
    whose graph serves every position) to every live slot (engine/serve/attention.py)."""
    import torch

    from engine.serve import attention

    heads, kv_heads, hd, _, _ = dims
    b, t, _ = h.shape
    x = _rms(h, w["ln1"], w["eps1"])
    q, k, v = _lin(x, w, lora, "qkv").split([heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
    q = q.view(b, t, heads, hd).transpose(1, 2)
    k = k.view(b, t, kv_heads, hd).transpose(1, 2)
    v = v.view(b, t, kv_heads, hd).transpose(1, 2)

    def rope(z: Any) -> Any:
        z1, z2 = z.chunk(2, dim=-1)
        return torch.cat((z1 * cos - z2 * sin, z2 * cos + z1 * sin), dim=-1)

    q, k = rope(q), rope(k)
    k_cache.index_copy_(2, pos, k)
    v_cache.index_copy_(2, pos, v)
    out = attention.attend(q, k_cache, v_cache, pos, kpos, first, w["sinks"], w["scaling"], w["window"])
    return h + _lin(out, w, lora, "o_proj")


def _moe(h: Any, w: dict, lora: dict | None, dims: tuple[int, int, int, int, int],
         weights: dict[str, Any] | None = None) -> tuple[Any, Any, Any]:
    """The experts half of a layer (residual added): only the routed experts' weights (and LoRA factors)
    are read. MXFP4 experts go through the routed-pair kernels unless `weights` holds them dequantized
    ([experts, in, out] per parameter, as bf16 experts are held): then, as bf16, grouped matmuls."""
    import torch
    import torch.nn.functional as F

    _, _, _, top_k, num_experts = dims
    b, t, d = h.shape
    x = _rms(h, w["ln2"], w["eps2"]).reshape(-1, d)
    xa = None
    if lora is not None and "router.W" in lora:  # the router's logits and gate_up LoRA's x·A, one product
        xa, logits = F.linear(x, lora["router.W"], lora.get("router.b")).split([lora["gate_up_proj.A"].shape[0],
                                                                              num_experts], dim=-1)
    else:
        logits = F.linear(x, w["router_w"], w["router_b"])
    top_v, top_i = _top_k(logits, top_k) if t == 1 else torch.topk(logits, top_k, dim=-1)
    gates = torch.softmax(top_v, dim=-1, dtype=top_v.dtype)
    if "routed" in w and weights is None:  # MXFP4: mxfp4_kernels.routed_experts
        return h + w["routed"](x, top_i, gates, w, lora, xa).view(b, t, d), top_i, gates
    moe = _grouped_experts(x, top_i, gates, weights or w, w, lora, num_experts)
    return h + moe.view(b, t, d), top_i, gates


def _grouped_experts(x: Any, top_i: Any, gates: Any, weights: dict[str, Any], w: dict, lora: dict | None,
                     num_experts: int) -> Any:
    """Grouped matmuls over the (row, expert) pairs sorted by expert: one GEMM per expert's group of rows,
    the expert LoRA as two more."""
    import torch
    import torch.nn.functional as F

    top_k = top_i.shape[1]
    experts, perm = torch.sort(top_i.reshape(-1))
    rows = x[perm // top_k]
    counts = (experts[:, None] == torch.arange(num_experts, device=x.device)[None, :]).sum(0)
    offs = torch.cumsum(counts, dim=0, dtype=torch.int32)

    def grouped(z: Any, param: str) -> Any:
        y = F.grouped_mm(z, weights[param], offs=offs) + w[f"{param}_bias"][experts]
        if lora is not None and f"{param}.A" in lora:
            a = lora[f"{param}.A"]
            if a.dim() == 2:  # MXFP4 packing of gate_up's A: [experts * r, in], every expert's x·A at once
                za = F.linear(x, a).view(x.shape[0], num_experts, -1)[perm // top_k, experts]
            else:
                za = F.grouped_mm(z, a, offs=offs)
            y = y + F.grouped_mm(za, lora[f"{param}.B"], offs=offs)
        return y

    gate_up = grouped(rows, "gate_up_proj")
    gate = gate_up[..., ::2].clamp(max=w["limit"])
    up = gate_up[..., 1::2].clamp(-w["limit"], w["limit"])
    down = grouped((up + 1) * (gate * torch.sigmoid(gate * w["alpha"])), "down_proj")
    # Summed in fp32: index_add_ adds the k experts of a row by atomics in no fixed order, and in bf16 each
    # add rounds, so a run differed from the next by enough to flip a later layer's expert choice.
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    return out.index_add_(0, perm // top_k, (down * gates.reshape(-1)[perm, None]).float()).to(x.dtype)
