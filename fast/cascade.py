"""The sampler's cache with the prompts' shared prefix kept once: cascade attention [FlashInfer's cascade
inference; Hydragen]. The plain cache is sampling.KVCache.

A group's prompts share a long prefix (the chat template and, for ARC, the whole puzzle: thousands of tokens)
and differ only at their ends. Plainly, every sample's cache row holds the whole prompt, so a 16-sample group
stores and reads the prefix 16 times a step. Here the prefix goes into one row read by all: each step attends
to it once for all rows and to each row's own tokens separately, and merges the two partial attentions by
their log-sum-exp, which is exact (softmax over the union of the keys). tests/test_sampler.py proves the
samples equal to the plain cache's.

The cache also serves the packed step (`step_views`, `attend_step`: fast/packing.py) and the compiled one
(`write_at`: a slot held in a tensor, so the step's shapes never change: fast/decode.py).
"""
import math

import torch
import torch.nn.functional as F

from sampling import KVCache

SHARE_MIN = 128  # a common prefix shorter than this is not worth a separate attention pass


def common_prefix(prompts) -> int:
    """Length of the longest prefix all prompts share, leaving each at least its last token."""
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for p in prompts[1:]:
        i = 0
        while i < n and p[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def attention_lse(q, k, v, mask):
    """Attention output (B, H, T, D) and the log-sum-exp of its scores (B, H, T), for merging partial
    attentions. On CPU, PyTorch's flash kernel returns both; elsewhere the plain formula (it materialises the
    scores, which is small for decoding and for the rows' own tokens)."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask)
        return out, lse
    scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + mask
    lse = torch.logsumexp(scores, -1)
    return (torch.exp(scores - lse[..., None]).to(v.dtype) @ v), lse


class CascadeCache(KVCache):
    """sampling.KVCache plus prefix_k/v (L, 1, H_kv, P_max, D): the shared prefix, positions [0, prefix_len),
    one row read by all. k/v then hold each row's own tokens only (the rest of its prompt, then what it
    generates)."""

    def __init__(self, n_layers, batch, n_kv, max_len, head_dim, dtype, device, prefix_len=0):
        super().__init__(n_layers, batch, n_kv, max_len, head_dim, dtype, device)
        pshape = (n_layers, 1, n_kv, prefix_len, head_dim)
        self.prefix_k = torch.zeros(pshape, dtype=dtype, device=device)
        self.prefix_v = torch.zeros(pshape, dtype=dtype, device=device)
        self.prefix_len, self.filling_prefix = 0, False
        self.write_at = None  # compiled step: the slot (a (1,) tensor) the next token's keys go to

    def fits(self, batch, max_len, dtype, device, prefix_len=0):
        return super().fits(batch, max_len, dtype, device) and self.prefix_k.shape[3] >= prefix_len

    def attend(self, layer, q, k, v, attn_mask):
        """Store the new keys/values (rows, H_kv, T, D) and return the attention output (rows, H, T, D).

        attn_mask (rows, 1, T, length + T) covers the rows' own tokens; the shared prefix is always visible."""
        T = k.shape[2]
        if self.filling_prefix:  # batch 1, positions from 0: plain causal attention
            self.prefix_k[layer, :, :, :T], self.prefix_v[layer, :, :, :T] = k, v
            return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)
        if self.write_at is not None:  # compiled step: one token at a tensor position, whole buffer
            self.k[layer, :self.rows].index_copy_(2, self.write_at, k)
            self.v[layer, :self.rows].index_copy_(2, self.write_at, v)
            kr, vr = self.k[layer, :self.rows], self.v[layer, :self.rows]
        else:
            kr, vr = self.update(layer, k, v)
        return self._attention(layer, q, kr, vr, attn_mask)

    def step_views(self):
        """For a one-token step (packing.PackedDecoder): the slots the new keys and values go to, (L, rows, H_kv, D)
        each, what each layer then attends over, (L, rows, H_kv, length + 1, D) each, and the rows' mask
        (rows, 1, 1, length + 1), cut once for all layers."""
        r, s = self.rows, self.length
        assert s < self.k.shape[3], f"KV cache full: {s} + 1 > {self.k.shape[3]}"
        return (self.k[:, :r, :, s], self.v[:, :r, :, s], self.k[:, :r, :, :s + 1], self.v[:, :r, :, :s + 1],
                self.bias[:r, None, None, :s + 1])

    def attend_step(self, layer, views, q, k, v):
        """`attend` for one new token per row, on `step_views`: q (rows, H, D), k and v (rows, H_kv, D)
        -> (rows, H, D)."""
        k_slot, v_slot, keys, values, mask = views
        k_slot[layer].copy_(k)
        v_slot[layer].copy_(v)
        return self._attention(layer, q[:, :, None], keys[layer], values[layer], mask)[:, :, 0]

    def _attention(self, layer, q, kr, vr, attn_mask):
        """q (B, H, T, D) over the rows' keys and values kr, vr (B, H_kv, S, D) and the shared prefix."""
        B, H, T, D = q.shape
        g = H // kr.shape[1]
        # Fold each kv head's g query heads into the query axis, (B, H_kv, g*T, D): keys and values are read
        # once per kv head and never repeated (faster than enable_gqa's copy for one-token decode).
        qr = q.reshape(B, -1, g * T, D)
        mask = attn_mask if T == 1 else attn_mask.repeat(1, 1, g, 1)  # (B, 1, g*T, S): same for each head
        if self.prefix_len == 0:
            return F.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask).reshape(B, H, T, D)
        out_r, lse_r = attention_lse(qr, kr, vr, mask)  # (B, H_kv, g*T, D), (B, H_kv, g*T)
        P = self.prefix_len
        qp = qr.transpose(0, 1).reshape(1, -1, B * g * T, D)  # every row's queries against one prefix
        out_p, lse_p = attention_lse(qp, self.prefix_k[layer, :, :, :P], self.prefix_v[layer, :, :, :P], None)
        out_p = out_p.view(-1, B, g * T, D).transpose(0, 1)
        lse_p = lse_p.view(-1, B, g * T).transpose(0, 1)
        m = torch.maximum(lse_p, lse_r)
        wp, wr = torch.exp(lse_p - m)[..., None], torch.exp(lse_r - m)[..., None]
        return ((out_p * wp + out_r * wr) / (wp + wr)).reshape(B, H, T, D)
