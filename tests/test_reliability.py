"""Reliability (issue 6): kill-and-resume trials, fuzzed completions through every task, bad user input through
the real command line, and a task that returns non-finite rewards. Real processes, real tasks, real sandbox.

- Kill trials: tests/kill_trials.py SIGKILLs run.py at seeded random moments and resumes it (toy and ARC,
  10 trials each); a trial fails on any lost, changed or re-scored candidate, torn file or surviving process.
- Fuzz: >= 10,000 random, truncated and adversarial completions per task through `parse`, and the valid
  candidates through `reward` (ARC: a fixed sample of 300 parsed programs plus hostile ones, in the sandbox).
  The Task contract: parse never raises and explains every rejection; reward never raises and stays finite
  inside reward_range, with JSON-serialisable info (the database stores it).
- Bad input: each must exit 2 with exactly one stderr line that names the problem and the fix, no traceback.
"""
import json
import math
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch

import kill_trials
from default_model import tiny_model_path
from sandbox import processes
from tasks import Parsed, load_task
from tasks.arc_agi import fenced

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # the tiny model gains nothing from threads on a shared machine


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=ENV)


# ---------------------------------------------------------------- kill and resume


@pytest.mark.slow
@pytest.mark.parametrize("task", ["toy", "arc"])
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


# ---------------------------------------------------------------- fuzzing parse and reward

N_FUZZ = 10_000
N_ARC_REWARD = 300
VALID = {  # answers each task accepts; their truncations and mutations are the fuzz's backbone
    "toy": ["migrate", "Migrant, maybe?", "My guess: migrate."],
    "semantle": ['["laptop", "keyboard"]', 'Sure! ```json\n["Laptop", "KEYBOARD"]\n``` Good luck.',
                 "['laptop', 'mouse']", '{"words": ["phone", "radio"]}', 'I say "printer" and "scanner".'],
    "molecule": ['["CC(=O)Oc1ccccc1C(=O)O"]', 'Sure! ["Cc1ccc(-c2cc(C(F)(F)F)nn2-c2ccc(S(N)(=O)=O)cc2)cc1"]',
                 '{"response": ["Cn1c(=O)c2c(ncn2C)n(C)c1=O"]}', "```\nc1ccccc1O\n```", '["C[C@H](N)C(=O)O"]'],
    "arc": ["```python\ndef transform(grid):\n    return grid\n```",
            "```python\ndef transform(grid):\n    out = [[0] * 4 for _ in range(4)]\n"
            "    out[0][0], out[0][3] = grid[1][1], grid[1][2]\n"
            "    out[3][0], out[3][3] = grid[2][1], grid[2][2]\n    return out\n```\nThat moves the block.",
            "Here:\n```py\nimport numpy as np\ndef transform(grid):\n"
            "    return np.rot90(np.array(grid)).tolist()\n```"],
}
ODD_CHARS = list("[]{}()\"'`\\\n\t\r\x00,:;#=@+-./%$~*") + ["\ud800", "\udfff", "\u202e", "\u200b", "\ufeff",
                                                           "é", "漢", "😀", "\x85", "\u2028", "ǅ", "\U0010ffff"]
# Per task: the pieces a plausible-but-random answer is built from, and how an answer is wrapped.
SOUP = {"toy": (list("abcdefghijklmnopqrstuvwxyzMIGRATE -'"), "{}"),
        "semantle": (list("abcdefghijklmnopqrstuvwxyz") + ['", "', " ", "-", "'", "laptop"], '["{}"]'),
        # mostly pieces that chain into valid molecules (so reward sees many), a few that break them
        "molecule": (["C", "C", "C", "N", "O", "C(=O)", "C(C)", "C(O)", "c1ccccc1", "C1CCCCC1", "C(C(F)(F)F)",
                      "S(=O)(=O)", "[C@H](C)", "[C@@H](N)", "C(Cl)", "C(Br)", "C(C#N)", "C([N+](=O)[O-])",
                      "c1ccncc1", "[13C]", "OC", "N(C)", "C(=O)N"] * 8
                     + ["[Si]", "[Na]", ".", "*", "=", "#", "(", ")", "1", "%10", "[CH2]", "[O-]", "/C=C/", "[Fe]"],
                     '["{}"]'),
        "arc": (["grid", "[0]", "[1][1]", " ", "\n    ", "return ", "for r in grid", "[", "]", "(", ")", ":",
                 " + ", " * ", "len(grid)", "0", "9", "range(", "np.", "import numpy as np\n"],
                "```python\ndef transform(grid):\n    {}\n```")}
