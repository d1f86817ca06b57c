"""Engine tests: LoRA (and its PEFT format), the GRPO loss on hand-made tensors, the learner, the database,
the search loop and the command line, on the real tiny model and the real toy task."""
import copy
import json
import os
import random
import sqlite3
import subprocess
import sys

import pytest
import torch

import grpo
import fast.shared_prompt as shared_prompt
from fast.shared_prompt import SharedPromptLearner
from database import Database, Row
from weights.default_model import tiny_model_path
from grpo import (GRPOConfig, Learner, clipped_token_loss, group_advantages, length_mask,
                  reduce_loss)
from lora import (inject_lora, load_adapter, lora_disabled, lora_modules, lora_parameters, merge_lora,
                  save_adapter)
from model import load_model
from sampling import Rollout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny():
    return load_model(tiny_model_path())


def randomise_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


IDS = torch.arange(3, 40).reshape(1, -1)

# ---------------------------------------------------------------- LoRA


def test_fresh_lora_changes_nothing_and_freezes_the_base(tiny):
    model, _ = tiny
    before = model(IDS)
    names = inject_lora(model, r=4, alpha=8)
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert torch.equal(model(IDS), before), "B starts at zero"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    with pytest.raises(ValueError, match="twice"):
        inject_lora(model)


def test_lora_switch_gives_the_base_policy(tiny):
    model, _ = tiny
    base = model(IDS)
    inject_lora(model, r=4, alpha=8)
    randomise_lora(model)
    assert not torch.allclose(model(IDS), base)
    with lora_disabled(model):
        assert torch.equal(model(IDS), base)
    assert all(m.enabled for m in lora_modules(model).values())


