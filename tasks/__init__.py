"""The task interface: what a black-box problem must provide to be searched with MiGrATe.

A task is one module in this folder defining a subclass of `Task` named `TASK`. It never imports the model
or the learner: it turns completions into candidates and candidates into rewards, and the engine does the
rest. Adding a task is adding a file; `load_task("name", task_id)` finds it by its file name, and
`--task path/to/my_task.py` loads one from anywhere. The other modules here serve tasks and nothing else:
embedder.py (Semantle's encoder), sandbox.py and jail.py (generated code, run locked down).

Vocabulary:
- completion: the text the model wrote for one prompt.
- candidate: one answer inside a completion, in canonical form (a word, a canonical SMILES, a program).
  Its string is its key in the database, so a candidate is never scored twice.
- oracle call: the reward of one new, valid candidate. Candidates that fail `parse` cost no call.
"""
import importlib
import importlib.util
import os
from dataclasses import dataclass, field, fields, replace

ALIASES = {"arc": "arc_agi"}  # short names users type -> module file


class TaskError(ValueError):
    """Bad task name or task id; the message names the problem and the fix."""


@dataclass(frozen=True)
class Tuned:
    """Values that replace the paper's where a measurement chose others, and where they apply: a preset, an
    embedded model and methods. `source` says where they come from (a sweep on a named tuning set, a paired grid,
    a sizing for the CPU), and run.py --dry-run prints it beside each value."""
    values: dict
    source: str
    preset: str = "cpu"  # the preset they belong to ("paper" is the paper's values alone)
    model: str | None = None  # only with this --model (an embedded model's name); None: any model
    methods: tuple[str, ...] = ()  # only for these methods; (): all


@dataclass
class Preset:
    """A task's hyperparameters: the paper's (shared/PAPER.md, "Per-task settings", and the reference code), and
    in `tuned` the values we measured better for a preset, a model and methods [ours]. run.py flags override all."""
    alpha: int  # on-policy completions per group
    beta: int  # greedy completions (best past ones, from the database)
    gamma: int  # neighbourhood completions (variations of a top past candidate)
    lr: float = 5e-5
    lora_r: int = 64
    lora_alpha: int = 16
    mu: int = 2  # inner epochs over one group
    # The reference's optimiser (TRL's GRPOTrainer as Unsloth configures it): linear warm-up over the first
    # tenth of the planned optimiser steps, then linear decay to 0; weight decay 0.01.
    lr_schedule: str = "linear"  # "linear" | "constant"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    steps: int = 100  # groups in one of the paper's runs: the schedule's length (x mu optimiser steps)
    budget: int = 1000  # oracle calls
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k_anchor: int = 3  # MiGrATe: one anchor a step, uniform among the k best, for all gamma NS prompts
    opro_k: int = 5  # MiGrATe(OPRO): the OPRO prompt lists the k best
    ns_baseline_k: int = 3  # the ns baseline's anchor: one of the k best
    opro_baseline_k: int = 10  # the opro baseline's list length
    baseline_alpha: int = 0  # task-prompt samples in each group of the ns and opro baselines (ARC: 12 of 16)
    # A completion with no valid candidate (a parse failure): "group" keeps it in the GRPO group at reward 0, so it
    # lowers the group mean (and leaves the loss under mask_zero_reward); "drop" leaves it out of the group, as
    # the reference's Semantle does (it refills a step's words from the valid guesses before packing them).
    failed: str = "group"
    # A sampled completion that only repeats known candidates: "keep" its known reward (the reference, every task:
    # its trainer scores every completion, repeats included; its molecule prompt tells the model a repeat scores
    # nothing, but no code zeroes one), or "zero". A repeat costs no oracle call and tells the search nothing new;
    # kept, a repeat of a good word is trained up like a discovery.
    repeats: str = "keep"
    kl_coef: float = 0.0  # KL pull to the base policy (the paper has none)
    diagnostics: float = 0.1  # the most of a run's time the learning diagnostics may take (run.py --diagnostics)
    source: str = "the paper (shared/PAPER.md, Per-task settings) and the reference code"  # of the values above
    tuned: tuple[Tuned, ...] = ()  # [ours] later entries win where two apply

    @property
    def group_size(self):
        return self.alpha + self.beta + self.gamma

    def named(self, name: str, model: str | None = None, method: str | None = None) -> "Preset":
        """The "paper" preset, or the "cpu" one, for this model and method: the paper's values with every
        applicable `tuned` entry's values in place."""
        return self.resolved(name, model, method)[0]

    def resolved(self, name: str, model: str | None = None, method: str | None = None) -> tuple["Preset", dict]:
        """(the preset `named` gives, {field: where its value comes from}) for run.py's config and --dry-run."""
        assert name in ("paper", "cpu"), f"presets are 'paper' and 'cpu', not {name!r}"
        out, sources = self, {f.name: self.source for f in fields(self) if f.name not in ("source", "tuned")}
        for t in self.applicable(name, model, method):
            unknown = set(t.values) - set(sources)
            assert not unknown, f"tuned values for fields a preset does not have: {sorted(unknown)}"
            out = replace(out, **t.values)
            sources.update(dict.fromkeys(t.values, t.source))
        return replace(out, tuned=()), sources

    def applicable(self, name, model, method) -> list[Tuned]:
        return [t for t in self.tuned if t.preset == name and t.model in (None, model)
                and (not t.methods or method in t.methods)]


