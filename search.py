"""The search loop: MiGrATe and every baseline, under one oracle budget (shared/PAPER.md).

One step builds a group from three sources, scores what is new, and (for training methods) takes a GRPO
step on it:
  1. alpha on-policy completions of the task prompt, sampled from the current policy;
  2. gamma neighbourhood completions: each of a prompt showing a random one of the top-k past candidates
     (or, in migrate-opro and opro, the OPRO prompt listing the best past candidates);
  3. beta greedy members: the best past completions, replayed from the database (no oracle call);
  4. parse every sampled completion into candidates; a candidate not yet in the database costs one oracle
     call (until the budget is spent), a known one reuses its reward; a completion's reward is the best
     of its candidates, 0 if it has none (or, with failed="drop", it leaves the group), and with repeats="zero"
     a completion of known candidates only trains as 0 (grpo.build_group);
  5. train (or not), record metrics, checkpoint; stop when solved, when the budget is spent, or when no step
     has found anything new for `patience` steps.
All methods share this loop; they differ only in the group's composition and whether they train.
"""
import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from database import Row
from diagnostics import adapter_change, policy_movement
from grpo import ROLES, build_group
from tasks import Preset, Score

@dataclass(frozen=True)
class Method:
    """What a method's groups hold and whether it learns from them."""
    mix: Callable  # (N, alpha, beta, gamma, n0) -> (alpha, beta, gamma) of a group, from the preset's mix and the
    #                baselines' task-prompt share n0
    prompt: str  # the kind of non-task prompt: "neighbour" (NS) or "opro"
    trains: bool  # a GRPO step on every group
    baseline: bool  # an inference-only baseline: its anchor and OPRO list sizes are the preset's *_baseline_k


METHODS = {
    "migrate": Method(lambda N, a, b, g, n0: (a, b, g), "neighbour", trains=True, baseline=False),
    "migrate-opro": Method(lambda N, a, b, g, n0: (a, b, g), "opro", trains=True, baseline=False),
    "grpo": Method(lambda N, a, b, g, n0: (N, 0, 0), "neighbour", trains=True, baseline=False),
    "grpo-greedy": Method(lambda N, a, b, g, n0: (N - 1, 1, 0), "neighbour", trains=True, baseline=False),
    "random": Method(lambda N, a, b, g, n0: (N, 0, 0), "neighbour", trains=False, baseline=True),
    "ns": Method(lambda N, a, b, g, n0: (n0, 0, N - n0), "neighbour", trains=False, baseline=True),
    "opro": Method(lambda N, a, b, g, n0: (n0, 0, N - n0), "opro", trains=False, baseline=True),
}


@dataclass
class SearchConfig:
    method: str = "migrate"
    alpha: int = 2
    beta: int = 1
    gamma: int = 1
    baseline_alpha: int = 0  # task-prompt samples in each ns/opro baseline group (the rest are NS/OPRO)
    budget: int = 100
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k_anchor: int = Preset.top_k_anchor  # the step's NS anchor: a random one of the k best
    opro_k: int = Preset.opro_k  # OPRO prompts list the k best
    patience: int = 20  # stop after this many steps without a new oracle call
    failed: str = "group"  # a completion with no valid candidate: "group" (reward 0) or "drop" (not in the group)
    repeats: str = "keep"  # a sampled completion of known candidates only: "keep" its reward, or "zero" it

    def __post_init__(self):
        assert self.method in METHODS, f"unknown method '{self.method}'"
        assert self.failed in ("group", "drop"), f"failed is 'group' or 'drop', not {self.failed!r}"
        assert self.repeats in ("keep", "zero"), f"repeats is 'keep' or 'zero', not {self.repeats!r}"
        assert min(self.alpha, self.beta, self.gamma) >= 0 and self.alpha + self.beta + self.gamma > 0, \
            "alpha, beta, gamma are non-negative and not all zero"

    def composition(self):
        """(alpha, beta, gamma) of this method's groups, and the kind of NS prompt, and whether it trains."""
        m = METHODS[self.method]
        N = self.alpha + self.beta + self.gamma
        return (*m.mix(N, self.alpha, self.beta, self.gamma, min(self.baseline_alpha, N)), m.prompt, m.trains)