TOKENS = ["```python\n", "```py\n", "```", "```json\n", "def transform(grid):\n", "    return grid\n", '["', '"]',
          "[", "]", "{", "}", '{"response": ', '{"words": ', "NaN", "Infinity", "-1e999", "1e999", "\x00",
          "\ud800", " " * 500, "\n" * 50, "c1ccccc1", "C" * 120, "[nH]", "%99", "laptop", "migrate", '"', "'",
          "\\u0000", "\\ud800", "while True: pass\n", "import os\n", "return None\n", "[[" * 200, "]]" * 200]


def _adversarial() -> list[str]:
    """Fixed hostile completions: sizes, nesting, JSON bombs, NULs, surrogates, fences in odd places."""
    big = 1_000_000
    return ["", " ", "\x00", "\x00" * 1000, "a" * big, "[" * 100_000, "[" * 50_000 + "]" * 50_000,
            '{"a":' * 10_000, '{"response":' * 2000, "[" + "1" * 100_000 + "]", '["' + "C" * 100_000 + '"]',
            '["' + "c1" * 5000 + '"]', "[1e999]", "[NaN, Infinity, -Infinity]", '["\\ud800"]', '["\ud800"]',
            '["' + '", "'.join(["laptop"] * 10_000) + '"]', json.dumps(["a" * 100_000]), "[" * 1000 + '"laptop"' +
            "]" * 1000, '"' * 100_000, "`" * 100_000, "\n" * 100_000, " \n" * 3000, "```python\n" * 10_000,
            "```python\ndef transform(grid):\n" + "    return grid\n" * 10_000,
            "```python\n```python\ndef transform(grid):\n    return grid\n```\n```",
            "``` python\ndef transform(grid): return grid```", "```PYTHON\ndef transform(grid):\n return grid\n```",
            "def transform(grid):\n    return grid\n", "```python\ndef transform(grid):\n\x00return grid\n```",
            "```python\n\tdef transform(grid):\n\t\treturn grid\n```", "```python\ndef transform(grid):",
            "```python\ndef transform(grid):\n    return '\ud800'\n```", '{"response": "CCO"}', '{"response": 5}',
            '{"response": ["CCO", 5]}', '["[Na+].[Cl-]"]', '["[CH3]"]', '["C1CC"]', '["[U]"]', '["C$C"]',
            '["' + "C" * 101 + '"]', '["' + "C" * 500 + '"]', '["*"]', '["[H][H]"]', '["c1ccccc1" ]', "CCO CCO",
            "[\"laptop\", \"mou", "['laptop', 'mouse'", "[laptop, mouse]", "[[[]]]", "[]", "{}", "[\"\"]",
            '["' + "x" * 10_000 + '"]', "\u202e]\"potpal\"[", "\ufeff[\"laptop\"]"]


ADVERSARIAL = _adversarial()


def mutate(text: str, rng: random.Random) -> str:
    for _ in range(rng.randint(1, 5)):
        i = rng.randint(0, len(text))
        op = rng.randrange(5)
        if op == 0:
            text = text[:i] + rng.choice(ODD_CHARS) + text[i:]
        elif op == 1:
            text = text[:i] + text[i + rng.randint(1, 8):]
        elif op == 2:
            text = text[:i] + rng.choice(TOKENS) + text[i:]
        elif op == 3:
            text = text[:i] + text[i:i + rng.randint(1, 40)] * rng.randint(2, 20) + text[i:]
        else:
            text = text[:i] + rng.choice(ODD_CHARS) + text[i + 1:]
    return text


