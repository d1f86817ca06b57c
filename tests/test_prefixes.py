"""Answer prefixes (the assistant's first words, written for the model before it samples): they never end in
whitespace or in part of a token, and the real default model continues them in the answer format.

Why it matters: BPE tokenizers merge a newline with the indentation after it, so a prefix ending in a bare
newline left SmolLM2 almost no way to start an indented body (0.1% of its next-token mass), and 97% of its
ARC programs did not compile.
"""
import re

import pytest
import torch

from weights.default_model import default_model_path
from model import load_model
from tasks import load_task

# task -> (task id, a typical answer body after the prefix, a candidate for the NS prompt, the tokens that can
# begin the body)
CASES = {
    "arc": ("66e6c45b", "\n    return grid\n```", "def transform(grid):\n    return grid\n", r"\n[ \t]"),
    "semantle": ("computer", 'laptop", "mouse"]', "laptop", r"[A-Za-z]"),
    "molecule": ("qed", 'CCO"]', "CCO", r"(Cl|Br|[BCNOPSFIcnops\[])"),
}


@pytest.fixture(scope="module")
def smollm():
    return load_model(default_model_path())


@pytest.mark.parametrize("name", CASES)
def test_prefix_ends_on_a_token_boundary(name, smollm):
    _, tok = smollm
    tid, body, _, _ = CASES[name]
    task = load_task(name, tid)
    prefix = task.answer_prefix
    assert prefix and prefix == prefix.rstrip(), f"{name}: the prefix ends in whitespace: {prefix!r}"
    head = tok.apply_chat_template(task.prompt()) + prefix
    alone, whole = tok.encode(head), tok.encode(head + body)
    assert whole[:len(alone)] == alone, \
        f"{name}: the prefix's last token {tok.decode(alone[-1:])!r} is part of a longer one in a real answer"
    task.close()


@pytest.mark.parametrize("name", CASES)
def test_the_model_continues_the_prefix_in_the_format(name, smollm):
    model, tok = smollm
    tid, _, anchor, start = CASES[name]
    task = load_task(name, tid)
    begins = torch.tensor([bool(re.match(start, tok.decode([i]))) for i in range(model.config.vocab_size)])
    for msgs in (task.prompt(), task.neighbour_prompt(anchor, 0.5)):
        ids = tok.encode(tok.apply_chat_template(msgs) + task.answer_prefix)
        with torch.no_grad():
            p = model(torch.tensor([ids]))[0, -1].softmax(-1)
        assert p[begins].sum() > 0.5, f"{name}: {float(p[begins].sum()):.3f} of the next-token mass begins an answer"
    task.close()
