"""Kill-and-resume trials: SIGKILL `run.py` at random moments, resume it until it finishes, and check that
nothing was lost, duplicated, scored twice or left running (the resume promise of README.md and docs/reference.md).

    python -m scripts.kill_trials --trials 10 --task toy     # tiny model, toy task
    python -m scripts.kill_trials --trials 10 --task arc     # tiny model, ARC 66e6c45b: real sandboxed programs
    python -m scripts.kill_trials --trials 10 --task toy-together   # three toy problems, --together 2

One trial: write a task file that wraps the real task so that every reward call appends one JSON line per
candidate (key, pid, time) to a log, flushed and fsynced before it returns; start `run.py` in its own
process group; kill the group with SIGKILL one to three times, each at a seeded random moment of one kind
(KILLS: right after a checkpoint lands, mid-step, right after a reward call, at a random time that may hit
start-up, or while a sandbox child runs); after each kill check the files a kill may have torn and snapshot
the database; then `--resume` (or restart, if the kill came before config.json existed) until the run ends.
Checks after the end: exit 0, summary.json, oracle calls == budget (or the stop reason's own condition),
unique keys, metrics steps 1..N, every candidate committed before a kill still there once with the same
reward and never scored again after that kill, no key scored twice by one process, no process left alive.
The test suite imports `run_trials` (tests/test_kill_resume.py).
"""
import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from tasks.jail import UID_BASE
from tasks.sandbox import processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project root: run.py is there

LOG_ENV = "MIGRATE_REWARD_LOG"
TASK_FILE = '''"""{cls} whose reward calls are logged for scripts/kill_trials.py: one JSON line per candidate, fsynced
before reward() returns, so the log holds at least everything the oracle answered, even under SIGKILL."""
import json
import os
import time

from {module} import {cls} as Base


class Logged(Base):
    def reward(self, candidates):
        scores = Base.reward(self, candidates)
        # Each record *starts* with a newline: a record torn by a kill stays alone on its line.
        data = "".join("\\n" + json.dumps({{"key": c, "id": self.task_id, "pid": os.getpid(), "t": time.time()}})
                       for c in candidates)
        fd = os.open(os.environ["{env}"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = data.encode()
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        return scores


TASK = Logged
'''
# Per task: what to wrap, run.py flags (small budgets: start-up dominates a trial) and a rough step time.
SETTINGS = {
    "toy": dict(module="tasks.toy", cls="Toy", step_s=0.4,
                args=["--model", "tiny", "--budget", "16"]),
    "arc": dict(module="tasks.arc_agi", cls="ARC", step_s=1.0,
                args=["--model", "tiny", "--task-id", "66e6c45b", "--budget", "6", "--alpha", "2", "--beta", "1",
                      "--gamma", "1", "--max-new-tokens", "8"]),
}
# Problems served together (run.py --task-ids ... --together 2): three toy problems, two at a time over one model; a
# kill hits all of them at once, and the same command resumes each where it stopped.
SETTINGS["toy-together"] = dict(SETTINGS["toy"], ids=("cat", "dog", "cow"),
                                 args=["--model", "tiny", "--budget", "12", "--together", "2"])
KILLS = ("after-checkpoint", "mid-step", "after-reward", "random")
ARC_KILLS = KILLS + ("in-sandbox",)  # only ARC has children worth catching alive
POLL_S = 0.01
GRACE_S = 3.0  # a sandbox child dies by PDEATHSIG, asynchronously: give it this long
RUN_TIMEOUT_S = 180


# ---------------------------------------------------------------- processes


