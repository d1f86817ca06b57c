"""Tests for the Semantle task (tasks/semantle.py) and its encoder (embedder.py), with the real
all-MiniLM-L6-v2 weights and real words. Parity with sentence-transformers runs where it is installed."""
import os
import random

import pytest
import torch

from tasks.embedder import Bert, BertConfig, load_embedder, load_weights, model_dir
from tasks import TaskError, load_task
from tasks.semantle import PAPER_TARGETS, Semantle


@pytest.fixture(scope="module")
def task():
    return load_task("semantle", "computer")


@pytest.fixture(scope="module")
def emb():
    return load_embedder()


# --- parse: hand-written completions, exact expected candidates ---

@pytest.mark.parametrize("completion, expected", [
    ('["laptop", "keyboard"]', ["laptop", "keyboard"]),
    ('Sure! ```json\n["Laptop", "KEYBOARD"]\n``` Good luck.', ["laptop", "keyboard"]),
    ('["laptop", "keyboard", "mouse"]', ["laptop", "keyboard"]),  # K = 2 kept
    ('["ice cream", "r2d2", 7, "x", "monitor"]', ["monitor"]),
    ('["laptop", "laptop", "screen"]', ["laptop", "screen"]),
    ('["laptop.", " tablet "]', ["laptop", "tablet"]),  # wrapping punctuation and spaces are stripped
    ("['laptop', 'mouse']", ["laptop", "mouse"]),  # broken JSON: single quotes
    ("[laptop, mouse]", ["laptop", "mouse"]),  # broken JSON: bare words
    ('Here: ["laptop", "mou', ["laptop"]),  # cut off mid-word: the unclosed last item is dropped
    ('My guesses are "printer" and "scanner".', ["printer", "scanner"]),  # no list: quoted words
    ('[["laptop", "mouse"]]', ["laptop", "mouse"]),  # innermost list
    ('{"words": ["phone", "radio"]}', ["phone", "radio"]),
])
def test_parse_candidates(task, completion, expected):
    assert task.parse(completion).candidates == expected


@pytest.mark.parametrize("completion, error", [
    ("", "no JSON list"),
    ("laptop", "no JSON list"),
    ("[]", "empty list"),
    ('["ice cream", "42"]', "'ice cream' is not one word"),
    ("[1, 2]", "1 is not a string"),
])
def test_parse_errors(task, completion, error):
    p = task.parse(completion)
    assert p.candidates == [] and error in p.error, p


def test_parse_records_why_and_never_raises(task):
    assert task.parse('["laptop", "mouse"]').error is None
    assert "broken JSON" in task.parse("['laptop']").error
    assert "kept the first 2 of 3" in task.parse('["a1", "laptop", "mouse", "cable"]').error
    for junk in [None, 123, "[[[", "]]][[", '["' * 500, "\x00[\"\u00e9t\u00e9\"]", '["caf\u00e9"]']:
        p = task.parse(junk)
        assert p.candidates == [] and p.error, (junk, p)  # non-ASCII words are refused: the encoder strips accents


# --- task ids, presets, prompts ---

def test_task_ids():
    assert load_task("semantle").task_id == "computer"
    assert load_task("semantle", "Skillet").task_id == "skillet"
    sets = Semantle.named_sets()
    assert sets["paper"] == PAPER_TARGETS and len(PAPER_TARGETS) == 10
    assert len(sets["tuning"]) == 10 and not set(sets["tuning"]) & set(PAPER_TARGETS), "tune on other words"
    for bad in ["two words", "c3po", "x", "naïve", "-"]:
        with pytest.raises(TaskError, match="one word of 2-30 letters"):
            load_task("semantle", bad)


def test_one_word_per_completion_keeps_ten_words_a_step():
    one = load_task("semantle", "computer", options={"words": 1})
    assert one.preset.gamma == 10 and one.parse('["laptop", "mouse"]').candidates == ["laptop"]
    assert "exactly 1 new English word " in one.prompt()[0]["content"]
    with pytest.raises(TaskError, match="divide the 10 words"):
        load_task("semantle", "computer", options={"words": 3})


def test_preset_counts_completions():
    p, k = Semantle.preset, Semantle.words_per_completion
    assert (p.alpha, p.beta, p.gamma, k) == (0, 0, 5, 2) and p.group_size * k == 10  # 10 words a step
    assert (p.lr, p.lora_r, p.lora_alpha, p.mu, p.budget, p.top_k_anchor) == (5e-5, 64, 16, 2, 1000, 3)