def random_text(rng: random.Random) -> str:
    n = rng.choice([0, 1, 3, 10, 50, 300, 3000])
    if rng.random() < 0.5:  # bytes, decoded the ways a careless caller might (surrogateescape: lone surrogates)
        raw = bytes(rng.randrange(256) for _ in range(n))
        return raw.decode("utf-8", rng.choice(["replace", "surrogateescape", "ignore", "backslashreplace"]))
    hi = rng.choice([0x80, 0x800, 0x10000, 0x110000])  # up to: ASCII, Latin/Greek, BMP (surrogates too), all
    return "".join(chr(rng.randrange(hi)) for _ in range(n))


def fuzz_corpus(task, seed=0) -> list[str]:
    """>= N_FUZZ completions: every truncation of every valid answer, the fixed hostile set, mutations and noise;
    each with the task's answer_prefix prepended or not."""
    rng = random.Random(f"fuzz-{task.name}-{seed}")
    prefix = task.answer_prefix
    valid = VALID["arc" if task.name == "arc_agi" else task.name]
    out = []
    for v in valid:
        for answer in dict.fromkeys([v, prefix + v]):  # ordered: the corpus must not depend on hash seeds
            out += [answer[:i] for i in range(len(answer) + 1)]
    for a in ADVERSARIAL:
        out += [a, prefix + a]
    while len(out) < N_FUZZ:
        kind = rng.random()
        if kind < 0.6:
            text = mutate(rng.choice(valid), rng)
        elif kind < 0.75:
            text = random_text(rng)
        elif kind < 0.9:  # the answer format around random pieces of the task's alphabet
            pieces, form = SOUP["arc" if task.name == "arc_agi" else task.name]
            text = form.format("".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))))
        else:  # token soup: fences, brackets, JSON words and code in random order
            text = mutate("".join(rng.choice(TOKENS) for _ in range(rng.randint(1, 30))), rng)
        out.append(prefix + text if rng.random() < 0.5 else text)
    return out


def check_parse(task, corpus) -> tuple[list[str], list[str], float]:
    """Parse every completion; return (distinct candidates in first-seen order, contract violations, slowest s)."""
    problems, cands, seen, slowest = [], [], set(), 0.0
    for text in corpus:
        t0 = time.perf_counter()
        try:
            p = task.parse(text)
        except Exception as e:
            problems.append(f"parse raised {type(e).__name__}: {e} on {text[:80]!r}")
            continue
        slowest = max(slowest, time.perf_counter() - t0)
        if not isinstance(p, Parsed) or not isinstance(p.candidates, list):
            problems.append(f"parse returned {type(p).__name__} on {text[:80]!r}")
        elif not all(isinstance(c, str) and c for c in p.candidates):
            problems.append(f"empty or non-string candidate {p.candidates!r:.80} from {text[:80]!r}")
        elif not p.candidates and not (isinstance(p.error, str) and p.error.strip()):
            problems.append(f"rejected without a reason: {text[:80]!r}")
        else:
            for c in p.candidates:
                if c not in seen:
                    seen.add(c)
                    cands.append(c)
    return cands, problems, slowest


def check_rewards(task, cands, chunk=500) -> list[str]:
    lo, hi = task.reward_range
    problems = []
    for i in range(0, len(cands), chunk):
        batch = cands[i:i + chunk]
        try:
            scores = task.reward(batch)
        except Exception as e:
            return problems + [f"reward raised {type(e).__name__}: {e} on a batch holding {batch[0][:60]!r}"]
        if len(scores) != len(batch):
            problems.append(f"{len(scores)} scores for {len(batch)} candidates")
            continue
        for c, s in zip(batch, scores):
            r = s.reward
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or not lo <= r <= hi:
                problems.append(f"reward {r!r} outside {task.reward_range} for {c[:80]!r}")
            try:
                json.dumps(s.info)
                assert isinstance(task.solved(s), bool), "solved() must say True or False"
            except Exception as e:
                problems.append(f"{type(e).__name__}: {e} for {c[:80]!r}")
    return problems


