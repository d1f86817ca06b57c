"""CPU decoding on packed weights: the sampler's copy of the model's matrices, laid out once for the batch size it
decodes, and the lean one-token step that runs on it.

A decode step of a few rows is a few hundred skinny matrix products, each reading a whole weight matrix, with
about a thousand small calls between them. A library's packed product (weights reordered once for a known row
count) runs them faster than the plain call, and the small calls cost more than their arithmetic: each one that
follows a product finds its caches flushed by megabytes of weights and runs about twice as slowly as it does
warm. So the step here makes as few calls as it can: q|k|v and gate|up are one product each, RoPE turns q and
k in one call, the cache's slices for the step are cut once for all layers, and no module is called.

Which library packs best depends on the CPU (docs/performance.md has which won where), so the float32 kernel is chosen by measurement the first time the sampler
packs, on the model's own products, and kept for the machine (`KERNELS`, `PackedDecoder.choice`, printed by
`scripts/bench.py sample`; fast/cpu_linear.py says why once per machine). The
int8 kernel (fbgemm: weights quantized per output channel, activations per row batch at run time) reads a
quarter of the bytes, the bfloat16 one (oneDNN) half; they change the numbers, so they are used only when asked
(`FastStep(model, weights="int8")` or `"bfloat16"`: fast/decode.py).

The math is model.py's (DecoderLayer, Attention, MLP) for one new token per row; tests/test_sampler.py checks
that both give the same samples and log-probabilities (int8: a bounded KL). An enabled LoRA adapter is packed
merged, W + scale B A, so the policy decodes at the base model's speed.
"""
import os
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fast.cpu_linear import remembered
from lora import LoRALinear
from model import apply_rope

# Decode batches that run on packs. At 1 row the packed product is no faster than the plain one (both are a
# matrix-vector read), but the lean step still saves its calls.
PACK_ROWS = range(1, 65)
PACK_MIN = 128  # a matrix narrower than this gains nothing from packing (tiny test models fall back)
TUNE_BYTES = 96 << 20  # weights timed when choosing a kernel: well past a last-level cache


class CopyRefused(ValueError):
    """Low-precision decode copies ("int8", "bfloat16") asked for where they would not be used: raised rather
    than decode in float32 under their name. `reason` is for a caller's own one-line error (run.py, scripts/bench.py)."""

    def __init__(self, weights, reason):
        super().__init__(f"{weights} decode copies: {reason}")
        self.weights, self.reason = weights, reason


@dataclass
class Kernel:
    """One library's packed product: `pack(w (out, in), bias, rows)` lays a weight out once, `mm(x (rows, in),
    packed, rows)` multiplies by it; `op` is the operator that does the work (tests count its calls)."""
    name: str
    available: bool
    pack: object
    mm: object
    op: object
    bytes_per_weight: int = 4


def _mkl_pack(w, bias, rows):
    # _mkl_linear reads the product's size from a stride-0 (out, in) tensor
    return torch.ops.mkl._mkl_reorder_linear_weight(w, rows), w.new_zeros(()).expand(w.shape), bias


def _int8_pack(w, bias, rows):
    scale = (w.abs().amax(1) / 127).clamp(min=1e-12).double()  # symmetric, per output channel
    with warnings.catch_warnings():  # PyTorch marks quantized tensors deprecated; fbgemm's kernel is what we use
        warnings.simplefilter("ignore", UserWarning)
        q = torch.quantize_per_channel(w, scale, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(q, bias)


def _bf16_pack(w, bias, rows):
    return torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), rows), bias


def _bf16_mm(x, p, rows):
    y = torch.ops.mkldnn._linear_pointwise(x.bfloat16(), p[0], None, "none", [], "").float()
    return y if p[1] is None else y + p[1]  # the bias added in float32