@dataclass
class Step:
    """One step of one problem in the making: what `Search.plan` chose to sample, what came back and how it
    scored, the group, the learner's statistics, and the times of its phases."""
    t0: float
    prompts: list = field(default_factory=list)  # prompt ids, each sampled counts[i] times
    counts: list = field(default_factory=list)
    sources: list = field(default_factory=list)  # each sample's role in the group ("on-policy", "neighbour")
    db_sources: list = field(default_factory=list)  # and its source in the database ("neighbour" or "opro")
    greedy: list = field(default_factory=list)  # members replayed from the database
    early: object = None  # EarlyRewards for a slow reward
    outs: list = field(default_factory=list)  # the sampler's Rollouts
    rewards: list = field(default_factory=list)
    new_rewards: list = field(default_factory=list)
    kinds: list = field(default_factory=list)
    members: list = field(default_factory=list)  # the GRPO group
    stats: dict = field(default_factory=dict)
    t_sample: float = 0.0
    t_reward: float = 0.0


class Search:
    def __init__(self, cfg: SearchConfig, task, tokenizer, sampler, db, learner=None, seed=0,
                 diagnose=Preset.diagnostics):
        self.cfg, self.task, self.tok, self.sampler, self.db, self.learner = cfg, task, tokenizer, sampler, db, learner
        a, b, g, self.ns_kind, self.trains = cfg.composition()
        self.alpha, self.beta, self.gamma = a, b, g
        assert not self.trains or learner is not None, f"method {cfg.method} trains: it needs a learner"
        self.rng = random.Random(seed)  # NS anchors
        self.gen = torch.Generator().manual_seed(seed)  # sampling (CPU generator: same draws on any device)
        self.task_prompt = self.encode(task.prompt())
        self.step_idx = 0
        self.idle_steps = 0
        self.zero_spread_steps = 0
        self.solved = False
        self.diagnose = float(diagnose)  # the most of the run's time the learning diagnostics may take
        self.diag_seconds = self.run_seconds = 0.0

    def encode(self, messages):
        """Prompt ids: the chat template, then the task's answer prefix (the model continues from there)."""
        return self.tok.encode(self.tok.apply_chat_template(messages) + self.task.answer_prefix)

    @property
    def calls_left(self):
        return self.cfg.budget - self.db.oracle_calls()

    def done(self) -> str | None:
        if self.solved:
            return "solved"
        if self.calls_left <= 0:
            return "budget"
        if self.idle_steps >= self.cfg.patience:
            return "stalled"
        return None

    # ------------------------------------------------------------ scoring

    def score(self, completions, sources, step, early=None, oracle=True):
        """Parse and score completions (texts, token ids) in order; store what is new. Returns each
        completion's reward (max over its candidates, 0 without any, None if the budget ran out first), the
        rewards of the new candidates (one oracle call each), and each completion's kind ("new", "repeat": only
        known candidates, "failed").
        `early` holds scores of candidates already sent to the oracle while sampling (EarlyRewards).
        oracle=False: what is scored is given, not searched (the warm start), and costs no budget."""
        # Text that is not valid UTF-8 (lone surrogates from a user's task) cannot be stored: replace it first.
        completions = [(text.encode("utf-8", "replace").decode("utf-8"), ids) for text, ids in completions]
        parsed = [self.task.parse(text) for text, _ in completions]
        known = self.db.lookup(c for p in parsed for c in p.candidates)
        scores = early.results() if early else {}
        new, left = [], self.calls_left - len(scores) if oracle else float("inf")
        for p in parsed:
            for c in p.candidates:
                if c not in known and c not in scores and c not in new and len(new) < left:
                    new.append(c)
        scores.update(zip(new, self.task.reward(new)) if new else {})
        scores = {c: finite(s) for c, s in scores.items()}
        rows, first_owner = [], {}
        for i, (p, (text, ids)) in enumerate(zip(parsed, completions)):
            if not p.candidates:
                rows.append(Row(None, text, 0.0, sources[i], step, ids, {"error": p.error}, oracle=False))
            for c in p.candidates:
                if c in scores and c not in first_owner:
                    first_owner[c] = i
                    rows.append(Row(c, text, scores[c].reward, sources[i], step, ids, scores[c].info, oracle=oracle))
        if rows:
            self.db.add(rows)
        self.solved = self.solved or any(self.task.solved(s) for s in scores.values())
        rewards, kinds = [], []  # kind: "failed" (nothing valid), "repeat" (only known candidates), "new"
        for p in parsed:
            got = [scores[c].reward if c in scores else known[c].reward for c in p.candidates
                   if c in scores or c in known]
            rewards.append(max(got) if got else (0.0 if not p.candidates else None))
            kinds.append("failed" if not p.candidates else "repeat" if all(c in known for c in p.candidates)
                         else "new")
        return rewards, [s.reward for s in scores.values()], kinds

    def warm_start(self):
        """Score the task's warm-start candidates once, before the first step. As in the reference, which
        preloads them with their scores, they are given to every method alike and cost no oracle call."""
        if self.db.count() or not self.task.warm_start():
            return
        prefix = self.task.answer_prefix
        texts = [self.task.render(c) for c in self.task.warm_start()]
        ids = [self.tok.encode(t[len(prefix):] if t.startswith(prefix) else t) for t in texts]
        self.score(list(zip(texts, ids)), ["warm-start"] * len(texts), step=0, oracle=False)

    # ------------------------------------------------------------ one step

    def step(self) -> dict:
        """One step alone: plan the group, sample it, score it, train on it, and say what happened (metrics.jsonl)."""
        step = self.plan()
        step.outs = self.sampler.generate(step.prompts, **self.sampling(step), generator=self.gen) \
            if step.prompts else []
        self.scored(step)
        step.stats = self.learner.step(self.task_prompt, step.members) if self.learns(step) else {}
        return self.finish(step)

    def plan(self) -> "Step":
        """The step's prompts and how many samples of each, and the greedy members replayed from the database."""
        self.step_idx += 1
        step = Step(t0=time.perf_counter())
        step.greedy = self.db.top(self.beta, distinct_completions=True) if self.beta else []
        n_on = self.alpha + (self.beta - len(step.greedy))  # no past completions yet: sample instead
        ns_prompt = self.ns_prompt() if self.gamma else None
        n_ns = self.gamma if ns_prompt else 0
        n_on += self.gamma - n_ns  # nothing scored yet: sample the task prompt instead
        for prompt, n, source, db_source in ((self.task_prompt, n_on, "on-policy", "on-policy"),
                                             (ns_prompt, n_ns, "neighbour", self.ns_kind)):
            if n:  # one prompt sampled n times: prefilled once
                step.prompts.append(prompt)
                step.counts.append(n)
                step.sources += [source] * n  # NS members are trained as completions of the task prompt too
                step.db_sources += [db_source] * n
        step.early = EarlyRewards(self) if self.task.slow_reward else None
        return step

    def sampling(self, step: "Step") -> dict:
        """The sampler's arguments for this step's prompts (but the generator)."""
        prefix = self.task.answer_prefix
        return dict(n=step.counts, max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                    stop_strings=self.task.stop_strings, stop_when=lambda text: self.task.finished(prefix + text),
                    on_finish=step.early.submit if step.early else None)

    def scored(self, step: "Step"):
        """Score the step's samples (`step.outs`) and build its GRPO group."""
        step.t_sample = time.perf_counter()
        prefix = self.task.answer_prefix
        step.rewards, step.new_rewards, step.kinds = self.score(
            [(prefix + o.text, o.ids) for o in step.outs], step.db_sources, self.step_idx, step.early)
        step.t_reward = time.perf_counter()
        sampled = [replace(o, text=prefix + o.text, source=src, reward=r, info={"kind": kind})
                   for src, o, r, kind in zip(step.sources, step.outs, step.rewards, step.kinds)]
        step.members = build_group(sampled, step.greedy, self.cfg.failed, self.cfg.repeats)

    def learns(self, step: "Step") -> bool:
        return self.trains and len(step.members) > 1

    def finish(self, step: "Step") -> dict:
        """After training (`step.stats`, the learner's statistics): the step's metrics, and the learning
        diagnostics when their share of the run's time allows."""
        outs, members, rewards, kinds, stats = step.outs, step.members, step.rewards, step.kinds, step.stats
        new_rewards, t0 = step.new_rewards, step.t0
        t_train = time.perf_counter()
        new_calls = len(new_rewards)
        self.idle_steps = 0 if new_calls else self.idle_steps + 1
        best = self.db.best()
        group = [m.reward for m in members]
        zero_spread = len(set(group)) <= 1
        self.zero_spread_steps += zero_spread
        # what the policy sampled, a failed parse counting 0 whether or not it joined the group
        on_policy = [r for src, r in zip(step.sources, rewards) if src == "on-policy" and r is not None]
        neighbour = [r for src, r in zip(step.sources, rewards) if src == "neighbour" and r is not None]
        diag = {"on_policy_reward": sum(on_policy) / len(on_policy) if on_policy else None,
                "neighbour_reward": sum(neighbour) / len(neighbour) if neighbour else None,
                # what the search gains: the mean reward of this step's new candidates (a collapsed policy's
                # sampled reward can be high while it only repeats known words)
                "new_reward": sum(new_rewards) / len(new_rewards) if new_rewards else None,
                "failed_share": round(kinds.count("failed") / len(outs), 4) if outs else None,
                "repeat_share": round(kinds.count("repeat") / len(outs), 4) if outs else None}
        # The learning diagnostics cost a forward pass of the group: they run while their share of the run's
        # time stays within `diagnose` (so on every trained step when 1.0, every few steps at 0.1).
        spent = time.perf_counter() - t0
        if self.trains and self.diagnose and self.diag_seconds <= self.diagnose * (self.run_seconds + spent):
            t_diag = time.perf_counter()
            diag.update(policy_movement(self.learner, self.task_prompt, [m.ids for m in members],
                                        best.completion_ids if best else None))
            diag["dw_rel"] = adapter_change(self.learner.model)
            self.diag_seconds += time.perf_counter() - t_diag
        self.run_seconds += time.perf_counter() - t0
        return {"step": self.step_idx, "oracle_calls": self.db.oracle_calls(), "new_calls": new_calls,
                "best_reward": best.reward if best else None,
                "group_reward_mean": sum(group) / len(group) if group else None,
                "group_reward_max": max(group) if group else None,
                "members": {s: sum(m.source == s for m in members) for s in ROLES},
                "completion_tokens": sum(len(o.ids) for o in outs),
                "loss": stats.get("loss"), "grad_norm": stats.get("grad_norm"),
                "zero_spread": zero_spread, "zero_spread_share": round(self.zero_spread_steps / self.step_idx, 4),
                "train_skipped": stats.get("skipped"),
                "lr": stats.get("lr"), **diag,
                "seconds": round(time.perf_counter() - t0, 3), "sample_seconds": round(step.t_sample - t0, 3),
                "reward_seconds": round(step.t_reward - step.t_sample, 3),
                "train_seconds": round(t_train - step.t_reward, 3),
                "diagnostics_seconds": round(time.perf_counter() - t_train, 3)}

    def ns_prompt(self) -> list[int] | None:
        """Token ids of this step's neighbourhood (or OPRO) prompt, None while the database is empty. As in the
        reference, one anchor (a uniformly random one of the top-k) serves every NS member of a step."""
        if self.ns_kind == "opro":
            history = self.db.history(self.cfg.opro_k)
            return self.encode(self.task.opro_prompt(history)) if history else None
        anchor = self.db.sample_top(self.cfg.top_k_anchor, self.rng)
        return self.encode(self.task.neighbour_prompt(anchor.key, anchor.reward)) if anchor else None

    # ------------------------------------------------------------ resume

    def state(self) -> dict:
        return {"step": self.step_idx, "idle_steps": self.idle_steps, "solved": self.solved,
                "zero_spread_steps": self.zero_spread_steps, "rng": self.rng.getstate(), "gen": self.gen.get_state()}

    def load_state(self, s: dict):
        self.step_idx, self.idle_steps, self.solved = s["step"], s["idle_steps"], s["solved"]
        self.zero_spread_steps = s["zero_spread_steps"]
        self.rng.setstate(s["rng"])
        self.gen.set_state(s["gen"])


