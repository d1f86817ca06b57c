"""together.py's speed machinery: the learner's pass with each problem's prompt run once, and the sampler's step
with each problem's prompt prefix prefilled once and the adapters' products batched [ours; Punica's BGMV].

Learning.
Plainly (together.Together.backward), K problems' groups go through the shared model as N rows of prompt +
completion, every member's prompt computed again. Here, as fast/shared_prompt.py does for one problem:
- the K prompts run once, one row each (left-padded to the longest), their keys/values kept with their graph;
- every problem's completions go in micro-batches of similar length across problems, each row attending to its
  own problem's prompt keys/values (gathered by row), the rows of a problem side by side so that each LoRA layer
  adds one low-rank product per problem (together.RowsLoRA);
- each micro-batch's losses (a problem's over its own rows) are backpropagated at once; the gradients reaching
  the prompts' activations accumulate on detached copies, and the prompts' backward runs once at the end.

Sampling (FastTogetherStep). Plainly (together.TogetherStep) every prompt is prefilled whole, and each decode step's
LoRA layers add K low-rank products, one per problem (2K small products a layer, each paying a call's overhead).
Here:
- a problem's prompts share a prefix (a task's instructions: Semantle's NS prompts differ only in their last
  line); it is prefilled once per problem, one row each, and copied to that problem's rows, which then prefill
  only the rest. (The shared-prefix row of fast/cascade.py cannot serve: each problem's adapter gives the same
  tokens other keys and values.)
- with no graph, the LoRA layers multiply every problem's rows by its adapter in two batched products over the
  adapters stacked once per sampling call (BatchedRowsLoRA), rows padded to the largest problem's;
- the draw is fast/decode.py's blocked search.
tests/test_together.py proves each equal to the plain path: the learner's log-probs, losses and adapter gradients,
and the sampler's tokens and log-probs.
"""
from itertools import accumulate

import torch

from fast.cascade import common_prefix
from fast.cpu_linear import frozen_products
from fast.decode import sample_blocked
from fast.shared_prompt import PromptRecorder, _layer_checkpoint, microbatches, target_logprobs
from grpo import LEARNER_DTYPES
from model import Cache
from together import RowsLoRA, Together, TogetherStep


class RowsPrefix(Cache):
    """Attention cache of the completion pass: row i attends to its problem's prompt keys/values
    (k[layer][prompt_of[i]]), then to its own."""

    def __init__(self, k: dict, v: dict, prompt_of: torch.Tensor):
        self.k, self.v, self.prompt_of = k, v, prompt_of  # layer -> (K, H_kv, Tp, D); (rows,) prompt indices

    def update(self, layer, k, v):
        pk = self.k[layer].index_select(0, self.prompt_of)  # (rows, H_kv, Tp, D)
        pv = self.v[layer].index_select(0, self.prompt_of)
        return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)


def _cut(t, rows, width):
    """A problem's per-row tensor for some of its rows: (N,) -> (rows,), (N, T) -> (rows, width); None stays None."""
    return None if t is None else t[rows] if t.dim() == 1 else t[rows, :width]


class BatchedRowsLoRA(RowsLoRA):
    """together.RowsLoRA whose low-rank updates, with no graph (sampling), are two batched products over every
    problem's rows at once: x (rows, T, C) -> per run of rows (R runs, padded to the longest, n rows)
    (R, n T, C) @ A^T (R, C, r) @ B^T (R, r, C_out) * scale. The stacked adapters are kept while no adapter
    changes (their tensors' versions), so a sampling call stacks them once."""
    _stack = None  # (key, A (R, r, C), B (R, C_out, r), scale (R, 1, 1))

    def forward(self, x):
        runs = self.rows.runs
        loras = [self.loras[k] for k, _, _ in runs]
        if torch.is_grad_enabled() or len(runs) < 2 or not all(lo.enabled for lo in loras) or \
                len({lo.lora_A.weight.shape for lo in loras}) > 1 or any(lo.training and isinstance(lo.dropout, torch.nn.Dropout) for lo in loras):
            return super().forward(x)
        y = self.base_layer(x)
        assert runs[-1][2] == x.shape[0], f"rows of {x.shape[0]} tagged as {len(self.rows.slots)}"
        key = tuple((id(lo), lo.lora_A.weight._version, lo.lora_B.weight._version) for lo in loras)
        if self._stack is None or self._stack[0] != key:
            self._stack = (key, torch.stack([lo.lora_A.weight for lo in loras]),
                           torch.stack([lo.lora_B.weight for lo in loras]),
                           torch.tensor([lo.scale for lo in loras], device=x.device)[:, None, None])
        _, A, Bw, scale = self._stack
        B, T, C = x.shape
        sizes = [hi - lo for _, lo, hi in runs]
        n = max(sizes)
        if min(sizes) == n:
            xs = x.reshape(len(runs), n * T, C)
        else:
            xs = x.new_zeros(len(runs), n, T, C)
            for j, (_, lo, hi) in enumerate(runs):
                xs[j, :hi - lo] = x[lo:hi]
            xs = xs.view(len(runs), n * T, C)
        d = torch.bmm(torch.bmm(xs.float(), A.transpose(1, 2)), Bw.transpose(1, 2)) * scale  # (R, n T, C_out)
        d = d.view(len(runs), n, T, -1)
        d = d.reshape(B, T, -1) if min(sizes) == n else torch.cat([d[j, :s] for j, s in enumerate(sizes)])
        return y + d.to(y.dtype)


