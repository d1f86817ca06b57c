"""Semantle: find a hidden English word, scored by the semantic similarity of each guess to it.

Follows shared/PAPER.md ("Rewards", Semantle; "Per-task settings"). The reward of a guess is the cosine
similarity between the embeddings of "What is a {target}?" and "What is a {guess}?"; an exact match
(lower-cased) scores 1.0 and solves the problem. The reference embedded with SimCSE RoBERTa-large; we use
all-MiniLM-L6-v2 through our own encoder (embedder.py).

[ours] One completion is one JSON list of K = 2 words (the reference packed a step's words two per completion).
Each valid word is one candidate and one oracle call, so the budget counts guessed words, as in the paper.

reward_range is (0, 1) and cosines below 0 are clipped to 0: over 2,000 random vocabulary words x the ten
paper targets the cosine ran from -0.042 to 0.787 (median ~0.19) and 0.12% of pairs were negative. The
engine masks members with reward exactly 0 out of the loss, so those rare words are masked too; a
non-exact guess is capped just below 1.0, so only the exact word solves.

Worked example (target "computer", the default):
    completion '```json\\n["Laptop", "keyboard", "ice cream"]\\n```'
    -> parse -> candidates ["laptop", "keyboard"], error "'ice cream' is not one word of 2-30 letters a-z"
    -> reward: cos("What is a computer?", "What is a laptop?") = 0.717, keyboard 0.604
    completion '["computer"]' -> reward 1.0, solved.
"""
import json
import random
import re
from dataclasses import replace

from tasks import Parsed, Preset, Score, Task, TaskError, Tuned

PAPER_TARGETS = ["airbase", "birthstone", "cement", "computer", "filament", "machetes", "meatloaf", "mob",
                 "polyethylene", "skillet"]
TUNING_TARGETS = ["apple", "river", "chair", "doctor", "garden", "music", "window", "bread", "ocean", "teacher"]
DEFAULT_TARGET = "computer"  # a paper target, and a common word a small model can plausibly reach
SENTENCE = "What is a {}?"  # the paper's template for both target and guess
WORD = re.compile(r"[a-z]{2,30}")
INNER_LIST = re.compile(r"\[[^\[\]]*\]")  # innermost bracketed span: tolerates text and code fences around it
STRIP = " \t\r\n.,;:!?'\"`*"  # punctuation a model wraps around a word ("laptop." or 'laptop')
NEAR_ONE = 1.0 - 1e-6  # ceiling for non-exact guesses: reward 1.0 is reserved for the target itself
WARM_START = 20  # guesses scored before step 1, as the reference seeded its database
WORDS_PER_STEP = 10  # the reference's Semantle step: gamma = 10 words
MAX_REASONS = 3  # keep Parsed.error one readable line when a model emits a long list of junk