def finite(score: Score) -> Score:
    """A task's score, with a non-finite reward (a task bug) turned into 0 and said so: NaN must not reach
    the database, the advantages or the adapter."""
    r = float(score.reward)
    if math.isfinite(r):
        return score
    return Score(0.0, dict(score.info, error=f"the task returned a non-finite reward ({r}); scored 0"))


class EarlyRewards:
    """Sends the new candidates of each completion to the oracle as soon as the sampler finishes it, on a
    background thread, so slow rewards (sandboxed programs, dockings) overlap with the decoding of the rest
    of the group. Never spends more than the budget left at the start of the step."""

    def __init__(self, search: Search):
        self.search = search
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="reward")
        self.sent = {}  # candidate -> (future of a list of Scores, index in it)
        self.left = search.calls_left

    def submit(self, _row, completion):
        task = self.search.task
        parsed = task.parse(task.answer_prefix + completion.text)
        fresh = [c for c in dict.fromkeys(parsed.candidates) if c not in self.sent]
        known = self.search.db.lookup(fresh)
        fresh = [c for c in fresh if c not in known][:self.left - len(self.sent)]
        if fresh:
            future = self.pool.submit(task.reward, fresh)
            self.sent.update({c: (future, i) for i, c in enumerate(fresh)})

    def results(self) -> dict:
        try:
            return {c: f.result()[i] for c, (f, i) in self.sent.items()}
        finally:
            self.pool.shutdown()