class FastTogether(Together):
    """together.Together whose learner pass runs each problem's prompt once (this file's docstring).
    tokens_per_microbatch, activation_checkpointing and learner_dtype as GRPOConfig's, shared by the problems."""

    def __init__(self, base, slots: int, targets, tokens_per_microbatch=4096, activation_checkpointing=False,
                 learner_dtype="float32"):
        super().__init__(base, slots, targets)
        for layer in self.layers.values():
            layer.__class__ = BatchedRowsLoRA
        self.tokens_per_microbatch, self.activation_checkpointing = tokens_per_microbatch, activation_checkpointing
        self.products = LEARNER_DTYPES[learner_dtype]

    def backward(self, slots, prompts, groups):
        with frozen_products(self.products):
            return self._backward(slots, prompts, groups)

    def _backward(self, slots, prompts, groups):
        dev = self.model.lm_head.weight.device
        layer_call = _layer_checkpoint if self.activation_checkpointing else None
        # The prompts: one row each, left-padded; a pad query sees itself so no softmax row is empty.
        Tp = max(len(p) for p in prompts)
        pad = torch.tensor([Tp - len(p) for p in prompts], device=dev)  # (K,)
        x = torch.tensor([[0] * (Tp - len(p)) + list(p) for p in prompts], device=dev)  # (K, Tp)
        s = torch.arange(Tp, device=dev)
        real = s[None] >= pad[:, None]  # (K, Tp)
        mask = None if not pad.any() else (
            ((s[:, None] >= s[None, :]) & real[:, None, :] | torch.eye(Tp, dtype=torch.bool, device=dev))[:, None])
        rec = PromptRecorder()
        self.rows.set(slots)
        h_last = self.model.hidden_states(x, positions=(s[None] - pad[:, None]).clamp(min=0), cache=rec,
                                          attn_mask=mask, layer_call=layer_call)[:, -1:]  # (K, 1, C)
        layers = sorted(rec.k)
        roots = [h_last] + [rec.k[i] for i in layers] + [rec.v[i] for i in layers]
        leaves = [r.detach().requires_grad_() for r in roots]
        last_h = leaves[0]
        keys, values = dict(zip(layers, leaves[1:1 + len(layers)])), dict(zip(layers, leaves[1 + len(layers):]))

        # Every trained row of every problem, (length, problem, row), micro-batched by length across problems.
        rows = sorted((int(n), i, r) for i, g in enumerate(groups) for r, n in enumerate(g.lengths.tolist()))
        out = [torch.zeros(g.ids.shape, device=dev) for g in groups]
        totals = [torch.zeros(()) for _ in groups]
        per_row = [g.epoch_rows() for g in groups]
        for part in microbatches([n for n, _, _ in rows], self.tokens_per_microbatch):
            part = sorted(rows[part], key=lambda t: t[1:])  # a problem's rows side by side (one LoRA run each)
            W = max(n for n, _, _ in part)  # this micro-batch's width
            B, Tin = len(part), W - 1  # the last token is only ever a target, never an input
            prob = torch.tensor([i for _, i, _ in part], device=dev)  # (B,) each row's problem
            x = torch.zeros(B, W, dtype=torch.long, device=dev)
            for j, (n, i, r) in enumerate(part):
                x[j, :n] = groups[i].ids[r, :n]
            h = last_h.index_select(0, prob)  # (B, 1, C): the state that predicts the first completion token
            if Tin > 0:
                # completion position t sees its own prompt's real tokens and completion positions <= t
                allowed = torch.ones(B, Tin, Tp + Tin, dtype=torch.bool, device=dev)
                allowed[:, :, :Tp] = real.index_select(0, prob)[:, None, :]
                allowed[:, :, Tp:] = torch.tril(torch.ones(Tin, Tin, dtype=torch.bool, device=dev))
                attn = torch.zeros(allowed.shape, dtype=h.dtype, device=dev).masked_fill_(~allowed, float("-inf"))
                positions = (Tp - pad.index_select(0, prob))[:, None] + torch.arange(Tin, device=dev)  # (B, Tin)
                self.rows.set([slots[i] for _, i, _ in part])
                hc = self.model.hidden_states(x[:, :Tin], positions=positions, cache=RowsPrefix(keys, values, prob),
                                              attn_mask=attn[:, None], layer_call=layer_call)
                h = torch.cat([h, hc], dim=1)  # (B, W, C): the state before each target token
            logp = target_logprobs(self.model, h, x)  # (B, W)
            loss, lo = 0.0, 0
            while lo < B:  # each problem's loss over its own rows of this micro-batch
                i = part[lo][1]
                hi = next((j for j in range(lo, B) if part[j][1] != i), B)
                mine = torch.tensor([r for _, _, r in part[lo:hi]], device=dev)
                w = max(n for n, _, _ in part[lo:hi])
                li = groups[i].loss_fn(logp[lo:hi, :w], **{k: _cut(v, mine, w) for k, v in per_row[i].items()})
                out[i][mine, :w] = logp[lo:hi, :w].detach()
                totals[i] += li.detach().cpu()
                loss, lo = loss + li, hi
            loss.backward()
        # The prompts' backward, once for all problems (with their rows' tags again: a checkpointed layer
        # recomputes its forward here).
        self.rows.set(slots)
        pairs = [(r, l.grad) for r, l in zip(roots, leaves) if r.requires_grad and l.grad is not None]
        if pairs:
            torch.autograd.backward([r for r, _ in pairs], [g for _, g in pairs])
        return [(o, t) for o, t in zip(out, totals)]


