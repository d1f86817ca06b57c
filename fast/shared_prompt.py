"""The learner with the task prompt computed once for the whole group: the learner's speed machinery [ours].

Plainly (grpo.Learner), the log-probs of a group's completions under the task prompt are N forward passes over
prompt + completion. ARC prompts are thousands of tokens and completions a few dozen, so that spends nearly all
the time on N copies of the same prompt. SharedPromptLearner is the same learner with this file's passes (run.py
builds it; tests/test_engine.py proves the two give the same gradient):
- the prompt runs once (batch 1) and its keys/values are kept with their graph (`PromptRecorder`);
- completions attend to them, expanded over the rows without a copy (`SharedPrefix`), in micro-batches of
  similar length, each as wide as its longest row;
- with a loss, each micro-batch's loss is backpropagated at once; the gradients reaching the shared prompt
  activations accumulate on detached copies, and the prompt's own backward runs once at the end.
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fast.cpu_linear import frozen_products, use_fast_linear
from grpo import LEARNER_DTYPES, Learner
from lora import lora_disabled
from model import Cache

LOGITS_BYTES = 1 << 27  # float32 logits (positions x vocabulary) computed at once: 128 MiB, ~220 positions of
#                        a 152k vocabulary; under autograd each such chunk is recomputed in backward, not kept


class PromptRecorder(Cache):
    """Attention cache of the prompt pass: keeps each layer's keys/values (with their graph). Recording the
    same layer again (activation checkpointing recomputes in backward) just overwrites, so it is harmless."""

    def __init__(self):
        self.k, self.v = {}, {}

    def update(self, layer, k, v):
        self.k[layer], self.v[layer] = k, v
        return k, v


class SharedPrefix(Cache):
    """Attention cache of the completion pass: every row attends to the prompt's keys/values, expanded over
    the rows without a copy, followed by its own. A pure function, so checkpointing may recompute it."""

    def __init__(self, k: dict, v: dict):
        self.k, self.v = k, v  # layer -> (1, H_kv, Tp, D)

    def update(self, layer, k, v):
        pk = self.k[layer].expand(k.shape[0], -1, -1, -1)  # (rows, H_kv, Tp, D)
        pv = self.v[layer].expand(k.shape[0], -1, -1, -1)
        return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)


def _layer_checkpoint(layer, x, cos, sin, cache, attn_mask):
    return checkpoint(layer, x, cos, sin, cache, attn_mask, use_reentrant=False)


def target_logprobs(model, h, targets):
    """log p(targets) (rows, T) from hidden states (rows, T, C), a chunk of positions at a time so that no more
    than LOGITS_BYTES of logits exist at once (a group of 16 x 300 tokens has 2.9 GB of them for a 152k
    vocabulary); under autograd a chunk's logits are recomputed in its backward rather than kept."""
    flat_h, flat_t = h.flatten(0, 1), targets.flatten()  # (rows*T, C), (rows*T,)
    n = max(1, LOGITS_BYTES // (4 * model.config.vocab_size))
    if flat_h.shape[0] <= n:
        return _logprobs(model, flat_h, flat_t).view(targets.shape)
    keep_graph = torch.is_grad_enabled() and flat_h.requires_grad
    parts = [checkpoint(_logprobs, model, flat_h[i:i + n], flat_t[i:i + n], use_reentrant=False) if keep_graph
             else _logprobs(model, flat_h[i:i + n], flat_t[i:i + n]) for i in range(0, flat_h.shape[0], n)]
    return torch.cat(parts).view(targets.shape)


def _logprobs(model, h, targets):
    """(P, C) hidden states, (P,) targets -> (P,) log-probs. Cross-entropy fuses log-softmax and the gather, and its
    backward (softmax - one-hot) needs no (P, V) scatter of zeros."""
    return -F.cross_entropy(model.logits(h).float(), targets, reduction="none")


@torch.no_grad()
def prompt_states(model, prompt_ids: list[int]):
    """The prompt's pass without a graph, to be reused by every no-gradient call of `completion_logprobs` under
    the same weights (grpo.Learner keeps the base policy's: it never changes during a run): the last hidden
    state (1, 1, C) and each layer's keys and values (1, H_kv, Tp, D)."""
    rec = PromptRecorder()
    h = model.hidden_states(torch.tensor([prompt_ids], device=model.lm_head.weight.device), cache=rec)
    return h[:, -1:], rec.k, rec.v


def microbatches(lengths: list[int], tokens: int) -> list[slice]:
    """Consecutive row slices of length-sorted rows: a slice grows while its padded size (rows x longest)
    stays within `tokens` and its longest row is at most twice its shortest (padding is wasted compute)."""
    assert lengths == sorted(lengths), "rows must be sorted by length"
    out, start = [], 0
    for i in range(1, len(lengths) + 1):
        if i == len(lengths) or (i - start + 1) * lengths[i] > tokens or lengths[i] > 2 * max(lengths[start], 1):
            out.append(slice(start, i))
            start = i
    return out


def _cut(t, rows, width):
    """A per-row tensor's part for one micro-batch: (N,) -> (rows,), (N, T) -> (rows, width); None stays None."""
    return None if t is None else t[rows] if t.dim() == 1 else t[rows, :width]


def completion_logprobs(model, prompt_ids: list[int], ids, lengths, loss_fn=None, per_row=None, head=None,
                        tokens_per_microbatch=4096, activation_checkpointing=False, states=None):
    """Log-probs (N, T) of completion tokens ids (N, T) as continuations of the task prompt, and the loss.

    `ids` rows are sorted by length (`lengths` (N,)). With a loss, each micro-batch's
    `loss_fn(logp, **per_row)` is backpropagated (logp: (rows, W), the micro-batch's own width W; each (N,) or
    (N, T) tensor of `per_row` cut to the same rows and columns) and the sum of them returned: the value and
    gradients of the group's loss over N plain forward passes (grpo.py's loss adds up over rows). Without a loss, nothing is recorded
    for backward, and `head(rows, h, x)` may replace the log-probs by another (rows, W) statistic of the hidden
    states h (rows, W, C) before the targets x (rows, W) (diagnostics.py). `states`: the prompt's pass, made
    before by `prompt_states` under the same weights (no loss then: it has no graph).
    With activation_checkpointing, every layer of both passes keeps only its input and is recomputed in backward
    (a 4k-token prompt through a 1.5B model otherwise keeps ~16 GB for backward)."""
    train = loss_fn is not None
    assert not (train and states is not None), "a prompt pass made without a graph cannot be trained through"
    dev, (N, T), Tp = ids.device, ids.shape, len(prompt_ids)
    layer_call = _layer_checkpoint if (activation_checkpointing and train) else None
    if states is None:
        rec = PromptRecorder()
        with torch.set_grad_enabled(train):
            h_last = model.hidden_states(torch.tensor([prompt_ids], device=dev), cache=rec,
                                         layer_call=layer_call)[:, -1:]  # (1, 1, C)
        states = h_last, rec.k, rec.v
    h_last, keys, values = states
    layers = sorted(keys)
    roots = [h_last] + [keys[i] for i in layers] + [values[i] for i in layers]
    leaves = [r.detach().requires_grad_(train) for r in roots]
    last_h = leaves[0]  # the hidden state that predicts the first completion token
    cache = SharedPrefix(dict(zip(layers, leaves[1:1 + len(layers)])), dict(zip(layers, leaves[1 + len(layers):])))
    out, total = torch.zeros(N, T, device=dev), 0.0
    for rsl in microbatches(lengths.tolist(), tokens_per_microbatch):
        W = int(lengths[rsl].max())  # this micro-batch's width
        x = ids[rsl, :W]
        B, Tin = x.shape[0], W - 1  # the last token is only ever a target, never an input
        with torch.set_grad_enabled(train):
            h = last_h.expand(B, 1, -1)
            if Tin > 0:
                # completion position j sees the whole prompt and completion positions <= j
                allowed = torch.ones(Tin, Tp + Tin, dtype=torch.bool, device=dev)
                allowed[:, Tp:] = torch.tril(torch.ones(Tin, Tin, dtype=torch.bool, device=dev))
                attn = torch.zeros(allowed.shape, dtype=h_last.dtype, device=dev).masked_fill_(
                    ~allowed, float("-inf"))
                positions = torch.arange(Tp, Tp + Tin, device=dev)[None].expand(B, -1)
                hc = model.hidden_states(x[:, :Tin], positions=positions, cache=cache,
                                         attn_mask=attn[None, None], layer_call=layer_call)
                h = torch.cat([h, hc], dim=1)  # (B, W, C): the state before each target token
            if train:
                logp = target_logprobs(model, h, x)
                loss = loss_fn(logp, **{k: _cut(v, rsl, W) for k, v in (per_row or {}).items()})
                loss.backward()
                total += float(loss.detach())
            else:
                logp = head(rsl, h, x) if head else target_logprobs(model, h, x)
        out[rsl, :W] = logp.detach()
    if train:
        # The prompt's backward, once for the whole group (roots without a graph, e.g. the first
        # layer's keys when k_proj has no adapter, need none).
        pairs = [(r, l.grad) for r, l in zip(roots, leaves) if r.requires_grad and l.grad is not None]
        if pairs:
            torch.autograd.backward([r for r, _ in pairs], [g for _, g in pairs])
    return out, torch.tensor(total)


class SharedPromptLearner(Learner):
    """grpo.Learner with the prompt run once a group (this file's passes), in micro-batches of similar length,
    layers recomputed in backward when asked (GRPOConfig.activation_checkpointing), the frozen weights multiplied in
    GRPOConfig.learner_dtype, and the base policy's prompt pass made once for the run."""

    products = tuple(LEARNER_DTYPES)

    def __init__(self, model, cfg):
        super().__init__(model, cfg)
        if cfg.learner_dtype != "float32":  # the frozen products go through cpu_linear's route, where it applies
            use_fast_linear(model)
        self._base_prompt = None  # (prompt ids, the base policy's prompt pass): it never changes during a run

    def _products(self):
        return frozen_products(LEARNER_DTYPES[self.cfg.learner_dtype])

    def backward(self, prompt_ids, ids, lengths, loss_fn, per_row):
        with self._products():
            return completion_logprobs(self.model, prompt_ids, ids, lengths, loss_fn, per_row, None,
                                       self.cfg.tokens_per_microbatch, self.cfg.activation_checkpointing)

    def logprobs(self, prompt_ids, ids, lengths, head=None):
        with self._products():
            return completion_logprobs(self.model, prompt_ids, ids, lengths, head=head,
                                       tokens_per_microbatch=self.cfg.tokens_per_microbatch)[0]

    @torch.no_grad()
    def base_logprobs(self, prompt_ids, ids, lengths, head=None):
        """The prompt's pass under the base policy made once per run and reused: its states never change, and an
        ARC prompt is thousands of tokens."""
        with lora_disabled(self.model), self._products():
            if self._base_prompt is None or self._base_prompt[0] != list(prompt_ids):
                self._base_prompt = (list(prompt_ids), prompt_states(self.model, prompt_ids))
            return completion_logprobs(self.model, prompt_ids, ids, lengths, head=head,
                                       tokens_per_microbatch=self.cfg.tokens_per_microbatch,
                                       states=self._base_prompt[1])[0]
