"""Compare methods on tasks x problems x seeds under equal oracle budgets, and report it as a table and plots.

    python -m scripts.experiments --tasks semantle:paper --methods random ns opro grpo grpo-greedy migrate --seeds 0 1 2 \
        --budget 80 --out experiments/semantle
    python -m scripts.experiments --tasks mytask:id1,id2 --methods random migrate --seeds 0 1     # any task module

Each run is `python run.py ...` in its own folder under --out, several at once in separate processes sized to the
cores (--jobs at once, the cores shared out among them). The harness is resumable: a run with a summary.json is done
and skipped, a run with a folder but no summary is continued with --resume. Then every summary.json and
metrics.jsonl is read and --out gets (from scripts/report.py) results.md (per method: solve rate, best reward, oracle calls
to solve, each a mean with a 95% bootstrap confidence interval that resamples problems, each with all its seeds) and
<task>.png (best reward against oracle calls, one curve per method, the mean over runs with its 95% band).

Task specs: `task:id,id,...`, or `task:<named set>` (e.g. semantle:paper, arc:evaluation-small), or a bare
`task` for its default problem. Extra run.py flags go after `--`, e.g. `-- --max-new-tokens 32`.
--label names a variant (e.g. an alpha/beta/gamma mix) so several variants of one method share a folder.
The report (results.md) covers every finished run in the folder. `--name NAME` reports only the grid the command
names (tasks x methods, or the --label, x seeds) as NAME.md, <task>-NAME.png and <task>-NAME-learning.png, so a
side comparison (an ablation) shares a folder, and the runs it has in common, with the main grid. In that grid a
bare `task` stands for every problem of the task that has a run, not only its default one.
"""
import argparse
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from scripts.report import report, task_name
from problem import folder_name
from run import parser as run_parser
from tasks import TaskError, problem_ids, task_class

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project root: run.py is there


def expand(spec: str) -> tuple[str, list]:
    """'semantle:paper' -> ('semantle', [ten targets]); 'molecule:similarity:aspirin,qed' -> two ids; a bare task
    -> [None], its default problem. An unknown task or a spec that names no problem raises TaskError."""
    task, _, ids = spec.partition(":")
    if task.endswith(".py"):  # a task file: every run.py starts in this folder, so name it from anywhere
        task = os.path.abspath(task)
    if not ids:
        task_class(task)  # an unknown task is refused here in one line, not once per run it would launch
        return task, [None]
    return task, problem_ids(task, ids)


def run_dir(out, task, tid, method, seed, label):
    return os.path.join(out, "runs", folder_name(task_name(task), tid or "default", label or method, f"s{seed}"))