@dataclass
class Parsed:
    candidates: list[str] = field(default_factory=list)  # canonical candidates, in order of appearance
    error: str | None = None  # why nothing (or not everything) in the completion was valid


@dataclass
class Score:
    reward: float
    info: dict = field(default_factory=dict)  # JSON-serialisable details (errors, per-pair scores, ...)


class Task:
    name = "base"
    reward_range = (0.0, 1.0)
    preset = Preset(alpha=4, beta=0, gamma=0)
    answer_prefix = ""  # the answer's first words, written for the model (assistant prefill); part of the
    #                     prompt for sampling and training, and of the completion text parse() sees
    slow_reward = False  # True: score candidates while the rest of the group is still being sampled
    stop_strings: tuple[str, ...] = ()  # a completion may end once its tail contains one of these...
    # The embedded model run.py uses unless --model names another: the smallest measured to serve this task
    # (default_model.EMBEDDED; "smollm2-135m" writes words, "qwen2.5-coder-1.5b" also programs and SMILES).
    model = "smollm2-135m"

    def __init__(self, task_id: str | None = None, seed: int = 0):
        self.task_id, self.seed = task_id, seed

    @classmethod
    def named_sets(cls) -> dict[str, list[str]]:
        """Named lists of task ids (e.g. the paper's Semantle targets), for --task-ids."""
        return {}

    def prompt(self) -> list[dict]:
        """Chat messages of the task prompt: the problem and the answer format."""
        raise NotImplementedError

    def neighbour_prompt(self, candidate: str, reward: float) -> list[dict]:
        """Chat messages asking for a variation of one past candidate that could score higher."""
        raise NotImplementedError

    def opro_prompt(self, history: list[tuple[str, float]]) -> list[dict]:
        """Chat messages listing past candidates with their rewards, worst to best, asking for better ones."""
        raise NotImplementedError

    def parse(self, completion: str) -> Parsed:
        """Completion -> its valid candidates, or an error saying why none are valid. Never raises."""
        raise NotImplementedError

    def reward(self, candidates: list[str]) -> list[Score]:
        """One Score per candidate, each reward within reward_range. Never raises: failures score the
        bottom of the range with the reason in info. Mind the bottom: a group member whose reward is exactly 0
        leaves the GRPO loss (it still counts in the group mean; GRPOConfig.mask_zero_reward, as the paper), so a
        task whose worst valid answer would score 0 should floor it above 0 (Semantle and molecules do)."""
        raise NotImplementedError

    def solved(self, score: Score) -> bool:
        """Whether this candidate solves the problem; the search stops at the first one."""
        return score.reward >= self.reward_range[1]

    def finished(self, completion: str) -> bool:
        """...and this says it is complete (default: yes). Called only when a stop string appears."""
        return True

    def render(self, candidate: str) -> str:
        """A completion that states just this candidate in the answer format, answer_prefix included (stored
        for warm-start candidates, which no model wrote, so that replaying them as greedy members teaches the
        format)."""
        return candidate

    def warm_start(self) -> list[str]:
        """Candidates scored before the first step, given to every method (they cost no oracle call). Default:
        none."""
        return []

    def evaluate(self, scored: list[tuple[str, Score]]) -> dict:
        """The task's final metric over every scored candidate, for summary.json."""
        best = max((s.reward for _, s in scored), default=0.0)
        return {"best_reward": best, "solved": any(self.solved(s) for _, s in scored)}

    def describe(self, final: dict) -> str:
        """One line in plain words for the user, from evaluate()'s result: what the search found."""
        return (f"The best candidate scored {final.get('best_reward', 0.0):.3f} of {self.reward_range[1]:g}; "
                f"the problem was {'solved' if final.get('solved') else 'not solved'}.")

    def close(self):
        """Release pools and processes."""


