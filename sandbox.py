"""Run untrusted generated Python (ARC `transform(grid)` programs) in throw-away processes, many in parallel.

Code the model writes is hostile until proven otherwise (shared/PAPER.md, "Things not to copy": the reference
ran it in-process behind a blocklist). Here each program gets its own process, started as
`python -I -B sandbox.py` (this file's `_child_main`), which sets up the layers below *before* it reads a
byte of the program, then runs `transform` on every input and writes one JSON line per input to a pipe.
The parent trusts nothing it reads: it re-validates every grid and caps every byte.

Layers, boundary first (when we are root, as here and in CI):
- a fresh uid (UID_BASE + the child's pid, unique among live children) with no groups and NO_NEW_PRIVS, so
  RLIMIT_NPROC=0 forbids fork and threads, nothing of ours can be signalled, and root files are read-only;
- private mount/network/IPC/UTS namespaces: no network interface at all; /tmp is a size-capped private tmpfs
  (the program's cwd), /var/tmp, /dev/shm, /run/lock are read-only and empty, /proc hides other processes,
  and an unreadable home holding the Python install (/root here) is replaced by a view of that install only;
- rlimits: CPU seconds, address space, file size, open files, no core dumps; an empty environment;
- its own session: on timeout or flood the whole process group, then any process of its uid, gets SIGKILL;
- an audit hook (sys.addaudithook) refusing exec/fork/subprocess/sockets/ctypes calls/signals and file
  access outside the work folder and the Python install: defence in depth, NOT a boundary (a program can
  monkeypatch the stdlib functions the hook relies on).
Root where namespaces are refused (a container without CAP_SYS_ADMIN): the uid drop stays, but network, /tmp
and world-readable files rest on the audit hook, and the Python install must be world-readable. Not root: no
uid drop either (NPROC still blocks fork for a user with other processes); writes are capped per file, not in
number. `Result.isolation` says which layers were active; a child that fails to set up raises RuntimeError.
"""
import ctypes
import json
import math
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

MAX_SIDE = 30  # ARC grids are 1x1 to 30x30
UID_BASE = 0x70000000  # far above real users; + pid gives each live child its own uid
RESULT_CAP = 1 << 20  # bytes of JSON results; 30x30 grids take ~3 KB each
STDERR_CAP, STDERR_KEEP = 1 << 20, 2000  # a program writing more than this to stderr is flooding
ENV = {"LANG": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}  # threads would hit NPROC


def as_grid(x):
    """(grid, None) if x is a 2-D rectangular grid of ints 0..9 of at most 30x30, else (None, why).
    Runs in the child (on the program's object) and again in the parent (on the JSON it got back)."""
    if type(x).__name__ == "ndarray" and hasattr(x, "tolist"):
        x = x.tolist()
    if not isinstance(x, (list, tuple)) or not 1 <= len(x) <= MAX_SIDE:
        return None, f"not a list of 1..{MAX_SIDE} rows"
    if not all(isinstance(r, (list, tuple)) and 1 <= len(r) <= MAX_SIDE for r in x):
        return None, f"rows must be lists of 1..{MAX_SIDE} cells"
    if len({len(r) for r in x}) != 1:
        return None, "ragged rows"
    grid = []
    for r in x:
        # numpy integers pass through __index__; floats and bools do not count as colours
        if not all(hasattr(v, "__index__") and not isinstance(v, (bool, float)) for v in r):
            return None, "non-integer cell"
        row = [int(v.__index__()) for v in r]
        if not all(0 <= v <= 9 for v in row):
            return None, "cell outside 0..9"
        grid.append(row)
    return grid, None


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
        _sweep_stale_workdirs()

    def run(self, sources: list[str], inputs: list[list[list[int]]]) -> list[Result]:
        """Run every program on every input; results in the order of `sources`."""
        return list(self.pool.map(lambda s: self.run_one(s, inputs), sources))

    def run_one(self, source: str, inputs) -> Result:
        workdir = tempfile.mkdtemp(prefix=f"migrate-sbx-{os.getpid()}-")  # our pid: see _sweep_stale_workdirs
        job = json.dumps({"source": source, "inputs": inputs, "timeout_s": self.timeout_s, "audit": self.audit,
                          "memory_mb": self.memory_mb, "disk_mb": self.disk_mb, "workdir": workdir,
                          "parent_pid": os.getpid()}).encode()
        t0 = time.monotonic()
        deadline = t0 + self.timeout_s
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-B", os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir, env=ENV,
                                    start_new_session=True)
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
        if flood or not exited:
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


