"""together.py's speed machinery: the learner's pass with each problem's prompt run once, and the sampler's step
with each problem's prompt prefix prefilled once and the adapters' products batched [ours; Punica's BGMV].

Learning.
Plainly (together.Together.backward), K problems' groups go through the shared model as N rows of prompt +
completion, every member's prompt computed again. Here, as fast/shared_prompt.py does for one problem:
- the K prompts run once, one row each (left-padded to the longest), their keys/values kept with their graph;
- every problem's completions go in micro-batches of similar length across problems, each row attending to its
  own problem's prompt keys/values (gathered by row), the rows of a problem side by side;
- each micro-batch's losses (a problem's over its own rows) are backpropagated at once; the gradients reaching
  the prompts' activations accumulate on detached copies, and the prompts' backward runs once at the end;
- the KL pull's reference (the base policy) takes every problem's rows through the base weights in one pass, the
  base's prompt pass made once per prompt and kept.

Sampling (FastTogetherStep). Plainly (together.TogetherStep) every prompt is prefilled whole, and each decode step's
LoRA layers add K low-rank products, one per problem (2K small products a layer, each paying a call's overhead).
Here:
- a problem's prompts share a prefix (a task's instructions: Semantle's NS prompts differ only in their last
  line); it is prefilled once per problem, one row each, and copied to that problem's rows, which then prefill
  only the rest. (The shared-prefix row of fast/cascade.py cannot serve: each problem's adapter gives the same
  tokens other keys and values.)
- the LoRA layers multiply every problem's rows by its adapter in two batched products over the stacked adapters
  (BatchedRowsLoRA; in the learner too), rows padded to the largest problem's;
- the draw is fast/decode.py's blocked search.
tests/test_together.py proves each equal to the plain path: the learner's log-probs, losses and adapter gradients,
and the sampler's tokens and log-probs.
"""
from itertools import accumulate

import torch

from fast.cascade import common_prefix
from fast.cpu_linear import frozen_products
from fast.decode import sample_blocked
from fast.shared_prompt import PromptRecorder, _cut, _layer_checkpoint, microbatches, target_logprobs
from grpo import LEARNER_DTYPES
from model import Cache
from sampling import left_padded
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


class BatchedRowsLoRA(RowsLoRA):
    """together.RowsLoRA whose low-rank updates are two batched products over every problem's rows at once:
    x (rows, T, C) -> per run of rows (R runs, padded to the longest, n rows) (R, n T, C) @ A^T (R, C, r)
    @ B^T (R, r, C_out) * scale. With no graph (sampling) the stacked adapters are kept while no adapter changes
    (their tensors' versions), so a sampling call stacks them once; under autograd they are stacked in the graph
    each pass, so each problem's gradient flows back to its own A and B."""
    _stack = None  # ((the adapters' tensors, their versions), A (R, r, C), B (R, C_out, r), scale (R, 1, 1))

    def forward(self, x):
        runs = self.rows.runs
        loras = [self.loras[k] for k, _, _ in runs]
        if len(runs) < 2 or not all(lo.enabled for lo in loras) or len({lo.lora_A.weight.shape for lo in loras}) > 1 \
                or any(lo.training and isinstance(lo.dropout, torch.nn.Dropout) for lo in loras):
            return super().forward(x)
        y = self.base_layer(x)
        assert runs[-1][2] == x.shape[0], f"rows of {x.shape[0]} tagged as {len(self.rows.slots)}"
        A, Bw, scale = self._stacked(loras, x.device)
        B, T, C = x.shape
        sizes = [hi - lo for _, lo, hi in runs]
        n = max(sizes)
        if min(sizes) == n:
            xs = x.reshape(len(runs), n * T, C)
        else:  # (R, n, T, C), each run's rows then zeros
            xs = torch.stack([torch.nn.functional.pad(x[lo:hi], (0, 0, 0, 0, 0, n - hi + lo)) for _, lo, hi in runs])
            xs = xs.view(len(runs), n * T, C)
        d = torch.bmm(torch.bmm(xs.float(), A.transpose(1, 2)), Bw.transpose(1, 2)) * scale  # (R, n T, C_out)
        d = d.view(len(runs), n, T, -1)
        d = d.reshape(B, T, -1) if min(sizes) == n else torch.cat([d[j, :s] for j, s in enumerate(sizes)])
        return y + d.to(y.dtype)

    def _stacked(self, loras, device):
        if torch.is_grad_enabled():
            return (torch.stack([lo.lora_A.weight for lo in loras]), torch.stack([lo.lora_B.weight for lo in loras]),
                    torch.tensor([lo.scale for lo in loras], device=device)[:, None, None])
        # The same tensors (not only the same ids: a finished problem's memory may be reused) at the same versions
        weights = [w for lo in loras for w in (lo.lora_A.weight, lo.lora_B.weight)]
        key = (weights, [w._version for w in weights])
        old = self._stack
        if old is None or old[0][1] != key[1] or len(old[0][0]) != len(weights) or \
                any(a is not b for a, b in zip(old[0][0], weights)):
            self._stack = (key, torch.stack([lo.lora_A.weight for lo in loras]),
                           torch.stack([lo.lora_B.weight for lo in loras]),
                           torch.tensor([lo.scale for lo in loras], device=device)[:, None, None])
        return self._stack[1:]


