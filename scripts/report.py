"""The report of an experiment folder: every finished run under <out>/runs read back from its summary.json and
metrics.jsonl, and written out as results.md (or <name>.md, for a named subset) and two plots per task. Nothing
here runs a model, so the tables and plots rebuild from what git keeps (`python -m scripts.experiments ... --report-only`).

Statistics: a mean with a 95% percentile-bootstrap interval that resamples problems (a problem's seeds go
together: they are not independent draws), and paired differences between methods over (problem, seed),
since methods share seeds and warm starts. The learning diagnostics (policy reward by thirds of a run, repeat
share, KL) come from the per-step metrics run.py logs.
"""
import json
import os
import random
import sys


def task_name(task):
    """How folders, tables and plots name a task: a task file by its file name ("/x/letters.py" -> "letters")."""
    return os.path.basename(task).removesuffix(".py")


def _clusters(xs, groups=None):
    """The values that are not None, as the lists bootstrap_ci resamples: one per group, or one per value."""
    clusters = {}
    for i, x in enumerate(xs):
        if x is not None:
            clusters.setdefault(i if groups is None else groups[i], []).append(x)
    return list(clusters.values())


def bootstrap_ci(xs, n=4000, seed=0, groups=None):
    """Mean and 95% percentile-bootstrap interval of the mean; (mean, lo, hi), Nones for no data. With `groups`
    (one label per x, e.g. the problem of each run), whole groups are resampled: runs of one problem at several
    seeds are not independent draws, and treating them so would narrow the interval. One x per group is the
    plain bootstrap, draw for draw."""
    clusters = _clusters(xs, groups)
    if not clusters:
        return None, None, None
    total = [x for c in clusters for x in c]
    rng = random.Random(seed)
    means = []
    for _ in range(n):
        draw = [x for c in rng.choices(clusters, k=len(clusters)) for x in c]
        means.append(sum(draw) / len(draw))
    means.sort()
    return sum(total) / len(total), means[int(0.025 * n)], means[int(0.975 * n) - 1]


def runs_ci(runs, fn):
    """bootstrap_ci of fn(run) over runs, a problem's seeds resampled together."""
    return bootstrap_ci([fn(r) for r in runs], groups=[r["task_id"] for r in runs])


def num(x, digits=3):
    """A number for a table cell; a dash for a value that does not exist (None)."""
    return "–" if x is None else f"{x:.{digits}f}"


def fmt(ci, digits=3):
    """A (mean, low, high) interval as "m [lo, hi]"; the mean alone when there is no interval."""
    m, lo, hi = ci[:3]  # a paired difference also carries its count of units
    return "–" if m is None else f"{m:.{digits}f}" if lo is None else f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def load_runs(out, unfinished=False):
    """Every finished run under <out>/runs: its summary, label, task options and per-step metrics. With
    `unfinished`, also runs that have logged steps but no summary yet (their config stands in for it)."""
    runs = []
    root = os.path.join(out, "runs")
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        folder = os.path.join(root, name)
        path = os.path.join(folder, "summary.json")
        finished = os.path.exists(path)
        if not finished and not (unfinished and os.path.exists(os.path.join(folder, "metrics.jsonl"))):
            continue
        with open(os.path.join(folder, "config.json")) as f:
            cfg = json.load(f)
        if finished:
            with open(path) as f:
                s = json.load(f)
        else:
            s = {k: cfg[k] for k in ("task", "task_id", "seed", "method", "budget")}
        s.update(task=task_name(s["task"]), label=cfg.get("label") or s["method"], task_options=cfg.get("task_options") or {}, finished=finished)
        if finished and "curve" not in s:  # runs from before summary.json carried its curve
            from database import Database
            db = Database(os.path.join(folder, "candidates.sqlite"))
            s["curve"] = db.curve()
            db.close()
        metrics = os.path.join(folder, "metrics.jsonl")
        with open(metrics) if os.path.exists(metrics) else open(os.devnull) as f:
            s["metrics"] = [json.loads(line) for line in f if line.strip()]
        runs.append(s)
    return runs