def children(pid) -> list[int]:
    """Child pids of pid, from every one of its threads (a child is listed under the thread that forked it)."""
    out = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def start_time(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


class Watch:
    """Every descendant of one trial's run.py processes ever seen (pid, start time), so that after a kill we can
    tell whether any of them, sandbox children included (they have their own sessions), is still alive."""

    def __init__(self):
        self.seen = {}  # pid -> starttime
        self.roots = []

    def add_root(self, pid):
        self.roots.append(pid)
        self.update()

    def update(self) -> list[int]:
        """Record the live descendants of the roots (cheap: /proc/PID/task/*/children); return the non-roots."""
        found, todo = [], [r for r in self.roots if start_time(r) is not None]
        while todo:
            pid = todo.pop()
            st = start_time(pid)
            if st is None:
                continue
            self.seen.setdefault(pid, st)
            if pid not in self.roots:
                found.append(pid)
            todo += children(pid)
        return found

    def sandbox_child_alive(self, pids) -> bool:
        """A descendant already running as a sandbox uid (past its set-up, about to run the program)."""
        for p in pids:
            try:
                if os.stat(f"/proc/{p}").st_uid >= UID_BASE:
                    return True
            except OSError:
                pass
        return False

    def leftovers(self) -> list[str]:
        """Live processes of this trial: in a run.py's group, a descendant seen before, or a sandbox uid of one."""
        uids = {UID_BASE + p for p in self.seen}
        left = []
        for pid, p in processes().items():
            if p.state == "Z":
                continue  # dead, waiting for its (new) parent to reap it
            if p.pgid in self.roots or self.seen.get(pid) == p.start or p.uid in uids:
                left.append(f"pid {pid} (pgid {p.pgid}, uid {p.uid}, state {p.state})")
        return left

    def wait_clean(self) -> list[str]:
        deadline = time.monotonic() + GRACE_S
        while (left := self.leftovers()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return left


# ---------------------------------------------------------------- run folder


def ckpt_id(folder):
    """Changes with every checkpoint written in `folder` (or in any of a list of folders)."""
    if isinstance(folder, (list, tuple)):
        return tuple(ckpt_id(f) for f in folder)
    try:
        st = os.stat(os.path.join(folder, "checkpoint.pt"))
        return st.st_ino, st.st_mtime_ns  # os.replace gives a new inode every step
    except FileNotFoundError:
        return None


def db_rows(folder) -> dict:
    """{key: (reward, oracle, step)} of the scored candidates; {} before the database exists.

    A kill can land after sqlite created the file but before the schema was written (the run's
    resume writes it then: CREATE TABLE IF NOT EXISTS), so a file without the table is empty too.
    """
    path = os.path.join(folder, "candidates.sqlite")
    if not os.path.exists(path):
        return {}
    conn = sqlite3.connect(path)
    try:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'candidates'").fetchone() is None:
            return {}
        rows = conn.execute("SELECT key, reward, oracle, step FROM candidates WHERE key IS NOT NULL").fetchall()
    finally:
        conn.close()
    out = {}
    for k, r, o, s in rows:
        assert k not in out, f"key {k[:60]!r} twice in the database"
        out[k] = (r, o, s)
    return out


def read_log(path) -> list[dict]:
    """The reward log's records; a record torn by a kill (not valid JSON) is skipped."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass  # blank (every record starts with a newline) or torn
    return out


def check_torn_files(folder) -> list[str]:
    """What a kill may have torn: checkpoint.pt must load; an adapter (or, between save_adapter's two renames,
    adapter.old) must load and be finite whenever a checkpoint with LoRA weights exists."""
    import torch
    from safetensors.torch import load_file
    from lora import read_adapter_config
    errs, has_lora = [], False
    ck_path = os.path.join(folder, "checkpoint.pt")
    if os.path.exists(ck_path):
        try:
            ck = torch.load(ck_path, weights_only=False)
            assert {"search", "elapsed", "torch_rng"} <= set(ck), f"keys {sorted(ck)}"
            has_lora = "lora" in ck
            bad = [k for k, v in ck.get("lora", {}).items() if not torch.isfinite(v).all()]
            assert not bad, f"non-finite LoRA tensors {bad[:3]}"
        except Exception as e:
            errs.append(f"checkpoint.pt does not load: {type(e).__name__}: {e}")
    adapter = os.path.join(folder, "adapter")
    for cand in (adapter, adapter + ".old"):
        if os.path.isdir(cand):
            try:
                cfg = read_adapter_config(cand)
                state = load_file(os.path.join(cand, "adapter_model.safetensors"))
                assert cfg["peft_type"] == "LORA" and state, "empty or not LoRA"
                assert all(torch.isfinite(v).all() for v in state.values()), "non-finite adapter weights"
            except Exception as e:
                errs.append(f"{os.path.basename(cand)}/ does not load: {type(e).__name__}: {e}")
            break  # adapter/ exists: it must be whole; adapter.old is only the fallback when it is missing
    else:
        if has_lora:
            errs.append("checkpoint.pt holds LoRA weights but neither adapter/ nor adapter.old/ exists")
    return errs


# ---------------------------------------------------------------- one trial


@dataclass
class Trial:
    task: str
    index: int
    kills: list = field(default_factory=list)  # (mode, step of the last checkpoint at the kill)
    failures: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    stop_reason: str = ""
    steps: int = 0
    calls: int = 0
    budget: int = 0
    rescored: int = 0  # keys scored again after a kill that came before their commit (allowed)
    seconds: float = 0.0

    def line(self) -> str:
        kills = ", ".join(f"{m}@{s}" for m, s in self.kills) or "none"
        status = "ok" if not self.failures else "FAIL: " + " | ".join(self.failures)
        notes = f" | {'; '.join(self.notes)}" if self.notes else ""
        return (f"trial {self.index:2d} {self.task}: kills {len(self.kills)} ({kills}) | {self.stop_reason} after "
                f"{self.steps} steps, calls {self.calls}/{self.budget} | rescored-uncommitted {self.rescored} | "
                f"{self.seconds:.1f} s{notes} | {status}")


def launch(argv, env, watch, err_path):
    # Own session and group: killpg reaches run.py and anything it did not move out of the group. stderr goes
    # to a file: a pipe nobody reads could fill and stall the run.
    with open(err_path, "ab") as err:
        p = subprocess.Popen([sys.executable, "run.py", *argv], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=err, start_new_session=True)
    watch.add_root(p.pid)
    return p


def wait_and_kill(proc, folder, log, mode, rng, step_s, watch) -> str | None:
    """Wait for the moment `mode` describes and SIGKILL the group. Returns None if the run ended first."""
    t0 = time.monotonic()
    last, changes = ckpt_id(folder), 0
    want = rng.randint(1, 2)  # kill after the first or second checkpoint of this process
    log_size = os.path.getsize(log) if os.path.exists(log) else 0
    delay = rng.uniform(0.3, 7.0)  # "random": may land in imports, model loading, resume or a step
    fired_at = None
    while proc.poll() is None:
        kids = watch.update()
        now = time.monotonic()
        cur = ckpt_id(folder)
        if cur != last:
            changes, last = changes + 1, cur
        if fired_at is None:
            if mode == "random" and now - t0 >= delay:
                fired_at = now
            elif mode == "after-checkpoint" and changes >= want:
                fired_at = now
            elif mode == "mid-step" and changes >= want:
                fired_at = now + rng.uniform(0.0, step_s)
            elif mode == "after-reward" and os.path.exists(log) and os.path.getsize(log) > log_size:
                fired_at = now
            elif mode == "in-sandbox" and watch.sandbox_child_alive(kids):
                fired_at = now
        if fired_at is not None and now >= fired_at:
            watch.update()  # the children alive at this instant are the ones that matter
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return mode
        time.sleep(POLL_S)
    return None


@dataclass
class Setup:
    """One trial's files: the logged task, the run folder, the reward log, a private TMPDIR, env and flags."""
    work: str
    task_file: str
    folder: str
    log: str
    tmp: str
    env: dict
    fresh: list  # run.py flags of a fresh start


def prepare(task: str, work: str, seed: int = 0) -> Setup:
    s = SETTINGS[task]
    os.makedirs(work)
    task_file = os.path.join(work, f"logged_{task}.py")
    with open(task_file, "w") as f:
        f.write(TASK_FILE.format(module=s["module"], cls=s["cls"], env=LOG_ENV))
    folder, log, tmp = os.path.join(work, "run"), os.path.join(work, "rewards.log"), os.path.join(work, "tmp")
    os.makedirs(tmp)
    # TMPDIR: sandbox work folders land here, so litter is countable. One thread: the tiny model gains nothing
    # from more, and trials run side by side on a small machine.
    env = dict(os.environ, **{LOG_ENV: log, "TMPDIR": tmp, "OMP_NUM_THREADS": "1"})
    ids = ["--task-ids", ",".join(s["ids"])] if "ids" in s else []
    return Setup(work, task_file, folder, log, tmp, env,
                 ["--task", task_file, "--seed", str(seed), *ids, *s["args"], "--out", folder])


def run_trial(task: str, index: int, base: str, seed: int = 0) -> Trial:
    rng = random.Random(f"{seed}-{task}-{index}")
    t = Trial(task, index)
    t0 = time.monotonic()
    su = prepare(task, os.path.join(base, f"{task}-{index}"), seed=index)
    work, folder, log, tmp, env, fresh = su.work, su.folder, su.log, su.tmp, su.env, su.fresh
    ids = SETTINGS[task].get("ids")  # problems served together: each in its folder under the command's
    folders = {i: os.path.join(folder, i) for i in ids} if ids else {None: folder}
    watch = Watch()
    snapshots = []  # per kill and problem: {id: (rows committed at the kill, its log lines at the kill)}
    modes = ARC_KILLS if task == "arc" else KILLS
    n_kills = rng.choice([1, 1, 1, 2, 3])  # each kill costs a start-up (~5 s here)
    proc = None
    try:
        for _ in range(n_kills + 1):
            # (served together, the same command resumes every problem)
            argv = ["--resume", folder] if os.path.exists(os.path.join(folder, "config.json")) and not ids else fresh
            err_path = os.path.join(work, f"stderr-{len(t.kills)}.txt")
            proc = launch(argv, env, watch, err_path)
            if len(t.kills) == n_kills:
                if proc.wait(timeout=RUN_TIMEOUT_S) != 0:
                    t.failures.append(f"final run exited {proc.returncode}: {_tail(err_path)}")
                break
            mode = rng.choice(modes)
            killed = wait_and_kill(proc, list(folders.values()), log, mode, rng, SETTINGS[task]["step_s"], watch)
            if killed is None:
                if proc.returncode != 0:
                    t.failures.append(f"run exited {proc.returncode} before the kill ({mode}): {_tail(err_path)}")
                t.notes.append(f"run ended before kill '{mode}'")
                break
            left = watch.wait_clean()
            if left:
                t.failures.append(f"alive after kill '{mode}': {', '.join(left[:3])}")
            entries = read_log(log)
            snapshots.append({})
            for i, f in folders.items():
                t.failures += [f"after kill '{mode}': {e}" for e in check_torn_files(f)]
                if os.path.isdir(os.path.join(f, "adapter")) and os.path.isdir(os.path.join(f, "adapter.old")):
                    t.notes.append("kill left adapter/ and adapter.old/")
                snapshots[-1][i] = (db_rows(f), sum(i is None or e.get("id") == i for e in entries))
            t.kills.append((mode, max(_ckpt_step(f) for f in folders.values())))
    except subprocess.TimeoutExpired:
        t.failures.append(f"no end within {RUN_TIMEOUT_S} s")
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for i, f in folders.items():
        t.failures += [(f"{i}: " if i else "") + e for e in final_checks(t, f, log, [s[i] for s in snapshots],
                                                                       watch, problem=i)]
    t.seconds = time.monotonic() - t0
    litter = [n for f in folders.values() if os.path.isdir(f) for n in os.listdir(f) if n.startswith(".adapter.")]
    litter += [n for n in os.listdir(tmp) if n.startswith("migrate-sbx-")]
    if litter:
        t.notes.append(f"litter left by kills: {len(litter)} temporary folder(s)")
    return t


def _tail(path, n=600):
    with open(path, errors="replace") as f:
        return f.read()[-n:].strip()


def _ckpt_step(folder):
    import torch
    try:
        return torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=False)["search"]["step"]
    except Exception:
        return 0


def final_checks(t: Trial, folder, log, snapshots, watch, problem=None) -> list[str]:
    """`problem`: served together, the problem of this folder (its lines of the shared reward log)."""
    errs = []
    left = watch.wait_clean()
    if left:
        errs.append(f"alive after the end: {', '.join(left[:3])}")
    if t.failures:
        return errs  # the run did not end cleanly: the checks below would only repeat it
    try:
        summary = json.load(open(os.path.join(folder, "summary.json")))
        cfg = json.load(open(os.path.join(folder, "config.json")))
    except (OSError, ValueError) as e:
        return errs + [f"no readable summary.json/config.json: {e}"]
    try:
        rows = db_rows(folder)
    except AssertionError as e:
        return errs + [str(e)]
    conn = sqlite3.connect(os.path.join(folder, "candidates.sqlite"))
    calls = conn.execute("SELECT COUNT(*) FROM candidates WHERE oracle = 1").fetchone()[0]
    nonfinite = conn.execute(  # SQLite keeps inf as a REAL, NaN only as NULL (which NOT NULL refuses)
        "SELECT COUNT(*) FROM candidates WHERE NOT (reward BETWEEN -1e308 AND 1e308)").fetchone()[0]
    conn.close()
    t.stop_reason = summary["stop_reason"]
    t.steps, t.calls, t.budget = t.steps + summary["steps"], t.calls + calls, t.budget + cfg["budget"]
    if summary["oracle_calls"] != calls:
        errs.append(f"summary says {summary['oracle_calls']} oracle calls, the database holds {calls}")
    if nonfinite:
        errs.append(f"{nonfinite} non-finite rewards in the database")
    metrics = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl")) if line.strip()]
    if [m["step"] for m in metrics] != list(range(1, summary["steps"] + 1)):
        errs.append(f"metrics steps {[m['step'] for m in metrics]} are not 1..{summary['steps']}")
    # The stop reason decides what the budget must look like.
    if t.stop_reason == "budget" and calls != cfg["budget"]:
        errs.append(f"stopped on budget with {calls} oracle calls, budget {cfg['budget']}")
    elif t.stop_reason == "solved" and not (calls <= cfg["budget"] and summary["solved"]):
        errs.append(f"stopped as solved but summary.solved={summary['solved']}, calls {calls}")
    elif t.stop_reason == "stalled":
        tail = metrics[-cfg["patience"]:]
        if calls >= cfg["budget"] or len(tail) < cfg["patience"] or any(m["new_calls"] for m in tail):
            errs.append(f"stopped as stalled but the last {cfg['patience']} steps found something new")
    elif t.stop_reason not in ("budget", "solved", "stalled"):
        errs.append(f"unknown stop reason {t.stop_reason!r}")
    # The oracle log against the database and the kills.
    entries = [e for e in read_log(log) if problem is None or e.get("id") == problem]
    logged = {e["key"] for e in entries}
    unlogged = [k for k, (_, oracle, _) in rows.items() if oracle and k not in logged]
    if unlogged:
        errs.append(f"{len(unlogged)} oracle rows were never scored by the task, e.g. {unlogged[0][:60]!r}")
    per_pid = {}
    for e in entries:
        per_pid.setdefault(e["pid"], []).append(e["key"])
    twice = [k for keys in per_pid.values() for k in set(keys) if keys.count(k) > 1]
    if twice:
        errs.append(f"{len(twice)} keys scored twice by one process, e.g. {twice[0][:60]!r}")
    for i, (before, n_log) in enumerate(snapshots):
        lost = [k for k in before if k not in rows]
        changed = [k for k in before if k in rows and rows[k] != before[k]]
        again = {e["key"] for e in entries[n_log:]} & set(before)
        if lost:
            errs.append(f"kill {i + 1}: {len(lost)} committed candidates vanished, e.g. {lost[0][:60]!r}")
        if changed:
            errs.append(f"kill {i + 1}: {len(changed)} candidates changed reward/oracle/step, e.g. {changed[0][:60]!r}")
        if again:
            errs.append(f"kill {i + 1}: {len(again)} committed candidates scored again, e.g. {sorted(again)[0][:60]!r}")
    counts = {}
    for e in entries:
        counts[e["key"]] = counts.get(e["key"], 0) + 1
    t.rescored = sum(n - 1 for n in counts.values() if n > 1)
    errs += [f"at the end: {e}" for e in check_torn_files(folder)]
    errs += adapter_matches_checkpoint(folder)
    return errs


def adapter_matches_checkpoint(folder) -> list[str]:
    """At the end, adapter/ must hold exactly the LoRA weights of the last checkpoint (a kill between the two
    writes leaves the adapter a step ahead; the redone step must write both again)."""
    import torch
    from safetensors.torch import load_file
    ck = torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=False)
    if "lora" not in ck:
        return []
    try:
        state = load_file(os.path.join(folder, "adapter", "adapter_model.safetensors"))
    except Exception as e:
        return [f"no final adapter: {type(e).__name__}: {e}"]
    want = {f"base_model.model.{k}": v for k, v in ck["lora"].items()}
    if set(state) != set(want) or any(not torch.equal(state[k], want[k].float()) for k in want):
        return ["the final adapter differs from the final checkpoint's LoRA weights"]
    return []