class FastTogetherStep(TogetherStep):
    """together.TogetherStep with each problem's prompt prefix prefilled once, batched adapter products (the
    Together model a FastTogether) and the blocked draw (this file's docstring)."""

    def row_prefixes(self, prompts):
        """Per prompt: the prefix its problem's prompts share (each keeps at least its last token), for the
        problem's runs of prompts (prompt_slots)."""
        out, i = [], 0
        while i < len(prompts):
            j = next((j for j in range(i, len(prompts)) if self.prompt_slots[j] != self.prompt_slots[i]), len(prompts))
            out += [common_prefix(prompts[i:j]) if j - i > 1 else 0] * (j - i)
            i = j
        return out

    def fill_row_prefixes(self, cache, prefixes):
        # One row per problem's prefix (left-padded to the longest), then each copied to its prompts' rows.
        starts = [i == 0 or self.prompt_slots[i] != self.prompt_slots[i - 1] for i in range(len(prefixes))]
        first = [i for i, s in enumerate(starts) if s]
        rows = [prefixes[i] for i in first]
        of = torch.tensor(list(accumulate(starts))) - 1  # (P,) each prompt's prefix row
        U, L, dev = len(rows), max(len(p) for p in rows), cache.k.device
        pad = torch.tensor([L - len(p) for p in rows], device=dev)
        ids = torch.tensor([[0] * (L - len(p)) + list(p) for p in rows], device=dev)  # (U, L)
        s = torch.arange(L, device=dev)
        real = s[None] >= pad[:, None]  # (U, L)
        cache.rows, cache.length = U, 0
        cache.bias[:U].fill_(float("-inf"))
        cache.bias[:U, :L].masked_fill_(real, 0.0)
        allowed = (s[:, None] >= s[None, :]) & real[:, None, :] | torch.eye(L, dtype=torch.bool, device=dev)
        mask = torch.zeros(allowed.shape, dtype=cache.k.dtype, device=dev).masked_fill_(~allowed, float("-inf"))
        cache.tags.set([self.prompt_slots[i] for i in first])
        self.model.hidden_states(ids, positions=(s[None] - pad[:, None]).clamp(min=0), cache=cache,
                                 attn_mask=mask[:, None])
        cache.length = L
        cache.select_rows(of.to(dev))  # every prompt's row gets its problem's prefix (and its tag)

    def draw(self, logits, temperature, top_k, top_p, u):
        return sample_blocked(logits, temperature, top_k, top_p, u)