def policy_reward(m):
    """What the policy sampled at one step: the mean reward of its task-prompt (on-policy) completions, or, for a
    method whose groups have none (Semantle's MiGrATe and `ns`: all neighbourhood), of its NS-prompt ones.
    Runs logged before "neighbour_reward" existed: a group of sampled NS members only is its group mean."""
    if m.get("on_policy_reward") is not None:
        return m["on_policy_reward"]
    if "neighbour_reward" in m:
        return m["neighbour_reward"]
    members = m.get("members") or {}
    return m.get("group_reward_mean") if members.get("neighbour") and not members.get("greedy") else None


def policy_rewards(run):
    """The run's `policy_reward` per step, the steps without one left out."""
    return [y for y in map(policy_reward, run["metrics"]) if y is not None]


def thirds(ys):
    """Means of the first and the last third of a series ((None, None) with fewer than 3 values)."""
    k = len(ys) // 3
    return (sum(ys[:k]) / k, sum(ys[-k:]) / k) if k else (None, None)


def rise(run):
    """Does training move the policy toward better answers? The policy's sampled mean reward (`policy_reward`)
    over the last third of a run's steps minus over its first third (None with fewer than 3 such steps)."""
    first, last_ = thirds(policy_rewards(run))
    return None if first is None else last_ - first


