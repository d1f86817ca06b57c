"""KV-cached batched sampling. The cache belongs to the sampler, not the model (shared/STYLE.md, rule 6).

A batch of P prompts is left-padded and prefilled once; each prompt's cache row is then copied to its n
sample rows, so a GRPO group of G completions of one prompt costs one prefill. Decoding advances every row
by one token per step over a preallocated, fixed-shape cache; rows that stop are dropped from the batch
once a quarter of them are done, so short completions stop costing compute.
"""
from dataclasses import dataclass, field

import torch


@dataclass
class Completion:
    ids: list[int]
    text: str
    logprobs: list[float]  # log-probability of each sampled token under the distribution it was drawn from
    stop_reason: str  # "stop_token" | "stop_string" | "length"
    prompt_index: int = 0
    prompt_ids: list[int] = field(default_factory=list, repr=False)


class KVCache:
    """Keys and values of every layer in one preallocated buffer (L, B_max, H_kv, S_max, D).

    The first `rows` rows are live, filled up to `length` for all of them at once; rows with shorter
    prompts are left-padded, and `bias` (B_max, S_max) is the additive attention mask: 0 where a slot
    holds a real token, -inf where it holds padding (a float mask takes PyTorch's flash kernel on CPU,
    a boolean one its slower math kernel).
    """

    def __init__(self, n_layers, batch, n_kv, max_len, head_dim, dtype, device):
        shape = (n_layers, batch, n_kv, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.bias = torch.zeros(batch, max_len, dtype=dtype, device=device)
        self.rows, self.length = batch, 0

    def fits(self, batch, max_len, dtype, device):
        return (self.k.shape[1] >= batch and self.k.shape[3] >= max_len and self.k.dtype == dtype
                and self.k.device == device)

    def update(self, layer, k, v):
        """Write k, v (rows, H_kv, T, D) at [length, length+T) and return all keys and values so far."""
        s, T = self.length, k.shape[2]
        assert k.shape[0] == self.rows, f"{k.shape[0]} rows of keys for a cache of {self.rows} live rows"
        assert s + T <= self.k.shape[3], f"KV cache full: {s} + {T} > {self.k.shape[3]}"
        self.k[layer, :self.rows, :, s:s + T] = k
        self.v[layer, :self.rows, :, s:s + T] = v
        return self.k[layer, :self.rows, :, :s + T], self.v[layer, :self.rows, :, :s + T]

    def select_rows(self, index):
        """Rows `index` of the live rows become the live rows, in place: fans a prompt out to its group
        (index repeats rows) and drops finished rows (index skips them)."""
        n, s = len(index), self.length
        assert n <= self.k.shape[1], f"{n} rows exceed the cache's {self.k.shape[1]}"
        self.k[:, :n, :, :s] = self.k[:, index, :, :s]
        self.v[:, :n, :, :s] = self.v[:, index, :, :s]
        self.bias[:n] = self.bias[index]
        self.rows = n


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


def sample(logits, temperature, top_k, top_p, generator):
    """One token per row (B,) and its log-probability (B,) under the sampling distribution.

    Inverse-CDF sampling: one uniform number per row. torch.multinomial draws one exponential per
    vocabulary entry (21 ms a step for 16 x 49k on our CPU); this costs a softmax and a cumsum.
    """
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits.float(), -1).gather(-1, tok[:, None])[:, 0]
    logits = sampling_logits(logits, temperature, top_k, top_p)
    cdf = logits.softmax(-1).cumsum_(-1)  # (B, V)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    # right=True picks the first entry whose cdf exceeds u, so a zero-probability token is never chosen.
    tok = torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=cdf.shape[1] - 1)
    # log p(tok), exact rather than a difference of two cdf entries
    logp = logits.gather(-1, tok[:, None])[:, 0] - torch.logsumexp(logits, -1)
    return tok, logp


