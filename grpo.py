"""Mixed-policy GRPO: group-relative advantages, the clipped loss, and one learner step per group.

Follows shared/PAPER.md ("GRPO loss (paper preset)"). A group holds N members from three sources, each
carrying its provenance: on-policy samples, greedy replays of the best past completions, and neighbourhood
(NS) samples drawn under another prompt. Every member is trained as a completion of the task prompt.

    A_i = r_i - mean(r)                                   (optionally / std(r))
    rho_it = exp(logp_new_it - logp_old_it)
    l_it = -min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i)  [+ beta_kl * KL_it]
    loss = 1/N sum_i mean_t l_it   ("sequence")   or   sum_it l_it / sum_i T_i   ("token")

Members whose reward is exactly 0 stay in the group mean but leave the loss (paper preset); as in the reference
they still count in the 1/N of the sequence mean. With mu = 1 the
ratio is 1 and the loss value ~0 while its gradient is not: log the gradient norm.

Off-policy members (`offpolicy`): "task-prompt" (paper, default) gives greedy and NS members ratio 1 against
the current policy, like on-policy ones; "importance" weights each NS token by the truncated ratio
min(pi(y_t | task prompt) / pi(y_t | NS prompt), c), the NS-prompt log-prob being the sampler's.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lora import lora_disabled, lora_parameters

SOURCES = ("on-policy", "greedy", "neighbour")


@dataclass
class Member:
    """One completion of a group, with where it came from (the currency between search and learner)."""
    source: str  # "on-policy" | "greedy" | "neighbour"
    completion_ids: list[int]
    reward: float
    text: str = ""
    gen_logprobs: list[float] | None = None  # sampler log-probs under the prompt it was generated from
    info: dict = field(default_factory=dict)


@dataclass
class GRPOConfig:
    lr: float = 5e-5
    mu: int = 2  # inner epochs over one group
    eps_low: float = 0.2
    eps_high: float = 0.28
    norm: str = "sequence"  # "sequence" | "token"
    scale_std: bool = False
    mask_zero_reward: bool = True
    kl_coef: float = 0.0
    offpolicy: str = "task-prompt"  # "task-prompt" (paper) | "importance" (NS members only)
    is_truncation: float = 1.0
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # "constant" | "linear": warm-up over warmup_ratio, then decay to 0
    warmup_ratio: float = 0.0
    planned_steps: int = 0  # optimiser steps the linear schedule spans (groups x mu)
    tokens_per_microbatch: int = 4096  # completion tokens per forward/backward chunk (memory, not maths)
    activation_checkpointing: bool = False


# ---------------------------------------------------------------- pure functions


def group_advantages(rewards: torch.Tensor, scale_std=False, eps=1e-4) -> torch.Tensor:
    """(N,) rewards -> (N,) advantages, centred on the group mean (and divided by its std if asked)."""
    adv = rewards - rewards.mean()
    return adv / (rewards.std() + eps) if scale_std else adv


def length_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """(N,) lengths -> (N, T) bool, True on real tokens. From lengths, never from token ids (rule 7)."""
    return torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]


def clipped_token_loss(logp, old_logp, adv, eps_low=0.2, eps_high=0.28):
    """(N, T) per-token clipped surrogate loss for log-probs under the new and old policy, (N,) advantages."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    return -torch.minimum(ratio * a, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a)


