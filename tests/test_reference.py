"""The group details of the authors' code (github dhdhagar/migrate), each matched here (shared/PAPER.md and the
docs/reference.md's "Not copied" section say where we differ): the NS anchor and OPRO list per task and method, one anchor
per step, the ARC baselines' 12 + 4 mix, the learning-rate schedule, and the warm start given for free."""
import pytest
import torch

import run
from database import Database, Row
from weights.default_model import tiny_model_path
from grpo import GRPOConfig, lr_factor
from model import load_model
from sampling import Sampler
from search import Search, SearchConfig
from tasks import load_task


def resolved(task, method, *extra, preset="paper"):
    """The configuration run.py would record (the task resolve built for it is closed: only the config is read)."""
    cfg, built, _ = run.resolve(run.parser().parse_args(["--task", task, "--method", method, "--preset", preset,
                                                      *extra]))
    built.close()
    return cfg


@pytest.mark.parametrize("task, method, anchor_k, opro_k, mix", [
    ("semantle", "migrate", 3, 5, (0, 0, 5)),
    ("semantle", "migrate-opro", 3, 5, (0, 0, 5)),
    ("semantle", "ns", 3, 10, (0, 0, 5)),
    ("semantle", "opro", 3, 10, (0, 0, 5)),
    ("molecule", "migrate", 1, 5, (2, 1, 2)),
    ("molecule", "migrate-opro", 1, 5, (2, 1, 2)),
    ("molecule", "ns", 3, 5, (0, 0, 5)),
    ("molecule", "opro", 3, 5, (0, 0, 5)),
    ("arc", "migrate", 1, 1, (11, 1, 4)),
    ("arc", "ns", 1, 1, (12, 0, 4)),  # the reference's inference.py: 12 task prompts + 4 NS per 16
    ("arc", "opro", 1, 1, (12, 0, 4)),
    ("arc", "random", 1, 1, (16, 0, 0)),
])
def test_anchor_and_opro_sizes_and_mix_per_task_and_method(task, method, anchor_k, opro_k, mix):
    cfg = resolved(task, method)
    assert (cfg["top_k_anchor"], cfg["opro_k"]) == (anchor_k, opro_k), cfg
    sc = SearchConfig(**{k: cfg[k] for k in ("method", "alpha", "beta", "gamma", "baseline_alpha")})
    assert sc.composition()[:3] == mix


def test_one_anchor_a_step_serves_every_ns_member(tmp_path):
    model, tok = load_model(tiny_model_path())
    task = load_task("toy", "migrate")
    db = Database(str(tmp_path / "c.sqlite"))
    db.add([Row(w, w, r, "on-policy", 0) for w, r in (("alpha", 0.9), ("beta", 0.8), ("gamma", 0.7), ("delta", 0.1))])
    sampler, seen = Sampler(model, tok), []
    generate = sampler.generate

    def spy(prompts, n=1, **kw):  # the real sampler, watched
        seen.append((prompts, n))
        return generate(prompts, n=n, **kw)
    sampler.generate = spy
    for k, allowed in ((1, {"alpha"}), (3, {"alpha", "beta", "gamma"})):
        cfg = SearchConfig(method="ns", alpha=0, beta=0, gamma=4, budget=100, max_new_tokens=3, top_k_anchor=k)
        search = Search(cfg, task, tok, sampler, db, seed=1)
        anchors = set()
        for _ in range(6):
            seen.clear()
            search.step()
            (prompts, counts), = seen
            assert len(prompts) == 1 and counts == [4], "one NS prompt, sampled gamma times"
            anchors |= {w for w in ("alpha", "beta", "gamma", "delta") if f"'{w}'" in tok.decode(prompts[0])}
        assert anchors <= allowed and (k == 1 or len(anchors) > 1), anchors
    db.close()


def test_linear_schedule_is_the_references():
    transformers = pytest.importorskip("transformers")
    cfg = GRPOConfig(lr=1.0, lr_schedule="linear", warmup_ratio=0.1, planned_steps=64)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=7, num_training_steps=64)
    want = []
    for _ in range(70):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        theirs.step()
    factor = lr_factor(cfg)
    assert [factor(n) for n in range(70)] == pytest.approx(want, abs=1e-12)
    assert lr_factor(GRPOConfig(lr_schedule="constant"))(1000) == 1.0
    assert resolved("arc", "migrate")["planned_steps"] == 64 and resolved("semantle", "migrate")["planned_steps"] == 200