def _bf16_products() -> bool:
    """Whether this CPU's oneDNN multiplies packed bfloat16 weights. It needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT
    and refuses otherwise (on an AVX2-only CPU, unpacked bfloat16 products run slower than float32), so ask it."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=torch.bfloat16), 1)
        return True
    except RuntimeError:
        return False


_NEEDS = {"bfloat16": "AVX-512 BW/VL/DQ or AVX-NE-CONVERT", "int8": "the fbgemm/x86 quantized engine"}


def missing_product(weights) -> str | None:
    """Why this CPU's PyTorch cannot multiply `weights` ("int8", "bfloat16") fast, or None where it can (and for
    "float32"). The low-precision options exist only to be faster: run.py, scripts/bench.py and PackedDecoder refuse them
    with this reason rather than run slower in another dtype than asked, or print float32 figures under its label."""
    if weights == "float32" or KERNELS[weights].available:
        return None
    return f"this CPU's PyTorch has no fast {weights} product (it needs {_NEEDS[weights]})"


def copies_refused(weights, device="cpu", rows=None) -> str | None:
    """Why decode copies in `weights` cannot serve a call of `rows` rows on `device` (None where they can; float32
    always can, falling back to the modules). One home for the refusal run.py gives before it loads a model and the
    sampler gives where it meets the case."""
    if weights == "float32":
        return None
    if device != "cpu":
        return "they are for the CPU's packed decoder; on a GPU use the model's dtype"
    if missing_product(weights):
        return missing_product(weights)
    if rows is not None and rows not in PACK_ROWS:
        return f"they decode {PACK_ROWS.start}-{PACK_ROWS.stop - 1} rows at a time, this call has {rows}"
    return None


def _quantized_engine():
    engines = torch.backends.quantized.supported_engines
    return next((e for e in ("x86", "fbgemm") if e in engines), None)


KERNELS = {
    "mkl": Kernel("mkl", torch.backends.mkl.is_available(), _mkl_pack,
                  lambda x, p, rows: torch.ops.mkl._mkl_linear(x, p[0], p[1], p[2], rows),
                  torch.ops.mkl._mkl_linear.default),
    "onednn": Kernel("onednn", torch.backends.mkldnn.is_available(),
                     lambda w, bias, rows: (torch.ops.mkldnn._reorder_linear_weight(w, rows), bias),
                     lambda x, p, rows: torch.ops.mkldnn._linear_pointwise(x, p[0], p[1], "none", [], ""),
                     torch.ops.mkldnn._linear_pointwise.default),
    # reduce_range: 7-bit activations, so AVX2's 16-bit pairwise sums of u8 x s8 products cannot saturate
    "int8": Kernel("int8", _quantized_engine() is not None, _int8_pack,
                   lambda x, p, rows: torch.ops.quantized.linear_dynamic(x, p, True),
                   torch.ops.quantized.linear_dynamic.default, bytes_per_weight=1),
    # oneDNN's packed product on bfloat16 copies: half the bytes of float32, and a faster product on CPUs
    # with bfloat16 instructions (AVX512-BF16, AMX); the activations are rounded to bfloat16 for the product
    "bfloat16": Kernel("bfloat16", _bf16_products(), _bf16_pack, _bf16_mm,
                       torch.ops.mkldnn._linear_pointwise.default, bytes_per_weight=2),
}
KERNELS["mm"] = Kernel("mm", True, lambda w, bias, rows: (w.contiguous(), bias),
                      lambda x, p, rows: _mm_plain(x, p[0], p[1]), torch.ops.aten.mm.default)
FLOAT32_KERNELS = ("mkl", "onednn", "mm")


def _mm_plain(x, w, bias):
    """W @ x^T, back to row-major: the unpacked product, the fastest for few rows on some CPUs."""
    y = torch.mm(w, x.t()).t().contiguous()
    return y if bias is None else y + bias


@dataclass
class Pack:
    kernel: str
    packed: object  # the kernel's layout of W (out, in) [and bias] for `rows` rows
    deps: list  # (tensor, version) of every tensor W and b were made from: the pack is current while all match


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


def _shape(mods):
    """(out, in) of projections stacked in output order, without building the stack."""
    return sum(_base(m).out_features for m in mods), _base(mods[0]).in_features


def _stacked(mods):
    """The weight (out, in) and bias (out,) or None of projections stacked in output order, and their deps."""
    srcs = [_source(m) for m in mods]
    deps = [t for _, _, ts in srcs for t in ts]
    w = (srcs[0][0]() if len(srcs) == 1 else torch.cat([make() for make, _, _ in srcs])).detach()
    bias = None
    if any(b is not None for _, b, _ in srcs):  # a part without a bias adds zeros
        bias = torch.cat([b if b is not None else w.new_zeros(_base(mod).out_features)
                          for (_, b, _), mod in zip(srcs, mods)]).detach()
    return w, bias, deps


def _norm(x, norm):
    """model.RMSNorm's float32 path."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.eps)


