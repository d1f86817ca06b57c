"""K problems over one base model (together.py): each problem draws the samples it draws alone, gets the loss and the
gradient it gets alone, and never a gradient from another's loss; on the real tiny model and SmolLM2."""
import pytest
import torch

from grpo import GRPOConfig, Learner
from lora import lora_modules, lora_parameters
from model import load_model
from sampling import Rollout, Sampler
from together import Together, TogetherStep, learn_together, problem_model
from weights.default_model import default_model_path, tiny_model_path

TARGETS = ("q_proj", "v_proj")


@pytest.fixture(scope="module")
def tiny():
    return load_model(tiny_model_path())


def problems(base, seeds, r=4, alpha=8):
    """A problem model per seed, its adapter moved off zero as training would (B = 0 changes nothing)."""
    out = []
    for s in seeds:
        m = problem_model(base, s, r, alpha, TARGETS)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(s + len(name))) * 0.05)
        out.append(m)
    return out


def test_problem_models_share_the_base_and_draw_their_adapter_as_a_run_alone():
    base, _ = load_model(tiny_model_path())
    a, b = (problem_model(base, s, 4, 8, TARGETS) for s in (0, 1))
    shared = {n: p for n, p in base.named_parameters()}
    for m in (a, b):
        for n, p in m.named_parameters():
            if "lora_" not in n:
                assert p is shared[n.replace(".base_layer", "")], f"{n} is a copy, not the base's weight"
    solo, _ = load_model(tiny_model_path())
    torch.manual_seed(1)  # as run.py: the seed, then inject_lora
    from lora import inject_lora
    inject_lora(solo, 4, 8, TARGETS)
    want = {n: p for n, p in solo.named_parameters() if "lora_" in n}
    assert all(torch.equal(p, want[n]) for n, p in b.named_parameters() if "lora_" in n)
    assert not torch.equal(a.model.layers[0].self_attn.q_proj.lora_A.weight,
                           b.model.layers[0].self_attn.q_proj.lora_A.weight)


def sample_both(base, tok, models, prompts, counts, max_new, stop_ids, temperature=1.0, fast=False):
    """Each problem's samples alone (its own model) and together (one batch), from its own generator seed; fast:
    through fast/together.py's step (prefixes once per problem, batched adapter products, blocked draw)."""
    from fast.together import FastTogether, FastTogetherStep
    alone = [Sampler(m, tok).generate(p, n=c, max_new_tokens=max_new, stop_ids=stop_ids, temperature=temperature,
                                      generator=torch.Generator().manual_seed(100 + k))
             for k, (m, p, c) in enumerate(zip(models, prompts, counts))]
    together = (FastTogether if fast else Together)(base, len(models), TARGETS)
    for k, m in enumerate(models):
        together.put(k, m)
    step = (FastTogetherStep if fast else TogetherStep)(together)
    step.prompt_slots = [k for k, p in enumerate(prompts) for _ in p]
    gens = [torch.Generator().manual_seed(100 + k) for k in range(len(models))]
    outs = Sampler(together.model, tok, step).generate(
        [q for p in prompts for q in p], n=[c for cs in counts for c in cs], max_new_tokens=max_new,
        stop_ids=stop_ids, temperature=temperature, generator=[gens[k] for k in step.prompt_slots])
    split, at = [], 0
    for a in alone:
        split.append(outs[at:at + len(a)])
        at += len(a)
    return alone, split


@pytest.mark.parametrize("fast", [False, True])
def test_sampled_together_each_problem_draws_what_it_draws_alone(tiny, fast):
    base, tok = tiny
    models = problems(base, [0, 1, 2])
    # Problems 0 and 2 have prompts that share a prefix (of different lengths), problem 1 a single prompt.
    prompts = [[tok.encode("hello"), tok.encode("hello, a longer second prompt")], [tok.encode("other problem")],
               [tok.encode("the same words first, x"), tok.encode("the same words first, y y"),
                tok.encode("the same words first, then the third one, longest of all the prompts")]]
    counts = [[3, 2], [4], [1, 2, 2]]
    alone, together = sample_both(base, tok, models, prompts, counts, 30, stop_ids=list(range(0, 259, 29)),
                                  fast=fast)
    assert any(o.stop_reason == "stop_token" for a in alone for o in a), "rows stop early: the batch shrinks"
    for a, t in zip(alone, together):
        assert [o.ids for o in a] == [o.ids for o in t]
        assert max(abs(x - y) for o, r in zip(a, t) for x, y in zip(o.logprobs, r.logprobs)) < 1e-5
    assert [o.ids for o in alone[0]] != [o.ids for o in alone[1]][:len(alone[0])]


