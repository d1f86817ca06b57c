"""The experiment harness end to end: real run.py processes on the toy task and the tiny model,
two methods x two problems x two seeds, then the table, the plot and resuming."""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--tasks", "toy:cat,dog", "--methods", "random", "grpo", "--seeds", "0", "1", "--budget", "8",
        "--jobs", "2"]


def harness(out, *extra):
    return subprocess.run([sys.executable, "-m", "scripts.experiments", *ARGS, "--out", str(out), *extra, "--", "--model", "tiny"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def summaries(out):
    runs = out / "runs"
    return {d.name: json.loads((d / "summary.json").read_text()) for d in runs.iterdir() if d.is_dir()}


def table_row(text, label):
    """The results.md row of one method, as its cells."""
    row = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    return [c.strip() for c in row.strip("|").split("|")]


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp")
    r = harness(out)
    assert r.returncode == 0, r.stderr[-2000:]
    return out, r


def test_every_run_has_its_folder_and_spends_the_budget(done):
    out, _ = done
    s = summaries(out)
    assert len(s) == 8, f"2 problems x 2 methods x 2 seeds, got {sorted(s)}"
    assert {(v["task_id"], v["method"], v["seed"]) for v in s.values()} == \
        {(t, m, seed) for t in ("cat", "dog") for m in ("random", "grpo") for seed in (0, 1)}
    assert all(v["oracle_calls"] == 8 or v["solved"] for v in s.values()), "a run stopped short of its budget"


def test_table_reports_what_the_runs_found(done):
    out, _ = done
    text = (out / "results.md").read_text()
    assert "toy: 2 problem(s) x 2 seed(s), budget 8" in text
    s = summaries(out)
    for method in ("random", "grpo"):
        mine = [v for v in s.values() if v["method"] == method]
        cells = table_row(text, method)
        assert cells[1] == "4", f"{method}: runs column {cells[1]}"
        # the mean in "0.412 [0.300, 0.520]" is the plain mean of the runs' best rewards
        mean = float(cells[3].split()[0])
        lo, hi = map(float, re.findall(r"[-\d.]+", cells[3])[1:3])
        expect = sum(v["best_reward"] for v in mine) / len(mine)
        assert abs(mean - expect) < 1e-3 and lo <= mean <= hi, (cells, expect)
        solve = float(cells[2].split()[0])
        assert abs(solve - sum(v["solved"] for v in mine) / 4) < 1e-2, cells
    assert (out / "toy.png").stat().st_size > 1000, "the reward-vs-calls plot is missing"


def test_every_run_is_in_the_report(done):
    out, _ = done
    text = (out / "results.md").read_text()
    s = summaries(out).values()
    shown = lambda v: f"**{v['best_reward']:.3f}**" if v["solved"] else f"{v['best_reward']:.3f}"
    for problem in ("cat", "dog"):
        # the problem x method table: each cell the runs' best rewards, seed 0 then seed 1
        cells = table_row(text, problem)
        for col, method in ((1, "random"), (2, "grpo")):
            runs = sorted((v for v in s if v["task_id"] == problem and v["method"] == method), key=lambda v: v["seed"])
            assert cells[col] == " / ".join(map(shown, runs)), (problem, method, cells)
    for v in s:
        cells = table_row(text, f"{v['task_id']} {v['method']} s{v['seed']}")
        assert float(cells[1].split()[0]) == round(v["best_reward"], 3) and cells[3] == str(v["oracle_calls"]), cells
        assert cells[2] in ("–", f"`{v['best_candidate']}`"), cells


def test_finished_runs_are_skipped_and_an_unfinished_one_is_resumed(done):
    out, _ = done
    before = {n: (out / "runs" / n / "summary.json").stat().st_mtime_ns for n in summaries(out)}
    victim = sorted(before)[0]
    folder = out / "runs" / victim
    calls = json.loads((folder / "summary.json").read_text())["oracle_calls"]
    os.remove(folder / "summary.json")  # a run that was stopped after its last step, before its summary
    r = harness(out)
    assert r.returncode == 0, r.stderr[-2000:]
    after = {n: (out / "runs" / n / "summary.json").stat().st_mtime_ns for n in summaries(out)}
    assert [n for n in before if n != victim and before[n] != after[n]] == [], "a finished run was redone"
    assert json.loads((folder / "summary.json").read_text())["oracle_calls"] == calls, "resume scored again"
    # the harness logs "[i/N] <run> <seconds> s ok": only the unfinished run took any time
    secs = {m[0]: int(m[1]) for m in re.findall(r"\] (\S+) (\d+) s ok", r.stderr)}
    assert len(secs) == 8 and [n for n, s in secs.items() if s > 0] == [victim], secs


def test_paired_differences_and_a_report_from_what_git_keeps(done, tmp_path):
    import shutil
    out, _ = done
    text = (out / "results.md").read_text()
    cells = table_row(text, "grpo − random")
    assert cells[1] == "4", "4 (problem, seed) pairs"
    s = list(summaries(out).values())
    key = lambda v: (v["task_id"], v["seed"])
    grpo = {key(v): v["best_reward"] for v in s if v["method"] == "grpo"}
    rand = {key(v): v["best_reward"] for v in s if v["method"] == "random"}
    want = sum(grpo[k] - rand[k] for k in grpo) / 4
    assert abs(float(cells[2].split()[0]) - want) < 1e-3, (cells, want)
    counts = [sum(grpo[k] > rand[k] for k in grpo), sum(grpo[k] == rand[k] for k in grpo),
              sum(grpo[k] < rand[k] for k in grpo)]
    assert cells[-1] == " / ".join(map(str, counts)), (cells, counts)
    assert (out / "toy-learning.png").stat().st_size > 1000
    # What results/experiments/ keeps in git (config, summary, metrics) rebuilds the same tables.
    kept = tmp_path / "kept"
    shutil.copytree(out, kept, ignore=shutil.ignore_patterns("candidates.sqlite*", "checkpoint.pt*", "adapter*",
                                                               ".adapter*", "*.log", "reward_curve.png", "*.png",
                                                               "results.md"))
    r = subprocess.run([sys.executable, "-m", "scripts.experiments", *ARGS, "--out", str(kept), "--report-only"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (kept / "results.md").read_text() == text


def test_a_named_report_covers_only_the_grid_it_names(done, tmp_path):
    """An ablation shares its folder and some arms with the main grid: `--name` writes <name>.md and its own
    plots from the runs of the tasks, labels and seeds named, and leaves results.md alone."""
    import shutil
    out, _ = done
    kept = tmp_path / "kept"
    shutil.copytree(out, kept)
    before = (kept / "results.md").read_text()
    r = subprocess.run([sys.executable, "-m", "scripts.experiments", "--tasks", "toy:cat", "--methods", "grpo", "--seeds", "1",
                        "--out", str(kept), "--report-only", "--name", "side"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    text = (kept / "side.md").read_text()
    assert "toy: 1 problem(s) x 1 seed(s)" in text, text[:300]
    assert table_row(text, "grpo")[1] == "1", "one run: cat, grpo, seed 1"
    assert not any(line.startswith(("| random |", "| dog |")) for line in text.splitlines()), "outside the grid"
    want = next(v for v in summaries(kept).values() if (v["task_id"], v["method"], v["seed"]) == ("cat", "grpo", 1))
    assert table_row(text, "cat grpo s1")[1].split()[0] == f"{want['best_reward']:.3f}"
    assert (kept / "toy-side.png").stat().st_size > 1000 and (kept / "results.md").read_text() == before
    assert (kept / "toy-side-learning.png").stat().st_size > 1000
    # a grid entry no run has is named, not silently dropped (a misspelt id would otherwise shrink the table)
    r = subprocess.run([sys.executable, "-m", "scripts.experiments", "--tasks", "toy:cat,cow", "--methods", "grpo", "--out",
                        str(kept), "--report-only", "--name", "side"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "no finished run in the report has problem toy:cow" in r.stderr, r.stderr[-2000:]
    # without --name, a launch of one variant (--label) reports every run in the folder: results.md keeps the others
    r = subprocess.run([sys.executable, "-m", "scripts.experiments", "--tasks", "toy:cat", "--methods", "grpo", "--label",
                        "grpo", "--seeds", "1", "--out", str(kept), "--report-only"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    after = (kept / "results.md").read_text()
    assert [table_row(after, m)[1] for m in ("random", "grpo")] == ["4", "4"], "2 problems x 2 seeds each"
    r = subprocess.run([sys.executable, "-m", "scripts.experiments", "--tasks", "toy:cat", "--out", str(kept), "--report-only",
                        "--name", "learning"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "would overwrite a learning plot" in r.stderr.strip().splitlines()[-1], r.stderr
    # one --label over two methods would give both the same run folder: refused before anything runs
    r = subprocess.run([sys.executable, "-m", "scripts.experiments", "--tasks", "toy:cat", "--methods", "grpo", "migrate",
                        "--label", "mix", "--out", str(kept), "--report-only"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "one variant of one method" in r.stderr.strip().splitlines()[-1], r.stderr


def test_too_few_pairs_give_no_interval_and_no_significance():
    """A bootstrap over one or two paired differences is no interval: the table shows the mean alone, unstarred
    (the airbase pair once read "-0.070 [-0.070, -0.070] *"). From three the interval is shown, but a difference
    counts only from MIN_SIGNIFICANT: three to five differences of one sign exclude 0 from the bootstrap interval
    while a sign test over them cannot reach 5% (three agreeing ones starred a sweep row once)."""
    sys.path.insert(0, ROOT)
    from scripts.report import MIN_PAIRS, MIN_SIGNIFICANT, fmt, paired_ci, significant
    few = paired_ci([(0.3, 0.4)] * (MIN_PAIRS - 1))
    assert few[1] is None and not significant(few) and fmt(few) == "-0.100", few
    lows = [0.3, 0.2, 0.1, 0.25, 0.15, 0.05, 0.35]
    highs = [0.4, 0.35, 0.3, 0.3, 0.3, 0.2, 0.4]
    for n in range(MIN_PAIRS, MIN_SIGNIFICANT):
        agree = paired_ci(list(zip(lows[:n], highs[:n])))
        assert agree[2] < 0 and agree[3] == n and not significant(agree), (n, agree)
        assert 2 / 2 ** n > 0.05, "the floor is where a sign test first can reach 5%"
    assert 2 / 2 ** MIN_SIGNIFICANT < 0.05
    enough = paired_ci(list(zip(lows[:MIN_SIGNIFICANT], highs[:MIN_SIGNIFICANT])))
    assert significant(enough) and enough[2] < 0, enough
    mixed = [(0.3, 0.4), (0.4, 0.3), (0.2, 0.2), (0.5, 0.45), (0.1, 0.2), (0.6, 0.5)]
    assert not significant(paired_ci(mixed)), "mixed signs: 0 inside"


def test_seeds_of_one_problem_are_resampled_together():
    """Runs of one problem at several seeds are not independent draws: the interval resamples whole problems, so
    seeds that agree do not narrow it as more problems would; one run per problem is the plain bootstrap, and two
    problems give no interval however many seeds they have."""
    sys.path.insert(0, ROOT)
    from scripts.report import MIN_SIGNIFICANT, bootstrap_ci, paired_ci, significant
    xs = [0.10, 0.12, 0.50, 0.52, 0.90, 0.88]  # three problems, two seeds each
    problems = ["a", "a", "b", "b", "c", "c"]
    plain, grouped = bootstrap_ci(xs), bootstrap_ci(xs, groups=problems)
    assert grouped[0] == plain[0], (grouped, plain)
    assert grouped[2] - grouped[1] > 1.2 * (plain[2] - plain[1]), (grouped, plain)
    assert bootstrap_ci(xs, groups=list("uvwxyz")) == plain, "one run a problem: the plain bootstrap"
    pairs = [(0.5, 0.4), (0.6, 0.4), (0.5, 0.3), (0.7, 0.4), (0.6, 0.45), (0.55, 0.5)]
    two = paired_ci(pairs, groups=list("aaabbb"))
    assert two[1] is None and two[3] == 2 and not significant(two), two
    six = paired_ci(pairs, groups=list("abcdef"))  # one pair a problem
    assert six[3] == len(pairs) >= MIN_SIGNIFICANT and significant(six), six


def test_policy_reward_reads_ns_samples_when_a_group_has_no_on_policy_ones():
    """Semantle's MiGrATe and ns groups are all neighbourhood: their rise is over NS samples; runs logged before
    neighbour_reward existed fall back to the group mean only when the group had no greedy member."""
    sys.path.insert(0, ROOT)
    from scripts.report import policy_reward
    assert policy_reward({"on_policy_reward": 0.2, "neighbour_reward": 0.5}) == 0.2
    assert policy_reward({"on_policy_reward": None, "neighbour_reward": 0.5}) == 0.5
    old = {"on_policy_reward": None, "group_reward_mean": 0.4, "members": {"neighbour": 5, "greedy": 0}}
    assert policy_reward(old) == 0.4
    assert policy_reward({**old, "members": {"neighbour": 4, "greedy": 1}}) is None, "greedy replays are not samples"


def test_a_thread_count_below_one_is_refused_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "scripts.experiments", "--tasks", "toy", "--methods", "random", "--threads", "0",
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1] == \
        "python -m scripts.experiments: error: --threads must be at least 1, not 0", r.stderr
    assert not (tmp_path / "runs").exists(), "nothing launched"


def test_a_task_spec_that_names_no_problem_is_refused_in_one_line(tmp_path):
    for spec, said in (("nosuch:x", "unknown task 'nosuch'"), ("nosuch", "unknown task 'nosuch'"),
                       ("toy:,", "names no problem of task toy")):
        r = subprocess.run([sys.executable, "-m", "scripts.experiments", "--tasks", spec, "--methods", "random", "--out",
                            str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (spec, r.stderr)
        assert said in r.stderr.strip().splitlines()[-1], (spec, r.stderr)
    assert not (tmp_path / "runs").exists(), "nothing launched"


def test_a_repeated_id_is_one_problem_and_a_named_set_is_its_list():
    from tasks import problem_ids
    from tasks.semantle import PAPER_TARGETS
    assert problem_ids("toy", " cat,dog ,cat,") == ["cat", "dog"], "two runs of one id would share a folder"
    assert problem_ids("semantle", "paper") == PAPER_TARGETS


@pytest.mark.parametrize("flags, said", [
    (["--budget", "0"], "--budget must be at least 1, not 0"),  # 0 used to run the preset's budget without a word
    (["--jobs", "0"], "--jobs must be at least 1, not 0"),
    (["--methods", "random", "nosuch"], "unknown method 'nosuch'; choose from migrate, migrate-opro, grpo"),
])
def test_a_bad_budget_job_count_or_method_is_refused_before_any_run(tmp_path, flags, said):
    r = subprocess.run([sys.executable, "-m", "scripts.experiments", "--tasks", "toy", "--methods", "random", *flags,
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"python -m scripts.experiments: error: {said}"), r.stderr
    assert not (tmp_path / "runs").exists(), "nothing launched"


def test_a_failed_run_makes_the_harness_exit_non_zero_after_its_report(tmp_path):
    """One run finishes and one fails (its run.py is given a task option that does not exist): the report still
    covers the finished run, and the exit status says that not everything ran (it was 0, so a script saw success)."""
    ok = subprocess.run([sys.executable, "-m", "scripts.experiments", "--tasks", "toy:cat", "--methods", "random", "--seeds", "0",
                         "--budget", "4", "--out", str(tmp_path), "--", "--model", "tiny"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "scripts.experiments", "--tasks", "toy:cat", "--methods", "random", "--seeds", "0",
                        "1", "--budget", "4", "--out", str(tmp_path), "--", "--model", "tiny", "--task-option",
                        "nosuch=1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "toy-cat-random-s1 " in r.stderr and "FAILED (exit 2" in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("error: 1 of 2 runs failed (their .log files say why); the report "
                                                 "covers the finished ones, and the same command continues the rest")
    assert "| random | 1 |" in r.stdout, "the report covers the run that finished"


def test_plots_draw_no_two_methods_alike_past_ten():
    # the Semantle grid has eleven methods: with colour alone (C0..C9 wrap) the eleventh looked like the first
    from scripts.report import line_style
    looks = [tuple(sorted(line_style(k).items())) for k in range(30)]
    assert len(set(looks)) == 30, "two of the first 30 labels share colour and line style"


def test_the_report_names_the_machine_behind_its_wall_times(done, tmp_path):
    """Wall seconds hold for one CPU: every summary names the machine it ran on, and the report counts the runs
    per machine, runs from before summary.json named it among them, so a grid done in pieces says it spans two."""
    import shutil
    from fast.cpu_linear import machine
    out, _ = done
    here, s = machine(), summaries(out)
    assert all((v["machine"]["cpu"], v["machine"]["isa"]) == (here["cpu"], here["isa"]) for v in s.values()), s
    threads = {v["machine"]["threads"] for v in s.values()}
    assert len(threads) == 1, f"one thread count for every run of one harness call, got {threads}"
    where = f"{here['cpu']}, {here['isa']}, {threads.pop()} thread(s)"
    assert f"Wall times measured on: {where}: 8 run(s)." in (out / "results.md").read_text()
    old = tmp_path / "old"
    shutil.copytree(out, old)
    for d in sorted(d for d in (old / "runs").iterdir() if d.is_dir())[:3]:  # as a summary written before it carried its machine
        v = json.loads((d / "summary.json").read_text())
        del v["machine"]
        (d / "summary.json").write_text(json.dumps(v))
    r = subprocess.run([sys.executable, "-m", "scripts.experiments", *ARGS, "--out", str(old), "--report-only"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(l for l in (old / "results.md").read_text().splitlines() if l.startswith("Wall times measured on"))
    assert f"{where}: 5 run(s)" in line and "not recorded" in line and ": 3 run(s)" in line, line


def test_the_sweep_table_resamples_whole_tasks_as_the_report_does():
    # A task's seeds are not independent draws. sweep.md once resampled runs (seven, two seeds on four tasks) and
    # starred a rise that scripts/report.py, resampling tasks, does not let count (MIN_SIGNIFICANT units): the two tables
    # must agree on a difference's interval. Read from the committed ARC sweep.
    import scripts.sweep as sweep
    out = os.path.join(ROOT, "results", "sweep", "arc-qwen")
    row = next(l for l in sweep.learning_table(out).splitlines() if l.startswith("| migrate-lr2e-4-a128 |"))
    rep = next(l for l in open(os.path.join(out, "results.md")) if l.startswith("| migrate-lr2e-4-a128 − random |"))
    assert rep.split("|")[2].strip() == "7", rep  # both seeds of the four tasks but e9afcf9a's second
    assert row.split("|")[3].strip() == rep.split("|")[5].strip(), (row, rep)


def test_a_label_keeps_its_meaning_when_a_default_changes(done):
    # The runs in a folder (and in git) keep what their label meant: a launch that would run a label under another
    # setting (here grpo with a KL pull, as if the default had changed) is refused before anything runs, naming
    # the value; the same setting passed as a flag, or under another label, runs.
    out, _ = done
    before = sorted(os.listdir(out / "runs"))
    r = subprocess.run([sys.executable, "-m", "scripts.experiments", "--tasks", "toy:cat", "--methods", "grpo", "--seeds", "2",
                        "--budget", "8", "--out", str(out), "--", "--model", "tiny", "--kl-coef", "0.2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "label 'grpo' ran toy with kl_coef = 0.0" in r.stderr, r.stderr[-2000:]
    assert "--kl-coef 0.0" in r.stderr and sorted(os.listdir(out / "runs")) == before, "nothing ran"
    r = subprocess.run([sys.executable, "-m", "scripts.experiments", "--tasks", "toy:cat", "--methods", "grpo", "--seeds", "2",
                        "--budget", "8", "--label", "grpo-kl0.2", "--out", str(out), "--", "--model", "tiny",
                        "--kl-coef", "0.2"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "runs" / "toy-cat-grpo-kl0.2-s2" / "config.json").read_text())["kl_coef"] == 0.2


def test_the_grid_served_together_in_one_process_finds_what_separate_runs_find(done, tmp_path):
    """--together 3: the eight runs in the harness's own process, three at a time over one model (a finished run's
    slot takes the next; random and grpo runs side by side), each in its own folder, finding what each found in a
    process of its own; the same command again skips them all."""
    out, _ = done
    r = harness(tmp_path, "--together", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "8 runs, 3 at a time in this process" in r.stderr
    alone, together = summaries(out), summaries(tmp_path)  # `done` may hold other tests' runs besides the grid's
    assert len(together) == 8 and set(together) <= set(alone), sorted(together)
    for name, t in together.items():
        s = alone[name]
        assert (t["oracle_calls"], t["best_reward"], t["best_candidate"]) == \
            (s["oracle_calls"], s["best_reward"], s["best_candidate"]), name
    again = harness(tmp_path, "--together", "3")
    assert again.returncode == 0 and summaries(tmp_path) == together, again.stderr[-2000:]