def load_task(name: str, task_id: str | None = None, seed: int = 0, options: dict | None = None) -> Task:
    """A task by module name in tasks/ ("arc", "semantle", ...) or by the path of any .py file defining TASK.
    `options` are the task's own keyword arguments (run.py --task-option KEY=VALUE)."""
    return _build(task_class(name), task_id, seed, options or {})


def task_class(name: str) -> type[Task]:
    """The Task subclass `name` names (as load_task), without building a problem: its named sets, its checks."""
    if name.endswith(".py"):
        if not os.path.isfile(name):
            raise TaskError(f"task file '{name}' does not exist")
        spec = importlib.util.spec_from_file_location(f"user_task_{abs(hash(os.path.abspath(name)))}", name)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        if not hasattr(mod, "TASK"):
            raise TaskError(f"{name} defines no TASK (a subclass of tasks.Task)")
        return mod.TASK
    module = ALIASES.get(name, name)
    try:
        mod = importlib.import_module(f"tasks.{module}")
    except ModuleNotFoundError as e:
        if e.name != f"tasks.{module}":
            raise  # the task exists but one of its imports is missing
        mod = None
    if not hasattr(mod, "TASK"):  # no such module, or one that serves tasks (tasks.sandbox)
        raise TaskError(f"unknown task '{name}'; available: {', '.join(available())}, or a path to a .py file")
    return mod.TASK


def problem_ids(name: str, spec: str) -> list[str]:
    """The problems `spec` names for task `name` (run.py --task-ids, scripts/experiments.py task:spec): one of the task's
    named sets ("paper") or ids separated by commas, each once, since two runs of one id would share a folder."""
    named = task_class(name).named_sets()
    ids = named[spec] if spec in named else [s.strip() for s in spec.split(",")]
    ids = list(dict.fromkeys(i for i in ids if i))
    if not ids:
        raise TaskError(f"'{spec}' names no problem of task {name}; give ids separated by commas or a named set "
                        f"({', '.join(named) or 'none for this task'})")
    return ids


def _build(cls, task_id, seed, options):
    try:
        return cls(task_id, seed=seed, **options)
    except TypeError as e:
        if options and "unexpected keyword" in str(e):
            raise TaskError(f"task {cls.name} has no option {str(e).split()[-1]}") from None
        raise


def available() -> list[str]:
    """The task modules here: those that define TASK (read from the source, so that listing them imports no
    task's dependencies)."""
    here = os.path.dirname(__file__)
    mods = [f.removesuffix(".py") for f in os.listdir(here) if f.endswith(".py") and f != "__init__.py"
            and "\nTASK = " in open(os.path.join(here, f)).read()]
    return sorted(set(mods) | set(ALIASES))
