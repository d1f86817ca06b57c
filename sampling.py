"""KV-cached batched sampling. The cache belongs to the sampler, not the model (shared/STYLE.md, rule 6).

A batch of prompts is prefilled once: the longest prefix they share (the chat template and, for ARC, the
whole puzzle: ~4k tokens) into one cache row that every sample reads, the rest of each prompt into rows of
its own, which are then copied to its n samples. Decoding advances every row by one token per step over a
preallocated cache; each step attends to the shared prefix once for all rows and to each row's own tokens
separately, and merges the two by their log-sum-exp ("cascade" attention), so a 16-sample group of a
4k-token prompt neither stores nor reads the prompt 16 times. Rows that stop are dropped from the batch once
a quarter of them are done, so short completions stop costing compute.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fast.packing import PACK_ROWS, CopyRefused, PackedDecoder

SHARE_MIN = 128  # a common prefix shorter than this is not worth a separate attention pass
CDF_BLOCK = 256  # tokens per block of the two-level inverse-CDF search (sample)
# Repack for a smaller batch only if (rows dropped) x (steps that may remain) reaches this: a finished row riding
# along in the packed step costs a few percent of a small batch's step, a repack is paid twice (the next call packs
# its full batch again), and `python -m scripts.bench repack` measured the break-even at 400-640 row-steps for both
# embedded models, rounded up because the steps left are an upper bound (docs/performance.md, "A coder-model step").
REPACK_ROW_STEPS = 1000


@dataclass
class Rollout:
    """One completion, the record that carries it from the sampler through the search to the learner (STYLE
    rule 8): the sampler fills its tokens, the search its source and reward, the learner trains on it. (The
    database stores what it found per candidate: database.Row.)"""
    ids: list[int]  # the completion's token ids, the end-of-sequence token included when it ended on one
    text: str
    logprobs: list[float] | None = None  # of each sampled token under the distribution it was drawn from
    #                                      (its own prompt's); None for one not sampled (a greedy replay)
    stop_reason: str = ""  # "stop_token" | "stop_string" | "length"
    prompt_index: int = 0
    prompt_ids: list[int] = field(default_factory=list, repr=False)
    source: str = "on-policy"  # its role in a GRPO group: "on-policy" | "greedy" | "neighbour" (grpo.ROLES)
    reward: float | None = None  # None until scored (and if the budget ran out first)
    info: dict = field(default_factory=dict)  # e.g. "kind": "new" | "repeat" | "failed" (search.py)


class KVCache:
    """Keys and values of a batch, in preallocated buffers.

    prefix_k/v (L, 1, H_kv, P_max, D): the shared prefix, positions [0, prefix_len), one row read by all.
    k/v (L, B_max, H_kv, S_max, D): each row's own tokens (the rest of its prompt, left-padded, then what it
    generates); the first `rows` rows are live and filled up to `length`. `bias` (B_max, S_max) is their
    additive mask: 0 on real tokens, -inf on padding and on slots not yet written (float, as a boolean mask
    sends SDPA to its slow path).
    """

    def __init__(self, n_layers, batch, n_kv, max_len, head_dim, dtype, device, prefix_len=0):
        shape = (n_layers, batch, n_kv, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.bias = torch.zeros(batch, max_len, dtype=dtype, device=device)
        pshape = (n_layers, 1, n_kv, prefix_len, head_dim)
        self.prefix_k = torch.zeros(pshape, dtype=dtype, device=device)
        self.prefix_v = torch.zeros(pshape, dtype=dtype, device=device)
        self.rows, self.length, self.prefix_len, self.filling_prefix = batch, 0, 0, False
        self.write_at = None  # static decode: the slot (a (1,) tensor) the next token's keys go to

    def fits(self, batch, max_len, prefix_len, dtype, device):
        return (self.k.shape[1] >= batch and self.k.shape[3] >= max_len and self.prefix_k.shape[3] >= prefix_len
                and self.k.dtype == dtype and self.k.device == device)

    def attend(self, layer, q, k, v, attn_mask):
        """Store the new keys/values (rows, H_kv, T, D) and return the attention output (rows, H, T, D).

        attn_mask (rows, 1, T, length + T) covers the rows' own tokens; the shared prefix is always visible."""
        T = k.shape[2]
        if self.filling_prefix:  # batch 1, positions from 0: plain causal attention
            self.prefix_k[layer, :, :, :T], self.prefix_v[layer, :, :, :T] = k, v
            return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)
        if self.write_at is not None:  # static decode (compiled): one token at a tensor position, whole buffer
            self.k[layer, :self.rows].index_copy_(2, self.write_at, k)
            self.v[layer, :self.rows].index_copy_(2, self.write_at, v)
            kr, vr = self.k[layer, :self.rows], self.v[layer, :self.rows]
        else:
            s = self.length
            assert s + T <= self.k.shape[3], f"KV cache full: {s} + {T} > {self.k.shape[3]}"
            assert k.shape[0] == self.rows, f"{k.shape[0]} rows of keys for a cache of {self.rows} live rows"
            self.k[layer, :self.rows, :, s:s + T] = k
            self.v[layer, :self.rows, :, s:s + T] = v
            kr, vr = self.k[layer, :self.rows, :, :s + T], self.v[layer, :self.rows, :, :s + T]
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

    def select_rows(self, index):
        """Rows `index` of the live rows become the live rows, in place: fans a prompt out to its samples
        (index repeats rows) and drops finished rows (index skips them). The shared prefix is untouched."""
        n, s = len(index), self.length
        assert n <= self.k.shape[1], f"{n} rows exceed the cache's {self.k.shape[1]}"
        self.k[:, :n, :, :s] = self.k[:, index, :, :s]
        self.v[:, :n, :, :s] = self.v[:, index, :, :s]
        self.bias[:n] = self.bias[index]
        self.rows = n


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


