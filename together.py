"""K problems over one base model, each with its own LoRA adapter, sampled and trained in one batch [for serving:
Punica's SGMV and S-LoRA; for training several adapters over one base: mLoRA].

Test-time training is paid per problem, yet one problem's decode step reads every base weight for a handful of
rows. Here the rows of K problems go through the frozen base weights together, and each run of rows adds its own
problem's low-rank update:

    rows     p1 p1 p1 p1 | p2 p2 p2 p2 | p3 p3 p3 p3          x: (B, C), B = the K problems' rows
    base     y = x W^T                 one product for all B rows
    LoRA     y[p_k] += s B_k A_k x[p_k]  one small product per problem, its own A_k, B_k

Each problem keeps a model of its own (`problem_model`): the base weights shared with every other (no copy) and
its adapter, drawn as a run alone draws it, so its learner, optimiser, checkpoint and adapter files are a solo
run's. `Together` is the one model the batches go through; its LoRA layers route each run of rows to its
problem's adapter. A problem's loss reaches only its own adapter: the others' parameters are not in its graph.
tests/test_together.py proves the samples, the loss and the gradient equal a problem's alone.
"""
import copy
from dataclasses import replace

import torch
import torch.nn as nn

from grpo import Group, Learner, completion_states, target_logprobs
from lora import LoRALinear, inject_lora, lora_modules
from sampling import KVCache, ModelStep, left_padded


def _shared(base) -> dict:
    """A deepcopy memo that keeps `base`'s tensors: a copy of the module tree made with it shares every weight."""
    return {id(t): t for t in list(base.parameters()) + list(base.buffers())}


def problem_model(base, seed: int, r: int, alpha: float, targets, dropout: float = 0.0):
    """One problem's model: `base`'s weights (shared, not copied) and its own LoRA adapter, drawn as run.py draws
    a run's (torch.manual_seed(seed), then inject_lora)."""
    assert not lora_modules(base), "the shared base model carries no adapter of its own"
    model = copy.deepcopy(base, _shared(base))
    torch.manual_seed(seed)
    inject_lora(model, r, alpha, targets, dropout)
    return model


class Rows:
    """Which problem (slot) each row of the next forward pass belongs to, and the runs of rows that share one."""

    def __init__(self):
        self.slots: list[int] = []
        self.runs: list[tuple[int, int, int]] = []  # (slot, first row, row after the last)

    def set(self, slots):
        self.slots, self.runs = list(slots), []
        for i, k in enumerate(self.slots):
            if self.runs and self.runs[-1][0] == k:
                self.runs[-1] = (k, self.runs[-1][1], i + 1)
            else:
                self.runs.append((k, i, i + 1))


class RowsLoRA(nn.Module):
    """A LoRA layer of `Together`: the base product once for all rows, then each run of rows adds the update of
    its problem's layer (a LoRALinear of that problem's model, whose `enabled` switch it follows)."""

    def __init__(self, base: nn.Linear, rows: Rows, slots: int):
        super().__init__()
        self.base_layer, self.rows = base, rows
        self.loras: list[LoRALinear | None] = [None] * slots  # a plain list: the parameters stay the problems'

    def forward(self, x):  # x (B, T, C) -> (B, T, C_out)
        y = self.base_layer(x)
        assert self.rows.runs and self.rows.runs[-1][2] == x.shape[0], \
            f"rows of {x.shape[0]} tagged as {len(self.rows.slots)}: set Together.rows before the pass"
        parts = []
        for k, lo, hi in self.rows.runs:
            lora = self.loras[k]
            parts.append(lora.delta(x[lo:hi]).to(y.dtype) if lora.enabled else y.new_zeros(hi - lo, *y.shape[1:]))
        return y + torch.cat(parts)


