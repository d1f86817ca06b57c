"""A forker's first hour: a new task is one short file that uses only what tasks/__init__.py
documents, and both run.py and scripts/experiments.py take it by path, from a folder other than the project's."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LETTERS = '''"""Name a word that shares letters with a hidden word."""
import re

from tasks import Parsed, Preset, Score, Task


class Letters(Task):
    name = "letters"
    preset = Preset(alpha=2, beta=1, gamma=1, lr=1e-3, lora_r=4, lora_alpha=8, budget=12, max_new_tokens=8)

    def prompt(self):
        return [{"role": "user", "content": "Name a word."}]

    def neighbour_prompt(self, candidate, reward):
        return [{"role": "user", "content": f"'{candidate}' scored {reward:.2f}. Name a similar word."}]

    def parse(self, completion):
        m = re.search(r"[a-z]+", completion.lower())
        return Parsed([m.group(0)]) if m else Parsed(error="no word")

    def reward(self, candidates):
        hidden = set(self.task_id or "search")
        return [Score(max(0.01, len(hidden & set(c)) / len(hidden))) for c in candidates]


TASK = Letters
'''


def test_a_task_file_works_with_run_and_experiments_given_by_path(tmp_path):
    (tmp_path / "letters.py").write_text(LETTERS)
    assert len(LETTERS.splitlines()) <= 100, "a task is one short file"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), "--task", "letters.py", "--task-id", "learn",
                          "--model", "tiny", "--budget", "6", "--out", "single"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert '"oracle_calls": 6' in (tmp_path / "single" / "summary.json").read_text()

    exp = subprocess.run([sys.executable, "-m", "scripts.experiments", "--tasks", "letters.py:search,learn",
                          "--methods", "random", "grpo", "--seeds", "0", "--budget", "6", "--jobs", "2", "--out", "exp",
                          "--", "--model", "tiny"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=ROOT))  # the project's scripts, from another folder
    assert exp.returncode == 0 and "FAILED" not in exp.stderr, exp.stderr[-2000:]
    runs = sorted(p.name for p in (tmp_path / "exp" / "runs").iterdir() if p.is_dir())
    assert runs == ["letters-learn-grpo-s0", "letters-learn-random-s0", "letters-search-grpo-s0",
                    "letters-search-random-s0"], "run folders are named by the task file's name, under --out"
    assert all((tmp_path / "exp" / "runs" / r / "summary.json").exists() for r in runs), "every run finished"
    text = (tmp_path / "exp" / "results.md").read_text()
    assert "### letters: 2 problem(s) x 1 seed(s), budget 6" in text, text[:300]
    assert "| grpo − random | 2 |" in text and "random − grpo" not in text, "each pair of methods once"
    assert (tmp_path / "exp" / "letters.png").exists() and (tmp_path / "exp" / "letters-learning.png").exists()
    assert sorted(os.listdir(tmp_path)) == ["exp", "letters.py", "single"], "nothing written beside the task file"