class Sampler:
    def __init__(self, model, tokenizer):
        self.model, self.tok = model, tokenizer
        self.cache = None

    def _cache(self, batch, max_len, dtype, device):
        if self.cache is None or not self.cache.fits(batch, max_len, dtype, device):
            # Reallocated only when a request outgrows it; later requests reuse the memory.
            cfg = self.model.config
            self.cache = KVCache(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim,
                                 dtype, device)
        return self.cache

    @torch.inference_mode()
    def generate(self, prompts, n=1, max_new_tokens=128, temperature=1.0, top_p=1.0, top_k=0,
                 stop_strings=(), generator=None, stop_ids=None) -> list[Completion]:
        """Sample n completions of each prompt (token-id lists or strings); n may be a list, one per prompt.

        stop_ids None means the tokenizer's; () never stops on a token (benchmarks).
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
                                  stops, generator, device, dtype)
        finally:
            model.train(was_training)

    def _generate(self, prompts, counts, max_new, temperature, top_p, top_k, stop_strings, stops, gen, device, dtype):
        P, Tp = len(prompts), max(len(p) for p in prompts)
        pad = torch.tensor([Tp - len(p) for p in prompts], device=device)  # left padding per prompt
        ids = torch.full((P, Tp), self.tok.pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, Tp - len(p):] = torch.tensor(p)
        ids = ids.to(device)
        B = sum(counts)
        cache = self._cache(max(B, P), Tp + max_new, dtype, device)
        cache.rows, cache.length = P, 0
        slots = torch.arange(Tp, device=device)
        real = slots[None] >= pad[:, None]  # (P, Tp)
        cache.bias[:P].zero_()
        cache.bias[:P, :Tp].masked_fill_(~real, float("-inf"))
        positions = (slots[None] - pad[:, None]).clamp(min=0)  # (P, Tp)
        # Causal over real tokens; a pad query also sees itself so no softmax row is empty (NaN).
        allowed = (slots[:, None] >= slots[None, :]) & real[:, None, :] | torch.eye(Tp, dtype=torch.bool, device=device)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
        h = self.model.hidden_states(ids, positions=positions, cache=cache, attn_mask=mask[:, None])
        cache.length = Tp
        logits = self.model.logits(h[:, -1])  # (P, V): only the last position is ever sampled from
        fan = torch.arange(P, device=device).repeat_interleave(torch.tensor(counts, device=device))
        cache.select_rows(fan)  # one copy of each prompt's cache per sample
        logits = logits[fan]
        next_pos = (Tp - pad)[fan]  # (B,) position of the next token of each row
        rows = list(range(B))  # original row of each live batch slot
        out_ids = [[] for _ in range(B)]
        out_lp = [[] for _ in range(B)]
        reason = ["length"] * B
        stop_window = max((len(s.encode()) for s in stop_strings), default=0) + 1
        live = torch.ones(B, dtype=torch.bool)
        for step in range(max_new):
            tok, lp = sample(logits, temperature, top_k, top_p, gen)
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
                    if any(s in tail for s in stop_strings):
                        reason[r], live[slot] = "stop_string", False
            if not live.any() or step == max_new - 1:
                break
            if (~live).sum() * 4 >= len(rows):  # drop finished rows: a cache copy, repaid by smaller steps
                keep = live.nonzero()[:, 0]
                cache.select_rows(keep.to(device))
                rows = [rows[i] for i in keep.tolist()]
                tok, next_pos, live = tok[keep.to(device)], next_pos[keep.to(device)], live[keep]
            s = cache.length
            h = self.model.hidden_states(tok[:, None], positions=next_pos[:, None], cache=cache,
                                         attn_mask=cache.bias[:cache.rows, None, None, :s + 1])
            cache.length = s + 1
            next_pos = next_pos + 1
            logits = self.model.logits(h[:, -1])
        owner = fan.tolist()
        return [Completion(ids=out_ids[r], text=self.tok.decode(out_ids[r]), logprobs=out_lp[r],
                           stop_reason=reason[r], prompt_index=owner[r], prompt_ids=prompts[owner[r]])
                for r in range(B)]
