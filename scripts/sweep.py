"""Choose the cpu preset by measurement: sweep the learning rate x LoRA scale (x mu, x words per completion) on
a tuning set, and keep the setting under which `grpo` (all on-policy) raises its on-policy mean reward over a
run the most beyond what `random` does (and MiGrATe its NS samples' mean reward beyond what `ns` does), without collapsing the answer format (the parse-failure share) or the
search onto one answer (the repeat share: completions that only repeat known candidates cost no oracle call, so
a collapsed run spends steps, not budget, and may not finish).

    python -m scripts.sweep semantle --seeds 0 1 --out results/sweep/semantle      # the tuning set "tuning"
    python -m scripts.sweep arc --seeds 0 --out results/sweep/arc                  # ARC training tasks
    python -m scripts.sweep molecule --seeds 0 --out results/sweep/molecule-qwen --extra --model qwen2.5-coder-1.5b

Every setting is one `scripts/experiments.py` call (labels like lr2e-3-a64-mu2) into the same folder, with `random` as
the paired reference, so a finished run is never redone and results.md holds the paired table: for each
setting, its policy reward rise minus its untrained reference's on the same (problem, seed), with its 95% interval. The
tuning sets never overlap what the README reports (Semantle's paper targets, ARC's evaluation tasks).
sweep.md is the sweep's own table over every run folder, finished or not (`--table-only` rebuilds it).
"""
import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project root: run.py is there
# task -> (tuning set, budget, settings: label -> (method, run.py flags)). LoRA r stays the paper's; alpha sets
# the scale alpha / r. The first grpo setting is the paper's. Semantle also compares one word per completion
# (its own random reference) and one inner epoch.
GRIDS = {
    "semantle": ("semantle:tuning", 200, {
        "random": ("random", []),
        "paper-lr5e-5-a16": ("grpo", ["--lr", "5e-5", "--lora-alpha", "16"]),
        "lr5e-4-a16": ("grpo", ["--lr", "5e-4", "--lora-alpha", "16"]),
        "lr2e-3-a16": ("grpo", ["--lr", "2e-3", "--lora-alpha", "16"]),
        "lr5e-4-a64": ("grpo", ["--lr", "5e-4", "--lora-alpha", "64"]),
        "lr2e-3-a64": ("grpo", ["--lr", "2e-3", "--lora-alpha", "64"]),
        "lr5e-3-a64": ("grpo", ["--lr", "5e-3", "--lora-alpha", "64"]),
        "lr2e-3-a64-mu1": ("grpo", ["--lr", "2e-3", "--lora-alpha", "64", "--mu", "1"]),
        "random-w1": ("random", ["--task-option", "words=1"]),
        "lr2e-3-a64-w1": ("grpo", ["--lr", "2e-3", "--lora-alpha", "64", "--task-option", "words=1"]),
        "lr5e-4-a64-w1": ("grpo", ["--lr", "5e-4", "--lora-alpha", "64", "--task-option", "words=1"]),
        # MiGrATe on Semantle samples only NS prompts (0/0/5), so its untrained twin is `ns`, its paired reference.
        "ns": ("ns", []),
        "migrate-lr5e-4-a64": ("migrate", ["--lr", "5e-4", "--lora-alpha", "64"]),
        "migrate-lr2e-4-a64": ("migrate", ["--lr", "2e-4", "--lora-alpha", "64"]),
        "migrate-lr1e-4-a64": ("migrate", ["--lr", "1e-4", "--lora-alpha", "64"]),
        # what a repeated or unparsable completion trains as (see --failed, --repeats): nothing new scores 0
        "migrate-lr5e-4-a64-zero": ("migrate", ["--lr", "5e-4", "--lora-alpha", "64", "--failed", "group",
                                                "--repeats", "zero"]),
        "lr5e-4-a64-zero": ("grpo", ["--lr", "5e-4", "--lora-alpha", "64", "--failed", "group", "--repeats", "zero"]),
    }),
    "arc": ("arc:d037b0a7,e9afcf9a,5582e5ca,6150a2bd", 64, {  # training tasks where copying scores > 0
        "random": ("random", []),
        "paper-lr1e-5-a32": ("grpo", ["--lr", "1e-5", "--lora-alpha", "32"]),
        "lr5e-5-a128": ("grpo", ["--lr", "5e-5", "--lora-alpha", "128"]),
        "lr2e-4-a128": ("grpo", ["--lr", "2e-4", "--lora-alpha", "128"]),
        "lr1e-3-a128": ("grpo", ["--lr", "1e-3", "--lora-alpha", "128"]),
        "lr1e-4-a128": ("grpo", ["--lr", "1e-4", "--lora-alpha", "128"]),
        # MiGrATe's 11/1/4 groups keep on-policy members, so its paired reference is `random` here too
        "migrate-lr1e-4-a128": ("migrate", ["--lr", "1e-4", "--lora-alpha", "128"]),
        "migrate-lr2e-4-a128": ("migrate", ["--lr", "2e-4", "--lora-alpha", "128"]),
        # the same with a KL pull to the base policy: at 2e-4 two evaluation runs narrowed onto one program
        # (4cd1b7b2, e633a9e5 at seed 0); the coefficient that stopped Semantle's collapse, tried here first
        "migrate-lr2e-4-a128-kl0.1": ("migrate", ["--lr", "2e-4", "--lora-alpha", "128", "--kl-coef", "0.1"]),
        # the second round, between the two (1e-4 did not raise the policy's reward, 2e-4 narrowed onto the
        # best-so-far program in 3 of 7 runs): the geometric middle rate, and 2e-4 under a stronger pull
        "migrate-lr1.4e-4-a128": ("migrate", ["--lr", "1.4e-4", "--lora-alpha", "128"]),
        "migrate-lr2e-4-a128-kl0.3": ("migrate", ["--lr", "2e-4", "--lora-alpha", "128", "--kl-coef", "0.3"]),
    }),
    # plogp tunes what qed reports (docs/results.md, the coder model's molecules), with the coder model (the default writes no
    # SMILES). MiGrATe's 2/1/2 groups have on-policy members, so its paired reference is `random`.
    "molecule": ("molecule:plogp", 20, {
        "random": ("random", []),
        "migrate-paper-lr5e-5-a16": ("migrate", ["--lr", "5e-5", "--lora-alpha", "16"]),
        "migrate-lr1e-4-a64": ("migrate", ["--lr", "1e-4", "--lora-alpha", "64"]),
        "migrate-lr5e-4-a64": ("migrate", ["--lr", "5e-4", "--lora-alpha", "64"]),
    }),
}