def test_adapter_roundtrip_and_merge(tiny, tmp_path):
    model, _ = tiny
    fresh = copy.deepcopy(model)
    inject_lora(model, r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    randomise_lora(model)
    want = model(IDS)
    save_adapter(model, str(tmp_path / "adapter"))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    load_adapter(fresh, str(tmp_path / "adapter"))
    assert torch.allclose(fresh(IDS), want, atol=1e-6)
    merged = merge_lora(fresh)
    assert not lora_modules(merged)
    assert torch.allclose(merged(IDS), want, atol=1e-5)


def test_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")  # hf_tiny_folder builds the reference model with it
    from test_all import hf_tiny_folder
    folder, hf = hf_tiny_folder(tmp_path, "llama")
    model, _ = load_model(folder)
    inject_lora(model, r=4, alpha=8)
    randomise_lora(model)
    save_adapter(model, str(tmp_path / "adapter"), base_model=folder)
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        diff = (model(IDS) - peft_model(IDS).logits).abs().max().item()
    assert diff <= 1e-4, diff


# ---------------------------------------------------------------- GRPO: pure functions on hand-made tensors


def test_advantages_are_group_relative():
    r = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(group_advantages(r), torch.tensor([-0.5, 0.0, 0.5]))
    assert torch.allclose(group_advantages(r, scale_std=True), torch.tensor([-1.0, 0.0, 1.0]), atol=1e-3)


def clipped_grad(ratio, adv):
    """d loss / d logp for one token with the given ratio and advantage."""
    logp = torch.tensor([[float(torch.log(torch.tensor(ratio)))]], requires_grad=True)
    clipped_token_loss(logp, torch.zeros(1, 1), torch.tensor([adv])).sum().backward()
    return logp.grad.item()


def test_clip_zeroes_the_gradient_exactly_where_it_should():
    # A > 0: a ratio above 1 + eps_high is clipped (no push further up); below 1 - eps_low it is not.
    assert clipped_grad(1.5, 1.0) == 0.0
    assert clipped_grad(0.5, 1.0) == pytest.approx(-0.5)  # -A * ratio
    assert clipped_grad(1.1, 1.0) == pytest.approx(-1.1)
    # A < 0: a ratio below 1 - eps_low is clipped; above 1 + eps_high it is not.
    assert clipped_grad(0.5, -1.0) == 0.0
    assert clipped_grad(1.5, -1.0) == pytest.approx(1.5)
    assert clipped_grad(0.9, -1.0) == pytest.approx(0.9)
    # the boundaries are 1 - 0.2 and 1 + 0.28
    assert clipped_grad(1.27, 1.0) != 0.0 and clipped_grad(1.29, 1.0) == 0.0
    assert clipped_grad(0.81, -1.0) != 0.0 and clipped_grad(0.79, -1.0) == 0.0


def test_sequence_and_token_normalisation():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = length_mask(torch.tensor([3, 1]), 3)
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    assert reduce_loss(loss, mask, "sequence").item() == pytest.approx((2.0 + 4.0) / 2)
    assert reduce_loss(loss, mask, "token").item() == pytest.approx(10.0 / 4)


def test_padding_gets_no_gradient_and_the_last_token_does():
    tl = torch.ones(2, 3, requires_grad=True)
    mask = length_mask(torch.tensor([3, 1]), 3)
    reduce_loss(tl, mask, "sequence").backward()
    assert tl.grad[1, 1:].eq(0).all(), "padding"
    assert tl.grad[0, 2] > 0 and tl.grad[1, 0] > 0, "the final (EOS) token of each completion"


# ---------------------------------------------------------------- the learner on the tiny model


def members(tok, rewards, eos=True):
    texts = ["abc", "defgh", "x", "hello"]
    return [Rollout(tok.encode(t) + ([tok.eos_id] if eos else []), t, reward=r) for t, r in zip(texts, rewards)]


def test_one_step_moves_lora_and_not_the_base(tiny):
    model, tok = tiny
    inject_lora(model, r=4, alpha=8)
    base = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    stats = Learner(model, GRPOConfig(lr=1e-2, mu=2)).step(tok.encode("prompt"), members(tok, [0.2, 0.9, 0.5, 0.1]))
    assert stats["skipped"] is None and stats["grad_norm"] > 0
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert all(not torch.equal(p, lora[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_the_plain_and_the_fast_learner_give_the_per_member_gradient(tiny, monkeypatch):
    model, tok = tiny
    inject_lora(model, r=4, alpha=8)
    randomise_lora(model)
    prompt, group = tok.encode("a prompt of some length"), members(tok, [0.2, 0.9, 0.5, 0.1])
    naive = copy.deepcopy(model)
    adv = group_advantages(torch.tensor([m.reward for m in group]))
    total = 0
    for m, a in zip(group, adv):
        logits = naive(torch.tensor([prompt + m.ids]))[0, len(prompt) - 1:-1]
        lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(m.ids)[:, None])[:, 0]
        total = total + clipped_token_loss(lp[None], lp[None].detach(), a[None]).mean() / len(group)
    total.backward()
    # grpo.Learner (every member's prompt and completion through the model), then the fast learner with
    # micro-batches of 8 tokens; every layer recomputed in backward; logits two positions at a time (each chunk
    # recomputed in backward too: what bounds a long group's logits, shared_prompt.LOGITS_BYTES)
    for kind, cfg, logits_bytes in [(Learner, GRPOConfig(mu=1), shared_prompt.LOGITS_BYTES),
                                    (SharedPromptLearner, GRPOConfig(mu=1, tokens_per_microbatch=8),
                                     shared_prompt.LOGITS_BYTES),
                                    (SharedPromptLearner, GRPOConfig(mu=1, activation_checkpointing=True),
                                     shared_prompt.LOGITS_BYTES),
                                    (SharedPromptLearner, GRPOConfig(mu=1), 2 * 4 * model.config.vocab_size)]:
        monkeypatch.setattr(shared_prompt, "LOGITS_BYTES", logits_bytes)
        learner = kind(copy.deepcopy(model), cfg)
        learner.opt.step = lambda: None  # compare gradients, not updates
        learner.cfg.max_grad_norm = 1e9
        learner.step(prompt, group)
        for ours, ref in zip(learner.params, lora_parameters(naive)):
            assert torch.allclose(ours.grad, ref.grad, atol=1e-7)


def test_the_base_policys_prompt_pass_is_made_once_and_stays_the_base_policys(tiny, monkeypatch):
    # The fast learner's base_logprobs (the KL pull's reference, the diagnostics' pi_0) reuses one prompt pass for
    # the run: equal to the LoRA-off computation without it, still the base policy's after updates, made again for
    # another prompt; and within float rounding of the plain learner's.
    model, tok = tiny
    inject_lora(model, r=4, alpha=8)
    randomise_lora(model)
    learner = SharedPromptLearner(model, GRPOConfig(lr=1e-2, mu=1))
    passes = []
    real = shared_prompt.prompt_states
    monkeypatch.setattr(shared_prompt, "prompt_states", lambda m, p: passes.append(len(p)) or real(m, p))
    prompt, group = tok.encode("a prompt of some length"), members(tok, [0.2, 0.9, 0.5, 0.1])
    ids, lengths = grpo.pad(sorted((m.ids for m in group), key=len), "cpu")

    def plain():
        with torch.no_grad(), lora_disabled(model):
            return shared_prompt.completion_logprobs(model, prompt, ids, lengths)[0]
    first = learner.base_logprobs(prompt, ids, lengths)
    assert torch.equal(first, plain())
    mask = length_mask(lengths, ids.shape[1])
    assert torch.allclose(first * mask, Learner.base_logprobs(learner, prompt, ids, lengths) * mask, atol=1e-5)
    assert not torch.equal(first, learner.logprobs(prompt, ids, lengths)), "the adapter changes the policy"
    learner.step(prompt, group)
    assert torch.equal(learner.base_logprobs(prompt, ids, lengths), first) and torch.equal(first, plain())
    other = tok.encode("another prompt")
    learner.base_logprobs(other, ids, lengths)
    assert passes == [len(prompt), len(other)], passes


def test_bfloat16_learner_follows_the_float32_gradient(tiny):
    # GRPOConfig.learner_dtype "bfloat16" multiplies the frozen weights in bfloat16: the adapters' gradient is
    # float32's up to rounding (same direction), not float32's exactly, and the base and adapters stay float32.
    model, tok = tiny
    inject_lora(model, r=4, alpha=8)
    randomise_lora(model)
    prompt, group = tok.encode("a prompt of some length"), members(tok, [0.2, 0.9, 0.5, 0.1])
    grads = {}
    for dtype in ("float32", "bfloat16"):
        learner = SharedPromptLearner(copy.deepcopy(model), GRPOConfig(mu=1, learner_dtype=dtype, max_grad_norm=1e9))
        learner.opt.step = lambda: None  # compare gradients, not updates
        assert learner.step(prompt, group)["skipped"] is None
        grads[dtype] = torch.cat([p.grad.flatten() for p in learner.params])
        assert all(p.dtype == torch.float32 for p in learner.model.parameters())
    a, b = grads["float32"], grads["bfloat16"]
    assert not torch.equal(a, b), "the bfloat16 route was not taken"
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99 and 0.9 < b.norm() / a.norm() < 1.1
    with pytest.raises(AssertionError, match="learner_dtype 'float16'"):
        GRPOConfig(learner_dtype="float16")
    with pytest.raises(AssertionError, match="SharedPromptLearner"):  # the plain learner multiplies in float32
        Learner(model, GRPOConfig(learner_dtype="bfloat16"))


def test_bfloat16_opt_ins_are_refused_where_the_cpu_has_no_bfloat16_products(tmp_path):
    # They exist only to be faster. Where oneDNN has no bfloat16 product (capped to AVX2 here, as on an AVX2-only
    # CPU) the decode copies used to fail mid-run with a RuntimeError traceback and the learner to run ~3x slower
    # than float32; now run.py says so in one line and exits 2 before any work.
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2")
    for flag in ("--sample-weights", "--learner-dtype"):
        r = subprocess.run([sys.executable, "run.py", "--task", "toy", "--model", "tiny", flag, "bfloat16", "--budget",
                            "2", "--out", str(tmp_path / flag)], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert r.stderr.strip().splitlines()[-1] == (
            f"error: {flag} bfloat16: this CPU's PyTorch has no fast bfloat16 product (it needs AVX-512 BW/VL/DQ or "
            "AVX-NE-CONVERT); use float32"), r.stderr
    # The library too: a sampler asked for bfloat16 copies used to decode quietly in float32 there.
    code = ("from weights.default_model import tiny_model_path; from model import load_model; from fast.decode import FastStep\n"
            "try:\n    FastStep(load_model(tiny_model_path())[0], weights='bfloat16')\n"
            "except ValueError as e:\n    print(e)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.stdout.strip() == ("bfloat16 decode copies: this CPU's PyTorch has no fast bfloat16 product (it needs "
                                "AVX-512 BW/VL/DQ or AVX-NE-CONVERT)"), (r.stdout, r.stderr[-2000:])


def test_decode_copies_are_refused_off_the_cpu(tiny):
    # The copies are the CPU's packed decoder's; a model elsewhere (a GPU; here PyTorch's shape-only device)
    # would decode through its modules in its own dtype and say nothing.
    with pytest.raises(ValueError, match="on a GPU use the model's dtype"):
        from fast.decode import FastStep
        FastStep(tiny[0].to("meta"), weights="int8")


def test_zero_reward_members_leave_the_loss_and_zero_spread_skips(tiny):
    model, tok = tiny
    inject_lora(model, r=4, alpha=8)
    learner = Learner(model, GRPOConfig(mu=1))
    stats = learner.step(tok.encode("p"), members(tok, [0.0, 0.0, 0.5, 0.1]))
    assert stats["trained_members"] == 2
    assert learner.step(tok.encode("p"), members(tok, [0.3] * 4))["skipped"] == "no reward spread"


def test_non_finite_step_never_reaches_the_adapter(tiny):
    model, tok = tiny
    inject_lora(model, r=4, alpha=8)
    before = [p.clone() for p in lora_parameters(model)]
    stats = Learner(model, GRPOConfig(mu=1)).step(tok.encode("p"), members(tok, [float("nan"), 0.5, 0.2, 0.1]))
    assert stats["skipped"].startswith("non-finite")
    assert all(torch.equal(a, b) for a, b in zip(before, lora_parameters(model)))


def test_importance_weights_only_touch_neighbour_members(tiny):
    model, tok = tiny
    inject_lora(model, r=4, alpha=8)
    randomise_lora(model)
    group = members(tok, [0.2, 0.9, 0.5, 0.1])
    # a behaviour log-prob far above the policy's: truncated ratio ~0, so this member barely trains
    group[1] = Rollout(group[1].ids, group[1].text, [0.0] * len(group[1].ids), source="neighbour", reward=0.9)
    grads = {}
    for mode in ("task-prompt", "importance"):
        learner = Learner(copy.deepcopy(model), GRPOConfig(mu=1, offpolicy=mode, max_grad_norm=1e9))
        learner.opt.step = lambda: None
        learner.step(tok.encode("p"), group)
        grads[mode] = torch.cat([p.grad.flatten() for p in learner.params])
    assert not torch.allclose(grads["task-prompt"], grads["importance"])


# ---------------------------------------------------------------- database


def test_database_dedup_order_and_persistence(tmp_path):
    path = str(tmp_path / "c.sqlite")
    db = Database(path)
    db.add([Row("a", "ca", 0.2, "on-policy", 1), Row("b", "cb", 0.9, "neighbour", 1),
            Row(None, "junk", 0.0, "on-policy", 1, info={"error": "no letters"}, oracle=False),
            Row("c", "cc", 0.5, "warm-start", 0)])
    with pytest.raises(sqlite3.IntegrityError):
        db.add([Row("d", "cd", 0.1, "on-policy", 2), Row("a", "again", 1.0, "on-policy", 2)])
    assert db.lookup(["d"]) == {}, "a failed batch leaves nothing behind"
    assert [r.key for r in db.top(2)] == ["b", "c"]
    assert db.history(3) == [("a", 0.2), ("c", 0.5), ("b", 0.9)], "worst to best"
    assert db.oracle_calls() == 3 and db.count() == 4
    assert db.sample_top(2, random.Random(0)).key in {"b", "c"}
    db.close()
    again = Database(path)
    assert again.best().key == "b" and again.curve() == [(1, 0.2), (2, 0.9), (3, 0.9)]


# ---------------------------------------------------------------- search and command line


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "run.py", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("method", ["migrate", "random", "ns", "opro", "grpo", "grpo-greedy", "migrate-opro"])
def test_every_method_spends_exactly_the_budget(tmp_path, method):
    r = run_cli("--task", "toy", "--model", "tiny", "--method", method, "--budget", "12", "--out", str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    db = Database(str(tmp_path / "r" / "candidates.sqlite"))
    keys = [row.key for row in db.scored()]
    assert s["oracle_calls"] == db.oracle_calls() == 12 and len(keys) == len(set(keys)) == 12
    lines = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(1, s["steps"] + 1))
    if method in ("migrate", "grpo-greedy"):
        assert any(l["members"]["greedy"] for l in lines), "greedy members replayed from the database"
    if method in ("migrate", "ns", "migrate-opro", "opro"):
        assert any(l["members"]["neighbour"] for l in lines)
    assert os.path.exists(tmp_path / "r" / "reward_curve.png")
    assert os.path.exists(tmp_path / "r" / "adapter" / "adapter_model.safetensors") == (
        method in ("migrate", "grpo", "grpo-greedy", "migrate-opro"))


def test_resume_of_a_finished_run_scores_nothing_new(tmp_path):
    out = str(tmp_path / "r")
    assert run_cli("--task", "toy", "--model", "tiny", "--budget", "8", "--out", out).returncode == 0
    first = json.loads(open(os.path.join(out, "summary.json")).read())
    r = run_cli("--resume", out)
    assert r.returncode == 0, r.stderr
    again = json.loads(open(os.path.join(out, "summary.json")).read())
    assert again["oracle_calls"] == first["oracle_calls"] == 8 and again["steps"] == first["steps"]


def test_bfloat16_run_on_cpu(tmp_path):
    # the dtype path users take on GPUs; on CPU it is slow but must work end to end
    r = run_cli("--task", "toy", "--model", "tiny", "--dtype", "bfloat16", "--budget", "6", "--out", str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr[-2000:]
    ck = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)
    assert all(v.dtype == torch.float32 for v in ck["lora"].values()), "adapters train in float32"


@pytest.mark.parametrize("args, says", [
    (["--task", "nosuch"], "unknown task 'nosuch'"),
    (["--task", "toy", "--task-id", "Not A Word"], "toy task id"),
    (["--task", "toy", "--budget", "-3"], "--budget must be at least 1"),
    (["--task", "toy", "--budget", "lots"], "invalid int value: 'lots'"),
    (["--task", "toy", "--model", "/no/such/folder"], "does not exist"),
    (["--task", "toy", "--model", "tiny", "--device", "cuda"], "no CUDA GPU"),
    (["--resume", "/tmp"], "not a run folder"),
    (["--task", "toy", "--method", "sgd"], "unknown method 'sgd'"),
    (["--task", "toy", "--dtype", "bfloat16", "--learner-dtype", "bfloat16"], "needs float32 weights"),
])
def test_bad_input_gets_one_line_and_exit_2(tmp_path, args, says):
    if "--device" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = run_cli(*args, "--out", str(tmp_path / "r")) if "--resume" not in args else run_cli(*args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert says in lines[-1] and "Traceback" not in r.stderr, r.stderr
