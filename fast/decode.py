"""The sampler's fast step: sampling.ModelStep's interface over the speed machinery, as run.py uses it.

- the prompts' shared prefix is prefilled once into one cache row that every sample reads (fast/cascade.py);
- the one-token step runs on packed weight copies where the machine gains from them (fast/packing.py), or, with
  compile=True, as a torch.compile'd function over fixed shapes (on CUDA with CUDA graphs); else the modules;
- the draw searches the cumulative probabilities in two levels instead of scanning the whole vocabulary.

tests/test_sampler.py proves each path draws the samples of the plain step (sampling.ModelStep).
"""
import os

import torch

from fast.cascade import SHARE_MIN, CascadeCache, common_prefix
from fast.packing import PACK_ROWS, CopyRefused, PackedDecoder, copies_refused
from sampling import ModelStep, sampling_logits

CDF_BLOCK = 256  # tokens per block of the two-level inverse-CDF search (sample_blocked)
# Repack for a smaller batch only if (rows dropped) x (steps that may remain) reaches this: a finished row riding
# along in the packed step costs a few percent of a small batch's step, a repack is paid twice (the next call packs
# its full batch again), and `python -m scripts.bench repack` measured the break-even for both embedded models,
# rounded up because the steps left are an upper bound (docs/performance.md, "A coder-model step").
REPACK_ROW_STEPS = 1000


