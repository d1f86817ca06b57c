"""Learning diagnostics (diagnostics.py) on the real tiny model: KL to the base policy is 0 before any update
and positive after one, the best answer's log-prob gain follows, and the diagnostics change nothing a run
samples or learns."""
import time

import torch

from database import Database
from weights.default_model import tiny_model_path
from diagnostics import adapter_change, policy_movement
from grpo import GRPOConfig, Learner
from lora import inject_lora, lora_parameters
from model import load_model
from sampling import Rollout, Sampler
from search import Search, SearchConfig
from tasks import load_task


def group(tok, rewards):
    return [Rollout(tok.encode(t := f"answer number {i} is {'x' * (i + 1)}"), t, reward=r) for i, r in enumerate(rewards)]


def test_kl_is_zero_before_the_first_update_and_positive_after():
    model, tok = load_model(tiny_model_path())
    torch.manual_seed(0)
    inject_lora(model, r=4, alpha=8)
    # Adam's first step moves every parameter by about lr, a sign step: small enough that the first-order gain
    # of the most advantaged member dominates
    learner = Learner(model, GRPOConfig(lr=1e-3, mu=1))
    # the zero-reward member stays in the group mean but leaves the loss: only the best one is trained
    prompt, members = tok.encode("a prompt of some length"), group(tok, [0.0, 0.9])
    comps, best = [m.ids for m in members], members[1].ids
    before = policy_movement(learner, prompt, comps, best)
    assert before["kl"] == 0.0 and before["best_logp_gain"] == 0.0 and adapter_change(model) == 0.0, before
    assert before["best_logp"] < 0
    learner.step(prompt, members)
    after = policy_movement(learner, prompt, comps, best)
    assert after["kl"] > 0 and adapter_change(model) > 0, after
    assert after["best_logp_gain"] > 0, "the only trained member, with a positive advantage, became more likely"
    # the same numbers as a plain, unbatched computation
    with torch.no_grad():
        x = torch.tensor([prompt + best])
        lp = torch.log_softmax(model(x)[0, len(prompt) - 1:-1], -1)
        want = float(lp.gather(-1, torch.tensor(best)[:, None]).sum())
    assert abs(after["best_logp"] - want) < 1e-3, (after["best_logp"], want)


def run_steps(tmp_path, diagnose, steps=3):
    model, tok = load_model(tiny_model_path())
    torch.manual_seed(0)
    inject_lora(model, r=4, alpha=8, dropout=0.1)  # dropout: the diagnostics must not draw random numbers
    learner = Learner(model, GRPOConfig(lr=1e-2, mu=2))
    db = Database(str(tmp_path / f"c{int(diagnose)}.sqlite"))
    cfg = SearchConfig(method="migrate", alpha=2, beta=1, gamma=1, budget=100, max_new_tokens=8)
    search = Search(cfg, load_task("toy"), tok, Sampler(model, tok), db, learner, seed=0,
                    diagnose=1.0 if diagnose else 0.0)
    metrics = [search.step() for _ in range(steps)]
    rows = [(r.key, r.completion_ids, r.reward) for r in db.scored()]
    db.close()
    return rows, [p.detach().clone() for p in lora_parameters(model)], metrics


def test_diagnostics_change_no_sample_and_no_update(tmp_path):
    rows_on, lora_on, metrics = run_steps(tmp_path, True)
    rows_off, lora_off, plain = run_steps(tmp_path, False)
    assert rows_on == rows_off, "the same candidates, token for token"
    assert all(torch.equal(a, b) for a, b in zip(lora_on, lora_off)), "the same adapter"
    assert all("kl" in m and "dw_rel" in m for m in metrics) and not any("kl" in m for m in plain)
    assert all(m["on_policy_reward"] is not None and 0 <= m["failed_share"] <= 1 for m in metrics + plain)
    # step 1 has no past candidate to vary, so no NS member; later steps sample the NS prompt (gamma 1)
    assert metrics[0]["neighbour_reward"] is None and all(0 <= m["neighbour_reward"] <= 1 for m in metrics[1:])
    # the new candidates' mean reward: one per oracle call, so absent exactly when a step made none
    assert all((m["new_reward"] is None) == (m["new_calls"] == 0) for m in metrics + plain)
    assert any(m["new_calls"] for m in metrics) and all(0 <= m["new_reward"] <= 1 for m in metrics if m["new_calls"])


def test_diagnostics_keep_to_their_share_of_the_run(tmp_path, monkeypatch):
    """--diagnostics 0.1: a diagnostics pass runs only while all passes so far took <= 10% of the run. A pass made
    slow on purpose (the real one plus 1 s) must then be skipped on most steps, and the time spent in passes
    before the last one stays within the share."""
    import search as search_module
    real = search_module.policy_movement

    def slow(*args, **kwargs):
        time.sleep(1.0)
        return real(*args, **kwargs)
    monkeypatch.setattr(search_module, "policy_movement", slow)
    model, tok = load_model(tiny_model_path())
    torch.manual_seed(0)
    inject_lora(model, r=4, alpha=8)
    db = Database(str(tmp_path / "c.sqlite"))
    cfg = SearchConfig(method="grpo", alpha=4, beta=0, gamma=0, budget=1000, max_new_tokens=8)
    search = Search(cfg, load_task("toy"), tok, Sampler(model, tok), db, Learner(model, GRPOConfig(lr=1e-2)),
                    seed=0, diagnose=0.1)
    metrics = [search.step() for _ in range(8)]
    db.close()
    diagnosed = [i for i, m in enumerate(metrics) if "kl" in m]
    assert diagnosed and diagnosed[0] == 0, f"the first trained step is diagnosed: {diagnosed}"
    assert len(diagnosed) < len(metrics), f"a 1 s pass on every step exceeds 10% of this run: {diagnosed}"
    last = metrics[diagnosed[-1]]["diagnostics_seconds"]
    assert search.diag_seconds - last <= 0.1 * search.run_seconds + 1e-3, (search.diag_seconds, search.run_seconds)