@pytest.mark.parametrize("fast", [False, True])
def test_smollm2_sampled_together_draws_what_it_draws_alone(fast):
    # Together, a prompt is left-padded to the batch's longest, and the products run over more rows: the logits
    # differ from alone's by float rounding (~1e-5 of SmolLM2's), which can move a tail token's boundary in the
    # cumulative sum past a uniform and change one draw at temperature 1. So: greedy decoding gives the same
    # tokens, and each sampled token's log-probability is what the problem's own model gives it, to 1e-4. fast:
    # fast/together.py's step (problem 1's two prompts share the chat template's prefix, prefilled once).
    base, tok = load_model(default_model_path())
    models = problems(base, [0, 1], r=8, alpha=16)
    chat = lambda text: tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))
    prompts = [[chat("Name a colour.")], [chat("Name an animal."), chat("Name a city in France, and say why.")]]
    alone, together = sample_both(base, tok, models, prompts, [[1], [1, 1]], 24, stop_ids=None, temperature=0,
                                  fast=fast)
    assert [[o.ids for o in a] for a in alone] == [[o.ids for o in t] for t in together]
    _, together = sample_both(base, tok, models, prompts, [[4], [2, 2]], 24, stop_ids=None, fast=fast)
    for m, t in zip(models, together):
        for o in t:
            with torch.no_grad():
                logp = torch.log_softmax(m(torch.tensor([o.prompt_ids + o.ids]))[0, len(o.prompt_ids) - 1:-1], -1)
            want = logp.gather(-1, torch.tensor(o.ids)[:, None])[:, 0]
            assert torch.allclose(torch.tensor(o.logprobs), want, atol=1e-4), (torch.tensor(o.logprobs) - want).abs().max()


def group(tok, rewards, texts):
    return [Rollout(tok.encode(t) + [tok.eos_id], t, reward=r) for t, r in zip(texts, rewards)]


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


def ready(together, base, seeds, cfgs, prompts, groups, slots=None):
    """Fresh problem models for `seeds` put in `slots` (default 0, 1, ...) of `together`, their learners, and their
    groups prepared, the models in training mode: what one epoch's pass needs."""
    models = problems(base, seeds)
    for k, m in zip(slots or range(len(models)), models):
        together.put(k, m)
    learners = [Learner(m, c) for m, c in zip(models, cfgs)]
    prepared = [l.prepare(p, g) for l, p, g in zip(learners, prompts, groups)]
    for m in models:
        m.train()
    return models, learners, prepared


