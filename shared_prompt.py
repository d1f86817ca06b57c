"""The group's log-probs with the task prompt computed once: the learner's speed machinery [ours].

Plainly, the log-probs of a group's completions under the task prompt are N forward passes over
prompt + completion (tests/test_engine.py computes them so, and proves this file's gradient equal to theirs).
ARC prompts are thousands of tokens and completions a few dozen, so that would spend nearly all the time on N
copies of the same prompt. Here:
- the prompt runs once (batch 1) and its keys/values are kept with their graph (`PromptRecorder`);
- completions attend to them, expanded over the rows without a copy (`SharedPrefix`), in micro-batches of
  similar length, each as wide as its longest row;
- with a loss, each micro-batch's loss is backpropagated at once; the gradients reaching the shared prompt
  activations accumulate on detached copies, and the prompt's own backward runs once at the end.
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOGITS_BYTES_KEPT = 1 << 30  # above this, a micro-batch's logits are recomputed in backward instead of kept


class PromptRecorder:
    """Attention cache of the prompt pass: keeps each layer's keys/values (with their graph). Recording the
    same layer again (activation checkpointing recomputes in backward) just overwrites, so it is harmless."""

    def __init__(self):
        self.k, self.v = {}, {}

    def update(self, layer, k, v):
        self.k[layer], self.v[layer] = k, v
        return k, v


class SharedPrefix:
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
    """log p(targets) (rows, T) from hidden states (rows, T, C). Cross-entropy fuses log-softmax and the
    gather, and its backward (softmax - one-hot) needs no (rows, T, V) scatter of zeros."""
    logits = model.logits(h).float()
    return -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def pad(completions: list[list[int]], device):
    """Token lists sorted by length -> (N, T) ids (zeros after each end) on `device`, (N,) lengths."""
    lengths = torch.tensor([len(c) for c in completions])
    ids = torch.zeros(len(completions), int(lengths.max()), dtype=torch.long)
    for i, c in enumerate(completions):
        ids[i, :len(c)] = torch.tensor(c)
    return ids.to(device), lengths


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
                        tokens_per_microbatch=4096, activation_checkpointing=False):
    """Log-probs (N, T) of completion tokens ids (N, T) as continuations of the task prompt, and the loss.

    `ids` rows are sorted by length (`lengths` (N,)). With a loss, each micro-batch's
    `loss_fn(logp, **per_row)` is backpropagated (logp: (rows, W), the micro-batch's own width W; each (N,) or
    (N, T) tensor of `per_row` cut to the same rows and columns) and the sum of them returned: the value and
    gradients of the group's loss over N plain forward passes (grpo.py's loss adds up over rows). Without a loss, nothing is recorded
    for backward, and `head(rows, h, x)` may replace the log-probs by another (rows, W) statistic of the hidden
    states h (rows, W, C) before the targets x (rows, W) (diagnostics.py)."""
    train = loss_fn is not None
    dev, (N, T), Tp = ids.device, ids.shape, len(prompt_ids)
    layer_call = _layer_checkpoint if (activation_checkpointing and train) else None
    rec = PromptRecorder()
    with torch.set_grad_enabled(train):
        h_prompt = model.hidden_states(torch.tensor([prompt_ids], device=dev), cache=rec,
                                       layer_call=layer_call)  # (1, Tp, C)
    layers = sorted(rec.k)
    roots = [h_prompt[:, -1:]] + [rec.k[i] for i in layers] + [rec.v[i] for i in layers]
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
                attn = torch.zeros(allowed.shape, dtype=h_prompt.dtype, device=dev).masked_fill_(
                    ~allowed, float("-inf"))
                positions = torch.arange(Tp, Tp + Tin, device=dev)[None].expand(B, -1)
                hc = model.hidden_states(x[:, :Tin], positions=positions, cache=cache,
                                         attn_mask=attn[None, None], layer_call=layer_call)
                h = torch.cat([h, hc], dim=1)  # (B, W, C): the state before each target token
            if train:
                if B * W * model.config.vocab_size * 4 > LOGITS_BYTES_KEPT:  # recompute rather than keep
                    logp = checkpoint(target_logprobs, model, h, x, use_reentrant=False)
                else:
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