def run_trials(task: str, trials: int = 10, seed: int = 0, base: str | None = None, jobs: int = 2,
               verbose=True) -> list[Trial]:
    """Run `trials` kill-and-resume trials of one task, `jobs` at a time (a trial mostly waits on run.py's
    start-up); print one line each as it ends; return them in order, failures inside."""
    assert task in SETTINGS, f"task must be one of {sorted(SETTINGS)}, got {task!r}"
    from concurrent.futures import ThreadPoolExecutor
    own = base is None
    base = base or tempfile.mkdtemp(prefix=f"kill-trials-{task}-")
    out = []

    def one(i):
        t = run_trial(task, i, base, seed)
        if verbose:
            print(t.line(), flush=True)
        return t
    try:
        with ThreadPoolExecutor(max(1, jobs)) as pool:
            out = list(pool.map(one, range(trials)))
    finally:
        if own and not any(t.failures for t in out):
            shutil.rmtree(base, ignore_errors=True)
        elif own:
            print(f"run folders kept in {base}", flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m scripts.kill_trials", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=10, help="trials to run")
    p.add_argument("--task", default="toy", choices=sorted(SETTINGS), help="task wrapped with a reward log")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments (run seeds are trial indices)")
    p.add_argument("--jobs", type=int, default=2, help="trials run at the same time")
    p.add_argument("--keep", default=None, metavar="DIR", help="put (and keep) the trial folders here")
    args = p.parse_args(argv)
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
    t0 = time.monotonic()
    results = run_trials(args.task, args.trials, args.seed, base=args.keep, jobs=args.jobs)
    kills = sum(len(t.kills) for t in results)
    failed = [t for t in results if t.failures]
    print(f"{args.task}: {len(results)} trials, {kills} kills, {len(failed)} failed, "
          f"{time.monotonic() - t0:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
