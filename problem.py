"""One problem's search in its run folder: opened new or from its last checkpoint, a record of every completed step,
and what it found at the end. run.py searches one problem alone, or several together over one model (together.py).

Run folder: config.json (resolved flags), metrics.jsonl (one line per step), candidates.sqlite (every scored
candidate), checkpoint.pt (adapter, optimiser, RNG and search state of the last completed step, replaced
atomically), adapter/ (the LoRA adapter in PEFT format), summary.json and reward_curve.png. A step is complete
once its checkpoint lands; a killed run resumes from there and never scores a candidate twice.
"""
import json
import math
import os
import sqlite3
import sys
import time


class UsageError(Exception):
    """Bad input: run.py prints the message as one line and exits 2."""


def config_of(cls, cfg: dict):
    """The learner's or the search's config from config.json: every field of `cls` the run recorded (a run
    from before a field existed gets the field's default, the behaviour it ran with)."""
    from dataclasses import fields
    return cls(**{f.name: cfg[f.name] for f in fields(cls) if f.name in cfg})


def read_config(folder) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder) or not os.path.exists(path):
        raise UsageError(f"'{folder}' is not a run folder (no config.json); give a folder that run.py wrote")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{path} is unreadable ({e}); the run cannot be resumed, start it again with --out")
    missing = {"task", "task_id", "method", "budget", "seed"} - set(cfg)
    if missing:
        raise UsageError(f"{path} lacks {sorted(missing)}; it was not written by run.py")
    return dict(cfg, out=folder)


def write_json(path, obj):
    """Write JSON whole or not at all (atomic.py)."""
    from atomic import write_atomically

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    write_atomically(path, write)


def folder_name(*parts) -> str:
    """A run folder's name from its parts (task, problem, method or label, seed): one path component, whatever
    the task id holds (molecule ids have ':' and '/', a task file is a path, several ids have ',')."""
    return "-".join(str(p) for p in parts).replace(":", "_").replace("/", "_").replace(",", "+")


def keep_metrics(path, last_step):
    """Drop metrics of steps after the last checkpoint (a kill between the two writes); they are redone."""
    if not os.path.exists(path):
        return
    from atomic import write_atomically
    with open(path) as f:
        lines = [l for l in f if l.strip() and json.loads(l)["step"] <= last_step]

    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(lines)
    write_atomically(path, write)


