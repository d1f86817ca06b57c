"""KV-cached batched sampling. The cache belongs to the sampler, not the model (shared/STYLE.md, rule 6).

A batch of prompts is prefilled once, left-padded to one length, and each prompt's cache rows are then copied
to its n samples (as nanochat does). Decoding advances every row by one token per step over a preallocated
cache, drawing each token from one uniform number per row with the sampler's own torch.Generator (same seed,
same samples). Rows that stop are dropped from the batch once a quarter of them are done, so short
completions stop costing compute.

The model runs through a `ModelStep`: here the plain one. fast/decode.py's FastStep is the same interface
with the speed machinery run.py uses: the prompts' shared prefix kept once for all rows (cascade attention),
packed decode weights, a compiled step, a cheaper search for the draw.
"""
from dataclasses import dataclass, field

import torch

from model import Cache


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


class KVCache(Cache):
    """Keys and values of a batch, in preallocated buffers.

    k/v (L, B_max, H_kv, S_max, D): each row's tokens (its prompt, left-padded, then what it generates); the
    first `rows` rows are live and filled up to `length`. `bias` (B_max, S_max) is their additive mask: 0 on
    real tokens, -inf on padding and on slots not yet written (float, as a boolean mask sends SDPA to its slow
    path). fast/cascade.py's cache adds one prefix that every row reads.
    """

    def __init__(self, n_layers, batch, n_kv, max_len, head_dim, dtype, device):
        shape = (n_layers, batch, n_kv, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.bias = torch.zeros(batch, max_len, dtype=dtype, device=device)
        self.rows, self.length = batch, 0

    def fits(self, batch, max_len, dtype, device):
        return self.k.shape[1] >= batch and self.k.shape[3] >= max_len and self.k.dtype == dtype and \
            self.k.device == device

    def update(self, layer, k, v):
        """Store the live rows' new keys/values (rows, H_kv, T, D) after `length`; all of theirs, (rows, H_kv,
        length + T, D) each. The caller advances `length` once every layer has run."""
        s, T = self.length, k.shape[2]
        assert s + T <= self.k.shape[3], f"KV cache full: {s} + {T} > {self.k.shape[3]}"
        assert k.shape[0] == self.rows, f"{k.shape[0]} rows of keys for a cache of {self.rows} live rows"
        self.k[layer, :self.rows, :, s:s + T] = k
        self.v[layer, :self.rows, :, s:s + T] = v
        return self.k[layer, :self.rows, :, :s + T], self.v[layer, :self.rows, :, :s + T]

    def select_rows(self, index):
        """Rows `index` of the live rows become the live rows, in place: fans a prompt out to its samples
        (index repeats rows) and drops finished rows (index skips them)."""
        n, s = len(index), self.length
        assert n <= self.k.shape[1], f"{n} rows exceed the cache's {self.k.shape[1]}"
        self.k[:, :n, :, :s] = self.k[:, index, :, :s]
        self.v[:, :n, :, :s] = self.v[:, index, :, :s]
        self.bias[:n] = self.bias[index]
        self.rows = n


def left_padded(pad: torch.Tensor, S: int):
    """Rows left-padded by pad (N,) to S slots: which slots are real (N, S), each slot's position (N, S) (a pad's
    is 0), and which keys each query may attend to (N, S, S): causal over real tokens, and a pad query also sees
    itself, so that no softmax row is empty (NaN)."""
    s = torch.arange(S, device=pad.device)
    real = s[None] >= pad[:, None]
    allowed = (s[:, None] >= s[None, :]) & real[:, None, :] | torch.eye(S, dtype=torch.bool, device=pad.device)
    return real, (s[None] - pad[:, None]).clamp(min=0), allowed


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
    number per row, u (B, 1) in [0, 1): the first token whose cumulative probability exceeds u (inverse-CDF
    sampling; right=True means a token of zero probability is never chosen). temperature 0 is the argmax.
    fast/decode.py draws the same tokens with a cheaper search."""
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits.float(), -1).gather(-1, tok[:, None])[:, 0]
    logp = torch.log_softmax(sampling_logits(logits, temperature, top_k, top_p), -1)  # (B, V)
    cum = logp.exp().cumsum(-1)  # (B, V)
    u = torch.minimum(u.to(cum.device) * cum[:, -1:], torch.nextafter(cum[:, -1:], torch.zeros_like(u)))  # < total
    tok = torch.searchsorted(cum, u, right=True)[:, 0]
    return tok, logp.gather(-1, tok[:, None])[:, 0]


class ModelStep:
    """How the sampler runs the model, plainly: a KVCache, no shared prefix, each token through the model's
    modules, the draw above. fast/decode.py's FastStep has the same methods over a shared-prefix cache, packed
    weights or a compiled step (run.py uses it; tests/test_sampler.py proves it draws the same samples)."""
    free_copies = False  # free the decode copies when a call ends: the plain step has none
    static = False  # a step over fixed shapes (compiled): finished rows stay in the batch
    cache_type = KVCache

    def __init__(self, model):
        self.model, self.cache = model, None

    def prefix_length(self, prompts, samples) -> int:
        """How many leading tokens, shared by every prompt, go into one cache row read by all: none here."""
        return 0

    def row_prefixes(self, prompts) -> list[int]:
        """How many leading tokens of each prompt go into its cache row ahead of the rest, from a pass of their
        own (`fill_row_prefixes`: a prefix that several prompts share, computed once and copied): none here."""
        return [0] * len(prompts)

    def fill_row_prefixes(self, cache, prefixes):
        """Write each prompt's prefix (token lists, `row_prefixes` long) into its live row's first slots, the
        shorter ones left-padded, and set `cache.length` past them."""
        raise NotImplementedError("the plain step prefills whole prompts")

    def new_cache(self, batch, max_len, prefix_len, dtype, device) -> KVCache:
        """A cache for `batch` rows of `max_len` tokens, kept between calls and grown, never shrunk."""
        c = self.cache
        if c is None or not c.fits(batch, max_len, dtype, device):
            cfg = self.model.config
            self.cache = None  # free the old buffers before allocating the new ones
            self.cache = self.cache_type(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len,
                                         cfg.head_dim, dtype, device)
        self.cache.rows, self.cache.length = batch, 0
        return self.cache

    def begin(self, rows, max_new):
        """Called once the prompts are prefilled, before `rows` rows decode up to `max_new` tokens."""

    def drop_now(self, rows, live, steps_left) -> bool:
        """Whether to drop the finished rows now: once a quarter are done (a cache copy, repaid by smaller steps)."""
        return (rows - live) * 4 >= rows

    def dropped(self, rows):
        """The batch now has `rows` rows."""

    def __call__(self, cache, tok, pos):
        """Logits (rows, V) of the token after tok (rows,) at positions pos (rows,); the new token's slot in the
        cache mask is already open, and the caller advances the cache's length."""
        s = cache.length
        h = self.model.hidden_states(tok[:, None], positions=pos[:, None], cache=cache,
                                     attn_mask=cache.bias[:cache.rows, None, None, :s + 1])
        return self.model.logits(h[:, -1])

    def draw(self, logits, temperature, top_k, top_p, u):
        """The next token of each row and its log-probability: `sample`."""
        return sample(logits, temperature, top_k, top_p, u)

    def end(self):
        """The call is over: free the decode copies if `free_copies` (the plain step has none)."""
        if self.free_copies:
            self.release()

    def release(self):
        """Free the decode copies now; the next call rebuilds them."""


class Sampler:
    """Samples completions of a batch of prompts. `step` says how the model runs (ModelStep by default; run.py
    passes fast/decode.py's FastStep); the loop, the draws and the stopping rules are the same for every step."""

    def __init__(self, model, tokenizer, step=None):
        self.model, self.tok = model, tokenizer
        self.step = step or ModelStep(model)

    @torch.inference_mode()
    def generate(self, prompts, n=1, max_new_tokens=128, temperature=1.0, top_p=1.0, top_k=0,
                 stop_strings=(), generator=None, stop_ids=None, stop_when=None, on_finish=None) -> list[Rollout]:
        """Sample n completions of each prompt (token-id lists or strings); n may be a list, one per prompt.

        generator: one torch.Generator, or one per prompt (prompts in a row with the same one draw from it together).
        stop_ids None means the tokenizer's; () never stops on a token (benchmarks). A row stops when its
        tail contains a stop string and, if given, `stop_when(text so far)` agrees (a task's own test; or one such
        test per prompt).
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
        was_training = self.model.training
        self.model.eval()
        try:
            stops = set(self.tok.stop_ids if stop_ids is None else stop_ids)
            return self._generate(prompts, counts, max_new_tokens, temperature, top_p, top_k, tuple(stop_strings),
                                  stop_when, on_finish, stops, generator)
        finally:
            self.model.train(was_training)
            self.step.end()

    def _prefill(self, prompts, counts, max_new):
        """Prefill every prompt once (left-padded to one length), then copy each prompt's cache to its samples.
        Returns the cache, the logits of each sample's first token (B, V), each sample's next position (B,) and
        its prompt (B,)."""
        model, step, P = self.model, self.step, len(prompts)
        device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
        shared = step.prefix_length(prompts, sum(counts))
        own = step.row_prefixes([p[shared:] for p in prompts])  # tokens each row holds before its rest
        # each rest at least one token: its last position yields the logits
        rest = [p[shared + o:] for p, o in zip(prompts, own)]
        Tp = max(len(r) for r in rest)
        pad = torch.tensor([Tp - len(r) for r in rest], device=device)  # left padding per prompt
        ids = torch.full((P, Tp), self.tok.pad_id, dtype=torch.long)
        for i, r in enumerate(rest):
            ids[i, Tp - len(r):] = torch.tensor(r)
        ids = ids.to(device)
        cache = step.new_cache(max(sum(counts), P), max(own) + Tp + max_new, shared, dtype, device)
        if shared:
            step.fill_prefix(cache, prompts[0][:shared])
        cache.rows = P
        cache.bias[:P].fill_(float("-inf"))  # slots not yet written stay masked (a compiled step reads them all)
        if any(own):
            step.fill_row_prefixes(cache, [p[shared:shared + o] for p, o in zip(prompts, own)])
        L = cache.length  # slots before the rest: the rows' own prefixes (0 without)
        real, positions, allowed = left_padded(pad, Tp)  # (P, Tp), (P, Tp), (P, Tp, Tp)
        cache.bias[:P, L:L + Tp].masked_fill_(real, 0.0)
        start = shared + torch.tensor(own, device=device)  # (P,) each rest's first position
        positions = start[:, None] + positions
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
        mask = torch.cat([cache.bias[:P, None, :L].expand(P, Tp, L), mask], dim=2)  # (P, Tp, L + Tp)
        h = model.hidden_states(ids, positions=positions, cache=cache, attn_mask=mask[:, None])
        cache.length = L + Tp
        logits = model.logits(h[:, -1])  # (P, V): only the last position is ever sampled from
        fan = torch.arange(P, device=device).repeat_interleave(torch.tensor(counts, device=device))
        cache.select_rows(fan)  # one copy of each prompt's cache per sample
        return cache, logits[fan], (start + Tp - pad)[fan], fan.tolist()

    def _generate(self, prompts, counts, max_new, temperature, top_p, top_k, stop_strings, stop_when, on_finish,
                  stops, gen):
        step, B = self.step, sum(counts)
        cache, logits, next_pos, fan = self._prefill(prompts, counts, max_new)
        rows = list(range(B))  # original row of each live batch slot
        out_ids = [[] for _ in range(B)]
        out_lp = [[] for _ in range(B)]
        reason = ["length"] * B
        stop_window = max((len(s.encode()) for s in stop_strings), default=0) + 1
        live = torch.ones(B, dtype=torch.bool)
        step.begin(B, max_new)

        def completion(r):
            return Rollout(ids=out_ids[r], text=self.tok.decode(out_ids[r]), logprobs=out_lp[r],
                           stop_reason=reason[r], prompt_index=fan[r], prompt_ids=prompts[fan[r]])

        # Each run of prompts that share a generator draws from it (one generator per problem when several problems
        # sample together: each draws what it would alone).
        gens = gen if isinstance(gen, (list, tuple)) else [gen] * len(prompts)
        assert len(gens) == len(prompts), f"{len(gens)} generators for {len(prompts)} prompts"
        runs = []  # [generator, rows]
        for g, c in zip(gens, counts):
            if runs and runs[-1][0] is g:
                runs[-1][1] += c
            else:
                runs.append([g, c])
        for t in range(max_new):
            # One uniform per original row, drawn whether or not the row is still in the batch: a row's
            # samples do not depend on when finished rows are dropped.
            u = torch.cat([torch.rand(n, 1, generator=g) for g, n in runs])[rows] if temperature != 0 else None
            tok, lp = step.draw(logits, temperature, top_k, top_p, u)
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
                    when = stop_when[fan[r]] if isinstance(stop_when, (list, tuple)) else stop_when
                    if any(s in tail for s in stop_strings) and (
                            when is None or when(self.tok.decode(out_ids[r]))):
                        reason[r], live[slot] = "stop_string", False
                if not live[slot] and on_finish is not None:
                    on_finish(r, completion(r))
            if not live.any() or t == max_new - 1:
                break
            if step.drop_now(len(rows), int(live.sum()), max_new - t - 1):
                keep = live.nonzero()[:, 0]
                cache.select_rows(keep.to(cache.k.device))
                rows = [rows[i] for i in keep.tolist()]
                tok, next_pos, live = tok[keep.to(tok.device)], next_pos[keep.to(tok.device)], live[keep]
                step.dropped(len(rows))
            cache.bias[:cache.rows, cache.length] = 0.0  # the new token's own slot
            logits = step(cache, tok, next_pos)
            cache.length += 1
            next_pos = next_pos + 1
        outs = [completion(r) for r in range(B)]
        if on_finish is not None:
            for r in range(B):
                if reason[r] == "length":  # rows that ran to the end were never reported
                    on_finish(r, outs[r])
        return outs