def sampling_logits(logits, temperature, top_k, top_p):
    """Logits (B, V) -> logits of the sampling distribution (B, V): scaled, entries outside top-k/top-p -inf."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p; the first token always stays.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits, temperature, top_k, top_p, u):
    """One token per row (B,) and its log-probability (B,) under the sampling distribution, from one uniform
    number per row, u (B, 1) in [0, 1).

    Inverse-CDF sampling with one uniform number per row, in two levels: the row's probability mass summed
    over blocks of CDF_BLOCK tokens, a search among the blocks, then a search inside the chosen block. A
    cumsum over the whole vocabulary is a sequential scan and torch.multinomial draws one exponential per entry,
    both far slower for a decoding batch (docs/performance.md); this costs one exp pass and block sums.
    """
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


class Sampler:
    """compile=True runs the one-token decode step as a torch.compile'd function over a fixed-shape cache
    (on CUDA with CUDA graphs: mode "reduce-overhead"). Shapes then never change inside a call: every step
    attends over the whole preallocated buffer under the -inf mask, writes at a position held in a tensor,
    and keeps finished rows. On a CPU eager decoding is faster (compiling SmolLM2 takes ~2 minutes there and
    its steps ran slower), so it is off by default; the static path itself is tested on CPU."""

    def __init__(self, model, tokenizer, compile=False, weights="float32", copies_room=None):
        self.model, self.tok = model, tokenizer
        # Free the decode copies when a call returns (rebuilt at the next), so the learner's memory and theirs are
        # never taken at once (plan.py decides).
        self.free_copies = False
        self.cache = None
        self.static = compile
        if compile and weights != "float32":
            raise CopyRefused(weights, "a compiled decode step runs the model's own weights")
        # "int8", "bfloat16": decode on such copies (fast/packing.py); copies_room: the bytes a memory plan gives them
        self.packed = PackedDecoder(model, weights, room=copies_room)
        self._step = None
        if compile:
            mode = "reduce-overhead" if model.lm_head.weight.device.type == "cuda" else "default"
            self._step = torch.compile(self._decode_step, mode=mode, dynamic=False)

    def _decode_step(self, tok, pos, write_at, bias):
        """Static-shape decode: tok, pos (B, 1); write_at (1,) the cache slot; bias (B, 1, 1, S_max)."""
        self.cache.write_at = write_at
        h = self.model.hidden_states(tok, positions=pos, cache=self.cache, attn_mask=bias)
        return self.model.logits(h[:, -1])

    def _cache(self, batch, max_len, prefix_len, dtype, device):
        c = self.cache
        if c is None or not c.fits(batch, max_len, prefix_len, dtype, device):
            if c is not None and c.k.dtype == dtype and c.k.device == device:  # grow, never shrink
                batch, max_len = max(batch, c.k.shape[1]), max(max_len, c.k.shape[3])
                prefix_len = max(prefix_len, c.prefix_k.shape[3])
            cfg = self.model.config
            self.cache = None  # free the old buffers before allocating the new ones
            self.cache = KVCache(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim,
                                 dtype, device, prefix_len)
        return self.cache

    @torch.inference_mode()
    def generate(self, prompts, n=1, max_new_tokens=128, temperature=1.0, top_p=1.0, top_k=0,
                 stop_strings=(), generator=None, stop_ids=None, stop_when=None, on_finish=None) -> list[Rollout]:
        """Sample n completions of each prompt (token-id lists or strings); n may be a list, one per prompt.

        stop_ids None means the tokenizer's; () never stops on a token (benchmarks). A row stops when its
        tail contains a stop string and, if given, `stop_when(text so far)` agrees (a task's own test).
        `on_finish(i, completion)` is called as soon as row i is complete, while the others still decode (a
        slow reward can start early).
        Returns sum(n) completions, prompt-major. temperature 0 is greedy (deterministic); its
        logprobs are the model's own log-softmax, as greedy has no distribution of its own.
        """
        prompts = [self.tok.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        assert prompts and all(prompts), "every prompt needs at least one token"
        counts = [n] * len(prompts) if isinstance(n, int) else list(n)
        assert len(counts) == len(prompts) and min(counts) >= 1 and max_new_tokens >= 0, \
            f"n={n} for {len(prompts)} prompts, max_new_tokens={max_new_tokens}"
        model = self.model
        device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
        was_training = model.training
        model.eval()
        try:
            stops = set(self.tok.stop_ids if stop_ids is None else stop_ids)
            return self._generate(prompts, counts, max_new_tokens, temperature, top_p, top_k, tuple(stop_strings),
                                  stop_when, on_finish, stops, generator, device, dtype)
        finally:
            model.train(was_training)
            if self.free_copies:
                self.packed.release()

    def _generate(self, prompts, counts, max_new, temperature, top_p, top_k, stop_strings, stop_when, on_finish,
                  stops, gen, device, dtype):
        P = len(prompts)
        shared = common_prefix(prompts)
        shared = shared if shared >= SHARE_MIN and sum(counts) > 1 else 0
        rest = [p[shared:] for p in prompts]  # each at least one token: its last position yields the logits
        Tp = max(len(r) for r in rest)
        pad = torch.tensor([Tp - len(r) for r in rest], device=device)  # left padding per prompt
        ids = torch.full((P, Tp), self.tok.pad_id, dtype=torch.long)
        for i, r in enumerate(rest):
            ids[i, Tp - len(r):] = torch.tensor(r)
        ids = ids.to(device)
        B = sum(counts)
        cache = self._cache(max(B, P), Tp + max_new, shared, dtype, device)
        cache.rows, cache.length, cache.prefix_len, cache.write_at = P, 0, 0, None
        if shared:
            cache.filling_prefix = True
            self.model.hidden_states(torch.tensor([prompts[0][:shared]], device=device), cache=cache)
            cache.filling_prefix, cache.prefix_len = False, shared
        slots = torch.arange(Tp, device=device)
        real = slots[None] >= pad[:, None]  # (P, Tp)
        cache.bias[:P].fill_(float("-inf"))  # slots not yet written stay masked (static decode reads them all)
        cache.bias[:P, :Tp].masked_fill_(real, 0.0)
        positions = shared + (slots[None] - pad[:, None]).clamp(min=0)  # (P, Tp)
        # Causal over real tokens; a pad query also sees itself so no softmax row is empty (NaN).
        allowed = (slots[:, None] >= slots[None, :]) & real[:, None, :] | torch.eye(Tp, dtype=torch.bool, device=device)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
        h = self.model.hidden_states(ids, positions=positions, cache=cache, attn_mask=mask[:, None])
        cache.length = Tp
        logits = self.model.logits(h[:, -1])  # (P, V): only the last position is ever sampled from
        fan = torch.arange(P, device=device).repeat_interleave(torch.tensor(counts, device=device))
        cache.select_rows(fan)  # one copy of each prompt's cache per sample
        logits = logits[fan]
        next_pos = (shared + Tp - pad)[fan]  # (B,) position of the next token of each row
        fan_l = fan.tolist()  # prompt of each row
        rows = list(range(B))  # original row of each live batch slot
        out_ids = [[] for _ in range(B)]
        out_lp = [[] for _ in range(B)]
        reason = ["length"] * B
        stop_window = max((len(s.encode()) for s in stop_strings), default=0) + 1
        live = torch.ones(B, dtype=torch.bool)
        packed = self.packed if self.packed.available and not self.static else None
        if packed and not (B in PACK_ROWS and max_new > 1 and packed.prepare(B)):
            if packed.weights != "float32" and max_new > 1:  # asked for on purpose: not float32 under its name
                why = (f"they decode {PACK_ROWS.start}-{PACK_ROWS.stop - 1} rows at a time, this call has {B}"
                       if B not in PACK_ROWS else "the weights are inference tensors, which cannot be packed")
                raise CopyRefused(packed.weights, why)
            packed = None
        for step in range(max_new):
            # One uniform per original row, drawn whether or not the row is still in the batch: a row's
            # samples do not depend on when finished rows are dropped.
            u = torch.rand(B, 1, generator=gen)[rows] if temperature != 0 else None
            tok, lp = sample(logits, temperature, top_k, top_p, u)
            tok_l, lp_l = tok.tolist(), lp.tolist()
            for slot, r in enumerate(rows):
                if not live[slot]:
                    continue
                out_ids[r].append(tok_l[slot])
                out_lp[r].append(lp_l[slot])
                if tok_l[slot] in stops:
                    reason[r], live[slot] = "stop_token", False
                elif stop_strings:
                    tail = self.tok.decode(out_ids[r][-stop_window:], skip_special_tokens=False)
                    if any(s in tail for s in stop_strings) and (
                            stop_when is None or stop_when(self.tok.decode(out_ids[r]))):
                        reason[r], live[slot] = "stop_string", False
                if not live[slot] and on_finish is not None:
                    on_finish(r, self._completion(r, out_ids, out_lp, reason, fan_l, prompts))
            if not live.any() or step == max_new - 1:
                break
            if self.static:  # fixed shapes: finished rows keep decoding, unread, and no slice ever shrinks
                s = cache.length
                cache.bias[:cache.rows, s] = 0.0
                step_fn = self._step or self._decode_step
                logits = step_fn(tok[:, None], next_pos[:, None], torch.tensor([s], device=device),
                                 cache.bias[:cache.rows, None, None, :])
                cache.length = s + 1
                next_pos = next_pos + 1
                continue
            # Drop finished rows once a quarter are done: a cache copy, repaid by smaller steps. On packs, only
            # when enough rows and steps may remain to repay a repack for the smaller batch (REPACK_ROW_STEPS);
            # until then the finished rows ride along in the packed step (its cost hardly depends on a few
            # rows), which is much cheaper than leaving the packs for the modules.
            n_live = int(live.sum())
            repack = packed is not None and n_live in PACK_ROWS and \
                (len(rows) - n_live) * (max_new - step - 1) >= REPACK_ROW_STEPS
            if (len(rows) - n_live) * 4 >= len(rows) and (packed is None or repack):
                keep = live.nonzero()[:, 0]
                cache.select_rows(keep.to(device))
                rows = [rows[i] for i in keep.tolist()]
                tok, next_pos, live = tok[keep.to(device)], next_pos[keep.to(device)], live[keep]
                if repack:
                    packed.prepare(len(rows))
            s = cache.length
            cache.bias[:cache.rows, s] = 0.0  # the new token's own slot
            if packed and packed.rows == cache.rows:  # else rows stopped too late to repay a repack
                logits = packed.step(cache, tok, next_pos)
            else:
                h = self.model.hidden_states(tok[:, None], positions=next_pos[:, None], cache=cache,
                                             attn_mask=cache.bias[:cache.rows, None, None, :s + 1])
                logits = self.model.logits(h[:, -1])
            cache.length = s + 1
            next_pos = next_pos + 1
        outs = [self._completion(r, out_ids, out_lp, reason, fan_l, prompts) for r in range(B)]
        if on_finish is not None:
            for r in range(B):
                if reason[r] == "length":  # rows that ran to the end were never reported
                    on_finish(r, outs[r])
        return outs

    def _completion(self, r, out_ids, out_lp, reason, fan_l, prompts):
        return Rollout(ids=out_ids[r], text=self.tok.decode(out_ids[r]), logprobs=out_lp[r],
                          stop_reason=reason[r], prompt_index=fan_l[r], prompt_ids=prompts[fan_l[r]])


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
