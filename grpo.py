"""Mixed-policy GRPO: group-relative advantages, the clipped loss, and one learner step per group.

Follows shared/PAPER.md ("GRPO loss (paper preset)"). A group holds N members from three sources, each
carrying its provenance: on-policy samples, greedy replays of the best past completions, and neighbourhood
(NS) samples drawn under another prompt (`build_group`; search.py samples and scores them). Every member is
trained as a completion of the task prompt.

    A_i = r_i - mean(r)                                   (optionally / std(r))
    rho_it = exp(logp_new_it - logp_old_it)
    l_it = -min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i)  [+ beta_kl * KL_it]
    loss = 1/N sum_i mean_t l_it   ("sequence")   or   sum_it l_it / sum_i T_i   ("token")

Members whose reward is exactly 0 stay in the group mean but leave the loss (paper preset); as in the reference
they still count in the 1/N of the sequence mean. With mu = 1 the ratio is 1 and the loss value ~0 while its gradient is not: log the gradient norm.

Off-policy members (`offpolicy`): "task-prompt" (paper, default) gives greedy and NS members ratio 1 against
the current policy, like on-policy ones; "importance" weights each NS token by the truncated ratio
min(pi(y_t | task prompt) / pi(y_t | NS prompt), c), the NS-prompt log-prob being the sampler's.
"""
import math
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F

from lora import lora_disabled, lora_parameters
from sampling import Rollout
from tasks import Preset

ROLES = ("on-policy", "greedy", "neighbour")  # a member's role in its group (database.SOURCES: where a
#                                               candidate came from)
LEARNER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # GRPOConfig.learner_dtype


@dataclass
class GRPOConfig:
    lr: float = Preset.lr  # a task's preset sets these two; run.py records what a run used in config.json
    mu: int = Preset.mu  # inner epochs over one group
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
    # The fast learner's (fast/shared_prompt.py): completion tokens per forward/backward chunk and recomputing
    # layers in backward (memory, not maths); "bfloat16": the frozen base weights multiply in bfloat16
    # (fast/cpu_linear.frozen_products; adapters, sums and gradients stay float32), faster where the CPU has
    # bfloat16 instructions, other numbers (docs/performance.md).
    tokens_per_microbatch: int = 4096
    activation_checkpointing: bool = False
    learner_dtype: str = "float32"

    def __post_init__(self):
        assert self.learner_dtype in LEARNER_DTYPES, \
            f"learner_dtype {self.learner_dtype!r}: choose from {', '.join(LEARNER_DTYPES)}"


# ---------------------------------------------------------------- the group


def build_group(sampled: list[Rollout], greedy: list, failed="group", repeats="keep") -> list[Rollout]:
    """One step's GRPO group: the sampled members (on-policy and neighbourhood, info["kind"] "new", "repeat":
    only known candidates, or "failed": none valid), then the greedy ones, replayed from the database's best
    rows (database.Row: no oracle call, no sampling). A sampled member whose reward is None (the budget ran
    out before it was scored) is left out; failed="drop" leaves out failed parses too, as the reference's
    Semantle; repeats="zero" trains a repeat at reward 0 (it found nothing new), "keep" at its known reward."""
    members = [replace(m, reward=0.0) if repeats == "zero" and m.info.get("kind") == "repeat" else m
               for m in sampled if m.reward is not None and (failed == "group" or m.info.get("kind") != "failed")]
    return members + [Rollout(g.completion_ids, g.completion, source="greedy", reward=g.reward) for g in greedy]


# ---------------------------------------------------------------- pure functions


def group_advantages(rewards: torch.Tensor, scale_std=False, eps=1e-4) -> torch.Tensor:
    """(N,) rewards -> (N,) advantages, centred on the group mean (and divided by its std if asked)."""
    adv = rewards - rewards.mean()
    return adv / (rewards.std() + eps) if scale_std else adv


def pad(completions: list[list[int]], device):
    """Token lists -> (N, T) ids (zeros after each end) on `device`, (N,) lengths."""
    lengths = torch.tensor([len(c) for c in completions])
    ids = torch.zeros(len(completions), int(lengths.max()), dtype=torch.long)
    for i, c in enumerate(completions):
        ids[i, :len(c)] = torch.tensor(c)
    return ids.to(device), lengths


def target_logprobs(model, h, targets):
    """log p(targets) (rows, T) from hidden states (rows, T, C). Cross-entropy fuses log-softmax and the gather,
    and its backward (softmax - one-hot) needs no (rows, T, V) scatter of zeros."""
    logits = model.logits(h).float()  # (rows, T, V)
    return -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def completion_states(model, prompt_ids: list[int], ids: torch.Tensor) -> torch.Tensor:
    """The hidden states (N, T, C) before each token of the completions ids (N, T) of one prompt, plainly: the
    prompt and each completion through the model (a row's padding comes after its end, so causal attention keeps
    it out)."""
    N, Tp = ids.shape[0], len(prompt_ids)
    x = torch.cat([torch.tensor(prompt_ids, device=ids.device).expand(N, Tp), ids], dim=1)  # (N, Tp + T)
    return model.hidden_states(x[:, :-1])[:, Tp - 1:]


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