def test_warm_start_is_given_for_free(tmp_path):
    model, tok = load_model(tiny_model_path())
    task = load_task("semantle", "computer")
    db = Database(str(tmp_path / "c.sqlite"))
    cfg = SearchConfig(method="random", alpha=2, beta=0, gamma=0, budget=3, max_new_tokens=8)
    search = Search(cfg, task, tok, Sampler(model, tok), db, seed=0)
    search.warm_start()
    given = db.scored()
    assert len(given) == 20 and db.oracle_calls() == 0 and search.calls_left == 3
    best_given = max(r.reward for r in given)
    db.add([Row("zebra", "z", 0.01, "on-policy", 1)])  # a worse first guess: the curve keeps the given best
    assert db.curve() == [(1, best_given)]
    db.close()


def test_failed_completions_leave_the_group_where_the_reference_drops_them(tmp_path):
    """The reference's Semantle never trains on a failed parse (it refills a step's words from the valid guesses);
    its ARC and molecules keep a failure in the group at reward 0. With failed="drop" no member the learner sees
    failed to parse, and the same seed's groups under "group" do hold such members (so this test can fail)."""
    from grpo import Learner
    from lora import inject_lora
    paper = [(resolved(t, "migrate")["failed"], resolved(t, "migrate")["repeats"]) for t in ("semantle", "arc", "molecule")]
    assert paper == [("drop", "keep"), ("group", "keep"), ("group", "keep")], paper
    cpu = resolved("semantle", "migrate", preset="cpu")
    assert (cpu["failed"], cpu["repeats"]) == ("group", "zero"), "[ours] the Semantle cpu preset trains both at 0"
    task = load_task("toy", "migrate")
    seen = {}
    for mode in ("group", "drop"):
        model, tok = load_model(tiny_model_path())
        torch.manual_seed(0)
        inject_lora(model, r=4, alpha=8)
        learner = Learner(model, GRPOConfig(lr=1e-3, mu=1))
        step = learner.step
        seen[mode] = []

        def spy(prompt, members):  # the real learner, watched
            seen[mode].append([task.parse(m.text).candidates for m in members])
            return step(prompt, members)
        learner.step = spy
        db = Database(str(tmp_path / f"{mode}.sqlite"))
        cfg = SearchConfig(method="grpo", alpha=8, beta=0, gamma=0, budget=1000, max_new_tokens=1, failed=mode)
        search = Search(cfg, task, tok, Sampler(model, tok), db, learner, seed=3, diagnose=0)
        for _ in range(4):
            search.step()
        db.close()
    failed = lambda groups: sum(not c for g in groups for c in g)
    assert failed(seen["group"]) > 0, "no failed parse in 4 groups: the test would check nothing"
    assert failed(seen["drop"]) == 0 and seen["drop"], seen["drop"]


@pytest.mark.parametrize("repeats", ["keep", "zero"])
def test_repeats_train_at_their_known_reward_or_at_zero(tmp_path, repeats):
    """A sampled completion of known candidates only: the reference trains it at its known reward (it scores
    every completion again); repeats="zero" trains it at 0 (the cpu presets' choice for Semantle). The database
    starts with the word of every one-token completion (at 0.5, as if guessed before), so every valid completion
    of one token is a repeat."""
    from grpo import Learner
    from lora import inject_lora
    task = load_task("toy", "migrate")
    model, tok = load_model(tiny_model_path())
    torch.manual_seed(0)
    inject_lora(model, r=4, alpha=8)
    learner = Learner(model, GRPOConfig(lr=1e-4, mu=1))
    step, seen, checked = learner.step, {}, []

    def spy(prompt, members):  # the real learner, watched
        for m in members:
            cands = task.parse(m.text).candidates
            if m.source == "on-policy" and cands and all(c in seen for c in cands):
                checked.append((m.reward, max(seen[c] for c in cands)))
        for m in members:
            for c in task.parse(m.text).candidates:
                seen.setdefault(c, m.reward)
        return step(prompt, members)
    learner.step = spy
    db = Database(str(tmp_path / "c.sqlite"))
    words = {c for i in range(tok.vocab_size) for c in task.parse(tok.decode([i])).candidates}
    db.add([Row(w, w, 0.5, "on-policy", 0) for w in sorted(words)])  # known rewards: any non-zero value
    seen.update(dict.fromkeys(words, 0.5))
    cfg = SearchConfig(method="grpo", alpha=8, beta=0, gamma=0, budget=1000, max_new_tokens=1, repeats=repeats)
    search = Search(cfg, task, tok, Sampler(model, tok), db, learner, seed=0, diagnose=0)
    for _ in range(4):
        search.step()
    db.close()
    assert checked, "no repeated completion reached the learner: the test would check nothing"
    if repeats == "zero":
        assert all(r == 0 for r, _ in checked), checked
    else:
        assert all(r == known == 0.5 for r, known in checked), checked