def test_learning_together_gives_each_problem_its_loss_and_gradient_alone(tiny):
    base, tok = tiny
    cfgs = [GRPOConfig(lr=1e-2, mu=2), GRPOConfig(lr=1e-2, mu=2, kl_coef=0.1)]  # the second pulled to the base
    prompts = [tok.encode("first problem's prompt"), tok.encode("the second")]
    groups = [group(tok, [0.2, 0.9, 0.5, 0.1], ["abc", "defgh", "x", "hello"]),
              group(tok, [1.0, 0.0, 0.3], ["a much longer completion here", "q", "zz"])]
    # Alone: each problem's learner on its own model.
    solo = problems(base, [3, 4])
    learners = [Learner(m, c) for m, c in zip(solo, cfgs)]
    want_grads, want_stats = [], []
    for learner, p, g in zip(learners, prompts, groups):
        prepared = learner.prepare(p, g)
        learner.model.train()
        learner.backward(p, prepared.ids, prepared.lengths, prepared.loss_fn, prepared.epoch_rows())
        want_grads.append(grads(learner.model))
    learners = [Learner(m, c) for m, c in zip(problems(base, [3, 4]), cfgs)]
    want_stats = [learner.step(p, g) for learner, p, g in zip(learners, prompts, groups)]
    want_after = [{n: p.detach().clone() for n, p in l.model.named_parameters() if "lora_" in n} for l in learners]
    # Together: the same problems' fresh models in slots 0 and 1.
    together = Together(base, 2, TARGETS)
    models, _, prepared = ready(together, base, [3, 4], cfgs, prompts, groups)
    logps = together.logprobs([0, 1], prompts, [g.ids for g in prepared])
    losses = [g.loss_fn(lp, **g.epoch_rows()) for g, lp in zip(prepared, logps)]
    torch.stack(losses).sum().backward()
    for m, want in zip(models, want_grads):
        got = grads(m)
        assert set(got) == set(want)
        for n in want:
            assert torch.allclose(got[n], want[n], atol=1e-5, rtol=1e-4), (n, (got[n] - want[n]).abs().max())
    # And the whole update: the same losses, gradient norms and adapters after mu = 2 epochs.
    models = problems(base, [3, 4])
    for k, m in enumerate(models):
        together.put(k, m)
    stats = learn_together(together, [Learner(m, c) for m, c in zip(models, cfgs)], prompts, groups)
    for s, w in zip(stats, want_stats):
        assert s["skipped"] is None and abs(s["loss"] - w["loss"]) < 1e-5 and abs(s["grad_norm"] - w["grad_norm"]) < 1e-5
    for m, want in zip(models, want_after):
        for n, p in m.named_parameters():
            if "lora_" in n:
                assert torch.allclose(p, want[n], atol=1e-5), (n, (p - want[n]).abs().max())


def test_one_problems_loss_gives_another_no_gradient_and_a_group_without_spread_skips(tiny):
    base, tok = tiny
    models = problems(base, [5, 6, 7])
    together = Together(base, 3, TARGETS)
    for k, m in enumerate(models):
        together.put(k, m)
    prompts = [tok.encode("p one"), tok.encode("p two"), tok.encode("p three")]
    groups = [group(tok, [0.1, 0.7], ["ab", "cd"]), group(tok, [0.4, 0.2], ["efg", "h"]),
              group(tok, [0.5, 0.5], ["same", "reward"])]
    learners = [Learner(m, GRPOConfig(lr=1e-2, mu=1)) for m in models]
    prepared = [l.prepare(p, g) for l, p, g in zip(learners, prompts, groups[:2])]
    logps = together.logprobs([0, 1], prompts[:2], [g.ids for g in prepared])
    prepared[0].loss_fn(logps[0], **prepared[0].epoch_rows()).backward()
    assert len(grads(models[0])) == 2 * len(together.layers) and all(g.abs().sum() > 0 for g in
                                                                    grads(models[0]).values()), "problem 0's gradient"
    # Problem 1's rows were in the pass (their gradient is computed, as zeros); problem 2 was not in it at all.
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in lora_parameters(models[1])), \
        "another problem's loss reached this adapter"
    assert all(p.grad is None for p in lora_parameters(models[2]))
    for m in models:
        for p in lora_parameters(m):
            p.grad = None
    before = [{n: p.detach().clone() for n, p in m.named_parameters() if "lora_" in n} for m in models]
    stats = learn_together(together, learners, prompts, groups)
    assert [s["skipped"] for s in stats] == [None, None, "no reward spread"], stats
    assert all(torch.equal(p, before[2][n]) for n, p in models[2].named_parameters() if "lora_" in n)
    assert not all(torch.equal(p, before[0][n]) for n, p in models[0].named_parameters() if "lora_" in n)
    assert len(lora_modules(models[0])) == len(together.layers)


