"""The README and the research record in docs/ tell the truth about the repository: every relative link in them
points at a file or folder git tracks (an ignore rule once kept a committed-looking plot and its tables out of the
repository), and every link to a section names a heading that exists."""
import glob
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK = re.compile(r"\]\(([^)#\s]*)(#[^)\s]*)?\)")  # [text](path#anchor) and ![alt](path)


def tracked():
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except OSError:
        out = None
    if out is None or out.returncode != 0:
        pytest.skip("not a git checkout")
    return set(out.stdout.splitlines())


def documents():
    """README.md and every docs/*.md, as paths relative to the root."""
    docs = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
    assert docs, "docs/ holds no .md file: the research record has gone missing"
    return ["README.md"] + docs


def links(doc):
    """(target relative to the root or '' for the document itself, anchor or '') for each relative link in `doc`,
    resolved from the folder that holds it, as GitHub resolves them. Code blocks are skipped."""
    with open(os.path.join(ROOT, doc)) as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
    out = []
    for path, anchor in LINK.findall(text):
        if re.match(r"[a-z]+:", path):
            continue  # https:, mailto:
        target = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else ""
        out.append((target, (anchor or "")[1:]))
    return out


def test_every_relative_link_in_the_readme_and_docs_is_tracked():
    files = tracked()
    folders = {d for f in files for d in [os.path.dirname(f)] if d}
    folders |= {p for d in folders for p in [d.rsplit("/", i)[0] for i in range(d.count("/") + 1)]}
    checked, missing = 0, []
    for doc in documents():
        for target, _ in links(doc):
            if not target:
                continue
            checked += 1
            if target.startswith(".."):
                missing.append(f"{doc}: {target} (outside the repository)")
            elif target not in files and target not in folders:
                missing.append(f"{doc}: {target}")
    assert checked, "the README and docs link no file: this test would check nothing"
    assert not missing, f"links to files git does not track: {missing}"


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, each space a hyphen."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc):
    with open(os.path.join(ROOT, doc)) as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_every_link_to_a_section_names_a_heading_that_exists():
    checked, broken = 0, []
    for doc in documents():
        for target, anchor in links(doc):
            if not anchor or (target and not target.endswith(".md")):
                continue
            checked += 1
            if anchor not in anchors(target or doc):
                broken.append(f"{doc}: {target or doc}#{anchor}")
    assert checked, "the README and docs link no section: this test would check nothing"
    assert not broken, f"links to sections that do not exist: {broken}"


def test_no_committed_run_records_a_path_of_the_machine_it_ran_on():
    """A run's config.json records its folder ("out"); committed with the results it must name the folder inside the
    repository, not where one machine kept the repository (scripts/experiments.py once passed run.py an absolute path)."""
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