def grpo_loss(logp, mask, adv, cfg: GRPOConfig, n_seqs, n_tokens, old_logp=None, gen_logp=None, is_ns=None,
              ref_logp=None):
    """The group loss from (N, T) log-probs of the trained members under the current policy, their (N, T) mask
    and (N,) advantages. old_logp (N, T): under the policy before this group's first update (None in the first
    epoch: the policy itself, ratio 1). gen_logp (N, T) and is_ns (N,): the sampler's log-probs of NS members
    under their NS prompt ("importance" off-policy weights). ref_logp (N, T): under the base policy (KL term).
    n_seqs, n_tokens: the whole group's counts, so that the losses of its micro-batches add up to its loss."""
    old_logp = logp.detach() if old_logp is None else old_logp
    tl = clipped_token_loss(logp, old_logp, adv, cfg.eps_low, cfg.eps_high)
    if gen_logp is not None:  # truncated importance weights of NS tokens, fixed by the old policy
        w = torch.clamp(torch.exp(old_logp - gen_logp), max=cfg.is_truncation)
        tl = tl * torch.where(is_ns[:, None], w, torch.ones_like(w))
    if ref_logp is not None:
        tl = tl + cfg.kl_coef * kl_k3(logp, ref_logp)
    return reduce_loss(tl, mask, cfg.norm, n_seqs=n_seqs, n_tokens=n_tokens)


# ---------------------------------------------------------------- the learner


@dataclass
class Group:
    """One group's update in the making (Learner.prepare): its statistics, and, when it trains, the trained members'
    padded completions (N, T) and lengths (N,), their per-row tensors for the loss, the loss, and the first epoch's
    log-probs once taken."""
    stats: dict
    ids: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    per_row: dict | None = None
    loss_fn: object = None
    old: torch.Tensor | None = None

    def epoch_rows(self) -> dict:
        return dict(self.per_row, old_logp=self.old)


