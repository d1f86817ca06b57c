"""Kill and resume: scripts/kill_trials.py SIGKILLs run.py at seeded random moments and resumes it (toy, ARC,
and three toy problems served together, 10 trials each); a trial fails on any lost, changed or re-scored candidate, torn file or surviving
process. Real processes, real tasks, real sandbox.
"""
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

import scripts.kill_trials as kill_trials
from database import Database, Row
from tasks.sandbox import processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # the tiny model gains nothing from threads on a shared machine


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=ENV)


# ---------------------------------------------------------------- kill and resume


@pytest.mark.slow
@pytest.mark.parametrize("task", ["toy", "arc", "toy-together"])  # toy-together: three problems, --together 2
def test_kill_and_resume_trials(task, tmp_path):
    trials = kill_trials.run_trials(task, trials=10, seed=0, base=str(tmp_path))
    failed = [t.line() for t in trials if t.failures]
    assert not failed, "\n".join(failed)
    assert sum(len(t.kills) for t in trials) >= len(trials), "most trials must actually kill the run"


def test_leftover_check_sees_a_process_that_left_the_group():
    # The trials' "nothing left alive" verdict is only as good as this detector: prove it on a real escapee.
    watch = kill_trials.Watch()
    p = subprocess.Popen(["bash", "-c", "setsid sleep 60 & sleep 60"], start_new_session=True)
    watch.add_root(p.pid)
    deadline, escaped = time.monotonic() + 5, []
    while not escaped and time.monotonic() < deadline:  # until the child has called setsid
        time.sleep(0.01)
        escaped = [pid for pid in watch.update() if getattr(processes().get(pid), "pgid", p.pid) != p.pid]
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    try:
        left = watch.wait_clean()
        assert escaped and any(f"pid {escaped[0]} " in line for line in left), left
    finally:
        for pid in escaped:
            os.kill(pid, signal.SIGKILL)


def test_snapshot_of_a_database_killed_before_its_schema(tmp_path):
    # Database() sets WAL (which creates the file) before it writes the schema: a SIGKILL between the two
    # left a table-less file, and the trial's snapshot raised "no such table" (a flaky ARC trial in CI).
    path = tmp_path / "candidates.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    assert path.exists() and kill_trials.db_rows(str(tmp_path)) == {}, "a table-less file is an empty database"
    db = Database(str(path))  # what the resumed run does: the schema is written then
    db.add([Row(key="x", completion="x", reward=0.5, source="on-policy", step=1)])
    db.close()
    assert kill_trials.db_rows(str(tmp_path)) == {"x": (0.5, 1, 1)}, kill_trials.db_rows(str(tmp_path))


def test_trial_checks_catch_rescoring_loss_and_metric_gaps(tmp_path):
    # The trials pass only if their checks can fail: finish one logged run, then forge each kind of damage.
    su = kill_trials.prepare("toy", str(tmp_path / "t"))
    r = subprocess.run([sys.executable, "run.py", *su.fresh], cwd=ROOT, env=su.env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-800:]

    def verdict(snapshots):
        t = kill_trials.Trial("toy", 0)
        return " | ".join(kill_trials.final_checks(t, su.folder, su.log, snapshots, kill_trials.Watch()))

    rows = kill_trials.db_rows(su.folder)
    n_log = len(kill_trials.read_log(su.log))
    assert verdict([(rows, n_log)]) == "", "an untouched run passes"
    key = next(iter(rows))
    with open(su.log, "a") as f:  # the oracle saw a committed candidate again, from a later process
        f.write("\n" + json.dumps({"key": key, "pid": 1, "t": 0.0}))
    assert "scored again" in verdict([(rows, n_log)])
    assert "vanished" in verdict([(dict(rows, ghost=(0.5, 1, 1)), n_log + 1)])
    assert "changed" in verdict([({key: (rows[key][0] + 0.25, *rows[key][1:])}, n_log + 1)])
    metrics = os.path.join(su.folder, "metrics.jsonl")
    lines = open(metrics).read().splitlines()
    open(metrics, "w").write("\n".join(lines[:1] + lines[2:]) + "\n")  # step 2 missing
    assert "metrics steps" in verdict([])


@pytest.mark.parametrize("torn", ["adapter/ and adapter.old/", "adapter.old/ only"])
def test_resume_after_a_kill_inside_save_adapter(tmp_path, torn):
    """save_adapter renames adapter/ to adapter.old/, the new folder to adapter/, then deletes adapter.old/. A
    kill between those leaves one of these two states; the resumed run must finish from either."""
    out = str(tmp_path / "run")
    watch = kill_trials.Watch()
    p = kill_trials.launch(["--task", "toy", "--model", "tiny", "--budget", "16", "--out", out], ENV, watch,
                           str(tmp_path / "stderr.txt"))
    assert kill_trials.wait_and_kill(p, out, str(tmp_path / "none.log"), "after-checkpoint",
                                     random.Random(0), 0.3, watch), "the run ended before the kill"
    adapter = os.path.join(out, "adapter")
    shutil.copytree(adapter, adapter + ".old")
    if torn == "adapter.old/ only":
        shutil.rmtree(adapter)
    r = run_cli("--resume", out)
    assert r.returncode == 0, r.stderr[-800:]
    assert json.load(open(os.path.join(out, "summary.json")))["oracle_calls"] == 16
    assert not kill_trials.check_torn_files(out)