def last_third(run, key):
    """Mean of a per-step metric over the last third of a run's steps (None if never logged)."""
    ys = [m[key] for m in run["metrics"] if m.get(key) is not None]
    return sum(ys[-max(1, len(ys) // 3):]) / max(1, len(ys) // 3) if ys else None


def last(run, key):
    """The last logged value of a per-step metric (None if never logged)."""
    return next((m[key] for m in reversed(run["metrics"]) if m.get(key) is not None), None)


MIN_PAIRS = 3  # a bootstrap over one or two differences (or problems) is no interval: fewer give the mean alone
# Fewer than six independent differences cannot show a difference at 5%: under the null (each difference as likely
# negative as positive) n differences of one sign have a two-sided probability 2 / 2**n, 0.0625 at n = 5. A
# percentile bootstrap over so few has at most C(2n-1, n) distinct resamples and excludes 0 far more often than 5%
# (at 3 pairs, whenever all three agree: a 1-in-4 chance under the null), so below this its interval is shown but
# never starred.
MIN_SIGNIFICANT = 6


def paired_ci(pairs, n=4000, seed=0, groups=None):
    """Mean difference a - b over matched (a, b) pairs and its 95% paired-bootstrap interval, resampling whole
    `groups` where given (see bootstrap_ci): (mean, low, high, units), units being the independent differences
    behind it (problems when grouped by problem, else pairs). No interval below MIN_PAIRS units."""
    diffs = [None if a is None or b is None else a - b for a, b in pairs]
    m, lo, hi = bootstrap_ci(diffs, n, seed, groups)
    units = len(_clusters(diffs, groups))
    return (m, lo, hi, units) if units >= MIN_PAIRS else (m, None, None, units)


def significant(diff):
    """Does a paired difference count: its interval excludes 0 and it rests on MIN_SIGNIFICANT units or more."""
    m, lo, hi, units = diff
    return lo is not None and not lo <= 0 <= hi and units >= MIN_SIGNIFICANT


def paired_rows(rs, labels, against, metrics):
    """Table rows: each label minus each `against` label on the same (problem, seed), per metric; a pair of two
    `against` labels once (grpo − random, not also random − grpo)."""
    key = lambda r: (r["task_id"], r["seed"])
    by = {lab: {key(r): r for r in rs if r["label"] == lab} for lab in labels}
    lines, done = [], set()
    for ref in [a for a in against if a in by]:
        for lab in labels:
            if lab == ref or frozenset((lab, ref)) in done:
                continue
            done.add(frozenset((lab, ref)))
            common = sorted(set(by[lab]) & set(by[ref]))
            cells = []
            for _, fn, digits in metrics:
                ci = paired_ci([(fn(by[lab][k]), fn(by[ref][k])) for k in common], groups=[k[0] for k in common])
                sign = " *" if significant(ci) else ""
                cells.append(fmt(ci, digits) + sign)
            # with two or three problems the interval is wide or absent (problems are resampled): the count of pairs
            # each way says how consistent the difference is, a sign test's input
            diffs = [metrics[0][1](by[lab][k]) - metrics[0][1](by[ref][k]) for k in common]
            signs = f"{sum(d > 0 for d in diffs)} / {sum(d == 0 for d in diffs)} / {sum(d < 0 for d in diffs)}"
            lines.append(f"| {lab} − {ref} | {len(common)} | " + " | ".join(cells) + f" | {signs} |")
    return lines


def calls_to_solve(run):
    """Oracle calls spent when the first solving candidate was scored (None if unsolved)."""
    if not run["solved"]:
        return None
    best = run["curve"][-1][1] if run["curve"] else None
    return next((c for c, r in run["curve"] if r >= best), run["oracle_calls"])


def by_problem(rs, labels, problems, seeds):
    """Table lines: the best reward of every run, problem x method, its seeds in order ("·" for one not run)."""
    cell = {(r["task_id"], r["label"], r["seed"]): r for r in rs}
    show = lambda r: "·" if r is None else f"**{r['best_reward']:.3f}**" if r["solved"] else f"{r['best_reward']:.3f}"
    which = f"seed {seeds[0]}" if len(seeds) == 1 else "seeds " + " / ".join(map(str, seeds)) + " in order"
    lines = [f"Best reward of every run, by problem and method, {which} (bold: solved; ·: not run):", "",
             "| problem | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for p in problems:
        cells = [" / ".join(show(cell.get((p, lab, s))) for s in seeds) for lab in labels]
        lines.append(f"| {p} | " + " | ".join(c if c.strip("· /") else "·" for c in cells) + " |")
    return lines


def machines(rs):
    """A line naming what the wall times were measured on, with its number of runs: a grid done in pieces may
    span machines, and seconds on one CPU are not seconds on another."""
    counts = {}
    for r in rs:
        m = r.get("machine")
        key = (f"{m['cpu']}, {m['isa']}, {m['threads']} thread(s)" + (f", {m['gpu']}" if m.get("gpu") else "")
               if m else "not recorded (runs from before summary.json named its machine)")
        counts[key] = counts.get(key, 0) + 1
    return "Wall times measured on: " + "; ".join(f"{k}: {n} run(s)" for k, n in counts.items()) + "."


def every_run(rs, labels, problems):
    """Table lines: one row a run, what it found and what its learning diagnostics say (as the tables above)."""
    lines = ["Every run: its best candidate (when short), the oracle calls it used, and its diagnostics:", "",
             "| run | best reward | best candidate | oracle calls used | steps | policy reward, first → last third "
             "| repeat share, last third | new candidates' reward, last third | KL, last | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = lambda r: (problems.index(r["task_id"]), labels.index(r["label"]), r["seed"])
    for r in sorted(rs, key=order):
        word = str(r.get("best_candidate") or "")
        word = f"`{word}`" if word and len(word) <= 30 and "\n" not in word and "`" not in word else "–"
        a, b = thirds(policy_rewards(r))
        lines.append(f"| {r['task_id']} {r['label']} s{r['seed']} | {r['best_reward']:.3f}{' (solved)' * r['solved']} "
                     f"| {word} | {r['oracle_calls']} | {r['steps']} | {num(a)} → {num(b)} "
                     f"| {num(last_third(r, 'repeat_share'), 2)} | {num(last_third(r, 'new_reward'))} "
                     f"| {num(last(r, 'kl'), 1)} | {r['wall_seconds']:.0f} |")
    return lines


def report(out, order=None, against=("random", "grpo"), labels=None, problems=None, seeds=None, name="results"):
    """Write <out>/<name>.md and the plots of the finished runs under <out>/runs, the labels in `order` first.
    By default every run; a grid keeps only the runs with a label in `labels`, (task, problem) in `problems` (a
    problem None stands for every problem of that task) and a seed in `seeds` (None takes all). A name other than
    "results" suffixes the plots (<task>-<name>.png, <task>-<name>-learning.png), so a side comparison (an
    ablation) can share a folder, and runs, with the main grid."""
    keep = lambda r: ((labels is None or r["label"] in labels) and (seeds is None or r["seed"] in seeds) and
                      (problems is None or (r["task"], r["task_id"]) in problems or (r["task"], None) in problems))
    runs = [r for r in load_runs(out) if keep(r)]
    # a grid entry with no run is most often a misspelt label or problem id: say so rather than drop it silently
    found = {(r["task"], r["task_id"]) for r in runs} | {(r["task"], None) for r in runs}
    for what, missing in [("label", set(labels or ()) - {r["label"] for r in runs}),
                          ("problem", {f"{t}:{p or '(all)'}" for t, p in problems or () if (t, p) not in found}),
                          ("seed", set(seeds or ()) - {r["seed"] for r in runs})]:
        for m in sorted(missing, key=str):
            print(f"note: no finished run in the report has {what} {m}", file=sys.stderr)
    if not runs:
        return "no finished runs"
    by_task = {}
    for r in runs:
        by_task.setdefault(r["task"], []).append(r)
    lines = []
    for task, rs in by_task.items():
        present = {r["label"] for r in rs}
        shown = [m for m in (order or []) if m in present] + sorted(present - set(order or []))
        task_ids = sorted({r["task_id"] for r in rs})
        run_seeds = sorted({r["seed"] for r in rs})
        budget = max(r["budget"] for r in rs)
        lines += [f"### {task}: {len(task_ids)} problem(s) x {len(run_seeds)} seed(s), budget {budget} oracle calls", "",
                  "| method | runs | solve rate | best reward | oracle calls to solve (solved runs) | unsolved "
                  "| oracle calls used | policy reward rise | wall s / run |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for lab in shown:
            sel = [r for r in rs if r["label"] == lab]
            ci = lambda fn: runs_ci(sel, fn)
            solve = ci(lambda r: float(r["solved"]))
            best = ci(lambda r: r["best_reward"])
            calls = ci(calls_to_solve)
            used = ci(lambda r: r["oracle_calls"])  # < budget: stopped by --patience or solved
            wall = sum(r["wall_seconds"] for r in sel) / len(sel)
            unsolved = sum(not r["solved"] for r in sel)
            lines.append(f"| {lab} | {len(sel)} | {fmt(solve, 2)} | {fmt(best)} | {fmt(calls, 0)} | {unsolved} "
                         f"| {fmt(used, 0)} | {fmt(ci(rise))} | {wall:.0f} |")
        lines += ["", machines(rs)]
        lines += ["", "What the policy samples and how far training moved it: the mean reward of its samples (of "
                  "the task prompt; for a method with no task-prompt samples, of its NS prompts) in the first and "
                  "last third of a run's steps, whose difference is the rise above; in the last third, the shares "
                  "of completions that failed to parse or only repeated known candidates, and the mean reward of "
                  "the new candidates found (absent from runs logged before it existed); KL to the base policy "
                  "per token and the log-prob gain of the best answer at the last diagnosed step (mean over runs):",
                  "",
                  "| method | policy reward, first third | last third | failed share | repeat share | new candidates' reward | "
                  "KL | log p(best) gain | steps |", "|---|---|---|---|---|---|---|---|---|"]
        for lab in shown:
            sel = [r for r in rs if r["label"] == lab]
            first, last_ = zip(*(thirds(policy_rewards(r)) for r in sel))
            mean = lambda xs: (lambda v: num(sum(v) / len(v) if v else None))([x for x in xs if x is not None])
            lines.append(f"| {lab} | {mean(first)} | {mean(last_)} "
                         f"| {mean(last_third(r, 'failed_share') for r in sel)} "
                         f"| {mean(last_third(r, 'repeat_share') for r in sel)} "
                         f"| {mean(last_third(r, 'new_reward') for r in sel)} | {mean(last(r, 'kl') for r in sel)} "
                         f"| {mean(last(r, 'best_logp_gain') for r in sel)} "
                         f"| {sum(len(r['metrics']) for r in sel) / len(sel):.0f} |")
        metrics = [("best reward", lambda r: r["best_reward"], 3), ("solved", lambda r: float(r["solved"]), 2),
                   ("policy reward rise", rise, 3)]
        if task == "arc":
            metrics.append(("pass@2", lambda r: r["final"].get("pass@2", 0.0), 2))
        paired = paired_rows(rs, shown, against or [], metrics)
        if paired:
            lines += ["", "Paired differences on the same (problem, seed), mean [95% paired bootstrap CI]; * where "
                      f"the interval excludes 0 over {MIN_SIGNIFICANT} or more "
                      "problems (fewer cannot show a difference at 5%: see scripts/report.py):", "",
                      "| difference | pairs | " + " | ".join(m for m, _, _ in metrics) + f" | {metrics[0][0]}: pairs "
                      "higher / equal / lower |", "|---|---|" + "---|" * (len(metrics) + 1), *paired]
        lines += ["", *by_problem(rs, shown, task_ids, run_seeds), "", *every_run(rs, shown, task_ids)]
        if task == "arc":
            lines += ["", "| method | pass@2 (mean over runs) | best train reward | share of programs that run |",
                      "|---|---|---|---|"]
            for lab in shown:
                sel = [r for r in rs if r["label"] == lab]
                p2 = runs_ci(sel, lambda r: r["final"].get("pass@2", 0.0))
                ran = runs_ci(sel, lambda r: r["final"].get("run_share"))
                lines.append(f"| {lab} | {fmt(p2, 2)} | {fmt(runs_ci(sel, lambda r: r['best_reward']))} "
                             f"| {fmt(ran)} |")
        lines.append("")
        suffix = "" if name == "results" else f"-{name}"
        plot_task(out, task + suffix, rs, shown, budget)
        plot_learning(out, task + suffix, rs, shown)
    text = "\n".join(lines)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(text + "\n")
    return text


def line_style(k):
    """The look of the k-th label in every plot: matplotlib's ten colours (C0..C9 wrap around), then the same ten
    dashed, then dotted, so a grid of more than ten methods never draws two alike."""
    return {"color": f"C{k % 10}", "linestyle": ("-", "--", ":")[k // 10 % 3]}


def plot_task(out, task, runs, labels, budget):
    """<out>/<task>.png: best reward so far against oracle calls, per label the mean over runs and its 95% band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xs = list(range(1, budget + 1))
    for k, lab in enumerate(labels):  # a method keeps its look in every plot: k is its place in `labels`
        curves, problems = [], []
        for r in (r for r in runs if r["label"] == lab):
            problems.append(r["task_id"])
            c, best, ys = dict(r["curve"]), None, []
            for x in xs:  # best so far at each call count; after the run stopped, its final best
                best = c.get(x, best)
                ys.append(best if best is not None else 0.0)
            curves.append(ys)
        mean = [sum(col) / len(col) for col in zip(*curves)]
        cis = [bootstrap_ci(list(col), n=400, groups=problems) for col in zip(*curves)]
        style = line_style(k)
        ax.plot(xs, mean, label=f"{lab} ({len(curves)})", **style)
        ax.fill_between(xs, [c[1] for c in cis], [c[2] for c in cis], alpha=0.15, color=style["color"])
    ax.set_xlabel("oracle calls")
    ax.set_ylabel("best reward so far (mean over runs)")
    ax.set_title(f"{task}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{task}.png"), dpi=110)
    plt.close(fig)


def plot_learning(out, task, runs, labels):
    """The policy's sampled mean reward (`policy_reward`) against step (mean over runs, 95% band), per method: does training move the
    policy toward better answers? Beside it, KL to the base policy per token for the trained methods."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for k, lab in enumerate(labels):
        style = line_style(k)
        for axis, value in ((ax, policy_reward), (ax2, lambda m: m.get("kl"))):
            mine = [r for r in runs if r["label"] == lab]
            series = [[value(m) for m in r["metrics"]] for r in mine]
            steps = max((len(s) for s in series), default=0)
            # per step, (problem, value) of each run that reached it and logged it
            cols = [[(r["task_id"], s[i]) for r, s in zip(mine, series) if i < len(s) and s[i] is not None]
                    for i in range(steps)]
            # a step is drawn while at least half the method's runs reached it (a method with one run is drawn too)
            pts = [(i + 1, bootstrap_ci([v for _, v in c], n=400, groups=[p for p, _ in c]))
                   for i, c in enumerate(cols) if len(c) >= max(1, len(series) // 2)]
            if pts:
                axis.plot([x for x, _ in pts], [c[0] for _, c in pts], label=lab, **style)
                axis.fill_between([x for x, _ in pts], [c[1] for _, c in pts], [c[2] for _, c in pts], alpha=0.15,
                                  color=style["color"])
    ax.set(xlabel="step", ylabel="policy's sampled mean reward (mean over runs)", title=f"{task}: what the policy samples")
    ax2.set(xlabel="step", ylabel="KL(policy || base) per token", title=f"{task}: how far training moved it")
    for a in (ax, ax2):
        a.grid(alpha=0.3)
        if a.lines:
            a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{task}-learning.png"), dpi=110)
    plt.close(fig)
