"""What a user runs: each task's model and preset (every value with its source, --dry-run), and the run's plan
(plan.py): memory planned from the model's shapes, a run that cannot fit refused in one line naming a model that
fits, and the time it takes estimated before its first step. The real command line, in its own process."""
import json
import os
import re
import subprocess
import sys

import torch

import outcome
import plan
from fast.cpu_linear import use_fast_linear
from weights.default_model import EMBEDDED, TINY_CONFIG, model_config
from lora import inject_lora
from model import ModelConfig, build_model, count_parameters
from tasks import load_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODER = ModelConfig.from_hf(EMBEDDED["qwen2.5-coder-1.5b"].shapes)
GB = 10 ** 9


def cli(*args, cache=None, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", **({"MIGRATE_CACHE": cache} if cache else {}))
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


# ---------------------------------------------------------------- each task's model and preset


def test_each_task_names_the_model_that_serves_it_and_the_preset_follows_model_and_method():
    assert (load_task("arc").model, load_task("molecule", "qed").model, load_task("semantle").model) == \
        ("qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b", "smollm2-135m")
    arc = load_task("arc").preset
    coder, sources = arc.resolved("cpu", "qwen2.5-coder-1.5b", "migrate")
    assert (coder.lr, coder.lora_alpha, coder.lr_schedule, coder.budget) != (arc.lr, arc.lora_alpha, "linear", 1024)
    assert "results/sweep/arc-qwen" in sources["lr"] and "paper" in sources["lora_r"], sources
    small = arc.named("cpu", "smollm2-135m", "migrate")  # another model: only the values for any model
    assert (small.lr, small.lora_alpha, small.budget) == (arc.lr, arc.lora_alpha, coder.budget)
    assert arc.named("paper", "qwen2.5-coder-1.5b", "migrate") == arc.named("paper"), "the paper's values alone"
    semantle = load_task("semantle").preset
    assert semantle.named("cpu", "smollm2-135m", "migrate").kl_coef == 0.1
    assert semantle.named("cpu", "smollm2-135m", "migrate-opro").kl_coef == 0.1
    assert semantle.named("cpu", "smollm2-135m", "grpo").kl_coef == 0.0, "the pull cost GRPO best reward"
    assert semantle.named("paper", "smollm2-135m", "migrate").kl_coef == 0.0


def test_dry_run_prints_every_value_with_its_source_and_fetches_nothing(tmp_path):
    cache = str(tmp_path / "cache")
    r = cli("--task", "arc", "--task-id", "6150a2bd", "--dry-run", cache=cache)
    assert r.returncode == 0, r.stderr[-1500:]
    out = json.loads(r.stdout)
    cfg, sources = out["config"], out["sources"]
    assert cfg["model"] == "qwen2.5-coder-1.5b" and set(sources) == set(cfg), set(cfg) ^ set(sources)
    assert sources["model"] == "the task's model (arc)" and "arc-qwen" in sources["lr"]
    assert sources["budget"].startswith("cpu preset") and sources["patience"] == "SearchConfig"
    assert out["model"]["fetched"] is False and "PyPI" in out["model"]["first_use"]
    # the plan against what this machine has free now: it fits, or it is refused before anything is fetched
    assert out["memory"].startswith(("memory: about", "refused: qwen2.5-coder-1.5b needs about")), out["memory"]
    assert not os.path.exists(cache) or not os.listdir(cache), "a dry run fetched or built something"
    assert not os.path.exists(os.path.join(ROOT, cfg["out"], "config.json")) or cfg["out"] == "", "nothing written"
    r = cli("--task", "semantle", "--method", "grpo", "--lr", "1e-3", "--model", "tiny", "--dry-run", cache=cache)
    out = json.loads(r.stdout)
    assert out["config"]["kl_coef"] == 0.0 and out["config"]["lr"] == 1e-3 and out["sources"]["lr"] == "--lr"
    assert out["sources"]["model"] == "--model"


# ---------------------------------------------------------------- memory


def test_the_activation_estimate_bounds_what_backward_keeps():
    # Every tensor autograd saves in the forward pass of a LoRA model (parameters aside), counted once per storage:
    # per token and layer, within plan.activation_bytes and most of it (the plan neither starves nor overshoots).
    for dims in [dict(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=2),
                 dict(hidden_size=192, intermediate_size=1120, num_attention_heads=6, num_key_value_heads=2,
                      architectures=["Qwen2ForCausalLM"], model_type="qwen2")]:
        model = build_model(dict(TINY_CONFIG, **dims), seed=0)
        inject_lora(model, r=8, alpha=16)
        use_fast_linear(model)  # as run.py runs it (its products' autograd keeps their inputs)
        params = {p.data_ptr() for p in model.parameters()}
        saved = {}

        def keep(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                saved[ptr] = max(saved.get(ptr, 0), t.untyped_storage().nbytes())
            return t
        tokens = 256
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            model.hidden_states(torch.randint(0, 250, (1, tokens)))
        per = sum(saved.values()) / tokens / model.config.num_hidden_layers
        bound = plan.activation_bytes(model.config, 8)
        assert 0.7 * bound < per <= bound, (dims["hidden_size"], per, bound)


def test_memory_is_planned_long_prompts_recompute_and_copies_go_first():
    # The coder model, 16 rows of 256 tokens: a 4k-token ARC prompt's activations would pass ACTIVATIONS_MAX, so
    # its layers are recomputed; a short prompt keeps them, in micro-batches sized to the rest of the bound.
    kw = dict(rows=16, max_new_tokens=256, lora_r=128, trains=True, copies_bytes=6 * GB)
    long, short = (plan.plan_memory(CODER, prompt_tokens=n, available=100 * GB, **kw) for n in (3959, 241))
    assert long.checkpointing and not short.checkpointing
    act = plan.activation_bytes(CODER, 128) * CODER.num_hidden_layers
    assert (241 + short.tokens_per_microbatch) * act <= plan.ACTIVATIONS_MAX < 3959 * act
    # Copies larger than the learner's memory are freed while it runs, whatever the machine has: the peak is then
    # the larger of the two, not their sum.
    assert long.learning < 6 * GB and long.copies == 6 * GB and not long.copies_while_learning
    # Less memory: (small copies are first kept through learning,) freed while the learner runs, then not made at
    # all, then the learner keeps less, then the run is refused.
    for copies, order in ((6 * GB, [(True, False), (False, False)]),
                          (GB // 2, [(True, True), (True, False), (False, False)])):
        steps = []
        for available in range(40 * GB, 0, -GB // 8):
            try:
                p = plan.plan_memory(CODER, prompt_tokens=3959, available=available, **dict(kw, copies_bytes=copies))
            except plan.DoesNotFit as e:
                assert e.need > e.available == available
                break
            assert p.peak <= available
            steps.append((p.copies > 0, p.copies_while_learning))
        assert list(dict.fromkeys(steps)) == order, (copies, steps)
        assert p.tokens_per_microbatch < long.tokens_per_microbatch, "at the end the learner kept less"
    untrained = plan.plan_memory(CODER, prompt_tokens=3959, available=100 * GB, **dict(kw, trains=False))
    assert untrained.learning == 0 and untrained.peak < long.peak


def test_the_embedded_models_are_planned_before_they_are_fetched(tmp_path, monkeypatch):
    monkeypatch.setenv("MIGRATE_CACHE", str(tmp_path))
    for name, entry in EMBEDDED.items():
        cfg = model_config(name)
        assert cfg.hidden_size == entry.shapes["hidden_size"]
    params = {name: count_parameters(model_config(name)) for name in EMBEDDED}
    assert params == {"smollm2-135m": 134_515_008, "qwen2.5-coder-1.5b": 1_777_088_000}, \
        "the converted folders' safetensors hold exactly these"
    assert os.listdir(tmp_path) == []


def test_a_run_that_cannot_fit_is_refused_in_one_line_naming_a_model_that_fits(tmp_path):
    cache, out = str(tmp_path / "cache"), str(tmp_path / "run")
    r = cli("--task", "arc", "--task-id", "6150a2bd", "--memory", "4", "--out", out, cache=cache)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert "qwen2.5-coder-1.5b needs about" in lines[0] and "--model smollm2-135m fits" in lines[0], lines[0]
    assert not os.path.exists(os.path.join(out, "config.json")), "the same --out stays free"
    assert not os.path.exists(cache) or not os.listdir(cache), "refused before anything was fetched"
    r = cli("--task", "arc", "--task-id", "6150a2bd", "--memory", "0.5", "--out", out, cache=cache)
    assert r.returncode == 2 and "no embedded model fits" in r.stderr, r.stderr[-1500:]


def test_problems_run_together_are_planned_and_too_many_are_refused_naming_how_many_fit(tmp_path):
    # Semantle's shapes with SmolLM2: K problems' cache rows (each holding its whole prompt), adapters, optimisers
    # and prompts in one learner pass; no decode copies; the prompts' activations kept while memory allows.
    smol = model_config("smollm2-135m")
    kw = dict(prompt_tokens=110, rows=5, max_new_tokens=24, lora_r=64, trains=True, copies_bytes=GB)
    plans = {k: plan.plan_memory(smol, problems=k, available=100 * GB, **kw) for k in (1, 2, 8, 16)}
    assert plans[1].copies == GB and all(plans[k].copies == 0 for k in (2, 8, 16))
    assert plans[16].resident > plans[8].resident > plans[2].resident and plans[16].peak > plans[8].peak
    assert not plans[16].checkpointing, "on a machine with room, many problems' prompts are kept, not recomputed"
    tight = plan.plan_memory(smol, problems=16, available=plans[16].peak - GB // 2, **kw)
    assert tight.peak <= plans[16].peak - GB // 2 and tight.checkpointing
    # The command line: refused before anything is written, naming the number of problems at a time that fits.
    cache, out = str(tmp_path / "cache"), str(tmp_path / "runs")
    r = cli("--task", "semantle", "--task-ids", "apple,river,chair,cloud", "--together", "4", "--memory", "2.3",
            "--out", out, cache=cache)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-1500:]
    m = re.fullmatch(r"error: --together 4 needs about [\d.]+ GB of memory and 2\.3 GB are available; --together "
                     r"(\d) fits", lines[0])
    assert m and 1 <= int(m.group(1)) < 4, lines[0]
    assert not os.path.exists(out) or not any(os.path.exists(os.path.join(out, d, "config.json"))
                                              for d in os.listdir(out)), "refused before any run was written"


# ---------------------------------------------------------------- time


def test_a_run_says_its_expected_duration_before_the_first_step_and_the_time_left_after_each(tmp_path):
    r = cli("--task", "toy", "--model", "tiny", "--budget", "8", "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-1500:]
    lines = r.stderr.splitlines()
    assert lines[0].startswith("toy ") and "model tiny" in lines[0] and "budget 8 oracle calls" in lines[0]
    assert lines[1].startswith("memory: about") and lines[2].startswith("expected: about"), lines[:3]
    steps = [line for line in lines if line.startswith("step ")]
    assert steps and all(" left" in s or s.endswith("| done") for s in steps), steps
    assert steps[-1].endswith("| done") or "stalled" in r.stderr or "solved" in r.stderr


def test_time_left_comes_from_the_steps_so_far():
    history = [{"seconds": 10.0, "new_calls": 4}, {"seconds": 30.0, "new_calls": 0}]  # 20 s and 2 calls a step
    assert outcome.time_left(history, 3) == "about 40 s left"  # 2 more steps
    assert outcome.time_left(history, 9) == "about 2 min left"  # 5 more
    assert outcome.time_left(history, 0) == "done"
    assert "unknown" in outcome.time_left([{"seconds": 5.0, "new_calls": 0}], 3)
