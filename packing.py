"""CPU decoding on MKL-packed weights: the sampler's copy of the model's float32 matrices, laid out once for the
batch size it decodes (cblas_sgemm_pack, reached through torch.ops.mkl), and the one-token step that runs on it.

A decode step of a few rows is a few hundred skinny matrix products, each reading a whole weight matrix, with
about a thousand small calls between them. MKL's packed sgemm runs the products 1.5-2x faster than the plain
call on our 2-core Xeon (SmolLM2, 16 rows: 56 vs 81 ms a step). The small calls then cost more than their
arithmetic: each one that follows a product finds its caches flushed by megabytes of weights and runs about
twice as slowly as it does warm. So the step here makes as few calls as it can: q|k|v and gate|up are one
product each, RoPE turns q and k in one call, the cache's slices for the step are cut once for all layers, and
no module is called. Against the same packed products reached through the modules this decodes SmolLM2 13%
faster at 16 rows and 22% faster at 8 (172 vs 152 and 115 vs 94 tokens/s, three interleaved runs).

The math is model.py's (DecoderLayer, Attention, MLP) for one new token per row; tests/test_sampler.py checks that both
give the same samples and log-probabilities. An enabled LoRA adapter is packed merged, W + scale B A, so the
policy decodes at the base model's speed.
"""
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lora import LoRALinear
from model import apply_rope

# Decode batches that run on packs. At 1 row the packed product is no faster (both are a matrix-vector read),
# but the lean step still saves its calls: batch 1 decodes 15-20% faster (17.5 vs 14.5 tokens/s, SmolLM2).
PACK_ROWS = range(1, 65)
PACK_MIN = 128  # a matrix narrower than this gains nothing from packing (tiny test models fall back)


@dataclass
class Pack:
    packed: torch.Tensor  # MKL's opaque layout of W (out, in) for `rows` rows
    shape: torch.Tensor  # a stride-0 (out, in) tensor: _mkl_linear reads the product's size from it
    bias: torch.Tensor | None
    deps: list  # (tensor, version) of every tensor W and b were made from: the pack is current while all match


def _mm(x, pack, rows):
    """x (rows, in) -> x W^T + b (rows, out) on a pack."""
    return torch.ops.mkl._mkl_linear(x, pack.packed, pack.shape, pack.bias, rows)


def _base(mod):
    """The Linear a projection multiplies by: itself, or the one a LoRALinear wraps."""
    return mod.base_layer if isinstance(mod, LoRALinear) else mod


def _source(mod):
    """What a projection (a Linear, or a LoRALinear around one) multiplies by: a function making its weight
    (an enabled adapter merged in), its bias, and the tensors both are made of."""
    base = _base(mod)
    deps = [base.weight] + ([] if base.bias is None else [base.bias])
    if isinstance(mod, LoRALinear) and mod.enabled:
        return mod.merged_weight, base.bias, deps + [mod.lora_A.weight, mod.lora_B.weight]
    return (lambda: base.weight), base.bias, deps


