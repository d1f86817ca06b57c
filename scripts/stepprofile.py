"""Where a Semantle step's time goes: `scripts/bench.py step`'s run (run.py, MiGrATe, `cpu` preset, a tuning target)
in this process, with a timer around each part of the step [ours, speed only].

    python -m scripts.stepprofile                  # median seconds a trained step spends in each part, as JSON
    python -m scripts.stepprofile --ops 2          # also the aten operators of two steps' sampling (torch.profiler)
    python -m scripts.stepprofile --train-ops 3    # and of three steps' learner (GRPO update)
    python -m scripts.stepprofile --train-ops 3 --extra --learner-dtype bfloat16   # run.py flags of the profiled run

`scripts/bench.py step` says how long a step takes against its floor; this says which part is over it. Each part's time
is exclusive (a part called inside another counts once, in the inner one), on the main thread only (the reward
thread scores finished rows while others decode), and the step's own remainder is what no timer covers:
database, group building, metrics. Medians are over the trained steps after the first (which also chooses the
machine's product kernels), as `scripts/bench.py step`. The timers cost a few microseconds a call: a share is exact to
about that, the absolute seconds are a little above an untimed run's. Nothing here changes what the run does.
"""
import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import threading
import time

LOOP = "sampling: the sampler's loop (Python, stop checks' logic)"
# (label, owner, attribute): the functions timed, by where the step spends time
PARTS = [
    ("step: search's own remainder", "search.Search", "step"),
    ("prompts: chat template and tokenizing", "search.Search", "encode"),
    ("prompts: choosing the anchor", "search.Search", "ns_prompt"),
    (LOOP, "sampling.Sampler", "generate"),
    ("sampling: prefill (model modules)", "model.Transformer", "hidden_states"),
    ("sampling: head at prefill", "model.Transformer", "logits"),
    ("sampling: repacking weights after an update", "fast.packing.PackedDecoder", "prepare"),
    ("sampling: packed decode step", "fast.packing.PackedDecoder", "step"),
    ("sampling: choosing tokens", "fast.decode.FastStep", "draw"),
    ("sampling: detokenizing (stop checks, texts)", "tokenizer.Tokenizer", "decode"),
    ("sampling: cache row copies", "sampling.KVCache", "select_rows"),
    ("scoring: waiting on rewards", "search.Search", "score"),
    ("training: GRPO learner step", "grpo.Learner", "step"),
]


class Timers:
    """Exclusive seconds per label, main thread only; `steps` gets one dict per Search.step call. A "sampling:"
    part is timed only inside the sampler (the learner runs the same model modules: that is training's time)."""

    def __init__(self):
        self.spent, self.stack, self.steps = {}, [], []

    def wrap(self, label, fn):
        def timed(*a, **k):
            if threading.current_thread() is not threading.main_thread() or (
                    label.startswith("sampling:") and label != LOOP and not any(e[0] == LOOP for e in self.stack)):
                return fn(*a, **k)  # its time stays with its caller
            self.stack.append([label, time.perf_counter(), 0.0])  # [label, start, seconds in timed callees]
            try:
                out = fn(*a, **k)
            finally:
                _, start, inner = self.stack.pop()
                total = time.perf_counter() - start
                self.spent[label] = self.spent.get(label, 0.0) + total - inner
                if self.stack:
                    self.stack[-1][2] += total
            if label == PARTS[0][0]:  # one Search.step done: its parts
                self.steps.append({"metrics": out, "parts": dict(self.spent)})
                self.spent.clear()
            return out
        return timed


def _owner(owner):
    """"module.Class" -> the class, "module" -> the module: where a timed or profiled function lives."""
    import importlib
    try:
        return importlib.import_module(owner)
    except ModuleNotFoundError:
        mod, _, cls = owner.rpartition(".")  # "fast.packing.PackedDecoder": a class of a module in a folder
        return getattr(importlib.import_module(mod), cls)


@contextlib.contextmanager
def timed(timers):
    undo = []
    for label, owner, attr in PARTS:
        target = _owner(owner)
        fn = getattr(target, attr)
        undo.append((target, attr, fn))
        setattr(target, attr, timers.wrap(label, fn))
    try:
        yield
    finally:
        for target, attr, fn in reversed(undo):
            setattr(target, attr, fn)