class Together:
    """The model K problems share: `model` is the base's module tree over the same weights, with every LoRA target
    a RowsLoRA; `put(k, problem)` routes slot k's rows to that problem's adapter (a finished problem's slot takes
    the next one); `rows.set(slots)` tags the rows of the next pass."""

    def __init__(self, base, slots: int, targets):
        assert slots >= 1, f"{slots} slots"
        self.base, self.rows, self.slots = base, Rows(), slots
        self.model = copy.deepcopy(base, _shared(base))
        self.layers = {}
        for name, module in list(self.model.named_modules()):
            if isinstance(module, nn.Linear) and name.split(".")[-1] in targets:
                parent, _, child = name.rpartition(".")
                self.layers[name] = RowsLoRA(module, self.rows, slots)
                setattr(self.model.get_submodule(parent), child, self.layers[name])
        assert self.layers, f"no linear layer matches the LoRA targets {list(targets)}"

    def put(self, k: int, problem):
        """Slot k's rows take `problem`'s adapter (a problem_model)."""
        mods = lora_modules(problem)
        assert set(mods) == set(self.layers), "the problem's adapter covers other layers than the shared model's"
        for name, layer in self.layers.items():
            layer.loras[k] = mods[name]

    def logprobs(self, slots: list[int], prompts: list[list[int]], ids: list[torch.Tensor]) -> list[torch.Tensor]:
        """The completions ids[i] (N_i, T_i) of the problem in slot slots[i] as continuations of its prompt
        prompts[i], all in one pass: every row's prompt left-padded to the longest prompt, its completion
        right-padded to the longest completion; the padding is masked, so each row sees what it would alone.
        Returns their log-probs, (N_i, T_i) each."""
        dev = self.model.lm_head.weight.device
        Tp, T = max(len(p) for p in prompts), max(t.shape[1] for t in ids)
        rows, tags, pads = [], [], []
        for k, p, x in zip(slots, prompts, ids):
            for row in x.tolist():
                rows.append([0] * (Tp - len(p)) + p + row + [0] * (T - len(row)))
                tags.append(k)
                pads.append(Tp - len(p))
        x = torch.tensor(rows, device=dev)[:, :-1]  # (N, Tp + T - 1): each position predicts the next token
        pad = torch.tensor(pads, device=dev)
        _, positions, allowed = left_padded(pad, x.shape[1])
        self.rows.set(tags)
        h = self.model.hidden_states(x, positions=positions, attn_mask=allowed[:, None])[:, Tp - 1:]  # (N, T, C)
        targets = torch.cat([torch.nn.functional.pad(t, (0, T - t.shape[1])) for t in ids])  # (N, T)
        logp = target_logprobs(self.model, h, targets)
        out, at = [], 0
        for t in ids:
            out.append(logp[at:at + t.shape[0], :t.shape[1]])
            at += t.shape[0]
        return out

    @torch.no_grad()
    def reference(self, prompts: list[list[int]], groups: list[Group]) -> list[torch.Tensor]:
        """The groups' log-probs (N_i, T_i) under the base policy (the KL pull's reference), prompts their task
        prompts: plainly, each through the base model, which has no adapter."""
        return [target_logprobs(self.base, completion_states(self.base, p, g.ids), g.ids)
                for p, g in zip(prompts, groups)]

    def backward(self, slots: list[int], prompts: list[list[int]], groups: list[Group]) -> list[tuple]:
        """One epoch's pass for the groups (grpo.Group, prepared) of the problems in slots, prompts their task
        prompts: the sum of their losses backpropagated. Returns each group's log-probs (N_i, T_i) and loss, both
        detached (what Learner.update takes). fast/together.FastTogether runs each prompt once instead."""
        logps = self.logprobs(slots, prompts, [g.ids for g in groups])
        losses = [g.loss_fn(lp, **g.epoch_rows()) for g, lp in zip(groups, logps)]
        torch.stack(losses).sum().backward()
        return [(lp.detach(), loss.detach()) for lp, loss in zip(logps, losses)]


def learn_together(together: Together, learners: list[Learner], prompts, groups, slots=None) -> list[dict]:
    """One GRPO update for each of K problems (learner i trains the problem in slot slots[i], default i), their
    groups' forward and backward in one pass through the base weights (`together.backward`): the sum of their
    losses, each of which reaches only its own adapter; then each learner's own clip and AdamW step, as
    `Learner.step` takes them alone. Returns each problem's statistics."""
    slots = list(range(len(learners))) if slots is None else slots
    prepared = [learner.prepare(p, members, reference=False) for learner, p, members in zip(learners, prompts, groups)]
    going = [k for k, g in enumerate(prepared) if not g.stats["skipped"]]
    pulled = [k for k in going if learners[k].cfg.kl_coef > 0]  # their references, in one pass
    for k, ref in zip(pulled, together.reference([prompts[k] for k in pulled], [prepared[k] for k in pulled])
                      if pulled else []):
        prepared[k].per_row["ref_logp"] = ref
    mus = {learners[k].cfg.mu for k in going}
    assert len(mus) <= 1, f"problems trained together share mu, not {sorted(mus)}"
    trained = set(going)
    for k in going:
        learners[k].model.train()  # LoRA dropout on
    for epoch in range(mus.pop() if mus else 0):
        for k in going:
            learners[k].opt.zero_grad(set_to_none=True)
        done = together.backward([slots[k] for k in going], [prompts[k] for k in going], [prepared[k] for k in going])
        going = [k for k, (lp, loss) in zip(going, done)  # a non-finite update stops that problem's epochs
                 if learners[k].update(prepared[k], lp, loss, epoch)]
    return [learner.finish(g) if k in trained else g.stats for k, (learner, g) in enumerate(zip(learners, prepared))]