def run_problems(tmp_path, words, seeds, steps, together_k):
    """Toy problems (hidden words) searched with MiGrATe for `steps` steps, alone (together_k 0) or together.
    Returns each problem's scored rows, metrics without timings, and adapter."""
    from database import Database
    from search import Search, SearchConfig
    from tasks import load_task
    from together import step_together
    base, tok = load_model(tiny_model_path())
    cfg = SearchConfig(method="migrate", alpha=2, beta=1, gamma=1, budget=40, max_new_tokens=10)
    models = problems(base, seeds)  # trained-looking adapters, so that each problem samples its own
    searches = []
    for k, (w, s, m) in enumerate(zip(words, seeds, models)):
        learner = Learner(m, GRPOConfig(lr=1e-2, mu=2))
        db = Database(str(tmp_path / f"{together_k}-{w}.sqlite"))
        searches.append(Search(cfg, load_task("toy", w, seed=s), tok, Sampler(m, tok), db, learner, seed=s,
                               diagnose=1.0))
    metrics = [[] for _ in searches]
    if together_k:
        together = Together(base, together_k, TARGETS)
        for k, m in enumerate(models):
            together.put(k, m)
        sampler = Sampler(together.model, tok, TogetherStep(together))
        for _ in range(steps):
            for k, m in enumerate(step_together(searches, sampler, list(range(len(searches))))):
                metrics[k].append(m)
    else:
        for _ in range(steps):
            for k, s in enumerate(searches):
                metrics[k].append(s.step())
    timing = ("seconds", "sample_seconds", "reward_seconds", "train_seconds", "diagnostics_seconds")
    out = []
    for s, ms, m in zip(searches, metrics, models):
        rows = [(r.key, r.completion_ids, r.reward, r.source, r.step) for r in s.db.scored()]
        s.db.close()
        out.append((rows, [{k: v for k, v in x.items() if k not in timing} for x in ms],
                    {n: p.detach().clone() for n, p in m.named_parameters() if "lora_" in n}))
    return out


def test_searches_stepped_together_find_what_they_find_alone(tmp_path):
    # Three toy problems, four MiGrATe steps (sampling, scoring, NS prompts, greedy members, two-epoch GRPO updates,
    # learning diagnostics): together, every problem scores the same candidates from the same completions, in the
    # same steps, with the same metrics, and ends with the same adapter to float rounding.
    words, seeds = ["migrate", "search", "ranking"], [0, 1, 2]
    alone = run_problems(tmp_path, words, seeds, 4, 0)
    together = run_problems(tmp_path, words, seeds, 4, 3)
    for (rows_a, metrics_a, lora_a), (rows_t, metrics_t, lora_t) in zip(alone, together):
        assert rows_a == rows_t and len(rows_a) > 8
        for ma, mt in zip(metrics_a, metrics_t):
            assert ma.keys() == mt.keys()
            for key in ma:
                a, t = ma[key], mt[key]
                assert (abs(a - t) < 1e-4 if isinstance(a, float) and isinstance(t, float) else a == t), (key, a, t)
        assert any(m["loss"] is not None for m in metrics_a), "the problems trained"
        for n in lora_a:
            assert torch.allclose(lora_a[n], lora_t[n], atol=1e-5), (n, (lora_a[n] - lora_t[n]).abs().max())


def cli(*args, timeout=300):
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "run.py", *args], cwd=root, capture_output=True, text=True, timeout=timeout)


def candidates(folder):
    import sqlite3
    with sqlite3.connect(folder / "candidates.sqlite") as db:
        return db.execute("select key, completion_ids, reward, source, step, oracle from candidates "
                          "where oracle = 1 order by rowid").fetchall()


