"""Toy task: guess a hidden word, scored instantly by edit distance. It exists so that the whole MiGrATe loop
runs in seconds on a tiny random model (tests, `python run.py --task toy --model tiny`).

Worked example (task id "migrate", the default):
    completion "Migrant, maybe?" -> parse -> candidates ["migrant"] (first run of 1-20 letters, lower-cased)
    -> reward 1 - levenshtein("migrant", "migrate") / 7 = 1 - 2/7 = 0.714
    completion "migrate" -> reward 1.0, solved.
"""
import re

from tasks import Parsed, Preset, Score, Task, TaskError, Tuned

WORD = re.compile(r"[a-zA-Z]{1,20}")  # any run of letters: even a random tiny model finds candidates


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


class Toy(Task):
    name = "toy"
    preset = Preset(alpha=2, beta=1, gamma=1, lr=1e-3, lora_r=8, lora_alpha=16, mu=2, steps=16, budget=64,
                    max_new_tokens=12, source="ours: a loop that runs in seconds (no paper setting exists)",
                    tuned=(Tuned(dict(budget=32, lr_schedule="constant"), "ours: half the budget, in seconds on a CPU"),))

    def __init__(self, task_id=None, seed=0):
        task_id = task_id or "migrate"
        if not re.fullmatch(r"[a-z]{3,20}", task_id):
            raise TaskError(f"toy task id must be a lower-case word of 3-20 letters, got '{task_id}'")
        super().__init__(task_id, seed)

    def prompt(self):
        return [{"role": "user", "content": "Guess my hidden word. Answer with one lower-case word."}]

    def neighbour_prompt(self, candidate, reward):
        return [{"role": "user", "content": f"Guess my hidden word. '{candidate}' scored {reward:.2f} out of 1. "
                                            "Answer with one similar lower-case word that could score higher."}]

    def opro_prompt(self, history):
        lines = "\n".join(f"{c}: {r:.2f}" for c, r in history)
        return [{"role": "user", "content": f"Guess my hidden word. Past guesses and scores, worst to best:\n"
                                            f"{lines}\nAnswer with one new lower-case word that could score higher."}]

    def parse(self, completion):
        m = WORD.search(completion)
        return Parsed([m.group(0).lower()]) if m else Parsed(error="no letters")

    def reward(self, candidates):
        t = self.task_id
        return [Score(1 - levenshtein(c, t) / max(len(c), len(t)), {"distance": levenshtein(c, t)})
                for c in candidates]


TASK = Toy