def test_prompts(task):
    assert "JSON list of exactly 2" in task.prompt()[0]["content"]
    ns = task.neighbour_prompt("laptop", 0.7168)[0]["content"]
    assert '"laptop" scored 0.717' in ns
    opro = task.opro_prompt([("laptop", 0.72), ("banana", 0.39), ("car", 0.5)])[0]["content"]
    assert opro.index("banana: 0.390") < opro.index("car: 0.500") < opro.index("laptop: 0.720"), opro
    # What varies comes last: the task prompt is a prefix of the others, so a step's prompts share it.
    assert ns.startswith(task.prompt()[0]["content"]) and opro.startswith(task.prompt()[0]["content"])
    assert "computer" not in ns + opro, "the target must stay hidden"


# --- rewards with the real encoder ---

def test_exact_match_solves(task):
    (s,) = task.reward(task.parse('["Computer"]').candidates)
    assert s.reward == 1.0 and task.solved(s) and s.info["exact"]


def test_related_beats_unrelated(task):
    laptop, banana = task.reward(["laptop", "banana"])  # measured: 0.717 and 0.391
    assert laptop.reward > banana.reward + 0.2, (laptop, banana)
    assert 0.6 < laptop.reward < 0.8 and not task.solved(laptop)
    pan, violin = load_task("semantle", "skillet").reward(["pan", "violin"])  # measured: 0.667 and 0.304
    assert pan.reward > violin.reward + 0.2, (pan, violin)


def test_rewards_in_range(task):
    scores = task.reward(["keyboard", "democracy", "teacup", "polymers", "of"])
    lo, hi = task.reward_range
    for s in scores:
        assert lo <= s.reward < hi and abs(s.reward - max(s.info["similarity"], 0.0)) < 1e-6, s
    assert task.reward([]) == []


def test_warm_start(task):
    words = task.warm_start()
    assert len(words) == 20 == len(set(words)) and words == task.warm_start()  # deterministic per seed
    assert all(w.isascii() and w.isalpha() and w.islower() and len(w) >= 4 for w in words), words
    assert words != Semantle("computer", seed=1).warm_start()
    # A target that the seed would draw is never offered as a warm-start guess.
    drawn = Semantle(words[0], seed=0).warm_start()
    assert words[0] not in drawn and len(set(drawn)) == 20


# --- encoder ---

def test_padding_does_not_change_embeddings(emb):
    short, long = "What is a cat?", "What is a very long sentence with many many words in it, really?"
    alone = emb.encode([short])
    batched = emb.encode([short, long])
    assert torch.allclose(alone[0], batched[0], atol=1e-5)
    assert torch.allclose(batched.norm(dim=1), torch.ones(2), atol=1e-5)


def test_strict_weight_loading(tmp_path):
    from safetensors.torch import save_file
    cfg = BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=8)
    state = Bert(cfg).state_dict()
    path = str(tmp_path / "model.safetensors")
    save_file({**state, "pooler.dense.bias": torch.zeros(8)}, path)  # known-unused keys are skipped
    load_weights(Bert(cfg), path)
    state.pop("encoder.layer.0.output.dense.weight")
    save_file({**state, "encoder.layer.0.extra": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"missing \['encoder.layer.0.output.dense.weight'\], "
                                         r"unexpected \['encoder.layer.0.extra'\]"):
        load_weights(Bert(cfg), path)


@pytest.mark.slow
def test_parity_with_sentence_transformers(emb):
    st = pytest.importorskip("sentence_transformers")
    sentences = ["What is a computer?", "What is a polyethylene?", "x",
                 "A much longer sentence about skillets, cement and airbases, with punctuation; and more words.",
                 " ".join(random.Random(0).choices(["machete", "meatloaf", "mob", "filament"], k=300))]  # > 256 tokens
    theirs = st.SentenceTransformer(model_dir(), device="cpu").encode(sentences, convert_to_tensor=True)
    ours = emb.encode(sentences)
    assert ours.shape == theirs.shape == (5, 384)
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_model_dir_has_files():
    d = model_dir()
    assert all(os.path.exists(os.path.join(d, f)) for f in ("config.json", "model.safetensors", "tokenizer.json"))