class Semantle(Task):
    name = "semantle"
    reward_range = (0.0, 1.0)
    words_per_completion = 2  # K: words asked for, and kept, per completion
    # Reference: 0/0/10 words a step, packed 2 per completion; ours counts completions (5 x 2 words).
    preset = Preset(alpha=0, beta=0, gamma=5, lr=5e-5, lora_r=64, lora_alpha=16, mu=2, steps=100, budget=1000,
                    max_new_tokens=64, top_k_anchor=3, opro_k=5, ns_baseline_k=3, opro_baseline_k=10,
                    # The reference never trains on a failed parse (it refills the step's words from the valid
                    # ones) and trains a repeated word at its score: failed="drop", repeats="keep". [ours] the cpu
                    # preset trains both at 0: kept at their known reward, repeats were trained up until MiGrATe
                    # and GRPO sampled nothing else (docs/results.md, "The cpu preset"); at 0 in the group mean, what is
                    # new and valid is pushed up and nothing else is.
                    failed="drop",
                    tuned=(
                        # [ours] lr and scale chosen by scripts/sweep.py on the "tuning" targets (docs/results.md, "The cpu preset"):
                        # at the paper's 5e-5 and scale 0.25 a 200-guess run moves the policy by KL 0.001 a token,
                        # nothing; at 2e-3 and scale 1 it collapses onto one word; 5e-4 and scale 1 raises the
                        # on-policy reward. Failures and repeats train at 0, or MiGrATe collapsed onto known words.
                        Tuned(dict(budget=200, max_new_tokens=24, lr=5e-4, lora_alpha=64, lr_schedule="constant",
                                   failed="group", repeats="zero"),
                              "scripts/sweep.py on the Semantle tuning targets (results/sweep/semantle)"),
                        # [ours] MiGrATe drifts onto nonsense stems without a pull to the base policy; 0.1 was chosen
                        # on tuning targets (results/sweep/semantle-500) and measured on the paper's ten at budget 500,
                        # three seeds: migrate-kl0.1 - migrate +0.075 [0.029, 0.119] in best reward (30 pairs). For
                        # GRPO the same pull cost -0.056 [-0.087, -0.027], so only MiGrATe carries it.
                        Tuned(dict(kl_coef=0.1), "the KL pull chosen on tuning targets (results/sweep/semantle-500), "
                              "+0.075 [0.029, 0.119] over no pull on the paper's ten (results/experiments/semantle)",
                              methods=("migrate", "migrate-opro")),
                    ))
    stop_strings = ("]",)  # the answer is complete once its list closes; the sampler keeps the ']'
    answer_prefix = '["'  # [ours] starting the list for the model: 10/16 parsable answers from SmolLM2, not 4/16

    def __init__(self, task_id=None, seed=0, words=2):
        if words not in (1, 2, 5, 10):
            raise TaskError(f"semantle option words (per completion) must divide the 10 words of a step: 1, 2, 5 "
                            f"or 10, got {words!r}")
        # [ours] K words per completion, 10 // K completions a step: the same 10 words a step either way.
        self.words_per_completion = words
        self.preset = replace(Semantle.preset, gamma=WORDS_PER_STEP // words)
        target = (task_id or DEFAULT_TARGET).strip().lower()
        if not WORD.fullmatch(target):
            raise TaskError(f"semantle task id must be one word of 2-30 letters a-z (e.g. '{DEFAULT_TARGET}' "
                            f"or any of the paper's: {', '.join(PAPER_TARGETS)}), got '{task_id}'")
        super().__init__(target, seed)
        self._target_vec = None  # embedded on first reward call, so parsing and prompts need no model

    @classmethod
    def named_sets(cls):
        # "tuning": [ours] everyday nouns, disjoint from the paper's ten, for choosing the cpu preset; results
        # are reported on "paper", which no tuning touched.
        return {"paper": list(PAPER_TARGETS), "tuning": list(TUNING_TARGETS)}

    # --- prompts: short, because the default model is SmolLM2-135M-Instruct ---
    # [ours] What varies (the anchor, the history) comes last, so every prompt of a step shares the rest and
    # the sampler prefills it once. The format names no example words: SmolLM2 copied a '["...", "..."]'
    # example 14% of the time.

    def _format(self):
        k = self.words_per_completion
        return f"Answer with a JSON list of exactly {k} new English word{'s' * (k > 1)} and nothing else."

    def _intro(self):
        return ("I am thinking of a secret English word. Each guess scores how close its meaning is to the secret "
                f"word; the secret word itself scores 1.0. Guess it. {self._format()}")

    def prompt(self):
        return [{"role": "user", "content": self._intro()}]

    def neighbour_prompt(self, candidate, reward):
        return [{"role": "user", "content": f"{self._intro()} Use words related to my guess below that could "
                                            f"score higher.\nMy guess: \"{candidate}\" scored {reward:.3f}."}]

    def opro_prompt(self, history):
        lines = "\n".join(f"{c}: {r:.3f}" for c, r in sorted(history, key=lambda cr: cr[1]))
        return [{"role": "user", "content": f"{self._intro()} Propose better guesses than my past ones below "
                                            f"(worst to best, with their scores), not in the list.\n{lines}"}]

    # --- completion -> candidates ---

    def parse(self, completion):
        try:
            items, note = _list_items(completion if isinstance(completion, str) else "")
        except Exception as e:  # parse never raises; a bug here must not stop a search
            return Parsed(error=f"parse failed: {type(e).__name__}: {e}")
        words, reasons = [], []
        for item in items:
            if not isinstance(item, str):
                reasons.append(f"{json.dumps(item)[:40]} is not a string")
                continue
            w = item.strip(STRIP).lower()
            if not WORD.fullmatch(w):
                reasons.append(f"'{item.strip()[:40]}' is not one word of 2-30 letters a-z")
            elif w in words:
                reasons.append(f"'{w}' repeated")
            else:
                words.append(w)
        k = self.words_per_completion
        if len(words) > k:  # the budget per step is set by K: extra words would spend it silently
            reasons.insert(0, f"kept the first {k} of {len(words)} words")
            words = words[:k]
        if note:
            reasons.insert(0, note)
        if not items and not note:
            reasons.append("empty list")
        dropped = len(reasons) - MAX_REASONS
        error = "; ".join(reasons[:MAX_REASONS]) + (f"; and {dropped} more" if dropped > 0 else "")
        return Parsed(words, error or None)

    # --- candidates -> rewards ---

    @property
    def embedder(self):
        from tasks.embedder import load_embedder  # one shared encoder per process, loaded on first use
        return load_embedder()

    def reward(self, candidates):
        if not candidates:
            return []
        try:
            if self._target_vec is None:
                self._target_vec = self.embedder.encode([SENTENCE.format(self.task_id)])[0]  # (C,)
            vecs = self.embedder.encode([SENTENCE.format(c) for c in candidates], batch_size=len(candidates))
            sims = (vecs @ self._target_vec).tolist()  # (N,) cosines: rows are unit vectors
        except Exception as e:  # reward never raises: the whole batch scores the bottom of the range
            return [Score(0.0, {"error": f"embedding failed: {type(e).__name__}: {e}"}) for _ in candidates]
        scores = []
        for c, s in zip(candidates, sims):
            if c.lower() == self.task_id:
                scores.append(Score(1.0, {"similarity": 1.0, "exact": True}))
            else:
                scores.append(Score(min(max(s, 0.0), NEAR_ONE), {"similarity": round(s, 6)}))
        return scores

    def render(self, candidate):
        return json.dumps([candidate])

    def warm_start(self):
        """20 distinct words from the encoder's own vocabulary (offline), drawn with Random(seed); never the
        target. Whole words only: lower-case a-z, at least 4 letters (no '##' pieces, no [unused] slots)."""
        vocab = self.embedder.tok.get_vocab()
        words = sorted(w for w in vocab if len(w) >= 4 and WORD.fullmatch(w) and w != self.task_id)
        return random.Random(self.seed).sample(words, WARM_START)

    def evaluate(self, scored):
        out = super().evaluate(scored)
        if scored:  # the paper's metrics are solved-or-not and the best similarity; name the best word too
            word, best = max(scored, key=lambda cs: cs[1].reward)
            out["best_word"], out["best_similarity"] = word, best.info.get("similarity", best.reward)
        out["target"] = self.task_id
        return out


def _list_items(text: str) -> tuple[list, str | None]:
    """The items of the first JSON list in `text`, or a best-effort reading of a broken one, and a note saying
    which fallback was used (None when the JSON was valid)."""
    spans = INNER_LIST.findall(text)
    for span in spans:
        try:
            value = json.loads(span)
        except ValueError:
            continue
        return value, None
    if spans:  # e.g. ['laptop', 'mouse'] (single quotes) or [laptop, mouse]
        body, note = spans[0][1:-1], "broken JSON list; read its comma-separated items"
    elif "[" in text:  # a list cut off by max_new_tokens: ["laptop", "mou
        body, note = text[text.index("[") + 1:], "unclosed JSON list; read its comma-separated items"
        parts = [p.strip() for p in re.split(r"[,\n]", body)]
        if parts and not parts[-1].endswith(("\"", "'")):
            parts = parts[:-1]  # the last item may be a word cut in half ("mou"): only closed items count
        return [p for p in parts if p], note
    else:
        quoted = re.findall(r"\"([^\"\n]{1,40})\"", text)
        return quoted, ("no JSON list; read the quoted words" if quoted else "no JSON list")
    return [s for s in (p.strip() for p in re.split(r"[,\n]", body)) if s], note


TASK = Semantle