def _kill_all(pid):
    # The group catches what stayed in it; the uid sweep catches anything that left it with setsid.
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if os.geteuid() != 0:
        return
    uid = str(UID_BASE + pid)
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/status") as f:
                if any(ln.startswith("Uid:") and ln.split()[1] == uid for ln in f):
                    os.kill(int(p), signal.SIGKILL)
        except (OSError, ValueError):
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


# ---------------------------------------------------------------- child side: runs as `python -I -B sandbox.py`

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWNET = 0x20000, 0x4000000, 0x8000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, MNT_DETACH = 1, 38, 2


def _libc_call(fn, *args):
    if fn(*args) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{fn.__name__}{args[:2]}: {os.strerror(e)}")


def _enter_namespaces(libc, disk_mb) -> str | None:
    """Root only: private mounts and no network. Returns the program's work folder (in a private tmpfs), or
    None if the kernel refuses namespaces (a container without CAP_SYS_ADMIN); later failures raise."""
    mount = lambda src, dst, fs, flags, data=None: _libc_call(
        libc.mount, src and src.encode(), dst.encode(), fs and fs.encode(), flags, data and data.encode())
    try:
        _libc_call(libc.unshare, CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS)
    except OSError:
        return None  # nothing changed yet: run with the other layers, and say so in Result.isolation
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted below leaks back to the host
    safe = MS_NOSUID | MS_NODEV
    # A Python install or virtual environment under /tmp (a CI clone, `python -m venv /tmp/v`) would vanish
    # under the private /tmp: hold each such folder open, then bind it back, read-only, from the held fd.
    installs = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, *sys.path)
                if p and os.path.isdir(p)}
    under_tmp = sorted(p for p in installs if p.startswith("/tmp/"))
    under_tmp = [p for p in under_tmp if not any(p.startswith(q + "/") for q in under_tmp)]  # outermost only
    held = {p: os.open(p, os.O_RDONLY | os.O_DIRECTORY) for p in under_tmp}
    mount("tmpfs", "/tmp", "tmpfs", safe, f"size={disk_mb}m,nr_inodes=512,mode=1777")
    for p, fd in held.items():
        os.makedirs(p, mode=0o755)
        mount(f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC)
        mount(None, p, None, MS_REMOUNT | MS_BIND | MS_RDONLY | safe)
        os.close(fd)
    # The interpreter may live under an unreadable home (pyenv under /root, say): show the install, hide the rest.
    for need in sorted({os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}):
        parts = need.split("/")
        home = next((h for h in ("/".join(parts[:k]) for k in range(2, len(parts)))
                     if not os.stat(h).st_mode & 0o001), None)
        if home is None:
            continue
        stage = "/tmp/.stage"
        os.mkdir(stage)
        mount(need, stage, None, MS_BIND | MS_REC)
        mount("tmpfs", home, "tmpfs", safe, "size=1m,mode=755")
        os.makedirs(need)
        mount(stage, need, None, MS_BIND | MS_REC)
        mount(None, need, None, MS_REMOUNT | MS_BIND | MS_RDONLY | safe)
        _libc_call(libc.umount2, stage.encode(), MNT_DETACH)
        os.rmdir(stage)
    for d in ("/var/tmp", "/dev/shm", "/run/lock"):
        if os.path.isdir(d):
            mount("tmpfs", d, "tmpfs", safe | MS_RDONLY, "size=4k")
    mount("proc", "/proc", "proc", safe, "hidepid=2")  # the program sees only its own process
    os.mkdir("/tmp/work", 0o700)
    return "/tmp/work"


