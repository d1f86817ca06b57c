"""Bad input, from users and from tasks: each bad command line must exit 2 with exactly one stderr line
that names the problem and the fix, no traceback; a task that returns non-finite rewards must not reach the
database, the metrics or the adapter with them. The real command line, in its own process.
"""
import json
import math
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys

import pytest
import torch

from weights.default_model import tiny_model_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # the tiny model gains nothing from threads on a shared machine


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=ENV)


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
    "task ids naming nothing": (["--task", "toy", "--model", "tiny", "--task-ids", " , "], "names no problem",
                                r"commas|named set"),
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
    "int8 copies of a model too narrow to pack": (["--task", "toy", "--model", "tiny", "--sample-weights", "int8"],
                                                  "--sample-weights int8", r"use float32"),
    "int8 copies of a group over 64 rows": (["--task", "toy", "--model", "tiny", "--sample-weights", "int8",
                                             "--group-size", "65"], "65", r"smaller group or float32"),
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


def test_refused_decode_copies_leave_the_run_folder_free(tmp_path):
    # The tiny model is too narrow for packed copies, which only the loaded model can tell: the refusal comes
    # after the run folder was made, and must not leave a config that blocks the same --out with float32.
    out = str(tmp_path / "run")
    r = run_cli("--task", "toy", "--model", "tiny", "--sample-weights", "int8", "--budget", "2", "--out", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert not os.path.exists(os.path.join(out, "config.json"))
    r = run_cli("--task", "toy", "--model", "tiny", "--budget", "2", "--out", out)
    assert r.returncode == 0, r.stderr[-1500:]
    assert json.load(open(os.path.join(out, "config.json")))["sample_weights"] == "float32"


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


# ---------------------------------------------------------------- bad input to the benchmarks


def test_bench_step_on_a_model_that_trains_no_step_says_so_in_one_line():
    """scripts/bench.py step resolves --model as run.py does (it used to pass 'tiny', or an embedded model's name, to the
    loader as a folder). A random model's guesses are never words, so its run trains no step: the benchmark must say
    that and exit 2, not fail on an assert. run.py's own progress lines come before it on stderr."""
    r = subprocess.run([sys.executable, "-m", "scripts.bench", "step", "--model", "tiny", "--budget", "15", "--kl-coefs", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 2 and "Traceback" not in r.stderr, f"exit {r.returncode}:\n{r.stderr[-1500:]}"
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: scripts/bench.py step: the run trained no step") and "raise --budget" in last, last


def test_bench_step_whose_run_fails_passes_the_error_on_without_a_traceback():
    """When the run.py that scripts/bench.py step launches fails (here on --budget 0), its one-line error is what the user
    reads, followed by one line from the benchmark and run.py's exit status; it used to end in a
    CalledProcessError traceback."""
    r = subprocess.run([sys.executable, "-m", "scripts.bench", "step", "--model", "tiny", "--budget", "0", "--kl-coefs", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 2 and "Traceback" not in r.stderr, f"exit {r.returncode}:\n{r.stderr[-1500:]}"
    lines = r.stderr.strip().splitlines()
    assert lines[-2].startswith("error: ") and "--budget must be at least 1" in lines[-2], lines[-2:]
    assert lines[-1] == "error: scripts/bench.py step: the measured run.py exited with status 2 (its error is above)", lines[-1]


def test_bench_repack_on_a_model_without_packs_says_so_in_one_line():
    """`tiny`'s products are narrower than packing.PACK_MIN, so its decoder never packs: scripts/bench.py repack has
    nothing to time and must say so in one line (it used to end in an AssertionError traceback)."""
    r = subprocess.run([sys.executable, "-m", "scripts.bench", "repack", "--model", "tiny", "--batches", "2", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 2 and "Traceback" not in r.stderr, f"exit {r.returncode}:\n{r.stderr[-1500:]}"
    assert r.stderr.strip().splitlines() == [
        "error: scripts/bench.py repack: this model decodes without packed weights on this machine (too narrow, not "
        "float32, or no room for the copy): nothing to repack"], r.stderr


@pytest.mark.parametrize("argv", [["-m", "scripts.bench", "sample"], ["-m", "scripts.bench", "grpo"],
                                  ["-m", "scripts.bench", "step"], ["-m", "scripts.bench", "repack"],
                                  ["-m", "scripts.stepprofile"]])
def test_benchmarks_given_a_model_that_does_not_exist_say_so_in_one_line(argv):
    """The benchmarks take --model as run.py does, and a wrong one gets run.py's one-line error and exit 2 (scripts/bench.py
    used to end in a ModelError traceback, scripts/stepprofile.py in an AssertionError after run.py's line)."""
    r = subprocess.run([sys.executable, *argv, "--model", "no-such-model"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 2 and "Traceback" not in r.stderr, f"exit {r.returncode}:\n{r.stderr[-1500:]}"
    lines = r.stderr.strip().splitlines()
    assert lines[0] == "error: model folder 'no-such-model' does not exist; give a local Hugging Face folder with " \
                       "--model", lines
    assert len(lines) == 1 or lines[1].startswith("error: scripts/stepprofile.py: the profiled run.py exited with status 2"), lines