class FastTogether(Together):
    """together.Together whose learner passes run each problem's prompt once (this file's docstring), and whose
    reference pass (the KL pull's base policy) takes every problem's rows through the base weights at once, the
    base's prompt pass made once per prompt. tokens_per_microbatch, activation_checkpointing and learner_dtype as
    GRPOConfig's, shared by the problems."""

    def __init__(self, base, slots: int, targets, tokens_per_microbatch=4096, activation_checkpointing=False,
                 learner_dtype="float32"):
        super().__init__(base, slots, targets)
        for layer in self.layers.values():
            layer.__class__ = BatchedRowsLoRA
        self.tokens_per_microbatch, self.activation_checkpointing = tokens_per_microbatch, activation_checkpointing
        self.products = LEARNER_DTYPES[learner_dtype]
        self._base_prompts = {}  # prompt ids -> the base policy's prompt pass: it never changes

    def backward(self, slots, prompts, groups):
        with frozen_products(self.products):
            layer_call = _layer_checkpoint if self.activation_checkpointing else None
            roots, shape = self._prompts(self.model, slots, prompts, True, layer_call)
            leaves = [r.detach().requires_grad_() for r in roots]
            done = self._completions(self.model, slots, leaves, shape, groups, layer_call)
            # The prompts' backward, once for all problems (with their rows' tags again: a checkpointed layer
            # recomputes its forward here).
            self.rows.set(slots)
            pairs = [(r, l.grad) for r, l in zip(roots, leaves) if r.requires_grad and l.grad is not None]
            if pairs:
                torch.autograd.backward([r for r, _ in pairs], [g for _, g in pairs])
            return done

    @torch.no_grad()
    def reference(self, prompts, groups):
        with frozen_products(self.products):
            unique = list(dict.fromkeys(tuple(p) for p in prompts))
            self._base_prompts = {p: self._base_prompts.get(p) for p in unique}  # keep the running problems' only
            missing = [p for p in unique if self._base_prompts[p] is None]
            if missing:
                roots, shape = self._prompts(self.base, [0] * len(missing), missing, False, None)
                for i, p in enumerate(missing):  # each prompt's pass, (1, ...) each, and its padding
                    self._base_prompts[p] = ([r[i:i + 1] for r in roots], shape[1][i:i + 1], shape[2][i:i + 1])
            own = [self._base_prompts[tuple(p)] for p in prompts]
            Tp = max(o[1].shape[1] for o in own)
            roots, pad, real = [], [], []
            for o in own:  # left-pad each prompt's pass to the longest
                n = Tp - o[1].shape[1]
                roots.append([o[0][0]] + [torch.nn.functional.pad(t, (0, 0, n, 0)) for t in o[0][1:]])
                pad.append(o[2] + n)
                real.append(torch.nn.functional.pad(o[1], (n, 0), value=False))
            roots = [torch.cat(parts) for parts in zip(*roots)]
            shape = (Tp, torch.cat(real), torch.cat(pad))
            return [lp for lp, _ in self._completions(self.base, [0] * len(prompts), roots, shape, groups, None)]

    def _prompts(self, model, slots, prompts, train, layer_call):
        """The prompts' pass, one row each, left-padded to the longest (a pad query sees itself so no softmax row is
        empty): [the last hidden state (K, 1, C), then each layer's keys, then each layer's values (K, H_kv, Tp,
        D)], and (Tp, which slots are real (K, Tp), the padding (K,))."""
        dev = self.model.lm_head.weight.device
        Tp = max(len(p) for p in prompts)
        pad = torch.tensor([Tp - len(p) for p in prompts], device=dev)  # (K,)
        x = torch.tensor([[0] * (Tp - len(p)) + list(p) for p in prompts], device=dev)  # (K, Tp)
        real, positions, allowed = left_padded(pad, Tp)  # (K, Tp), (K, Tp), (K, Tp, Tp)
        rec = PromptRecorder()
        self.rows.set(slots)
        with torch.set_grad_enabled(train):
            h_last = model.hidden_states(x, positions=positions, cache=rec, attn_mask=allowed[:, None] if pad.any()
                                         else None, layer_call=layer_call)[:, -1:]  # (K, 1, C)
        layers = sorted(rec.k)
        return [h_last] + [rec.k[i] for i in layers] + [rec.v[i] for i in layers], (Tp, real, pad)

    def _completions(self, model, slots, states, shape, groups, layer_call):
        """Every group's completions after its problem's prompt states (`_prompts`' list, the prompts in the
        groups' order), micro-batched by length across problems. Where `states` need a gradient, each
        micro-batch's losses (a problem's over its own rows) are backpropagated. Returns each group's log-probs
        (N_i, T_i) and loss (0 without a gradient), detached."""
        dev = self.model.lm_head.weight.device
        Tp, real, pad = shape
        train = states[0].requires_grad
        n_layers = (len(states) - 1) // 2
        last_h = states[0]  # (K, 1, C)
        keys, values = dict(enumerate(states[1:1 + n_layers])), dict(enumerate(states[1 + n_layers:]))
        rows = sorted((int(n), i, r) for i, g in enumerate(groups) for r, n in enumerate(g.lengths.tolist()))
        out = [torch.zeros(g.ids.shape, device=dev) for g in groups]
        totals = [torch.zeros(()) for _ in groups]
        per_row = [g.epoch_rows() for g in groups] if train else None
        for part in microbatches([n for n, _, _ in rows], self.tokens_per_microbatch):
            part = sorted(rows[part], key=lambda t: t[1:])  # a problem's rows side by side (one LoRA run each)
            W = max(n for n, _, _ in part)  # this micro-batch's width
            B, Tin = len(part), W - 1  # the last token is only ever a target, never an input
            prob = torch.tensor([i for _, i, _ in part], device=dev)  # (B,) each row's problem
            x = torch.zeros(B, W, dtype=torch.long, device=dev)
            for j, (n, i, r) in enumerate(part):
                x[j, :n] = groups[i].ids[r, :n]
            with torch.set_grad_enabled(train):
                h = last_h.index_select(0, prob)  # (B, 1, C): the state that predicts the first completion token
                if Tin > 0:
                    # completion position t sees its own prompt's real tokens and completion positions <= t
                    allowed = torch.ones(B, Tin, Tp + Tin, dtype=torch.bool, device=dev)
                    allowed[:, :, :Tp] = real.index_select(0, prob)[:, None, :]
                    allowed[:, :, Tp:] = torch.tril(torch.ones(Tin, Tin, dtype=torch.bool, device=dev))
                    attn = torch.zeros(allowed.shape, dtype=h.dtype, device=dev).masked_fill_(~allowed, float("-inf"))
                    positions = (Tp - pad.index_select(0, prob))[:, None] + torch.arange(Tin, device=dev)  # (B, Tin)
                    self.rows.set([slots[i] for _, i, _ in part])
                    hc = model.hidden_states(x[:, :Tin], positions=positions, cache=RowsPrefix(keys, values, prob),
                                             attn_mask=attn[:, None], layer_call=layer_call)
                    h = torch.cat([h, hc], dim=1)  # (B, W, C): the state before each target token
                logp = target_logprobs(model, h, x)  # (B, W)
                loss, lo = 0.0, 0
                while lo < B:  # each problem's rows of this micro-batch
                    i = part[lo][1]
                    hi = next((j for j in range(lo, B) if part[j][1] != i), B)
                    mine = torch.tensor([r for _, _, r in part[lo:hi]], device=dev)
                    w = max(n for n, _, _ in part[lo:hi])
                    out[i][mine, :w] = logp[lo:hi, :w].detach()
                    if train:
                        li = groups[i].loss_fn(logp[lo:hi, :w], **{k: _cut(v, mine, w) for k, v in per_row[i].items()})
                        totals[i] += li.detach().cpu()
                        loss = loss + li
                    lo = hi
            if train:
                loss.backward()
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
        real, positions, allowed = left_padded(pad, L)  # (U, L), (U, L), (U, L, L)
        cache.rows, cache.length = U, 0
        cache.bias[:U].fill_(float("-inf"))
        cache.bias[:U, :L].masked_fill_(real, 0.0)
        mask = torch.zeros(allowed.shape, dtype=cache.k.dtype, device=dev).masked_fill_(~allowed, float("-inf"))
        cache.tags.set([self.prompt_slots[i] for i in first])
        self.model.hidden_states(ids, positions=positions, cache=cache, attn_mask=mask[:, None])
        cache.length = L
        cache.select_rows(of.to(dev))  # every prompt's row gets its problem's prefix (and its tag)

    def draw(self, logits, temperature, top_k, top_p, u):
        return sample_blocked(logits, temperature, top_k, top_p, u)
