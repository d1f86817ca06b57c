"""CPU decoding on MKL-packed weights: the sampler's copy of the model's large float32 matrices, laid out once
for the batch size it decodes (cblas_sgemm_pack, reached through torch.ops.mkl).

The model side is one check in model.packed_linear (Linear and LoRALinear call it): a module carrying a pack
for exactly this many rows, with autograd off, multiplies by the packed copy. Everything else (when to pack,
what, when a pack is stale) is here, owned by the sampler (sampling.py) as its KV cache is.
"""
import os

import torch

from lora import LoRALinear
from model import Linear

PACK_ROWS = range(2, 65)  # decode batches MKL's packed sgemm speeds up (at 1 row both are a matrix-vector read)
PACK_MIN = 128  # a matrix narrower than this (LoRA's A and B) gains nothing from packing


class WeightPacks:
    """MKL-packed copies of the model's large float32 weights, for decoding exactly `rows` rows on a CPU.

    A decode step of 2-64 rows is ~210 skinny matmuls that each read a whole weight matrix. MKL's packed sgemm
    (the weight laid out once for that row count) runs them 1.5-2x faster than the plain call on our 2-core
    Xeon (SmolLM2, 30 layers: 16 rows 56 vs 81 ms, 2 rows 29 vs 60 ms). The price is a second copy of those
    weights and 0.4 s to build it, so packs are kept across calls, rebuilt only for a new row count or a
    weight changed in place (its version counter), and installed on the Linear modules only while the
    sampler decodes: the model never carries them into training, state_dict or deepcopy."""

    def __init__(self, model):
        self.model, self.rows, self.packs = model, None, {}
        self._fits = None

    @property
    def available(self):
        """CPU, float32, an MKL build, and room for the copy: at most half the free memory (a 3B model in
        float32 is 12 GB, and a second 12 GB would not fit our 24 GB machine)."""
        w = self.model.lm_head.weight
        if not (w.device.type == "cpu" and w.dtype == torch.float32 and torch.backends.mkl.is_available()):
            return False
        if self._fits is None:
            need = sum(4 * m.weight.numel() for m in self.model.modules()
                       if isinstance(m, Linear) and min(m.weight.shape) >= PACK_MIN)
            self._fits = need <= os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
        return self._fits

    def install(self, rows):
        self.remove()
        old = self.packs if rows == self.rows else {}
        self.packs, self.rows = {}, rows  # old packs for another row count are freed before new ones are built
        # An enabled LoRA adapter is packed merged, W + scale * B A, and installed on the adapter: the policy
        # then decodes at the base model's speed (the rank-16 side branch cost ~15 ms a step at 8 rows).
        adapters = {m.base_layer: m for m in self.model.modules() if isinstance(m, LoRALinear) and m.enabled}
        for m in self.model.modules():
            w = m.weight if isinstance(m, Linear) else None
            if w is None or min(w.shape) < PACK_MIN or w.is_inference():  # inference tensors have no version
                continue
            owner = adapters.get(m, m)
            version = (w._version,) if owner is m else (w._version, owner.lora_A.weight._version,
                                                        owner.lora_B.weight._version)
            p = old.get(owner)
            if p is None or p[1] != version:
                src = w.detach() if owner is m else owner.merged_weight().detach()
                p = (rows, version, torch.ops.mkl._mkl_reorder_linear_weight(src, rows))
            self.packs[owner] = owner.pack = p

    def remove(self):
        for m in self.packs:
            m.pack = None
