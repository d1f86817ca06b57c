"""The README's "Search your own problem" task file runs as printed: taken from the README, written to a folder of
its own, and searched by run.py on the tiny random model."""
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_task():
    """The first ```python block after the "Search your own problem" heading."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    assert "## Search your own problem" in text, "the README has lost its own-problem section"
    m = re.search(r"```python\n(.*?)```", text.split("## Search your own problem", 1)[1], flags=re.S)
    assert m, "the own-problem section has no python block"
    return m.group(1)


def test_the_readme_task_file_is_short_and_imports_only_tasks():
    code = readme_task()
    assert len(code.splitlines()) <= 45, "the README's task file is meant to be short"
    imports = re.findall(r"^\s*(?:from\s+(\S+)\s+import|import\s+(\S+))", code, flags=re.M)
    assert [a or b for a, b in imports] == ["tasks"], f"it imports only from tasks: {imports}"
    assert re.search(r"^TASK = ", code, flags=re.M), "a task file names its class TASK"


def test_the_readme_task_file_runs(tmp_path):
    task = tmp_path / "my_task.py"
    task.write_text(readme_task())
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "run.py", "--task", str(task), "--task-id", "learn", "--model", "tiny",
                          "--budget", "6", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["oracle_calls"] == 6, summary