def launch(job):
    """Run (or continue) one run on `threads` cores; returns (folder, seconds, return code)."""
    folder, args, threads = job
    if os.path.exists(os.path.join(folder, "summary.json")):
        return folder, 0.0, 0
    # run.py starts in the project folder: a run folder inside it is named relative to it, so config.json (committed
    # with the results) records where the run lives in the repository, not where this machine keeps the repository
    rel = os.path.relpath(folder, HERE)
    where = folder if rel.startswith("..") else rel
    if os.path.exists(os.path.join(folder, "config.json")):
        cmd = [sys.executable, "run.py", "--resume", where]
    else:
        cmd = [sys.executable, "run.py", *args, "--out", where]
    # the cores are shared out over the runs in flight: --jobs 1 (a model too big for two at once) gets them all
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t = time.time()
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with open(folder + ".log", "a") as log:
        rc = subprocess.run(cmd, cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    return folder, time.time() - t, rc


def main():
    ap = argparse.ArgumentParser(prog="python -m scripts.experiments", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", required=True, help="task specs: task, task:id,id or task:<named set>")
    ap.add_argument("--methods", nargs="+", default=["random", "ns", "opro", "grpo", "grpo-greedy", "migrate"],
                    help="methods to compare")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per (problem, method)")
    ap.add_argument("--budget", type=int, default=None, help="oracle calls per run (default: the task's preset)")
    ap.add_argument("--label", default=None, help="name of this variant in the table (default: the method)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads a run (default: the cores shared out over the runs in flight; set it when something "
                         "else already uses some of them)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count(),
                    help="runs in parallel; the cores are shared out among them")
    ap.add_argument("--together", type=int, default=None, metavar="K",
                    help="run the grid in this one process, K runs at a time over one model (run.py --together): a "
                         "finished run's slot takes the next; --jobs and --threads do not apply")
    ap.add_argument("--out", required=True, help="experiment folder")
    ap.add_argument("--report-only", action="store_true", help="only aggregate the runs already finished")
    ap.add_argument("--against", nargs="*", default=["random", "grpo"],
                    help="labels every other method is compared with, paired on (problem, seed)")
    ap.add_argument("--name", default=None,
                    help="report only the grid named here (tasks x methods or --label, x seeds) as <out>/<name>.md, "
                         "<task>-<name>.png and <task>-<name>-learning.png, beside results.md (which, without "
                         "--name, covers every finished run in the folder); a bare task there means all its problems")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="after --: flags passed to every run.py")
    args = ap.parse_args()
    if args.name is not None:  # a file name beside results.md that must not overwrite another report's files
        if not re.fullmatch(r"[\w.-]+", args.name):
            ap.error(f"--name is a file name (letters, digits, . _ -), not {args.name!r}")
        if args.name == "learning" or args.name.endswith("-learning"):
            ap.error(f"--name {args.name!r} would overwrite a learning plot (<task>-...-learning.png); choose another")
        if args.name == "sweep":
            ap.error("--name sweep is the name scripts/sweep.py writes its table under; choose another")
    if args.label is not None and len(args.methods) > 1:  # one label, one folder per (problem, seed): runs would clash
        ap.error(f"--label names one variant of one method, not of {len(args.methods)} ({' '.join(args.methods)})")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be at least 1, not {args.threads}")
    if args.jobs < 1:
        ap.error(f"--jobs must be at least 1, not {args.jobs}")
    if args.together is not None and args.together < 1:
        ap.error(f"--together must be at least 1, not {args.together}")
    if args.budget is not None and args.budget < 1:  # 0 once meant "the preset's budget" without a word
        ap.error(f"--budget must be at least 1, not {args.budget}")
    if not args.report_only:  # in a report, --methods are labels (e.g. migrate-kl0.1), not only methods
        from search import METHODS
        unknown = [m for m in args.methods if m not in METHODS]
        if unknown:  # caught here, not as one FAILED run per (problem, seed)
            ap.error(f"unknown method {', '.join(map(repr, unknown))}; choose from {', '.join(METHODS)}")
    try:
        specs = [expand(spec) for spec in args.tasks]
    except TaskError as e:
        ap.error(str(e))
    extra = [a for a in args.extra if a != "--"]
    args.out = os.path.abspath(args.out)  # run.py runs in this folder, wherever the harness was started
    failed = 0
    if not args.report_only:
        jobs = []
        for task, ids in specs:
            for tid in ids:
                for seed in args.seeds:
                    for method in args.methods:
                        a = ["--task", task, "--method", method, "--seed", str(seed), *extra]
                        a += ["--task-id", tid] if tid else []
                        a += ["--budget", str(args.budget)] if args.budget is not None else []
                        a += ["--label", args.label] if args.label else []
                        jobs.append((run_dir(args.out, task, tid, method, seed, args.label), a))
        changed = changed_meaning(jobs)
        if changed:
            print(f"error: {changed}", file=sys.stderr)
            return 2
        if args.together:
            failed = serve_together(args, jobs)
            write_report(args, specs)
            return 2 if failed else 0
        parallel = max(1, min(args.jobs, len(jobs)))
        threads = args.threads or max(1, (os.cpu_count() or 1) // parallel)
        if parallel > 1 and "--memory" not in extra:  # each run plans its memory: share what the machine has
            from plan import available_memory
            jobs = [(folder, a + ["--memory", f"{available_memory() / 1e9 / parallel:.1f}"]) for folder, a in jobs]
        jobs = [(folder, a, threads) for folder, a in jobs]
        print(f"{len(jobs)} runs, {args.jobs} at a time, {threads} thread(s) each, in {args.out}", file=sys.stderr)
        t0 = time.time()
        with ThreadPoolExecutor(args.jobs) as pool:
            for i, (folder, secs, rc) in enumerate(pool.map(launch, jobs), 1):
                state = "ok" if rc == 0 else f"FAILED (exit {rc}, see {folder}.log)"
                failed += rc != 0
                print(f"[{i}/{len(jobs)}] {os.path.basename(folder)} {secs:.0f} s {state} "
                      f"({time.time() - t0:.0f} s so far)", file=sys.stderr, flush=True)
    write_report(args, specs)
    if not args.report_only and failed:  # the report covers the finished runs; a script must still see the failure
        print(f"error: {failed} of {len(jobs)} runs failed (their .log files say why); the report covers the "
              "finished ones, and the same command continues the rest", file=sys.stderr)
        return 1
    return 0


# What a label means: every setting of a run but where it runs and what it is run on (config.json's keys); for a
# method that does not train, the learner's settings mean nothing either.
NOT_MEANING = {"task_id", "seed", "out", "label", "device", "diagnostics", "memory", "compile",
               "activation_checkpointing"}
LEARNER = {"lr", "lr_schedule", "warmup_ratio", "planned_steps", "weight_decay", "lora_r", "lora_alpha", "lora_targets",
           "lora_dropout", "mu", "norm", "scale_std", "mask_zero_reward", "kl_coef", "offpolicy", "max_grad_norm",
           "learner_dtype", "failed", "repeats"}


def changed_meaning(jobs) -> str | None:
    """A label already in the folder is another setting than this command would run under it (a preset's default
    changed since, say): the runs in git keep what their label meant, so say which value differs and stop. One
    `run.py --dry-run` per task and label decides, against every run of that label (a key an older run did not
    record is not compared); None when every label keeps its meaning."""
    import json
    from search import METHODS
    runs = os.path.dirname(jobs[0][0]) if jobs else ""
    done = {}  # (task, label) -> [(folder name, config.json)] of the runs already in the folder
    for d in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
        try:
            with open(os.path.join(runs, d, "config.json")) as f:
                cfg = json.load(f)
            key = (task_name(cfg["task"]), cfg.get("label") or cfg["method"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # no run here, or not one run.py wrote: its own launch will say so
        done.setdefault(key, []).append((d, cfg))
    flags = {action.dest for action in run_parser()._actions}
    asked = set()
    for folder, a in jobs:
        task = task_name(a[a.index("--task") + 1])
        label = a[a.index("--label") + 1] if "--label" in a else a[a.index("--method") + 1]
        if (task, label) not in done or (task, label) in asked or os.path.exists(os.path.join(folder, "config.json")):
            continue
        asked.add((task, label))
        r = subprocess.run([sys.executable, "run.py", *a, "--dry-run"], cwd=HERE, capture_output=True, text=True)
        try:
            new = json.loads(r.stdout)["config"]
        except (ValueError, KeyError):
            continue  # the launch would fail the same way, and say why there
        ignore = NOT_MEANING | (LEARNER if not METHODS[new["method"]].trains else set())
        for where, old in done[(task, label)]:
            for key in sorted(set(new) & set(old) - ignore):
                was, now = _norm(key, old[key]), _norm(key, new[key])
                if was != now:
                    keep = f", or pass -- --{key.replace('_', '-')} {was} to keep what the label means" if (
                        key in flags and isinstance(was, (int, float, str)) and not isinstance(was, bool)) else ""
                    return (f"label '{label}' ran {task} with {key} = {was!r} (runs/{where}), and this command would "
                            f"run it with {now!r} (a default changed since?): give the new setting another "
                            f"--label{keep}")
    return None


def _norm(key, value):
    """config.json values that mean the same: the default model written as None by older runs; lists and tuples."""
    from weights.default_model import canonical
    if key == "model":
        return canonical(value)
    return list(value) if isinstance(value, tuple) else value


def serve_together(args, jobs) -> bool:
    """The grid's runs in this process, --together K at a time over one model (run.serve), each in its own folder
    as a run alone would be. True if a run's flags were refused (said in one line)."""
    from model import ModelError
    from problem import UsageError
    from run import serve
    os.chdir(HERE)  # run folders are named relative to the project, as launch() names them
    runs = [run_parser().parse_args(a + ["--out", folder if os.path.relpath(folder, HERE).startswith("..")
                                         else os.path.relpath(folder, HERE)]) for folder, a in jobs]
    print(f"{len(jobs)} runs, {args.together} at a time in this process over one model, in {args.out}",
          file=sys.stderr)
    try:
        serve(runs, args.together)
    except (UsageError, TaskError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return True
    return False


def write_report(args, specs):
    if args.name is None:  # every run in the folder: a launch of one variant (--label) keeps the others in results.md
        print(report(args.out, args.methods, args.against))
        return
    grid = {(task_name(task), tid) for task, ids in specs for tid in ids}
    labels = [args.label] if args.label else args.methods
    print(report(args.out, labels, args.against, labels=set(labels), problems=grid, seeds=set(args.seeds),
                 name=args.name))


if __name__ == "__main__":
    sys.exit(main())