def learning_table(out):
    """The sweep's own table, over every run folder, finished or not (a setting that collapses the policy onto one
    answer may never finish, and that is the finding): per setting, the policy reward rise paired
    against its untrained reference (`random` for its words per completion; `ns` for MiGrATe, whose Semantle
    groups are all neighbourhood), the last third's repeat and parse-failure shares, the last KL to the base
    policy, and the best reward."""
    from scripts.report import fmt, last, last_third, load_runs, paired_ci, rise, significant
    runs = load_runs(out, unfinished=True)
    key = lambda r: (r["task_id"], r["seed"])
    words = lambda r: r["task_options"].get("words", 2)
    lines = ["| setting | runs (finished) | policy reward rise − reference's, paired [95% CI] | reference | "
             "repeat share, last third | failed share, last third | new candidates' reward, last third | "
             "KL per token, last diagnosed step | best reward |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label in dict.fromkeys(r["label"] for r in runs):
        mine = [r for r in runs if r["label"] == label]
        untrained = mine[0]["method"] in ("random", "ns")
        has_ns = any(r["label"] == "ns" for r in runs)
        ref_label = ("ns" if mine[0]["method"] == "migrate" and has_ns else "random-w1" if words(mine[0]) == 1
                     else "random")
        ref = {key(r): r for r in runs if r["label"] == ref_label}
        paired = [r for r in mine if key(r) in ref]
        # A task's seeds are not independent draws: resample whole tasks, as scripts/report.py does (it and this table
        # must agree on what counts)
        diff = paired_ci([(rise(r), rise(ref[key(r)])) for r in paired], groups=[r["task_id"] for r in paired])
        star = " *" if significant(diff) else ""

        def mean(xs):
            xs = [x for x in xs if x is not None]
            return f"{sum(xs) / len(xs):.3f}" if xs else "–"
        lines.append(f"| {label} | {len(mine)} ({sum(r['finished'] for r in mine)}) | "
                     f"{'–' if untrained else fmt(diff) + star} | {'–' if untrained else ref_label} | "
                     f"{mean([last_third(r, 'repeat_share') for r in mine])} | "
                     f"{mean([last_third(r, 'failed_share') for r in mine])} | "
                     f"{mean([last_third(r, 'new_reward') for r in mine])} | {mean([last(r, 'kl') for r in mine])} | "
                     f"{mean([last(r, 'best_reward') for r in mine])} |")
    return "\n".join(lines)


def experiments(*args):
    cmd = [sys.executable, "-m", "scripts.experiments", *args]
    print(" ".join(cmd), file=sys.stderr, flush=True)
    r = subprocess.run(cmd, cwd=HERE)
    if r.returncode not in (0, 1):  # a usage error: every setting would meet it
        sys.exit(r.returncode)
    return r.returncode  # 1: some runs failed, the report covers the rest; the sweep goes on to the other settings


def main():
    ap = argparse.ArgumentParser(prog="python -m scripts.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=sorted(GRIDS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--only", nargs="*", default=None, help="run only these settings (labels)")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                    help="run.py flags for every run, e.g. --extra --lr-schedule constant --task-option words=1")
    ap.add_argument("--label-suffix", default="", help="appended to every grpo label (a variant of the grid)")
    ap.add_argument("--tasks", default=None,
                    help="a subset of the tuning set when time is short, e.g. semantle:apple,river (same syntax as scripts/experiments.py)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--table-only", action="store_true", help="only write <out>/sweep.md from the runs there")
    args = ap.parse_args()
    if args.table_only:
        return write_table(args.out)
    spec, budget, grid = GRIDS[args.task]
    spec = args.tasks or spec
    common = ["--tasks", spec, "--seeds", *map(str, args.seeds), "--budget", str(budget), "--out", args.out]
    # The cpu preset runs at a constant learning rate: a run's length is its budget, not a planned step count.
    extra = ["--preset", "cpu", "--lr-schedule", "constant", *args.extra]
    failed = 0
    for label, (method, flags) in grid.items():
        if args.only is None or label in args.only:
            failed += experiments(*common, "--methods", method, "--label", label + args.label_suffix, "--", *extra,
                                  *flags)
    experiments(*common, "--methods", *grid, "--report-only", "--against", "random", "random-w1", "ns")
    write_table(args.out)
    if failed:
        print(f"error: runs failed in {failed} setting(s) (scripts/experiments.py said which above); the table covers the "
              "finished runs, and the same command continues the rest", file=sys.stderr)
        return 1
    return 0


def write_table(out):
    table = learning_table(out)
    with open(os.path.join(out, "sweep.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    sys.exit(main())