def _audit_hook(workdir):
    """Defence in depth: refuse obviously hostile operations at the Python level."""
    realpath, fsdecode = os.path.realpath, os.fsdecode
    readable = tuple({realpath(p) + "/" for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)})
    inside = workdir + "/"
    deny = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill",
            "os.killpg", "os.link", "os.symlink", "subprocess.", "socket.", "ctypes.", "signal.pthread_kill",
            "resource.setrlimit", "resource.prlimit", "pty.", "webbrowser.")
    writes = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate",
              "os.utime", "shutil.")
    reads = ("os.listdir", "os.scandir", "os.chdir", "glob.glob")
    busy = []

    def where(p):
        return realpath(fsdecode(p)) + "/" if isinstance(p, (str, bytes, os.PathLike)) else None

    def hook(event, args):
        if busy or not event.startswith(("os.", "subprocess.", "socket.", "ctypes.", "signal.", "resource.",
                                         "pty.", "webbrowser.", "shutil.", "glob.", "open")):
            return
        busy.append(1)  # realpath below must not re-enter the hook
        try:
            if event.startswith(deny):
                raise PermissionError(f"sandbox: {event} is not allowed")
            paths = [where(a) for a in args[:2] if where(a)]
            writing = event == "open" and (any(c in str(args[1] or "") for c in "wax+") or args[2] & 0o3103)
            if (event in writes or event.startswith("shutil.") or writing) and \
                    not all(p.startswith(inside) for p in paths):
                raise PermissionError(f"sandbox: {event} outside the work folder")
            if (event in reads or event == "open") and not all(p.startswith(readable + (inside,)) for p in paths):
                raise PermissionError(f"sandbox: {event} of {args[0]!r} is not allowed")
        finally:
            busy.pop()
    sys.addaudithook(hook)


def _describe(e):
    try:
        return f"{type(e).__name__}: {e}"[:300]
    except BaseException:  # a hostile __str__
        return type(e).__name__


def _child_main():
    import resource  # ctypes is imported at the top, before the hook: numpy needs it; ctypes *calls* are refused
    job = json.loads(sys.stdin.buffer.read())
    result_fd = os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)  # the program's prints go nowhere; stderr stays for tracebacks

    def emit(obj):
        data = (json.dumps(obj) + "\n").encode()
        while data:
            data = data[os.write(result_fd, data):]

    try:
        cpu = max(1, math.ceil(job["timeout_s"]))
        for lim, v in ((resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, job["memory_mb"] << 20),
                       (resource.RLIMIT_FSIZE, job["disk_mb"] << 20), (resource.RLIMIT_NOFILE, 64),
                       (resource.RLIMIT_NPROC, 0), (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(lim, v if isinstance(v, tuple) else (v, v))
        libc = ctypes.CDLL(None, use_errno=True)
        root = os.geteuid() == 0
        private = _enter_namespaces(libc, job["disk_mb"]) if root else None
        workdir = private or job["workdir"]
        os.chdir(workdir)  # while still root: the sandbox uid may not be able to traverse its parents
        if root:
            uid = UID_BASE + os.getpid()
            _libc_call(libc.prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # no setuid binary can give root back
            os.chown(workdir, uid, uid)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            assert os.getuid() == uid, "uid drop failed"
        # Set after the uid change, which clears it: if our supervisor dies, so do we.
        _libc_call(libc.prctl, PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        assert os.getppid() == job["parent_pid"], "supervisor already gone"
        assert os.access(os.path.dirname(os.__file__), os.R_OK | os.X_OK), \
            f"the sandbox uid cannot read the Python install at {sys.base_prefix}"
        emit({"isolation": {"uid_drop": root, "namespaces": private is not None, "audit_hook": job["audit"]}})
        if job["audit"]:
            _audit_hook(workdir)
    except BaseException as e:
        emit({"error": f"sandbox setup failed: {_describe(e)}"})
        os._exit(3)

    # ---- untrusted from here on ----
    try:
        ns = {"__name__": "__program__"}
        exec(compile(job["source"], "<program>", "exec"), ns)
        transform = ns.get("transform")
        assert callable(transform), "the program defines no function transform(grid)"
    except BaseException as e:
        emit({"error": _describe(e)})
        os._exit(0)
    for i, grid in enumerate(job["inputs"]):
        try:
            out, why = as_grid(transform([row[:] for row in grid]))  # a fresh copy: programs mutate inputs
        except BaseException as e:
            out, why = None, _describe(e)
        emit({"i": i, "output": out} if out is not None else {"i": i, "error": why})
    os._exit(0)  # skip atexit handlers and finalisers the program may have registered


if __name__ == "__main__":
    _child_main()