def report(name, corpus, cands, problems, slowest, t0):
    print(f"\nfuzz {name}: {len(corpus)} completions, {len(cands)} distinct candidates, slowest parse "
          f"{slowest:.2f} s, {time.perf_counter() - t0:.1f} s, {len(problems)} problems")
    assert not problems, "\n".join(problems[:10])


@pytest.mark.parametrize("name, task_id", [("toy", None), ("semantle", "computer")])
def test_fuzz_word_tasks(name, task_id):
    t0 = time.perf_counter()
    task = load_task(name, task_id)
    corpus = fuzz_corpus(task)
    assert len(corpus) >= N_FUZZ
    cands, problems, slowest = check_parse(task, corpus)
    assert cands, "the corpus holds valid answers"
    problems += check_rewards(task, cands)
    report(name, corpus, cands, problems, slowest, t0)


def test_fuzz_molecule():
    t0 = time.perf_counter()
    sim, qed = load_task("molecule", "similarity:celecoxib"), load_task("molecule", "qed")
    corpus = fuzz_corpus(sim)
    cands, problems, slowest = check_parse(sim, corpus)
    assert len(cands) > 10
    problems += check_rewards(sim, cands) + check_rewards(qed, cands)
    report("molecule", corpus, cands, problems, slowest, t0)


HOSTILE_PROGRAMS = [  # (what it does, body of transform or a whole program)
    "    while True:\n        pass\n",
    "    import time\n    time.sleep(100)\n",
    "    return [[1] * 10**6] * 1000\n",
    "    return [[1] * 31] * 31\n",
    "    return [[1] * 30] * 30\n",
    "    return 'x' * 10**7\n",
    "    print('x' * 10**7)\n    return grid\n",
    "    return None\n", "    return 5\n", "    return [[]]\n", "    return [[1, 2], [3]]\n", "    return [[1.0]]\n",
    "    return [[True]]\n", "    return [[10]]\n", "    return [[-1]]\n", "    return {'a': 1}\n",
    "    return (r for r in grid)\n", "    return [[float('nan')]]\n",
    "    import numpy as np\n    return np.array(grid)\n", "    import numpy as np\n    return np.array(grid) / 3\n",
    "    class I:\n        def __index__(self):\n            raise RuntimeError('no')\n    return [[I()]]\n",
    "    class L(list):\n        def __len__(self):\n            raise RuntimeError('no')\n    return L([[1]])\n",
    "    raise ValueError('boom')\n", "    raise SystemExit(3)\n", "    raise KeyboardInterrupt\n",
    "    import os\n    os._exit(0)\n", "    import sys\n    sys.exit(1)\n",
    "    return transform(grid)\n", "    a = []\n    while True:\n        a.append(bytearray(10**7))\n",
    "    import os\n    os.kill(os.getppid(), 9)\n",
]
HOSTILE_WHOLE = ["def transform(grid):\n    return grid\nwhile True:\n    pass\n",
                 "def transform(grid):\n    return grid\ntransform = 5\n", "def transform():\n    return [[1]]\n",
                 "def transform(grid):\n    return grid\nraise SystemExit(0)\n", "def transform(grid) return grid\n"]