def main():
    ap = argparse.ArgumentParser(prog="python -m scripts.stepprofile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="Hugging Face folder or embedded name (default: SmolLM2-135M)")
    ap.add_argument("--task-id", default="river", help="Semantle target: a tuning one, never one of the paper's ten")
    ap.add_argument("--budget", type=int, default=80, help="oracle calls of the profiled run (20 warm start)")
    ap.add_argument("--kl-coef", type=float, default=0.0, help="the run's KL coefficient")
    ap.add_argument("--ops", type=int, default=0, help="also profile aten operators over this many steps' sampling")
    ap.add_argument("--train-ops", type=int, default=0,
                    help="also profile aten operators over this many trained steps' learner update")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                    help="run.py flags for the profiled runs, e.g. --extra --learner-dtype bfloat16")
    args = ap.parse_args()
    import run
    from scripts.bench import machine, step_argv
    timers = Timers()
    with tempfile.TemporaryDirectory() as folder:
        with timed(timers), contextlib.redirect_stdout(sys.stderr):
            rc = run.main(step_argv(args.model, args.budget, args.kl_coef, folder, args.task_id) + args.extra)
    if rc != 0:  # run.py has printed its own one-line error
        print(f"error: scripts/stepprofile.py: the profiled run.py exited with status {rc} (its error is above)",
              file=sys.stderr)
        sys.exit(rc)
    trained = [s for s in timers.steps[1:] if (s["metrics"] or {}).get("loss") is not None]
    if not trained:
        print(f"error: scripts/stepprofile.py: no trained step after the first in {args.budget} oracle calls; raise "
              "--budget, or use a model whose guesses are words", file=sys.stderr)
        sys.exit(2)
    labels = [label for label, _, _ in PARTS]
    med = {label: round(statistics.median(s["parts"].get(label, 0.0) for s in trained), 4) for label in labels}
    seconds = statistics.median(s["metrics"]["seconds"] for s in trained)
    out = {"machine": machine(), "steps": len(trained), "step_seconds": round(seconds, 3),
           "sample_seconds": round(statistics.median(s["metrics"]["sample_seconds"] for s in trained), 3),
           "train_seconds": round(statistics.median(s["metrics"]["train_seconds"] for s in trained), 3),
           "completion_tokens": statistics.median(s["metrics"]["completion_tokens"] for s in trained),
           "parts_median_s": dict(sorted(med.items(), key=lambda kv: -kv[1]))}
    if args.ops:
        out["ops"] = profile_ops(args, "sampling.Sampler", "generate", args.ops)
    if args.train_ops:
        out["train_ops"] = profile_ops(args, "grpo.Learner", "step", args.train_ops)
    print(json.dumps(out, indent=1))


def profile_ops(args, where, attr, n):
    """aten operators by self CPU time over `n` calls (the second on) of where.attr (the sampler's
    generate, or the learner's step) in a second run of the same command: the profiler's cost is per operator,
    so this ranks them; it does not time them. Also the wall seconds of the profiled calls, and what they
    worked on (learner: its trained members, which differ between runs)."""
    import run
    from scripts.bench import step_argv
    from torch.profiler import ProfilerActivity, profile
    import search
    owner = _owner(where)
    calls, tables, walls, stats, stepping = [0], [], [], [], [False]
    original, step = getattr(owner, attr), search.Search.step

    def in_step(self):  # the run's own calls, not run.py's probe of the machine before its first step
        stepping[0] = True
        try:
            return step(self)
        finally:
            stepping[0] = False

    def profiled(self, *a, **k):
        calls[0] += stepping[0]
        if not stepping[0] or not 2 <= calls[0] <= 1 + n:
            return original(self, *a, **k)
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = original(self, *a, **k)
        walls.append(round(time.perf_counter() - start, 3))
        tables.append(prof.key_averages())
        if isinstance(out, dict):
            stats.append({k: out[k] for k in ("trained_members", "skipped") if k in out})
        return out
    setattr(owner, attr, profiled)
    search.Search.step = in_step
    try:
        with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(sys.stderr):
            run.main(step_argv(args.model, args.budget, args.kl_coef, folder, args.task_id) + args.extra)
    finally:
        setattr(owner, attr, original)
        search.Search.step = step
    total = {}
    for table in tables:
        for e in table:
            total[e.key] = total.get(e.key, 0.0) + e.self_cpu_time_total / 1e6
    top = sorted(total.items(), key=lambda kv: -kv[1])[:25]
    return {"calls": len(tables), "wall_seconds": walls, **({"calls_stats": stats} if stats else {}),
            "self_seconds": {k: round(v, 4) for k, v in top}}


if __name__ == "__main__":
    main()