def test_run_together_finds_what_each_problem_finds_alone_and_survives_a_kill(tmp_path):
    # Three toy problems, two slots: the third takes the first free slot. Each problem's run folder holds what the
    # same problem's run alone holds (run.py alone: the fast sampler and learner); killed mid-run and resumed, no
    # problem scores a candidate twice or loses one, and every problem finishes.
    import json
    import signal
    import subprocess
    import sys
    import time
    words = "migrate,search,ranking"
    base = ["--task", "toy", "--model", "tiny", "--task-ids", words, "--budget", "40"]
    r = cli(*base, "--out", str(tmp_path / "alone"))
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli(*base, "--together", "2", "--out", str(tmp_path / "together"))
    assert r.returncode == 0, r.stderr[-2000:]
    for w in words.split(","):
        assert candidates(tmp_path / "alone" / w) == candidates(tmp_path / "together" / w)
        assert len(candidates(tmp_path / "alone" / w)) == 40
    agg = json.loads((tmp_path / "together" / "summary.json").read_text())
    assert agg["together"] == 2 and agg["problems"] == 3 and agg["oracle_calls"] == 120
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "run.py", *base, "--together", "2", "--out", str(out)], cwd=root,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not any((out / w / "checkpoint.pt").exists() for w in words.split(",")) and p.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL, "killed mid-run"
    assert not all((out / w / "summary.json").exists() for w in words.split(","))
    r = cli(*base, "--together", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    for w in words.split(","):
        keys = [row[0] for row in candidates(out / w)]
        assert len(keys) == 40 == len(set(keys)), "each new candidate scored once, the budget spent exactly"
        assert json.loads((out / w / "summary.json").read_text())["oracle_calls"] == 40


def test_together_refuses_a_single_problem_and_settings_it_cannot_share(tmp_path):
    r = cli("--task", "toy", "--model", "tiny", "--together", "2", "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and r.stderr.strip() == "error: --together runs several problems: give them with --task-ids"
    r = cli("--task", "toy", "--model", "tiny", "--task-ids", "migrate,search", "--together", "2",
            "--sample-weights", "int8", "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip().startswith("error:"), r.stderr


@pytest.mark.parametrize("tokens,checkpointing", [(4096, False), (12, True)])
def test_fast_together_pass_gives_each_problem_the_plain_pass_log_probs_loss_and_gradient(tiny, tokens,
                                                                                          checkpointing):
    """fast/together.py (each prompt once, rows of several problems in one micro-batch, prompts of different
    lengths left-padded) against the plain pass (every member's prompt): the same per-problem log-probs, losses
    and adapter gradients. tokens=12 cuts the rows into several micro-batches, some with one problem's rows."""
    from fast.together import FastTogether
    base, tok = tiny
    cfgs = [GRPOConfig(lr=1e-2, mu=2), GRPOConfig(lr=1e-2, mu=2, kl_coef=0.1), GRPOConfig(lr=1e-2, mu=2)]
    prompts = [tok.encode("first problem's prompt, the longest of the three"), tok.encode("the second"),
               tok.encode("a third prompt")]
    groups = [group(tok, [0.2, 0.9, 0.5, 0.1], ["abc", "defgh", "x", "hello"]),
              group(tok, [1.0, 0.0, 0.3], ["a much longer completion here", "q", "zz"]),
              group(tok, [0.4, 0.6], ["", "two words"])]  # an empty completion: only its EOS is a target
    got = []
    for together in (Together(base, 3, TARGETS),
                     FastTogether(base, 3, TARGETS, tokens_per_microbatch=tokens,
                                  activation_checkpointing=checkpointing)):
        slots = [2, 0, 1]  # slots need not follow the problems' order
        models, _, prepared = ready(together, base, [3, 4, 5], cfgs, prompts, groups, slots)
        done = together.backward(slots, prompts, prepared)
        got.append((done, [grads(m) for m in models], prepared))
    (plain, plain_grads, prepared), (fast, fast_grads, _) = got
    for (lp, loss), (flp, floss), g in zip(plain, fast, prepared):
        mask = g.per_row["mask"]
        assert torch.allclose(flp[mask], lp[mask], atol=1e-5), (flp[mask] - lp[mask]).abs().max()
        assert abs(float(floss) - float(loss)) < 1e-5, (float(floss), float(loss))
    for want, have in zip(plain_grads, fast_grads):
        assert set(want) == set(have) and want
        for n in want:
            assert torch.allclose(have[n], want[n], atol=1e-5, rtol=1e-4), (n, (have[n] - want[n]).abs().max())
    # The KL pull's reference, every problem's rows through the base at once (a prompt given twice, its base
    # pass made once and reused on the second call), against the plain one, each problem through the base alone.
    fast_together = FastTogether(base, 3, TARGETS, tokens_per_microbatch=tokens)
    twice = prompts + prompts[:1]
    want = Together(base, 3, TARGETS).reference(twice, prepared + prepared[:1])
    for _ in range(2):
        for w, have, g in zip(want, fast_together.reference(twice, prepared + prepared[:1]), prepared + prepared[:1]):
            mask = g.per_row["mask"]
            assert torch.allclose(have[mask], w[mask], atol=1e-5), (have[mask] - w[mask]).abs().max()
