"""The README tells the truth about the repository: every relative link in it points at a file git tracks (an
ignore rule once kept a committed-looking plot and its tables out of the repository)."""
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tracked():
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except OSError:
        out = None
    if out is None or out.returncode != 0:
        pytest.skip("not a git checkout")
    return set(out.stdout.splitlines())


def test_every_relative_link_in_the_readme_is_tracked():
    files = tracked()
    with open(os.path.join(ROOT, "README.md")) as f:
        links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", f.read())
    local = sorted({l for l in links if not re.match(r"[a-z]+:", l)})
    assert local, "the README links no file: this test would check nothing"
    folders = {os.path.dirname(f) for f in files}
    missing = [l for l in local if l.rstrip("/") not in files and not any(
        d == l.rstrip("/") or d.startswith(l.rstrip("/") + "/") for d in folders)]
    assert not missing, f"README.md links files git does not track: {missing}"


def test_no_committed_run_records_a_path_of_the_machine_it_ran_on():
    """A run's config.json records its folder ("out"); committed with the results it must name the folder inside the
    repository, not where one machine kept the repository (experiments.py once passed run.py an absolute path)."""
    import json
    configs = [f for f in tracked() if f.startswith("results/") and f.endswith("config.json")]
    assert configs, "no committed run config: this test would check nothing"
    absolute = []
    for f in configs:
        with open(os.path.join(ROOT, f)) as fh:
            out = json.load(fh).get("out")
        if out is not None and (os.path.isabs(out) or re.match(r"[A-Za-z]:[\\/]", out)):
            absolute.append(f"{f}: {out}")
    assert not absolute, f"committed runs record an absolute path: {absolute}"