class Learner:
    """GRPO updates of a LoRA-wrapped model, one group at a time, in plain PyTorch: every member's prompt and
    completion through the model, the loss, its backward. fast/shared_prompt.SharedPromptLearner is the same learner
    with the task prompt run once for the whole group (run.py uses it; a test proves the two equal)."""

    products = ("float32",)  # the learner dtypes (GRPOConfig.learner_dtype) this learner multiplies in

    def __init__(self, model, cfg: GRPOConfig):
        assert cfg.learner_dtype in self.products, \
            f"learner_dtype {cfg.learner_dtype}: bfloat16 products are fast/shared_prompt.SharedPromptLearner's"
        self.model, self.cfg = model, cfg
        self.params = lora_parameters(model)
        assert self.params, "the learner trains LoRA adapters: inject them first"
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor(cfg))

    def step(self, prompt_ids: list[int], members: list[Rollout]) -> dict:
        """Train on one group for mu inner epochs. Returns statistics for metrics.jsonl."""
        group = self.prepare(prompt_ids, members)
        if group.stats["skipped"]:
            return group.stats
        # mu epochs of: log-probs -> clipped loss -> backward -> clipped gradient -> AdamW step.
        self.model.train()  # LoRA dropout on
        for epoch in range(self.cfg.mu):
            self.opt.zero_grad(set_to_none=True)
            logp, loss = self.backward(prompt_ids, group.ids, group.lengths, group.loss_fn, group.epoch_rows())
            if not self.update(group, logp, loss, epoch):
                break
        return self.finish(group)

    def prepare(self, prompt_ids: list[int], members: list[Rollout], reference=True) -> "Group":
        """What an update on this group needs: advantages relative to the whole group, the members that train (as
        completions of the task prompt, whatever prompt each was sampled under), their padded ids, the reference
        log-probs (with reference=False left for the caller to put in per_row["ref_logp"]: together.py takes
        several problems' at once) and the loss. `stats["skipped"]` says why there is nothing to train."""
        cfg = self.cfg
        rewards = torch.tensor([m.reward for m in members], dtype=torch.float32)
        adv = group_advantages(rewards, cfg.scale_std)
        keep = [i for i, m in enumerate(members)
                if m.ids and not (cfg.mask_zero_reward and m.reward == 0)]
        stats = {"zero_spread": bool(rewards.max() == rewards.min()), "trained_members": len(keep),
                 "loss": None, "grad_norm": None, "skipped": None}
        if stats["zero_spread"] or not keep or all(adv[i] == 0 for i in keep):
            stats["skipped"] = "no reward spread" if stats["zero_spread"] else "no member to train"
            return Group(stats)
        keep.sort(key=lambda i: len(members[i].ids))  # similar lengths side by side (the fast path's micro-batches)
        rows = [members[i] for i in keep]
        dev = self.model.lm_head.weight.device
        ids, lengths = pad([m.ids for m in rows], dev)  # (N, T), (N,)
        mask = length_mask(lengths, ids.shape[1]).to(dev)
        gen, is_ns = self._behaviour_logprobs(rows, ids.shape[1], dev)
        ref = self.base_logprobs(prompt_ids, ids, lengths) if cfg.kl_coef > 0 and reference else None
        per_row = dict(mask=mask, adv=adv[keep].to(dev), gen_logp=gen, is_ns=is_ns, ref_logp=ref)
        # n_seqs: the whole group, as the reference (a masked zero-reward member adds 0 but counts)
        loss_fn = partial(grpo_loss, cfg=cfg, n_seqs=len(members), n_tokens=int(mask.sum()))
        return Group(stats, ids, lengths, per_row, loss_fn)

    def update(self, group: "Group", logp, loss, epoch: int) -> bool:
        """After an epoch's backward: clip the gradient and take the AdamW step, or drop a non-finite update (and
        say so). The first epoch's log-probs become the ratio's old ones. False when the epochs must stop."""
        group.old = logp if group.old is None else group.old
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        if not (torch.isfinite(gnorm) and torch.isfinite(loss)):
            # Never let a NaN/inf reach the adapter: drop this update and say so.
            self.opt.zero_grad(set_to_none=True)
            group.stats["skipped"] = f"non-finite {'loss' if not torch.isfinite(loss) else 'gradient'}, epoch {epoch}"
            return False
        self.opt.step()
        self.schedule.step()
        group.stats["loss"], group.stats["grad_norm"] = float(loss), float(gnorm)
        return True

    def finish(self, group: "Group") -> dict:
        group.stats["lr"] = self.opt.param_groups[0]["lr"]
        self.model.eval()
        return group.stats

    def backward(self, prompt_ids, ids, lengths, loss_fn, per_row) -> tuple[torch.Tensor, torch.Tensor]:
        """The group's log-probs (N, T), detached, and its loss after backpropagating it: `loss_fn(logp, **per_row)`."""
        logp = self.logprobs(prompt_ids, ids, lengths)
        loss = loss_fn(logp, **per_row)
        loss.backward()
        return logp.detach(), loss.detach()

    def logprobs(self, prompt_ids, ids, lengths, head=None) -> torch.Tensor:
        """(N, T) log-probs of the completions ids (N, T) as continuations of the task prompt: each member's prompt
        and completion through the model (a row's padding comes after its end, so causal attention keeps it out).
        `head(rows, h, x)` may replace them by another (rows, T) statistic of the hidden states h (rows, T, C)
        before the targets x (rows, T) (diagnostics.py)."""
        h = completion_states(self.model, prompt_ids, ids)
        return head(slice(0, ids.shape[0]), h, ids) if head else target_logprobs(self.model, h, ids)

    @torch.no_grad()
    def base_logprobs(self, prompt_ids, ids, lengths, head=None) -> torch.Tensor:
        """`logprobs` under the base policy: LoRA off (the KL pull's reference, the diagnostics' pi_0)."""
        with lora_disabled(self.model):
            return self.logprobs(prompt_ids, ids, lengths, head)

    def state_dict(self) -> dict:
        """What a resumed run needs of the learner: the adapters, AdamW's moments and the schedule's position."""
        return {"lora": {k: v for k, v in self.model.state_dict().items() if "lora_" in k},
                "optimizer": self.opt.state_dict(), "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict):
        self.model.load_state_dict(state["lora"], strict=False)
        self.opt.load_state_dict(state["optimizer"])
        if "schedule" in state:  # checkpoints from before the schedule existed ran at a constant rate
            self.schedule.load_state_dict(state["schedule"])

    def _behaviour_logprobs(self, rows, T, dev):
        """(N, T) sampler log-probs of NS members under their NS prompt, and which rows are NS; or Nones."""
        if self.cfg.offpolicy != "importance":
            return None, None
        gen = torch.zeros(len(rows), T)
        is_ns = torch.zeros(len(rows), dtype=torch.bool)
        for i, m in enumerate(rows):
            if m.source == "neighbour" and m.logprobs:
                assert len(m.logprobs) == len(m.ids), "one sampler log-prob per token"
                gen[i, :len(m.logprobs)] = torch.tensor(m.logprobs)
                is_ns[i] = True
        return gen.to(dev), is_ns.to(dev)


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