class PackedDecoder:
    """The packed copy of a model's projections for decoding exactly `rows` rows on a CPU, and its step.

    The copy costs memory (one more copy of the weights; a quarter of it in int8, half in bfloat16) and time to
    build, so it is kept across calls and rebuilt only for a new row count or when a weight it
    was made of was replaced or changed in place (an optimiser step on the adapter: only the products holding q
    and v are rebuilt): the tensor and its version counter are checked on every `prepare`. The model itself never
    carries a pack: training, state_dict and deepcopy never see one.

    weights: "float32" (the model's own numbers; the kernel chosen by measurement, or forced with `kernel`)
    or "int8" or "bfloat16" (opt-in: other numbers, docs/performance.md)."""

    def __init__(self, model, weights="float32", kernel=None, room=None):
        assert weights in ("float32", "int8", "bfloat16"), \
            f"packed weights are float32, int8 or bfloat16, not {weights!r}"
        self.model, self.weights, self.rows, self.packs = model, weights, None, {}
        self.room = room  # bytes a run's memory plan (plan.py) gives the copies; None: half the free memory
        self.forced = kernel if weights == "float32" else weights
        assert self.forced is None or self.forced in KERNELS, f"unknown kernel {kernel!r}"
        if weights != "float32":  # asked for on purpose: never decode quietly in float32 instead
            reason = copies_refused(weights, model.lm_head.weight.device.type) or self._unfit()
            if reason:
                raise CopyRefused(weights, reason)
        self.kernel = None  # kind of product -> the kernel the current packs were made with
        self.choice = {}  # size class -> ({kind: kernel}, {kernel: {kind: seconds a step}}, rows timed)
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
        """CPU, float32 weights, a kernel this build has, every product wide enough to gain, and room for the
        copy: at most half the free memory (a 3B model in float32 is 12 GB; a second 12 GB would not fit a
        24 GB machine)."""
        w = self.model.lm_head.weight
        names = [self.forced] if self.forced else FLOAT32_KERNELS
        if not (w.device.type == "cpu" and w.dtype == torch.float32 and any(KERNELS[k].available for k in names)):
            return False
        if self._fits is None:
            self._fits = self._unfit() is None
        return self._fits

    def _unfit(self) -> str | None:
        """Why this model gets no packed copy on this machine (None where it does): weights not float32, a product
        too narrow to gain, or no room. float32 then decodes through the modules; int8 and bfloat16 are refused
        with this reason (__init__), since decoding in float32 under their name would be another policy than asked."""
        dtype = self.model.lm_head.weight.dtype
        if dtype != torch.float32:
            return f"the model's weights are {str(dtype).removeprefix('torch.')}; the copies are made from float32 ones"
        shapes = [_shape(mods) for _, mods in self._groups()]
        narrowest = min(min(s) for s in shapes)
        if narrowest < PACK_MIN:
            return f"the model's narrowest product is {narrowest} wide, and packing needs {PACK_MIN}"
        need = self.copy_bytes()
        if self.room is not None:
            return None if need <= self.room else \
                f"the copy needs {need / 1e9:.1f} GB and the run's memory plan leaves {self.room / 1e9:.1f} GB"
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if need > free // 2:
            return f"the copy needs {need / 2**30:.1f} GiB, more than half the free memory ({free / 2**30:.1f} GiB)"
        return None

    def copy_bytes(self) -> int:
        """What the copies of every product take (the model's weights but the input embedding, in their dtype)."""
        per = KERNELS["mkl" if self.weights == "float32" else self.weights].bytes_per_weight
        return sum(per * o * i for o, i in (_shape(mods) for _, mods in self._groups()))

    @staticmethod
    def _kind(key):
        return "head" if key == "head" else key[1]

    def _kernels_for(self, rows) -> dict:
        """For each kind of product (qkv, o, gate_up, down, head), the float32 kernel that runs it fastest at
        about `rows` rows on this machine. Measured once per size class (1, 2-8, 9-64 rows) at the first count
        seen in it, and kept per machine and shapes (cpu_linear.remembered: every process then decodes with
        the same kernels, so a seeded run's samples do not depend on which process ran it)."""
        kinds = {"qkv", "o", "gate_up", "down", "head"}
        if self.forced:
            return dict.fromkeys(kinds, self.forced)
        bucket = 1 if rows == 1 else 8 if rows <= 8 else 64
        if bucket not in self.choice:
            shapes = {self._kind(key): _shape(mods) for key, mods in self._groups()}  # every layer: the first's
            key = f"packed float32, {bucket if bucket == 1 else '2-8' if bucket == 8 else '9-64'} rows, " + \
                ", ".join(f"{kind} {o}x{i}" for kind, (o, i) in sorted(shapes.items()))
            got = remembered(key, lambda: self._time_kernels(rows, kinds))
            self.choice[bucket] = (got["chosen"], got["seconds"], got["rows"])
        return self.choice[bucket][0]

    def _time_kernels(self, rows, kinds) -> dict:
        """Every float32 kernel timed on the model's own head and first layers (enough of them, TUNE_BYTES,
        that their weights stream from memory as in a real step, not from cache; the layers all have the same
        shapes): the seconds per decode step for each kind of product, and the fastest kernel per kind. Well
        under a second for SmolLM2."""
        layers = self.model.model.layers
        per_layer = sum(p.numel() * 4 for p in layers[0].parameters())
        k = min(len(layers), max(1, -(-TUNE_BYTES // per_layer)))
        groups = [(key, mods) for key, mods in self._groups() if key == "head" or key[0] < k]
        seconds = {}  # kernel -> kind -> seconds for one decode step's products of that kind
        with torch.no_grad():
            for name in (n for n in FLOAT32_KERNELS if KERNELS[n].available):
                kern = KERNELS[name]
                packs = [(key, kern.pack(*_stacked(mods)[:2], rows)) for key, mods in groups]
                xs = [torch.randn(rows, _base(mods[0]).in_features) for _, mods in groups]
                best = dict.fromkeys(kinds, float("inf"))
                for _ in range(4):  # the first pass warms up
                    spent = dict.fromkeys(kinds, 0.0)
                    for (key, packed), x in zip(packs, xs):
                        t = time.perf_counter()
                        kern.mm(x, packed, rows)
                        spent[self._kind(key)] += time.perf_counter() - t
                    best = {kind: min(best[kind], spent[kind]) for kind in kinds}
                del packs
                seconds[name] = {kind: round(t * (1 if kind == "head" else len(layers) / k), 5)
                                 for kind, t in best.items()}
        chosen = {kind: min(seconds, key=lambda n: seconds[n][kind]) for kind in kinds}
        return {"chosen": chosen, "seconds": seconds, "rows": rows}

    def release(self):
        """Free the packs: the next prepare builds every one again (what a rebuild costs is what scripts/bench.py repack
        times)."""
        self.packs, self.rows = {}, None

    def prepare(self, rows) -> bool:
        """Packs for decoding `rows` rows, reusing the current ones. False (and no packs) when a weight is an
        inference tensor, which has no version counter to tell a stale pack by."""
        kernels = self._kernels_for(rows)
        old = self.packs if rows == self.rows else {}
        self.release()  # packs for another row count are freed before new ones are built
        packs = {}
        for key, mods in self._groups():
            deps = [t for m in mods for t in _source(m)[2]]
            if any(t.is_inference() for t in deps):
                return False
            kernel = kernels[self._kind(key)]
            p = old.get(key)
            if p is None or p.kernel != kernel or len(p.deps) != len(deps) or any(
                    t is not d or v != d._version for (t, v), d in zip(p.deps, deps)):
                w, bias, deps = _stacked(mods)
                p = Pack(kernel, KERNELS[kernel].pack(w, bias, rows), [(t, t._version) for t in deps])
            packs[key] = p
        self.packs, self.rows, self.kernel = packs, rows, kernels
        return True

    def step(self, cache, tok, pos):
        """Logits (B, V) of the next token after tokens tok (B,) at positions pos (B,), B = self.rows = the
        cache's live rows; writes their keys and values into the cache (the caller advances its length).

        model.py's DecoderLayer restated over the stacked products: the only place besides model.py that spells
        out a layer's maths (prefill, the static step and training all run the modules). A feature added to
        model.py's layers goes here too; tests/test_sampler.py decodes each architecture both ways."""
        m, cfg, B = self.model, self.model.config, tok.shape[0]
        P = {key: (KERNELS[p.kernel].mm, p.packed) for key, p in self.packs.items()}

        def mm(x, key):
            f, packed = P[key]
            return f(x, packed, B)
        H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        assert B == self.rows == cache.rows, f"packs for {self.rows} rows, {B} tokens, {cache.rows} cache rows"
        cos, sin = m.rope(pos)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, D): the same for every head
        views = cache.step_views()
        x = m.model.embed_tokens(tok)  # (B, C)
        for i, layer in enumerate(m.model.layers):
            attn = layer.self_attn
            qkv = mm(_norm(x, layer.input_layernorm), (i, "qkv"))  # (B, (H + 2 Hkv) D)
            qk = qkv[:, :(H + Hkv) * D].view(B, H + Hkv, D)
            if hasattr(attn, "q_norm"):  # Qwen3 normalises each head before RoPE
                qk = torch.cat((attn.q_norm(qk[:, :H]), attn.k_norm(qk[:, H:])), 1)
            qk = apply_rope(qk, cos, sin)  # q and k heads in one call
            y = cache.attend_step(i, views, qk[:, :H], qk[:, H:], qkv[:, (H + Hkv) * D:].view(B, Hkv, D))
            x = x + mm(y.reshape(B, H * D), (i, "o"))
            gu = mm(_norm(x, layer.post_attention_layernorm), (i, "gate_up"))  # (B, 2I)
            half = gu.shape[1] // 2
            x = x + mm(F.silu(gu[:, :half]) * gu[:, half:], (i, "down"))
        return mm(_norm(x, m.model.norm), "head")