def _norm(x, norm):
    """model.RMSNorm's float32 path."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.eps)


class PackedDecoder:
    """The packed copy of a model's projections for decoding exactly `rows` rows on a CPU, and its step.

    The copy costs memory (one more float32 copy of the weights) and 0.4 s to build for SmolLM2, so it is kept
    across calls and rebuilt only for a new row count or when a weight it was made of was replaced or changed
    in place (an optimiser step on the adapter): the tensor and its version counter are checked on every
    `prepare`. The model itself never carries a pack: training, state_dict and deepcopy never see one."""

    def __init__(self, model):
        self.model, self.rows, self.packs = model, None, {}
        self._fits = None

    def _groups(self):
        """The products of one step, each a key and the projections stacked into it (in output order)."""
        for i, layer in enumerate(self.model.model.layers):
            a, m = layer.self_attn, layer.mlp
            yield (i, "qkv"), (a.q_proj, a.k_proj, a.v_proj)
            yield (i, "o"), (a.o_proj,)
            yield (i, "gate_up"), (m.gate_proj, m.up_proj)
            yield (i, "down"), (m.down_proj,)
        yield "head", (self.model.lm_head,)

    @property
    def available(self):
        """CPU, float32, an MKL build, every product wide enough to gain, and room for the copy: at most half the
        free memory (a 3B model in float32 is 12 GB, and a second 12 GB would not fit our 24 GB machine)."""
        w = self.model.lm_head.weight
        if not (w.device.type == "cpu" and w.dtype == torch.float32 and torch.backends.mkl.is_available()):
            return False
        if self._fits is None:
            shapes = [(sum(_base(m).out_features for m in mods), _base(mods[0]).in_features)  # (out, in)
                      for _, mods in self._groups()]
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            self._fits = (min(min(s) for s in shapes) >= PACK_MIN
                          and sum(4 * o * i for o, i in shapes) <= free // 2)
        return self._fits

    def prepare(self, rows) -> bool:
        """Packs for decoding `rows` rows, reusing the current ones. False (and no packs) when a weight is an
        inference tensor, which has no version counter to tell a stale pack by."""
        old = self.packs if rows == self.rows else {}
        self.packs, self.rows = {}, None  # packs for another row count are freed before new ones are built
        packs = {}
        for key, mods in self._groups():
            srcs = [_source(m) for m in mods]
            deps = [t for _, _, ts in srcs for t in ts]
            if any(t.is_inference() for t in deps):
                return False
            p = old.get(key)
            if p is None or len(p.deps) != len(deps) or any(
                    t is not d or v != d._version for (t, v), d in zip(p.deps, deps)):
                w = (srcs[0][0]() if len(srcs) == 1 else torch.cat([make() for make, _, _ in srcs])).detach()
                bias = None
                if any(b is not None for _, b, _ in srcs):  # a part without a bias adds zeros
                    bias = torch.cat([b if b is not None else w.new_zeros(_base(mod).out_features)
                                      for (_, b, _), mod in zip(srcs, mods)]).detach()
                p = Pack(torch.ops.mkl._mkl_reorder_linear_weight(w, rows), w.new_zeros(()).expand(w.shape),
                         bias, [(t, t._version) for t in deps])
            packs[key] = p
        self.packs, self.rows = packs, rows
        return True

    def step(self, cache, tok, pos):
        """Logits (B, V) of the next token after tokens tok (B,) at positions pos (B,), B = self.rows = the
        cache's live rows; writes their keys and values into the cache (the caller advances its length)."""
        m, cfg, P, B = self.model, self.model.config, self.packs, tok.shape[0]
        H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        assert B == self.rows == cache.rows, f"packs for {self.rows} rows, {B} tokens, {cache.rows} cache rows"
        cos, sin = m.rope(pos)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, D): the same for every head
        views = cache.step_views()
        x = m.model.embed_tokens(tok)  # (B, C)
        for i, layer in enumerate(m.model.layers):
            attn = layer.self_attn
            qkv = _mm(_norm(x, layer.input_layernorm), P[i, "qkv"], B)  # (B, (H + 2 Hkv) D)
            qk = qkv[:, :(H + Hkv) * D].view(B, H + Hkv, D)
            if hasattr(attn, "q_norm"):  # Qwen3 normalises each head before RoPE
                qk = torch.cat((attn.q_norm(qk[:, :H]), attn.k_norm(qk[:, H:])), 1)
            qk = apply_rope(qk, cos, sin)  # q and k heads in one call
            y = cache.attend_step(i, views, qk[:, :H], qk[:, H:], qkv[:, (H + Hkv) * D:].view(B, Hkv, D))
            x = x + _mm(y.reshape(B, H * D), P[i, "o"], B)
            gu = _mm(_norm(x, layer.post_attention_layernorm), P[i, "gate_up"], B)  # (B, 2I)
            half = gu.shape[1] // 2
            x = x + _mm(F.silu(gu[:, :half]) * gu[:, half:], P[i, "down"], B)
        return _mm(_norm(x, m.model.norm), P["head"], B)