def sample_blocked(logits, temperature, top_k, top_p, u):
    """sampling.sample's token and log-probability from the same uniform u (B, 1), found in two levels: the row's
    probability mass summed over blocks of CDF_BLOCK tokens, a search among the blocks, then a search inside the
    chosen block. A cumsum over the whole vocabulary is a sequential scan and torch.multinomial draws one
    exponential per entry, both far slower for a decoding batch (docs/performance.md); this costs one exp pass
    and block sums. (The two summation orders round differently, so a u within rounding of a boundary between
    two tokens may pick the other one.)"""
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits.float(), -1).gather(-1, tok[:, None])[:, 0]
    logits = sampling_logits(logits, temperature, top_k, top_p)
    B, V = logits.shape
    nb = -(-V // CDF_BLOCK)
    top = logits.amax(-1, keepdim=True)  # (B, 1)
    w = logits.new_empty(B, nb * CDF_BLOCK)  # unnormalised probabilities, zero-padded to whole blocks
    w[:, V:] = 0
    torch.sub(logits, top, out=w[:, :V]).exp_()
    blocks = w.view(B, nb, CDF_BLOCK)
    mass = blocks.sum(-1)  # (B, nb)
    cum = mass.cumsum(-1)  # (B, nb)
    u = u.to(w.device) * cum[:, -1:]
    # right=True finds the first block (then entry) whose cumulative mass exceeds u, which therefore has mass:
    # a zero-probability token is never chosen. u is kept strictly below each total, which rounding in
    # the products and in the two summation orders could otherwise reach.
    u = torch.minimum(u, torch.nextafter(cum[:, -1:], torch.zeros_like(u)))
    j = torch.searchsorted(cum, u, right=True)  # (B, 1)
    inside = blocks.gather(1, j[..., None].expand(B, 1, CDF_BLOCK))[:, 0].cumsum(-1)  # (B, CDF_BLOCK)
    u = (u - (cum.gather(1, j) - mass.gather(1, j))).clamp(min=0)
    u = torch.minimum(u, torch.nextafter(inside[:, -1:], torch.zeros_like(u)))
    tok = (j * CDF_BLOCK + torch.searchsorted(inside, u, right=True))[:, 0]
    # log p(tok) = logit - logsumexp, with the logsumexp from the same pass: top + log(total mass)
    logp = logits.gather(-1, tok[:, None])[:, 0] - (top[:, 0] + cum[:, -1].log())
    return tok, logp


class FastStep(ModelStep):
    """weights: the decode copies, "float32" (the model's own numbers, packed where that gains), "int8" or
    "bfloat16" (opt-in: other numbers); copies_room: the bytes a run's memory plan gives them (plan.py).

    compile=True runs the step as a torch.compile'd function over a fixed-shape cache (on CUDA with CUDA graphs:
    mode "reduce-overhead"). Shapes then never change inside a call: every step attends over the whole
    preallocated buffer under the -inf mask, writes at a position held in a tensor, and keeps finished rows.
    On a CPU eager decoding is faster (docs/performance.md), so run.py leaves it off there."""

    def __init__(self, model, weights="float32", compile=False, copies_room=None):
        super().__init__(model)
        self.static = compile
        if compile and weights != "float32":
            raise CopyRefused(weights, "a compiled decode step runs the model's own weights")
        self.packed = PackedDecoder(model, weights, room=copies_room)
        self._packed, self._repack, self._compiled = None, False, None
        if compile:
            on_cpu = model.lm_head.weight.device.type == "cpu"
            if on_cpu and os.environ.get("ATEN_CPU_CAPABILITY") == "avx2":
                # ATen capped by hand to stand for an AVX2 CPU (scripts/bench.py's help). Inductor picks its vector
                # width from the hardware, not from that cap, and its AVX-512 code beside ATen's AVX2 kernels
                # decoded NaN; generated for AVX2 too, the step is what an AVX2 CPU computes.
                from torch._inductor import config as inductor
                inductor.cpp.simdlen = 256
            mode = "default" if on_cpu else "reduce-overhead"
            self._compiled = torch.compile(self._static_step, mode=mode, dynamic=False)

    def prefix_length(self, prompts, samples):
        shared = common_prefix(prompts)
        return shared if shared >= SHARE_MIN and samples > 1 else 0

    def new_cache(self, batch, max_len, prefix_len, dtype, device):
        c = self.cache
        if c is None or not c.fits(batch, max_len, dtype, device, prefix_len):
            if c is not None and c.k.dtype == dtype and c.k.device == device:  # grow, never shrink
                batch, max_len = max(batch, c.k.shape[1]), max(max_len, c.k.shape[3])
                prefix_len = max(prefix_len, c.prefix_k.shape[3])
            cfg = self.model.config
            self.cache = None  # free the old buffers before allocating the new ones
            self.cache = CascadeCache(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim,
                                      dtype, device, prefix_len)
        c = self.cache
        c.rows, c.length, c.prefix_len, c.write_at = batch, 0, 0, None
        return c

    def fill_prefix(self, cache, ids):
        """The shared prefix's keys and values, from one pass of batch 1."""
        cache.filling_prefix = True
        self.model.hidden_states(torch.tensor([ids], device=cache.k.device), cache=cache)
        cache.filling_prefix, cache.prefix_len = False, len(ids)

    def begin(self, rows, max_new):
        packed = self.packed if self.packed.available and not self.static else None
        if packed and not (rows in PACK_ROWS and max_new > 1 and packed.prepare(rows)):
            if packed.weights != "float32" and max_new > 1:  # asked for on purpose: not float32 under its name
                raise CopyRefused(packed.weights, copies_refused(packed.weights, rows=rows) or
                                  "the weights are inference tensors, which cannot be packed")
            packed = None
        self._packed, self._repack = packed, False

    def drop_now(self, rows, live, steps_left):
        # A compiled step keeps every row (fixed shapes). On packs, drop only when enough rows and steps may remain
        # to repay a repack for the smaller batch (REPACK_ROW_STEPS); until then the finished rows ride along in
        # the packed step (its cost hardly depends on a few rows), much cheaper than leaving the packs.
        if self.static:
            return False
        self._repack = self._packed is not None and live in PACK_ROWS and \
            (rows - live) * steps_left >= REPACK_ROW_STEPS
        return super().drop_now(rows, live, steps_left) and (self._packed is None or self._repack)

    def dropped(self, rows):
        if self._repack:
            self._packed.prepare(rows)

    def draw(self, logits, temperature, top_k, top_p, u):
        return sample_blocked(logits, temperature, top_k, top_p, u)

    def _static_step(self, tok, pos, write_at, bias):
        """Fixed-shape step: tok, pos (B, 1); write_at (1,) the cache slot; bias (B, 1, 1, S_max)."""
        self.cache.write_at = write_at
        h = self.model.hidden_states(tok, positions=pos, cache=self.cache, attn_mask=bias)
        return self.model.logits(h[:, -1])

    def __call__(self, cache, tok, pos):
        if self.static:  # finished rows keep decoding, unread, and no slice ever shrinks
            return (self._compiled or self._static_step)(tok[:, None], pos[:, None],
                                                         torch.tensor([cache.length], device=tok.device),
                                                         cache.bias[:cache.rows, None, None, :])
        if self._packed and self._packed.rows == cache.rows:  # else rows stopped too late to repay a repack
            return self._packed.step(cache, tok, pos)
        return super().__call__(cache, tok, pos)

    def release(self):
        self.packed.release()