def test_fuzz_arc():
    t0 = time.perf_counter()
    task = load_task("arc", "66e6c45b")
    try:
        corpus = fuzz_corpus(task)
        cands, problems, slowest = check_parse(task, corpus)
        rng = random.Random(0)
        sample = rng.sample(cands, min(N_ARC_REWARD, len(cands)))
        hostile = [fenced(f"def transform(grid):\n{body}") for body in HOSTILE_PROGRAMS] + \
            [fenced(src) for src in HOSTILE_WHOLE]
        parsed = [task.parse(h) for h in hostile]
        assert all(p.candidates for p in parsed), [h for h, p in zip(hostile, parsed) if not p.candidates]
        programs = list(dict.fromkeys(sample + [p.candidates[0] for p in parsed]))
        assert len(programs) >= N_ARC_REWARD
        problems += check_rewards(task, programs, chunk=len(programs))
        right = task.parse(VALID["arc"][1]).candidates
        assert task.solved(task.reward(right)[0]), "the fuzz's reference program solves 66e6c45b"
    finally:
        task.close()
    report(f"arc ({len(programs)} programs run)", corpus, cands, problems, slowest, t0)


# ---------------------------------------------------------------- bad user input through the command line


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """Broken model folders (copies of the tiny model) and broken run folders (copies of a finished run)."""
    base = tmp_path_factory.mktemp("broken")
    tiny = tiny_model_path()
    paths = {}
    for name in ("garbage", "truncated", "arch", "notok"):
        paths[name] = str(base / name)
        shutil.copytree(tiny, paths[name])
    weights = open(os.path.join(tiny, "model.safetensors"), "rb").read()
    open(os.path.join(paths["garbage"], "model.safetensors"), "wb").write(random.Random(0).randbytes(5000))
    open(os.path.join(paths["truncated"], "model.safetensors"), "wb").write(weights[:len(weights) // 3])
    cfg = json.load(open(os.path.join(tiny, "config.json")))
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    json.dump(cfg, open(os.path.join(paths["arch"], "config.json"), "w"))
    os.remove(os.path.join(paths["notok"], "tokenizer.json"))
    run = str(base / "run")
    r = run_cli("--task", "toy", "--model", "tiny", "--budget", "4", "--out", run)
    assert r.returncode == 0, r.stderr
    for name in ("badcfg", "truncck", "garbck", "baddb"):
        paths[name] = str(base / name)
        shutil.copytree(run, paths[name])
    ck = open(os.path.join(run, "checkpoint.pt"), "rb").read()
    open(os.path.join(paths["badcfg"], "config.json"), "w").write(open(os.path.join(run, "config.json")).read()[:50])
    open(os.path.join(paths["truncck"], "checkpoint.pt"), "wb").write(ck[:len(ck) // 2])
    open(os.path.join(paths["garbck"], "checkpoint.pt"), "wb").write(random.Random(1).randbytes(3000))
    open(os.path.join(paths["baddb"], "candidates.sqlite"), "wb").write(random.Random(2).randbytes(3000))
    paths["notrun"] = str(base / "notrun")
    os.makedirs(paths["notrun"])
    paths["afile"] = str(base / "afile")
    open(paths["afile"], "w").write("not a folder")
    return paths


# (args with {name} placeholders for `broken`, what the line must name, a regex any fix wording must match)
BAD_INPUT = {
    "unknown task": (["--task", "nosuch"], "nosuch", r"available|choose"),
    "arc task id": (["--task", "arc", "--task-id", "zzzzzzzz"], "zzzzzzzz", r"look like|e\.g\.|use"),
    "semantle task id": (["--task", "semantle", "--task-id", "two words"], "two words", r"must be|e\.g\."),
    "molecule task id": (["--task", "molecule", "--task-id", "nosuch"], "nosuch", r"use |e\.g\."),
    "toy task id": (["--task", "toy", "--task-id", "X"], "'X'", r"must be"),
    "negative budget": (["--task", "toy", "--model", "tiny", "--budget", "-5"], "-5", r"at least"),
    "missing model folder": (["--task", "toy", "--model", "/no/such/model"], "/no/such/model", r"give|--model"),
    "garbage safetensors": (["--task", "toy", "--model", "{garbage}"], "model.safetensors", r"re-download|re-convert"),
    "truncated safetensors": (["--task", "toy", "--model", "{truncated}"], "model.safetensors",
                              r"re-download|re-convert"),
    "unsupported architecture": (["--task", "toy", "--model", "{arch}"], "GPT2LMHeadModel", r"supported"),
    "no tokenizer.json": (["--task", "toy", "--model", "{notok}"], "tokenizer.json", r"re-download|re-convert|give"),
    "cuda without a GPU": (["--task", "toy", "--model", "tiny", "--device", "cuda"], "cuda", r"--device cpu"),
    "unknown device": (["--task", "toy", "--model", "tiny", "--device", "tpu"], "tpu", r"cpu"),
    "out is a file": (["--task", "toy", "--model", "tiny", "--out", "{afile}"], "afile", r"--out|another|choose"),
    "resume: not a run folder": (["--resume", "{notrun}"], "notrun", r"run\.py wrote|give"),
    "resume: missing folder": (["--resume", "/no/such/run"], "/no/such/run", r"run\.py wrote|give"),
    "resume: corrupt config.json": (["--resume", "{badcfg}"], "config.json", r"start it again|--out"),
    "resume: truncated checkpoint.pt": (["--resume", "{truncck}"], "checkpoint.pt", r"remove|start"),
    "resume: garbage checkpoint.pt": (["--resume", "{garbck}"], "checkpoint.pt", r"remove|start"),
    "resume: corrupt candidates.sqlite": (["--resume", "{baddb}"], "candidates.sqlite", r"cannot be resumed|start"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_exits_2_with_one_line(case, broken, tmp_path):
    args, names, fix = BAD_INPUT[case]
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    args = [a.format(**broken) for a in args]
    if "--resume" not in args and "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    r = run_cli(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, \
        f"exit {r.returncode}, {len(lines)} stderr lines:\n{r.stderr[-1500:]}"
    line = lines[0]
    assert line.startswith("error: ") and names in line, line
    assert re.search(fix, line), f"the line names no fix: {line}"
    if case == "unknown device":
        assert "corrupt" not in line, f"blames the model file for a bad --device: {line}"


# ---------------------------------------------------------------- non-finite rewards

NAN_TASK = '''"""Toy, but every other candidate scores NaN, +inf or -inf: a buggy task the engine must survive."""
from tasks import Score
from tasks.toy import Toy

BAD = [float("nan"), float("inf"), float("-inf")]


class NanToy(Toy):
    def reward(self, candidates):
        scores = Toy.reward(self, candidates)
        return [Score(BAD[i % 3], s.info) if i % 2 == 0 else s for i, s in enumerate(scores)]


TASK = NanToy
'''


def test_non_finite_rewards_never_reach_the_database_or_the_adapter(tmp_path):
    from safetensors.torch import load_file
    task_file, out = tmp_path / "nan_toy.py", str(tmp_path / "run")
    task_file.write_text(NAN_TASK)
    r = run_cli("--task", str(task_file), "--model", "tiny", "--budget", "16", "--out", out)
    assert r.returncode == 0, r.stderr[-1500:]
    conn = sqlite3.connect(os.path.join(out, "candidates.sqlite"))
    rows = conn.execute("SELECT key, reward, info FROM candidates WHERE oracle = 1").fetchall()
    conn.close()
    assert len(rows) == 16
    assert all(isinstance(rw, float) and math.isfinite(rw) for _, rw, _ in rows), rows
    flagged = [k for k, _, info in rows if "non-finite" in json.loads(info).get("error", "")]
    assert flagged, "the candidates the task scored NaN/inf say so in their info"
    state = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    assert all(torch.isfinite(v).all() for v in state.values())
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert all(torch.isfinite(v).all() for v in ck["lora"].values())
    for line in open(os.path.join(out, "metrics.jsonl")):
        m = json.loads(line)
        for k in ("best_reward", "group_reward_mean", "group_reward_max", "loss", "grad_norm"):
            assert m[k] is None or math.isfinite(m[k]), (k, m)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert math.isfinite(summary["best_reward"])
