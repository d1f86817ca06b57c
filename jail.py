"""The child side of the sandbox (the design, and the parent that supervises it, are in sandbox.py).

Started as `python -I -B jail.py` with the job as JSON on stdin, `_child_main` locks the process down (rlimits,
private namespaces and /tmp, a fresh uid, NO_NEW_PRIVS, PDEATHSIG, an audit hook) before a line of the program
runs, reports the active layers as its first JSON line, then runs `transform` on every input and writes one
JSON line per input to the result pipe.

Stdlib only and self-contained: `-I` drops this file's folder from sys.path, so no project module can be
imported here. What the parent shares with the child (UID_BASE, `as_grid`) is defined here, and sandbox.py
imports it from this file.
"""
import ctypes
import json
import math
import os
import signal
import sys

MAX_SIDE = 30  # ARC grids are 1x1 to 30x30
UID_BASE = 0x70000000  # far above real users; + pid gives each live child its own uid
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWNET = 0x20000, 0x4000000, 0x8000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, MNT_DETACH = 1, 38, 2


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