def read_metrics(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_base(cfg):
    """The run's model and tokenizer (config.json's model, device and dtype), no adapter."""
    import torch
    from model import load_model
    from weights.default_model import model_path
    return load_model(model_path(cfg["model"]), device=cfg["device"], dtype=getattr(torch, cfg["dtype"]))


class Shared:
    """What problems run together share: the base model and tokenizer, the Together model over it and the sampler
    that decodes every problem's rows in one batch (together.py)."""

    def __init__(self, cfg, slots: int, plan=None):
        from fast.cpu_linear import use_fast_linear
        from sampling import Sampler
        from fast.together import FastTogether, FastTogetherStep
        self.base, self.tok = load_base(cfg)
        # together.Together, its learner pass with each problem's prompt run once
        use_fast_linear(self.base)  # its reference passes (the KL pull's), as the learner alone
        # (plan: plan.plan_run's for the K problems, which may ask for layers recomputed, smaller micro-batches)
        self.together = FastTogether(self.base, slots, tuple(cfg["lora_targets"]),
                                     tokens_per_microbatch=plan.tokens_per_microbatch if plan else 4096,
                                     activation_checkpointing=cfg.get("activation_checkpointing", False) or
                                     bool(plan and plan.checkpointing),
                                     learner_dtype=cfg.get("learner_dtype", "float32"))
        use_fast_linear(self.together.model)  # as a run alone: the products through the measured fastest library
        self.sampler = Sampler(self.together.model, self.tok, FastTogetherStep(self.together))


class Problem:
    """One search in its run folder. Opening builds (or restores from checkpoint.pt) the model, learner, sampler,
    database and search, refusing bad input with a UsageError before anything is written; `record` keeps a
    completed step; `close` writes the summary, the plot and the closing lines.

    Alone (shared None) the problem has the model to itself, with run.py's fast paths (fast/) and a memory plan.
    With `shared` (several problems together) its model is a together.problem_model over the shared base, with the
    prompt-once learner; the shared sampler decodes its rows (together.step_together steps it)."""

    def __init__(self, cfg, *, resume=False, task=None, shared: Shared | None = None):
        import torch
        from database import Database
        from plan import DoesNotFit, plan_run
        from search import METHODS, Search, SearchConfig
        from tasks import Preset, load_task
        self.cfg, self.resume, self.out = cfg, resume, cfg["out"]
        out = self.out
        self.ckpt_path, self.metrics_path = os.path.join(out, "checkpoint.pt"), os.path.join(out, "metrics.jsonl")
        if not resume and os.path.exists(os.path.join(out, "config.json")):
            raise UsageError(f"{out} already holds a run; continue it with --resume {out} or choose another --out")
        if cfg["device"].startswith("cuda") and not torch.cuda.is_available():
            raise UsageError("--device cuda but no CUDA GPU is visible to PyTorch; use --device cpu")
        try:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, ".writable"), "w"):
                pass
            os.remove(os.path.join(out, ".writable"))
        except OSError as e:
            raise UsageError(f"cannot write the run folder {out} ({e.strerror}); choose another --out") from None
        self.task = task or load_task(cfg["task"], cfg["task_id"], seed=cfg["seed"], options=cfg.get("task_options"))
        self.trains = METHODS[cfg["method"]].trains
        self.plan = None
        if shared is None:
            try:  # before anything is fetched or written: the prompt's length estimated from its characters
                self.plan = plan_run(cfg, self.task, self.trains)
            except DoesNotFit as e:
                raise UsageError(str(e) if not resume else f"{e}; a resumed run keeps its model: start a new run "
                                 "with --model to change it") from None
            self._alone()
        else:
            self._together(shared)
        if not resume:  # every refusal is behind: from here the folder holds this run
            write_json(os.path.join(out, "config.json"), cfg)
        try:
            self.db = Database(os.path.join(out, "candidates.sqlite"))
        except sqlite3.DatabaseError as e:
            raise UsageError(f"{out}/candidates.sqlite is not a readable database ({e}); the run cannot be resumed")
        self.search = Search(config_of(SearchConfig, cfg), self.task, self.tok, self.sampler, self.db, self.learner,
                             seed=cfg["seed"], diagnose=cfg.get("diagnostics", Preset.diagnostics))
        elapsed = 0.0
        if resume and os.path.exists(self.ckpt_path):
            try:
                ck = torch.load(self.ckpt_path, weights_only=False)
            except Exception as e:  # written atomically, so only outside damage gets here
                raise UsageError(f"{self.ckpt_path} is unreadable ({type(e).__name__}); remove it to continue from "
                                 f"the database with a fresh adapter") from None
            self.search.load_state(ck["search"])
            elapsed = ck["elapsed"]
            torch.set_rng_state(ck["torch_rng"])
            if self.learner:
                self.learner.load_state_dict(ck)
            keep_metrics(self.metrics_path, self.search.step_idx)
        else:
            keep_metrics(self.metrics_path, 0)
            self.search.warm_start()
        self.announce(shared is None)
        self.t_start = time.time() - elapsed
        self.history = read_metrics(self.metrics_path) if os.path.exists(self.metrics_path) else []

    def _alone(self):
        """The model to itself: its adapter, the prompt-once learner, the fast sampler, within the memory plan."""
        import torch
        from fast.cpu_linear import use_fast_linear
        from fast.decode import FastStep
        from fast.packing import CopyRefused
        from fast.shared_prompt import SharedPromptLearner
        from grpo import GRPOConfig
        from lora import inject_lora
        from plan import plan_run
        from sampling import Sampler
        cfg = self.cfg
        torch.manual_seed(cfg["seed"])  # LoRA's A matrices
        self.model, self.tok = load_base(cfg)
        self.learner = None
        if self.trains:
            inject_lora(self.model, cfg["lora_r"], cfg["lora_alpha"], tuple(cfg["lora_targets"]), cfg["lora_dropout"])
            self.learner = SharedPromptLearner(self.model, config_of(GRPOConfig, cfg))  # grpo.Learner, prompt once
        use_fast_linear(self.model)  # the products through the library this machine measured fastest
        prompt_ids = self.tok.encode(self.tok.apply_chat_template(self.task.prompt()) + self.task.answer_prefix)
        if self.plan:  # the same memory, the prompt's real length (at most the estimate: it fits)
            self.plan = plan_run(cfg, self.task, self.trains, len(prompt_ids), self.plan.available)
        try:
            step = FastStep(self.model, cfg.get("sample_weights", "float32"), cfg.get("compile", False),
                            copies_room=self.plan.copies if self.plan else None)  # sampling.ModelStep, sped up
        except CopyRefused as e:  # low-precision decode copies this model or machine cannot have
            raise UsageError(f"--sample-weights {e.weights}: {e.reason}; use float32") from None
        self.sampler = Sampler(self.model, self.tok, step)
        if self.plan:  # how the learner and the sampler fit the memory (none of it changes what a run computes)
            self.sampler.step.free_copies = not self.plan.copies_while_learning
            if self.learner:
                self.learner.cfg.activation_checkpointing |= self.plan.checkpointing
                self.learner.cfg.tokens_per_microbatch = self.plan.tokens_per_microbatch

    def _together(self, shared: Shared):
        """A model of its own over the shared base (its adapter drawn as alone), the prompt-once learner (which
        prepares its groups; the shared model trains them together), the shared sampler."""
        from fast.cpu_linear import use_fast_linear
        from fast.shared_prompt import SharedPromptLearner
        from grpo import GRPOConfig
        from together import problem_model
        cfg = self.cfg
        self.tok, self.sampler, self.learner = shared.tok, shared.sampler, None
        self.model = use_fast_linear(problem_model(shared.base, cfg["seed"], cfg["lora_r"], cfg["lora_alpha"],
                                                   tuple(cfg["lora_targets"]), cfg["lora_dropout"]))
        if self.trains:
            self.learner = SharedPromptLearner(self.model, config_of(GRPOConfig, cfg))

    def announce(self, alone: bool):
        """The line that says what this run will do, its memory plan and how long it should take."""
        from plan import expected, measure, step_seconds
        from tasks import Preset
        from weights.default_model import canonical
        cfg, search = self.cfg, self.search
        rows = search.alpha + search.gamma  # sampled a step: each may be a new candidate
        steps_left = search.calls_left / max(1, rows)
        rates = measure(self.model, self.sampler, search.task_prompt, rows + search.beta) if alone else None
        if not alone:
            when = "expected: not estimated for problems run together"
        elif rates is None:
            when = "expected: not estimated for a compiled decode step (the probe would compile other shapes)"
        else:
            per_step = step_seconds(rates, prompt_tokens=len(search.task_prompt), rows=rows + search.beta,
                                    max_new_tokens=cfg["max_new_tokens"], trains=self.trains,
                                    checkpointing=bool(self.learner and self.learner.cfg.activation_checkpointing),
                                    diagnostics=cfg.get("diagnostics", Preset.diagnostics),
                                    kl_pull=cfg.get("kl_coef", 0) > 0)
            when = (f"expected: about {expected(steps_left, per_step)} for about {math.ceil(steps_left)} steps, from "
                    f"this machine's prompt pass ({1 / rates.prompt_token:.0f} tokens/s) and decoding "
                    f"({rows + search.beta} rows at {1 / rates.decode_step:.1f} steps/s), completions of "
                    f"{cfg['max_new_tokens'] // 4}-{cfg['max_new_tokens']} tokens")
        memory = self.plan.describe() if self.plan else \
            "memory: not planned (a GPU, a model folder without config.json, or problems run together)"
        print(f"{cfg['task']} {self.task.task_id} | {cfg['method']} | model {canonical(cfg['model'])} | prompt "
              f"{len(search.task_prompt)} tokens | budget {cfg['budget']} oracle calls ({search.calls_left} left) | "
              f"run folder {self.out}\n{memory}\n{when}", file=sys.stderr)

    def record(self, m: dict, name=""):
        """Keep a completed step: its metrics line, then the adapter and the checkpoint (the step is complete once
        the checkpoint lands)."""
        import torch
        from atomic import write_atomically
        from lora import save_adapter
        from outcome import progress as progress_line, time_left
        self.history.append(m)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(m) + "\n")
        state = {"search": self.search.state(), "elapsed": time.time() - self.t_start,
                 "torch_rng": torch.get_rng_state()}
        if self.learner:
            state.update(self.learner.state_dict())  # the same keys checkpoints have always had: old runs resume
            save_adapter(self.model, os.path.join(self.out, "adapter"), base_model=self.cfg["model"])
        write_atomically(self.ckpt_path, lambda tmp: torch.save(state, tmp))
        progress_line(m, self.cfg["budget"], time_left(self.history, self.search.calls_left), name)

    def close(self, reason: str):
        """The final adapter, summary.json, the plot and the closing lines."""
        from lora import save_adapter
        from outcome import plot, summarise, what_learned, what_next
        from plan import minutes
        cfg, out, search, task = self.cfg, self.out, self.search, self.task
        if self.learner and search.step_idx:
            # A kill between the adapter's save and the checkpoint's rename leaves an adapter one step ahead of the
            # checkpoint; if that step spent the budget, the resumed loop takes no step to overwrite it. The final
            # adapter is the final policy: write it from the model once more.
            save_adapter(self.model, os.path.join(out, "adapter"), base_model=cfg["model"])
        summary = summarise(cfg, task, self.db, search, reason, time.time() - self.t_start)
        write_json(os.path.join(out, "summary.json"), summary)
        plot(self.db.curve(), read_metrics(self.metrics_path), os.path.join(out, "reward_curve.png"),
             f"{cfg['task']} {task.task_id} ({cfg['method']})")
        print(f"\n{reason}: best reward {summary['best_reward']} after {summary['oracle_calls']} oracle calls, "
              f"{summary['steps']} steps, {minutes(summary['wall_seconds'])}; solved: {summary['solved']}\n"
              f"{task.describe(summary['final'])}\n"
              + "\n".join(what_learned(cfg, read_metrics(self.metrics_path)) + what_next(cfg, summary))
              + f"\nplot: {os.path.join(out, 'reward_curve.png')}; everything in {out}/summary.json", file=sys.stderr)
        task.close()
        self.db.close()
        return summary