class RowsCache(KVCache):
    """The sampler's cache for K problems: when it fans out or drops rows, their problem tags (`tags`, the shared
    model's Rows, set by TogetherStep) follow."""

    def select_rows(self, index):
        super().select_rows(index)
        self.tags.set([self.tags.slots[i] for i in index.tolist()])


class TogetherStep(ModelStep):
    """The sampler's step for K problems at once: the plain step over Together's model, each cache row tagged with
    its problem. Set `prompt_slots` (the slot of each prompt) before each generate call; give each problem's
    prompts their own generator (Sampler.generate), so that each draws what it would alone."""
    cache_type = RowsCache

    def __init__(self, together: Together):
        super().__init__(together.model)
        self.together, self.prompt_slots = together, None

    def new_cache(self, batch, max_len, prefix_len, dtype, device):
        cache = super().new_cache(batch, max_len, prefix_len, dtype, device)
        assert self.prompt_slots is not None, "set TogetherStep.prompt_slots before sampling"
        cache.tags = self.together.rows
        cache.tags.set(self.prompt_slots)  # the prefill's rows are the prompts
        return cache


def step_together(searches, sampler, slots: list[int]) -> list[dict]:
    """One step of each search (search.Search, one problem each, in slot slots[i] of the sampler's Together), as
    `Search.step` takes it alone but for two things done once for all: every problem's prompts sampled in one
    batch (each problem drawing from its own generator), and the groups of those that train learned in one pass.
    Returns each search's metrics."""
    step = sampler.step
    assert isinstance(step, TogetherStep), "sample K problems with Sampler(together.model, tok, TogetherStep(...))"
    plans = [s.plan() for s in searches]
    args = [s.sampling(p) for s, p in zip(searches, plans)]
    shared = {k: args[0][k] for k in ("max_new_tokens", "temperature", "stop_strings")}
    assert all({k: a[k] for k in shared} == shared for a in args), "problems sampled together share these settings"
    prompts, counts, gens, stops, owner = [], [], [], [], []  # owner: (search, its row) of each row
    step.prompt_slots = []
    for i, (s, p, a) in enumerate(zip(searches, plans, args)):
        for prompt, n in zip(p.prompts, p.counts):
            prompts.append(prompt)
            counts.append(n)
            gens.append(s.gen)
            stops.append(a["stop_when"])
            step.prompt_slots.append(slots[i])
        owner += [(i, r) for r in range(sum(p.counts))]

    def finished(row, completion):  # a slow reward starts as soon as its row is done, as alone
        i, r = owner[row]
        if args[i]["on_finish"]:
            args[i]["on_finish"](r, completion)
    outs = sampler.generate(prompts, n=counts, generator=gens, stop_when=stops, on_finish=finished,
                            **shared) if prompts else []
    first = 0  # the problem's first prompt in the batch
    for i, (s, p) in enumerate(zip(searches, plans)):
        p.outs = [replace(o, prompt_index=o.prompt_index - first) for o, (j, _) in zip(outs, owner) if j == i]
        first += len(p.prompts)
        s.scored(p)
    learning = [i for i, (s, p) in enumerate(zip(searches, plans)) if s.learns(p)]
    stats = learn_together(sampler.step.together, [searches[i].learner for i in learning],
                           [searches[i].task_prompt for i in learning], [plans[i].members for i in learning],
                           [slots[i] for i in learning]) if learning else []
    for i, st in zip(learning, stats):
        plans[i].stats = st
    return [s.finish(p) for s, p in zip(searches, plans)]
