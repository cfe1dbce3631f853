"""Fast GPT-OSS decoding: a static KV cache, expert LoRA on the routed experts only, CUDA graphs.

Why not the model's own forward: PEFT adapts fused experts (`target_parameters`) by adding the LoRA
delta of all 32 experts to the weights on every forward (6.5 tok/s with a specialist on the 20B shape),
and transformers' forward spends most of a decode step in Python. This decoder reads the weights of a
loaded GptOssForCausalLM (PEFT-wrapped or not) and runs the same math itself: experts as grouped
matmuls over the routed (token, expert) pairs, an adapter's expert LoRA the same way over its
per-expert factors, and on CUDA each one-token step replayed as a CUDA graph, one per cache-length
bucket. Tests compare its logits with the PEFT model's.

An adapter is packed once into one flat buffer; switching copies it into the slot the graphs read, a
single device copy. Adapters that adapt anything else (DoRA, bias, other modules), quantized weights
and non-GPT-OSS models are refused with a reason, and the engine uses the reference path for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_PARAMS = ("gate_up_proj", "down_proj")
BUCKET = 256  # attention reads the cache up to the next multiple of this: one graph per bucket
PREFILL_CHUNK = 512  # prompt tokens per eager forward: bounds the attention scores' memory


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
    layer = hf.model.layers[0]
    experts = _unwrap(layer.mlp.experts)
    w = getattr(experts, "gate_up_proj", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 3:
        return "experts are not fused 3-D tensors (a quantized or per-expert checkpoint)"
    q = _unwrap(layer.self_attn.q_proj)
    if type(q) is not torch.nn.Linear or q.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"attention weights are {type(q).__name__}/{q.weight.dtype}, not plain floating point"
    if w.device.type == "cuda" and w.dtype != torch.bfloat16:
        return f"grouped matmuls on CUDA need bf16 weights, these are {w.dtype}"
    return None


@dataclass
class _Pack:
    """One adapter's LoRA factors in the decoder's layout, all views into one flat buffer."""

    layout: tuple[tuple[str, tuple[int, ...]], ...]
    flat: Any
    parts: dict[str, Any]

    @classmethod
    def build(cls, tensors: dict[str, Any], dtype: Any, device: Any) -> _Pack:
        import torch

        layout = tuple((k, tuple(t.shape)) for k, t in tensors.items())
        flat = torch.empty(sum(t.numel() for t in tensors.values()), dtype=dtype, device=device)
        parts, at = {}, 0
        for k, t in tensors.items():
            parts[k] = flat[at:at + t.numel()].view(t.shape)
            parts[k].copy_(t)
            at += t.numel()
        return cls(layout, flat, parts)

    def empty_like(self) -> _Pack:
        import torch

        return _Pack.build({k: torch.zeros_like(v) for k, v in self.parts.items()}, self.flat.dtype, self.flat.device)


class FastDecoder:
    """Prefill and one-token steps for one GPT-OSS model, batch rows in lockstep. Not thread-safe:
    the engine calls it under the model's lock."""

    def __init__(self, model: Any, max_len: int, graphs: bool | None = None, prefill_chunk: int = PREFILL_CHUNK):
        import torch

        reason = unsupported(model)
        if reason:
            raise ValueError(f"fast decoding does not apply: {reason}")
        self.hf = _hf_model(model)
        cfg = self.hf.config
        self.cfg = cfg
        emb = self.hf.model.embed_tokens.weight
        self.device, self.dtype = emb.device, _unwrap(self.hf.model.layers[0].mlp.experts).gate_up_proj.dtype
        self.max_len = max_len
        self.prefill_chunk = prefill_chunk
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.top_k, self.num_experts = cfg.num_experts_per_tok, cfg.num_local_experts
        self.layers = [self._layer_weights(i, layer) for i, layer in enumerate(self.hf.model.layers)]
        with torch.inference_mode():
            pos = torch.arange(max_len, device=self.device)
            cos, sin = self.hf.model.rotary_emb(emb[:1].to(self.dtype), pos[None])
            self.cos, self.sin = cos[0], sin[0]
            self.arange = pos
        self.batch = 0
        self.length = 0  # tokens in the cache
        self.packs: dict[str, _Pack | str] = {}  # adapter name -> pack, or why it cannot be packed
        self.slots: dict[tuple, _Pack] = {}  # layout -> the buffer the graphs read
        self.slot_holds: dict[tuple, str] = {}
        self.active: _Pack | None = None
        self.reason: str | None = None  # set while the selected adapter is one the fast path refuses
        self.routes: tuple[Any, Any] | None = None  # last forward's (indices, weights): [layer, row, k]
        self._graphs: dict[tuple, tuple[Any, Any]] = {}
        self._pool = None

    # ----- weights
    def _layer_weights(self, i: int, layer: Any) -> dict[str, Any]:
        attn, mlp = layer.self_attn, layer.mlp
        experts = _unwrap(mlp.experts)
        w = {p: _unwrap(getattr(attn, p)) for p in ATTENTION}
        return {
            "ln1": layer.input_layernorm, "ln2": layer.post_attention_layernorm,
            **{p: (m.weight, m.bias) for p, m in w.items()},
            "sinks": attn.sinks, "window": attn.sliding_window, "scaling": attn.scaling,
            "router": (_unwrap(mlp.router).weight, _unwrap(mlp.router).bias),
            "gate_up_proj": (experts.gate_up_proj, experts.gate_up_proj_bias),
            "down_proj": (experts.down_proj, experts.down_proj_bias),
            "alpha": experts.alpha, "limit": experts.limit,
        }

    def _pack(self, name: str) -> _Pack | str:
        """Read adapter `name`'s factors from the PEFT layers: attention as (A^T, scaling*B^T), experts as
        PEFT's own per-expert (lhs, scaling*rhs). A string says why it cannot be packed."""
        tensors: dict[str, Any] = {}
        seen = 0
        for i, layer in enumerate(self.hf.model.layers):
            for p in ATTENTION:
                m = getattr(layer.self_attn, p)
                if name not in getattr(m, "lora_A", {}):
                    continue
                if m.use_dora.get(name) or m.lora_B[name].bias is not None:
                    return f"{name} uses DoRA or a LoRA bias on {p}"
                s = m.scaling[name]
                tensors[f"{i}.{p}.A"] = m.lora_A[name].weight.t()
                tensors[f"{i}.{p}.B"] = m.lora_B[name].weight.t() * s
                seen += 1
            wrapper = layer.mlp.experts
            while hasattr(wrapper, "base_layer"):
                if name in getattr(wrapper, "lora_A", {}):
                    param = getattr(wrapper, "parameter_name", None)
                    if param not in EXPERT_PARAMS or wrapper._did_swap_in_out_features:
                        return f"{name} adapts experts.{param} in a layout the fast path does not know"
                    lhs, rhs, s = wrapper.get_delta_factors(name)
                    tensors[f"{i}.{param}.A"] = lhs
                    tensors[f"{i}.{param}.B"] = rhs * s
                    seen += 1
                wrapper = wrapper.base_layer
        total = sum(1 for m in self.hf.modules() if name in (getattr(m, "lora_A", None) or {}))
        if total != seen:
            return f"{name} adapts {total - seen} module(s) besides attention and experts"
        if not tensors:
            return f"{name} is not attached to the model"
        return _Pack.build(tensors, self.dtype, self.device)

    def select(self, name: str | None) -> None:
        """Apply adapter `name` (attached to the PEFT model) from the next token on; None for the base."""
        import torch

        self.reason = None
        if name is None:
            self.active = None
            return
        pack = self.prepare(name)
        if isinstance(pack, str):
            self.active, self.reason = None, pack
            return
        slot = self.slots.get(pack.layout)
        if slot is None:
            with torch.inference_mode():
                slot = self.slots[pack.layout] = pack.empty_like()
        if self.slot_holds.get(pack.layout) != name:
            with torch.inference_mode():
                slot.flat.copy_(pack.flat)
            self.slot_holds[pack.layout] = name
        self.active = slot

    def prepare(self, name: str) -> _Pack | str:
        """Pack adapter `name` now (when it is loaded), so that selecting it later is one copy."""
        import torch

        if name not in self.packs:
            with torch.inference_mode():
                self.packs[name] = self._pack(name)
        return self.packs[name]

    def forget(self, name: str) -> None:
        """Drop the packed copy of `name` (unloaded or replaced on disk)."""
        self.packs.pop(name, None)
        for layout, held in list(self.slot_holds.items()):
            if held == name:
                del self.slot_holds[layout]

    @property
    def usable(self) -> bool:
        return self.reason is None

    # ----- the forward pass
    @staticmethod
    def _norm(x: Any, norm: Any) -> Any:
        import torch

        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return (norm.weight * h).to(x.dtype)

    @staticmethod
    def _linear(x: Any, wb: tuple[Any, Any], lora: _Pack | None, key: str) -> Any:
        import torch.nn.functional as F

        y = F.linear(x, *wb)
        if lora is not None and f"{key}.A" in lora.parts:
            y = y + (x @ lora.parts[f"{key}.A"]) @ lora.parts[f"{key}.B"]
        return y

    def _attention(self, i: int, w: dict, x: Any, pos: Any, span: int, lora: _Pack | None) -> Any:
        import torch

        b, t, _ = x.shape
        hd, kvh, g = self.head_dim, self.kv_heads, self.heads // self.kv_heads
        q = self._linear(x, w["q_proj"], lora, f"{i}.q_proj").view(b, t, -1, hd).transpose(1, 2)
        k = self._linear(x, w["k_proj"], lora, f"{i}.k_proj").view(b, t, -1, hd).transpose(1, 2)
        v = self._linear(x, w["v_proj"], lora, f"{i}.v_proj").view(b, t, -1, hd).transpose(1, 2)
        cos, sin = self.cos[pos], self.sin[pos]

        def rope(z: Any) -> Any:
            z1, z2 = z.chunk(2, dim=-1)
            return torch.cat((z1 * cos - z2 * sin, z2 * cos + z1 * sin), dim=-1)

        q, k = rope(q), rope(k)
        self.k_cache[i].index_copy_(2, pos, k)
        self.v_cache[i].index_copy_(2, pos, v)
        keys, values = self.k_cache[i][:, :, :span], self.v_cache[i][:, :, :span]
        kpos = self.arange[:span]
        allowed = kpos[None, :] <= pos[:, None]
        if w["window"]:
            allowed = allowed & (kpos[None, :] > pos[:, None] - w["window"])
        mask = torch.zeros(allowed.shape, device=x.device).masked_fill_(~allowed, float("-inf"))
        scores = (q.reshape(b, kvh, g * t, hd) @ keys.transpose(-1, -2)).float() * w["scaling"]
        scores = scores.view(b, kvh, g, t, span) + mask
        sink = w["sinks"].float().view(1, kvh, g, 1)
        top = torch.maximum(scores.amax(-1), sink)
        p = torch.exp(scores - top[..., None])
        p = p / (p.sum(-1) + torch.exp(sink - top))[..., None]
        out = (p.to(values.dtype).view(b, kvh, g * t, span) @ values).view(b, kvh, g, t, hd)
        out = out.permute(0, 3, 1, 2, 4).reshape(b, t, -1)
        return self._linear(out, w["o_proj"], lora, f"{i}.o_proj")

    def _experts(self, i: int, w: dict, x: Any, lora: _Pack | None) -> tuple[Any, Any, Any]:
        """Grouped matmuls over (token, expert) pairs sorted by expert: only routed experts' weights
        (and LoRA factors) are read."""
        import torch
        import torch.nn.functional as F

        logits = F.linear(x, *w["router"])
        top_v, top_i = torch.topk(logits, self.top_k, dim=-1)
        weights = torch.softmax(top_v, dim=-1, dtype=top_v.dtype)
        experts, perm = torch.sort(top_i.reshape(-1))
        rows = x[perm // self.top_k]
        counts = torch.histc(experts.float() if x.device.type != "cuda" else experts.int(),
                             bins=self.num_experts, min=0, max=self.num_experts - 1)
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)

        def grouped(h: Any, param: str) -> Any:
            weight, bias = w[param]
            y = F.grouped_mm(h, weight, offs=offs) + bias[experts]
            if lora is not None and f"{i}.{param}.A" in lora.parts:
                mid = F.grouped_mm(h, lora.parts[f"{i}.{param}.A"], offs=offs)
                y = y + F.grouped_mm(mid, lora.parts[f"{i}.{param}.B"], offs=offs)
            return y

        gate_up = grouped(rows, "gate_up_proj")
        gate, up = gate_up[..., ::2].clamp(max=w["limit"]), gate_up[..., 1::2].clamp(-w["limit"], w["limit"])
        hidden = (up + 1) * (gate * torch.sigmoid(gate * w["alpha"]))
        down = grouped(hidden, "down_proj") * weights.reshape(-1)[perm, None]
        out = torch.zeros_like(x).index_add_(0, perm // self.top_k, down)
        return out, top_i, weights

    def _forward(self, ids: Any, pos: Any, span: int, lora: _Pack | None) -> tuple[Any, Any, Any]:
        """Logits of each row's last position for `ids` [batch, t] at positions `pos` [t], attending
        to the first `span` cache slots; also the routing [layer, batch*t, k]."""
        import torch
        import torch.nn.functional as F

        h = F.embedding(ids, self.hf.model.embed_tokens.weight).to(self.dtype)
        b, t, d = h.shape
        routes_i, routes_w = [], []
        for i, w in enumerate(self.layers):
            h = h + self._attention(i, w, self._norm(h, w["ln1"]), pos, span, lora)
            moe, top_i, top_w = self._experts(i, w, self._norm(h, w["ln2"]).reshape(-1, d), lora)
            h = h + moe.view(b, t, d)
            routes_i.append(top_i)
            routes_w.append(top_w)
        last = self._norm(h[:, -1], self.hf.model.norm)
        return _unwrap(self.hf.lm_head)(last), torch.stack(routes_i), torch.stack(routes_w)

    # ----- prefill and steps
    def _span(self, end: int) -> int:
        return min(self.max_len, -(-end // BUCKET) * BUCKET)

    def prefill(self, ids: Any) -> Any:
        """Start over with prompts `ids` [batch, t] (equal lengths); logits [batch, vocab] of the last."""
        import torch

        b, t = ids.shape
        if t >= self.max_len:
            raise ValueError(f"prompt of {t} tokens does not fit the {self.max_len}-token cache")
        with torch.inference_mode():
            if b != self.batch:
                shape = (b, self.kv_heads, self.max_len, self.head_dim)
                self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
                self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
                self._graphs.clear()
                self._pool = None  # a pool outlives its graphs badly: start a fresh one with the new shapes
                self.batch = b
            for start in range(0, t, self.prefill_chunk):
                chunk = ids[:, start:start + self.prefill_chunk].to(self.device)
                end = start + chunk.shape[1]
                logits, *routes = self._forward(chunk, self.arange[start:end], self._span(end), self.active)
        self.length = t
        self.routes = tuple(routes)
        return logits

    @property
    def full(self) -> bool:
        return self.length >= self.max_len

    def step(self, tokens: Any) -> Any:
        """Feed one token per row ([batch]); logits [batch, vocab]. On CUDA the returned tensors are the
        graph's static outputs: read them before the next step."""
        import torch

        if self.full:
            raise ValueError(f"the {self.max_len}-token cache is full")
        span = self._span(self.length + 1)
        with torch.inference_mode():
            if not self.graphs:
                pos = self.arange[self.length:self.length + 1]
                logits, *routes = self._forward(tokens.view(-1, 1).to(self.device), pos, span, self.active)
            else:
                logits, *routes = self._replay(tokens, span)
        self.length += 1
        self.routes = tuple(routes)
        return logits

    def _replay(self, tokens: Any, span: int) -> tuple[Any, Any, Any]:
        import torch

        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            self._tok = torch.zeros((self.batch, 1), dtype=torch.long, device=self.device)
            self._pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self._tok.copy_(tokens.view(-1, 1))
        self._pos.fill_(self.length)
        lora = self.active
        key = (self.batch, span, lora.layout if lora is not None else None)
        if key not in self._graphs:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside capture (allocator, cuBLAS workspaces)
                self._forward(self._tok, self._pos, span, lora)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                outputs = self._forward(self._tok, self._pos, span, lora)
            self._graphs[key] = (graph, outputs)
        graph, outputs = self._graphs[key]
        graph.replay()
        return outputs