def kl_k3(logp, ref_logp):
    """Per-token KL(new || ref) estimate exp(ref - new) - (ref - new) - 1: unbiased, non-negative."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def reduce_loss(token_loss, mask, norm, n_seqs=None, n_tokens=None):
    """Masked (N, T) per-token losses -> scalar. "sequence": mean over sequences of each one's token mean;
    "token": sum over all tokens / token count. n_seqs / n_tokens give the whole group's counts when this is
    one micro-batch of it, so micro-batch losses add up to the group loss."""
    m = mask.to(token_loss.dtype)
    if norm == "sequence":
        per_seq = (token_loss * m).sum(-1) / m.sum(-1).clamp(min=1)
        return per_seq.sum() / (n_seqs if n_seqs is not None else mask.shape[0])
    if norm == "token":
        return (token_loss * m).sum() / (n_tokens if n_tokens is not None else m.sum().clamp(min=1))
    raise ValueError(f"norm must be 'sequence' or 'token', got {norm}")


# ---------------------------------------------------------------- the prompt, computed once per group


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


def _target_logprobs(model, h, targets):
    """log p(targets) (rows, T) from hidden states (rows, T, C). Cross-entropy fuses log-softmax and the
    gather, and its backward (softmax - one-hot) needs no (rows, T, V) scatter of zeros."""
    logits = model.logits(h).float()
    return -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


LOGITS_BYTES_KEPT = 1 << 30  # above this, logits are recomputed in backward instead of kept


class Learner:
    """GRPO updates of a LoRA-wrapped model, one group at a time."""

    def __init__(self, model, cfg: GRPOConfig):
        self.model, self.cfg = model, cfg
        self.params = lora_parameters(model)
        assert self.params, "the learner trains LoRA adapters: inject them first"
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor(cfg))

    def step(self, prompt_ids: list[int], members: list[Member]) -> dict:
        """Train on one group for mu inner epochs. Returns statistics for metrics.jsonl."""
        cfg = self.cfg
        rewards = torch.tensor([m.reward for m in members], dtype=torch.float32)
        adv = group_advantages(rewards, cfg.scale_std)
        keep = [i for i, m in enumerate(members)
                if m.completion_ids and not (cfg.mask_zero_reward and m.reward == 0)]
        stats = {"zero_spread": bool(rewards.max() == rewards.min()), "trained_members": len(keep),
                 "loss": None, "grad_norm": None, "skipped": None}
        if stats["zero_spread"] or not keep or all(adv[i] == 0 for i in keep):
            stats["skipped"] = "no reward spread" if stats["zero_spread"] else "no member to train"
            return stats
        keep.sort(key=lambda i: len(members[i].completion_ids))  # similar lengths share a micro-batch
        rows = [members[i] for i in keep]
        dev = self.model.lm_head.weight.device
        ids, lengths = self.pad([m.completion_ids for m in rows])
        T = ids.shape[1]
        mask, adv = length_mask(lengths, T).to(dev), adv[keep].to(dev)
        n_tokens = int(mask.sum())
        gen, is_ns = self._behaviour_logprobs(rows, T, dev)
        ref = None
        if cfg.kl_coef > 0:
            with torch.no_grad(), lora_disabled(self.model):
                ref = self._logprobs(prompt_ids, ids, lengths, None)[0]
        old = None
        self.model.train()  # LoRA dropout on
        for epoch in range(cfg.mu):
            self.opt.zero_grad(set_to_none=True)

            def loss_fn(rsl, logp):  # rsl: rows of one micro-batch; logp (rows, its own width)
                cols = slice(0, logp.shape[1])
                o = old[rsl, cols] if old is not None else logp.detach()  # epoch 0: the policy itself, ratio 1
                tl = clipped_token_loss(logp, o, adv[rsl], cfg.eps_low, cfg.eps_high)
                if gen is not None:  # truncated importance weights of NS tokens, fixed by the old policy
                    w = torch.clamp(torch.exp(o - gen[rsl, cols]), max=cfg.is_truncation)
                    tl = tl * torch.where(is_ns[rsl, None], w, torch.ones_like(w))
                if ref is not None:
                    tl = tl + cfg.kl_coef * kl_k3(logp, ref[rsl, cols])
                # n_seqs: the whole group, as the reference (a masked zero-reward member adds 0 but counts)
                return reduce_loss(tl, mask[rsl, cols], cfg.norm, n_seqs=len(members), n_tokens=n_tokens)

            logp, loss = self._logprobs(prompt_ids, ids, lengths, loss_fn)
            if old is None:
                old = logp
            gnorm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
            if not (torch.isfinite(gnorm) and torch.isfinite(loss)):
                # Never let a NaN/inf reach the adapter: drop this update and say so.
                self.opt.zero_grad(set_to_none=True)
                stats["skipped"] = f"non-finite {'loss' if not torch.isfinite(loss) else 'gradient'}, epoch {epoch}"
                break
            self.opt.step()
            self.schedule.step()
            stats["loss"], stats["grad_norm"] = float(loss), float(gnorm)
        stats["lr"] = self.opt.param_groups[0]["lr"]
        self.model.eval()
        return stats

    def pad(self, completions: list[list[int]]):
        """Token lists sorted by length -> (N, T) ids (zeros after each end) on the model's device, (N,) lengths."""
        lengths = torch.tensor([len(c) for c in completions])
        ids = torch.zeros(len(completions), int(lengths.max()), dtype=torch.long)
        for i, c in enumerate(completions):
            ids[i, :len(c)] = torch.tensor(c)
        return ids.to(self.model.lm_head.weight.device), lengths

    def _behaviour_logprobs(self, rows, T, dev):
        """(N, T) sampler log-probs of NS members under their NS prompt, and which rows are NS; or Nones."""
        if self.cfg.offpolicy != "importance":
            return None, None
        gen = torch.zeros(len(rows), T)
        is_ns = torch.zeros(len(rows), dtype=torch.bool)
        for i, m in enumerate(rows):
            if m.source == "neighbour" and m.gen_logprobs:
                assert len(m.gen_logprobs) == len(m.completion_ids), "one sampler log-prob per token"
                gen[i, :len(m.gen_logprobs)] = torch.tensor(m.gen_logprobs)
                is_ns[i] = True
        return gen.to(dev), is_ns.to(dev)

    def _logprobs(self, prompt_ids, ids, lengths, loss_fn, head=None):
        """Log-probs (N, T) of completion tokens as continuations of the task prompt, and the group loss.
        Without a loss, `head(rows, h, x)` may replace the log-probs by another (rows, W) statistic of the
        hidden states h (rows, W, C) before the targets x (rows, W) (diagnostics.py).

        The prompt runs once (batch 1); completions attend to its keys/values in micro-batches of similar
        length (rows arrive sorted by length; each micro-batch is as wide as its longest row). With a
        `loss_fn(rows, logp)`, each micro-batch's loss is backpropagated at once, the gradients reaching the
        shared prompt activations accumulate on detached copies, and the prompt's own backward runs once at
        the end (ARC prompts are thousands of tokens; G backward passes through them would dominate)."""
        model, cfg = self.model, self.cfg
        train = loss_fn is not None
        dev, (N, T), Tp = ids.device, ids.shape, len(prompt_ids)
        layer_call = _layer_checkpoint if (cfg.activation_checkpointing and train) else None
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
        for rsl in microbatches(lengths.tolist(), cfg.tokens_per_microbatch):
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
                        logp = checkpoint(_target_logprobs, model, h, x, use_reentrant=False)
                    else:
                        logp = _target_logprobs(model, h, x)
                    loss = loss_fn(rsl, logp)
                    loss.backward()
                    total += float(loss.detach())
                else:
                    logp = head(rsl, h, x) if head else _target_logprobs(model, h, x)
            out[rsl, :W] = logp.detach()
        if train:
            # The prompt's backward, once for the whole group (roots without a graph, e.g. the first
            # layer's keys when k_proj has no adapter, need none).
            pairs = [(r, l.grad) for r, l in zip(roots, leaves) if r.requires_grad and l.grad is not None]
            if pairs:
                torch.autograd.backward([r for r, _ in pairs], [g for _, g in pairs])
        return out, torch.tensor(total)


def lr_factor(cfg: GRPOConfig):
    """Multiplier of the learning rate after n optimiser steps: 1 ("constant"), or the reference's linear warm-up
    over the first warmup_ratio of planned_steps, then linear decay to 0 at planned_steps ("linear")."""
    if cfg.lr_schedule == "constant":
        return lambda n: 1.0
    assert cfg.lr_schedule == "linear" and cfg.planned_steps > 0, \
        f"lr_schedule {cfg.lr_schedule!r} with {cfg.planned_steps} planned steps: use 'constant' or plan steps"
    warm = math.ceil(cfg.warmup_ratio * cfg.planned_steps)
    # transformers' get_linear_schedule_with_warmup, exactly (its first step has learning rate 0)
    return lambda n: n / max(1, warm) if n < warm else max(0.0, (cfg.planned_steps - n) / max(1, cfg.planned_steps - warm))


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
