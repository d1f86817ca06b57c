"""Fuzzing every task: >= 10,000 random, truncated and adversarial completions per task through `parse`,
and the valid candidates through `reward` (ARC: a fixed sample of 300 parsed programs plus hostile ones, in the
sandbox). The Task contract: parse never raises and explains every rejection; reward never raises and stays
finite inside reward_range, with JSON-serialisable info (the database stores it).
"""
import json
import math
import random
import time

import pytest

from tasks import Parsed, load_task
from tasks.arc_agi import fenced

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
