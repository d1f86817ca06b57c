"""Benchmarks, printed as JSON: our code against its peer on the same weights in the same run.

  python -m scripts.bench sample   # tokens/s of our sampler (float32, and int8 weights) vs transformers' generate,
                           # batch 1/8/16, beside this machine's bandwidth and product-rate limits
  python -m scripts.bench grpo     # seconds per GRPO iteration vs TRL's GRPOTrainer (sampling on float32, and on int8;
                           # --learner-dtypes float32 bfloat16: also the opt-in bfloat16 learner)
  python -m scripts.bench step     # a Semantle step of run.py (MiGrATe, cpu preset): seconds sampling and training,
                           # beside the floor this machine's bandwidth and product rate put under each
                           # (--dtypes float32 bfloat16: also the opt-in bfloat16 model, and its KL to float32;
                           # --learner-dtypes float32 bfloat16: also the opt-in bfloat16 learner)
  python -m scripts.bench repack   # what the sampler's REPACK_ROW_STEPS weighs: seconds to rebuild the packed weights
                           # for a batch, and a packed decode step's milliseconds, per row count (no peer)
  python -m scripts.bench together # problems per hour at equal budget, K problems at a time in one process
                           # (--together 1 2 4 8 16) against one at a time, with peak memory and a step's phases
  python -m scripts.bench gpu      # CUDA, bf16, random weights of real shapes: decode vs transformers, roofline,
                           # one ARC-sized GRPO iteration (needs a GPU; not run on the CPU machines)

As on an AVX2-only CPU, on this one: `ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
python -m scripts.bench ...` caps the instructions every library here (and the peer's) uses; the JSON records the caps.
It is the same cores, caches and memory, so it shows the kernels' choice, not another CPU's figures.

Speed is measured, never asserted: nothing here fails on a slow machine. `transformers`, `trl` and `peft`
are benchmark-only imports (requirements-bench.txt).
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from fast.cpu_linear import machine, use_fast_linear
from weights.default_model import model_path
from model import ModelError, load_model
from fast.packing import KERNELS, CopyRefused, missing_product
from fast.decode import FastStep
from sampling import Sampler

PROMPT = "Write a short story about a robot who learns to paint."  # 42 tokens once chat-templated (SmolLM2)



def run_sampler(model, tok, **kw):
    """The sampler as run.py builds it: the fast step (fast/decode.py)."""
    return Sampler(model, tok, FastStep(model, **kw))

def read_weights(model):
    """Weights a decode step reads whole: all but an untied embedding, which is only indexed."""
    return sum(p.numel() for n, p in model.named_parameters()
               if "embed_tokens" not in n or model.config.tie_word_embeddings)


def limits(model, batches, kernel):
    """This machine's own limits for decoding this model, measured here: read bandwidth (a 1 GB sum) and the
    best float32 product rate (the model's head on 1024 rows, with the sampler's kernel), as the tokens/s they
    allow: a step reads every weight once and does 2 flops per weight and row."""
    x = torch.randn(1 << 28)  # 1 GiB
    x.sum()
    t = time.perf_counter()
    for _ in range(3):
        x.sum()
    bandwidth = 3 * x.numel() * 4 / (time.perf_counter() - t)
    del x
    params = read_weights(model)
    k, w = KERNELS[kernel], model.lm_head.weight.detach()
    xb, packed = torch.randn(1024, w.shape[1]), k.pack(w, None, 1024)
    k.mm(xb, packed, 1024)
    t = time.perf_counter()
    for _ in range(3):
        k.mm(xb, packed, 1024)
    flops = 3 * 2 * 1024 * w.numel() / (time.perf_counter() - t)
    xh, wh = xb.bfloat16(), w.bfloat16()  # the learner's opt-in product (GRPOConfig.learner_dtype)
    F.linear(xh, wh)
    t = time.perf_counter()
    for _ in range(3):
        F.linear(xh, wh)
    bf16_flops = 3 * 2 * 1024 * w.numel() / (time.perf_counter() - t)
    out = {"read_GB_s": round(bandwidth / 1e9, 1), "float32_GFLOP_s": round(flops / 1e9, 1),
           "bfloat16_GFLOP_s": round(bf16_flops / 1e9, 1), "weights_GB_float32": round(params * 4 / 1e9, 3)}
    for b in batches:
        out[f"batch_{b}_limit_tok_s"] = {"float32": round(min(bandwidth / (params * 4) * b, flops / (2 * params)), 1),
                                         "int8_bandwidth": round(bandwidth / params * b, 1)}
    return out


def bench_sample(args):
    from transformers import AutoModelForCausalLM

    path = model_path(args.model)
    model, tok = load_model(path)
    use_fast_linear(model)  # as run.py runs it
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]))
    samplers = {w: run_sampler(model, tok, weights=w) for w in args.weights}
    rows = []
    for batch in args.batches or [1, 8, 16]:
        ours, theirs, kl = {w: [] for w in samplers}, [], {}
        for rep in range(args.repeats):
            for w, sampler in samplers.items():
                g = torch.Generator().manual_seed(rep)
                t = time.perf_counter()
                out = sampler.generate([prompt], n=batch, max_new_tokens=args.new_tokens, temperature=1.0,
                                       stop_ids=(), generator=g)  # never stop early: every row makes N tokens
                ours[w].append(sum(len(c.ids) for c in out) / (time.perf_counter() - t))
                if w != "float32" and rep == 0:
                    kl[w] = kl_to_float32(model, out)
            ids = torch.tensor([prompt] * batch)
            torch.manual_seed(rep)
            t = time.perf_counter()
            with torch.inference_mode():
                res = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                  top_k=0, top_p=1.0, max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, pad_token_id=tok.pad_id)
            theirs.append((res.shape[1] - ids.shape[1]) * batch / (time.perf_counter() - t))
        h = max(theirs)  # best of repeats for all: the machine's noise only slows things
        row = {"batch": batch, "transformers_tok_s": round(h, 1)}
        for w in samplers:
            row[f"ours_{w}_tok_s"] = round(max(ours[w]), 1)
            row[f"ratio_{w}"] = round(max(ours[w]) / h, 2)
        for w, k in kl.items():
            row[f"{w}_kl_per_token"] = k
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    kernels = {w: {"kernel": s.step.packed.kernel, "timed": {str(k): v for k, v in s.step.packed.choice.items()}}
               for w, s in samplers.items()}
    return {"benchmark": "sample", "model": path.rsplit("/", 1)[-1], "prompt_tokens": len(prompt),
            "new_tokens": args.new_tokens, "repeats": args.repeats, "machine": machine(), "kernels": kernels,
            "limits": limits(model, args.batches or [1, 8, 16],
                             (samplers["float32"].step.packed.kernel or {}).get("head", "onednn") if "float32" in samplers
                             else "onednn"),
            "results": rows}


@torch.no_grad()
def kl_to_float32(model, outs):
    """KL(sampling policy || float32 policy) per token, estimated on the sampler's own samples (int8 or bfloat16
    weight copies, or a bfloat16 model: dtype_kl): the mean of log p_q(y) - log p_float32(y) (k1) and of the
    always-positive k3, with `model`, the float32 model, giving log p_float32."""
    k1, k3, n = 0.0, 0.0, 0
    for o in outs:
        x = torch.tensor([o.prompt_ids + o.ids])
        lp = torch.log_softmax(model(x)[0, len(o.prompt_ids) - 1:-1].float(), -1)
        d = torch.tensor(o.logprobs) - lp.gather(-1, torch.tensor(o.ids)[:, None])[:, 0]  # log p_q - log p32
        k1, k3, n = k1 + float(d.sum()), k3 + float((torch.exp(-d) + d - 1).sum()), n + len(o.ids)
    return {"k1": round(k1 / n, 5), "k3": round(k3 / n, 5)}


GRPO_PROMPT = ("Invent a name for a new colour and describe it in one vivid sentence, "
               "as a poet would for a paint catalogue.")  # ~40 tokens once chat-templated (SmolLM2)


def toy_reward(text):
    """A cheap, varied reward so every group has spread: share of distinct letters."""
    letters = [c for c in text.lower() if c.isalpha()]
    return len(set(letters)) / 26


def bench_grpo(args):
    """One GRPO iteration (sample G completions, score, one clipped-loss update of LoRA r=16 on q/v) for us and
    for TRL's GRPOTrainer with a PEFT LoRA of the same shape, on the same weights, float32 CPU."""
    from fast.shared_prompt import SharedPromptLearner
    from grpo import GRPOConfig
    from lora import inject_lora

    path = model_path(args.model)
    G, new = args.group, args.new_tokens
    model, tok = load_model(path)
    inject_lora(model, r=16, alpha=32, targets=("q_proj", "v_proj"))
    use_fast_linear(model)  # as run.py runs it
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": GRPO_PROMPT}]))
    ours = {}
    settings = [(w, d) for d in args.learner_dtypes for w in args.weights]  # sampler copies x learner dtypes
    for weights, learner_dtype in settings:
        key = weights + ("" if learner_dtype == "float32" else f"_learner_{learner_dtype}")
        learner = SharedPromptLearner(model, GRPOConfig(lr=1e-5, mu=1, learner_dtype=learner_dtype))
        sampler, ours[key] = run_sampler(model, tok, weights=weights), []
        for it in range(args.iterations + 1):  # the first is warm-up
            t = time.perf_counter()
            outs = sampler.generate([prompt], n=G, max_new_tokens=new, stop_ids=(),
                                    generator=torch.Generator().manual_seed(it))
            learner.step(prompt, [replace(o, reward=toy_reward(o.text)) for o in outs])
            if it:
                ours[key].append(time.perf_counter() - t)
    trl_times = bench_trl(path, G, new, args.iterations)
    h = min(trl_times)
    out = {"benchmark": "grpo_iteration", "model": path.rsplit("/", 1)[-1], "group": G, "prompt_tokens": len(prompt),
           "new_tokens": new, "lora": "r=16 alpha=32 q_proj,v_proj", "iterations": args.iterations,
           "machine": machine(), "trl_s_per_iteration": round(h, 2), "trl_all": [round(x, 2) for x in trl_times]}
    for w, times in ours.items():
        out[f"ours_{w}_s_per_iteration"] = round(min(times), 2)
        out[f"speedup_{w}"] = round(h / min(times), 2)
        out[f"ours_{w}_all"] = [round(x, 2) for x in times]
    return out


def bench_trl(path, G, new, iterations):
    """Seconds per GRPOTrainer step (generation + loss + update), first step excluded."""
    import tempfile
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig as TRLConfig, GRPOTrainer

    class Timer(TrainerCallback):
        times, t = [], None

        def on_step_begin(self, *a, **k):
            Timer.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            Timer.times.append(time.perf_counter() - Timer.t)

    def reward(completions, **kw):
        return [toy_reward(c[0]["content"] if isinstance(c, list) else c) for c in completions]

    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": GRPO_PROMPT}]}] * (G * (iterations + 1)))
    with tempfile.TemporaryDirectory() as out:
        cfg = TRLConfig(output_dir=out, per_device_train_batch_size=G, num_generations=G,
                        max_completion_length=new, generation_kwargs={"min_new_tokens": new},
                        num_iterations=1, beta=0.0, epsilon_high=0.28, scale_rewards="none", learning_rate=1e-5,
                        max_steps=iterations + 1, use_cpu=True, bf16=False, report_to=[], logging_steps=1,
                        save_strategy="no", temperature=1.0, top_k=0, top_p=1.0, seed=0)
        trainer = GRPOTrainer(model=hf, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tok,
                              peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                                     task_type="CAUSAL_LM"), callbacks=[Timer()])
        with contextlib.redirect_stdout(sys.stderr):  # its log dicts: stdout is for our JSON
            trainer.train()
    return Timer.times[1:]


GPU_CONFIGS = {  # the shapes of the real models (weights random: nothing large needs to travel)
    "qwen2.5-1.5b": {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936, "hidden_size": 1536,
                     "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
                     "num_key_value_heads": 2, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                     "max_position_embeddings": 32768, "tie_word_embeddings": True},
    "llama-3.2-3b": {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 3072,
                     "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24,
                     "num_key_value_heads": 8, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                     "max_position_embeddings": 131072, "tie_word_embeddings": True,
                     "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
}
PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}  # bytes/s of HBM, SXM parts


def step_argv(model, budget, kl, folder, task_id="river"):
    """run.py's flags for the measured Semantle step (bench_step, scripts/stepprofile.py): MiGrATe, cpu preset, a tuning
    target, no learning diagnostics."""
    argv = ["--task", "semantle", "--task-id", task_id, "--method", "migrate", "--preset", "cpu",
            "--budget", str(budget), "--diagnostics", "0", "--kl-coef", str(kl), "--out", folder]
    return argv + (["--model", model] if model else [])


def bench_step(args):
    """The step users wait for: `run.py --task semantle --method migrate` on a tuning target (never one of the
    paper's ten), the median seconds of its trained steps after the first, split into sampling and training,
    beside their floors on this machine. Training is mu epochs of a forward and an input-gradient backward
    through the frozen weights (about two forwards) over the shared prompt and the group's completions, plus
    the reference forward when the KL term is on: 2 flops per weight and token each, at the measured product
    rate. Sampling is the prompt's prefill at that rate plus one read of every weight per decoded token (the
    mean completion's length: the longest is at least that) at the measured bandwidth. No peer runs this step."""
    import subprocess
    import tempfile
    path = model_path(args.model)
    model, _ = load_model(path)
    lim = limits(model, [1], "onednn" if torch.backends.mkldnn.is_available() else "mm")
    weights = read_weights(model)
    del model
    out = {"machine": machine(), "limits": lim}
    # each model dtype as it is, then the float32 model with each pairing of the opt-in learner dtypes and
    # sampler weight copies
    runs = [(kl, dtype, "float32", "float32") for dtype in args.dtypes for kl in args.kl_coefs]
    runs += [(kl, "float32", d, w) for d in args.learner_dtypes for w in args.weights
             if (d, w) != ("float32", "float32") for kl in args.kl_coefs]
    for kl, dtype, learner_dtype, sample_weights in runs:
        with tempfile.TemporaryDirectory() as folder:
            cmd = [sys.executable, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "run.py"),
                   *step_argv(args.model, args.budget, kl, folder), "--dtype", dtype, "--learner-dtype", learner_dtype,
                   "--sample-weights", sample_weights]
            done = subprocess.run(cmd, stdout=subprocess.DEVNULL)  # run.py's own one-line error reaches stderr
            if done.returncode != 0:
                print(f"error: scripts/bench.py step: the measured run.py exited with status {done.returncode} "
                      "(its error is above)", file=sys.stderr)
                sys.exit(done.returncode)
            with open(os.path.join(folder, "metrics.jsonl")) as f:
                steps = [json.loads(line) for line in f][1:]  # the first step also chooses kernels
            with open(os.path.join(folder, "summary.json")) as f:
                summary = json.load(f)
            prompt = summary["prompt_tokens"]
            with open(os.path.join(folder, "config.json")) as f:
                cfg = json.load(f)
        steps = [m for m in steps if m.get("loss") is not None]  # trained (a skipped update takes ~0 s, not 0)
        if not steps:  # e.g. a random model: its guesses are never words, so no group ever has a reward to learn from
            print(f"error: scripts/bench.py step: the run trained no step ({summary['steps']} steps, "
                  f"{summary['oracle_calls']} of {args.budget} oracle calls, stopped on {summary['stop_reason']}); "
                  "raise --budget, or use a model whose guesses are words", file=sys.stderr)
            sys.exit(2)
        med = lambda key: round(statistics.median(m[key] for m in steps), 3)
        tokens = statistics.median(m["completion_tokens"] for m in steps)
        rows = statistics.median(sum(m["members"].values()) for m in steps)
        forwards = 2 * cfg["mu"] + (1 if kl > 0 else 0)
        train_flops = forwards * 2 * weights * (prompt + tokens)
        rate, bandwidth = lim["float32_GFLOP_s"] * 1e9, lim["read_GB_s"] * 1e9
        train_rate = rate if learner_dtype == "float32" else lim["bfloat16_GFLOP_s"] * 1e9
        read = 4 if sample_weights == "float32" else KERNELS[sample_weights].bytes_per_weight  # a token, per weight
        out[f"kl_{kl}" + ("" if dtype == "float32" else f"_{dtype}")
            + ("" if learner_dtype == "float32" else f"_learner_{learner_dtype}")
            + ("" if sample_weights == "float32" else f"_weights_{sample_weights}")] = {
            "dtype": dtype, "learner_dtype": learner_dtype, "sample_weights": sample_weights, "steps": len(steps),
            "seconds": med("seconds"), "sample_seconds": med("sample_seconds"),
            "train_seconds": med("train_seconds"), "prompt_tokens": prompt, "completion_tokens": tokens,
            "rows": rows, "train_GFLOP": round(train_flops / 1e9, 1),
            "train_floor_s": round(train_flops / train_rate, 3),
            "sample_floor_s": round(2 * weights * prompt / rate + tokens / rows * weights * read / bandwidth, 3)}
    if "bfloat16" in args.dtypes:
        out["bfloat16_kl_to_float32"] = dtype_kl(path, torch.bfloat16)
    return out


@torch.no_grad()
def dtype_kl(path, dtype):
    """KL(policy in `dtype` || float32 policy) per token, on 16 samples of 64 tokens of the `dtype` model (k1, k3)."""
    model, tok = load_model(path, dtype=dtype)
    use_fast_linear(model)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]))
    outs = run_sampler(model, tok).generate([prompt], n=16, max_new_tokens=64, temperature=1.0, stop_ids=(),
                                        generator=torch.Generator().manual_seed(0))
    return kl_to_float32(use_fast_linear(load_model(path)[0]), outs)


def bench_repack(args):
    """The two costs fast.decode.REPACK_ROW_STEPS weighs when rows finish early: rebuilding the decoder's packed
    weights for a smaller batch (paid twice: the next call packs its full batch again), against a finished row
    riding along in the packed step. Per row count: the seconds of a full rebuild, and the packed decode step's
    milliseconds (32 tokens more minus 2, no stop). The row-steps that repay a repack are twice the rebuild over
    the step's cost per row, from the largest and smallest counts."""
    model, tok = load_model(model_path(args.model))
    use_fast_linear(model)  # as run.py runs it
    sampler = run_sampler(model, tok)
    if not sampler.step.packed.available:  # e.g. `tiny`: its products are too narrow to gain from packs
        print("error: scripts/bench.py repack: this model decodes without packed weights on this machine (too narrow, not "
              "float32, or no room for the copy): nothing to repack", file=sys.stderr)
        sys.exit(2)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]))

    def seconds(rows, new):
        t = time.perf_counter()
        sampler.generate([prompt], n=rows, max_new_tokens=new, stop_ids=(), generator=torch.Generator().manual_seed(0))
        return time.perf_counter() - t
    rows_out = []
    for rows in sorted(args.batches or [16, 8, 4, 2, 1], reverse=True):
        seconds(rows, 2)  # packs for this count (and, the first time in its size class, the kernels chosen)
        packed = sampler.step.packed
        repack = []
        for _ in range(args.repeats):
            packed.release()
            t = time.perf_counter()
            packed.prepare(rows)
            repack.append(time.perf_counter() - t)
        step = (min(seconds(rows, 34) for _ in range(args.repeats)) -
                min(seconds(rows, 2) for _ in range(args.repeats))) / 32
        rows_out.append({"rows": rows, "repack_s": round(min(repack), 3), "step_ms": round(1000 * step, 2)})
    hi, lo = rows_out[0], rows_out[-1]
    per_row = (hi["step_ms"] - lo["step_ms"]) / max(1, hi["rows"] - lo["rows"]) / 1000
    repay = round(2 * statistics.mean(r["repack_s"] for r in rows_out) / per_row) if per_row > 0 else None
    return {"machine": machine(), "model": args.model or "SmolLM2-135M-Instruct", "rows": rows_out,
            "step_ms_per_row": round(1000 * per_row, 3), "row_steps_to_repay_a_repack": repay}


def bench_together(args):
    """Problems per hour at equal budget, one problem at a time (run.py --task-ids, each problem alone on the fast
    paths) against K at a time in one process (--together K): the same problems, the same budget each, MiGrATe at
    the task's cpu preset. Per K: wall seconds, problems per hour and its ratio to one at a time, the peak
    resident memory, and where a step's time goes (median seconds of a step's phases; together, a step is every
    running problem's). Semantle's problems are words outside the paper's ten."""
    import subprocess
    import tempfile
    from problem import folder_name
    from tasks.semantle import TUNING_TARGETS
    ids = args.task_ids.split(",") if args.task_ids else \
        (TUNING_TARGETS + ["mountain", "pencil", "castle", "bridge", "forest", "candle", "winter", "letter"])
    ids = ids[:args.problems]
    out = {"machine": machine(), "task": args.task, "task_ids": ids, "problems": len(ids), "budget": args.budget,
           "results": []}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for k in args.together:
        with tempfile.TemporaryDirectory() as folder:
            cmd = [sys.executable, os.path.join(root, "run.py"), "--task", args.task, "--task-ids", ",".join(ids),
                   "--method", "migrate", "--budget", str(args.budget), "--diagnostics", "0", "--out", folder]
            cmd += (["--model", args.model] if args.model else []) + (["--together", str(k)] if k > 1 else [])
            t = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak memory
            wall = time.perf_counter() - t
            if os.waitstatus_to_exitcode(status) != 0:
                print(f"error: scripts/bench.py together: run.py exited with status "
                      f"{os.waitstatus_to_exitcode(status)} at K={k} (run it by hand to see why)", file=sys.stderr)
                sys.exit(2)
            steps = []
            for tid in ids:
                with open(os.path.join(folder, folder_name(tid), "metrics.jsonl")) as f:
                    steps += [json.loads(line) for line in f]
        phases = {key: round(statistics.median(m[key] for m in steps), 3)
                  for key in ("seconds", "sample_seconds", "reward_seconds", "train_seconds")}
        row = {"together": k, "wall_s": round(wall, 1), "problems_per_hour": round(len(ids) / wall * 3600, 1),
               "peak_rss_GB": round(usage.ru_maxrss * 1024 / 1e9, 2), "step_median_s": phases}
        out["results"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    alone = next((r for r in out["results"] if r["together"] == 1), None)
    for r in out["results"]:
        r["ratio_to_one_at_a_time"] = round(r["problems_per_hour"] / alone["problems_per_hour"], 2) if alone else None
    return out


def bench_gpu(args):
    """Decode tokens/s at batch 1/16/64 for ours (compiled static decode) and transformers' generate on the
    same bf16 weights, the share of the memory-bandwidth roofline reached at batch 1, and one GRPO iteration
    on an ARC-sized group (~4k-token prompt, G=16, 512 new tokens): seconds and peak memory."""
    from transformers import AutoModelForCausalLM, AutoConfig
    from fast.shared_prompt import SharedPromptLearner
    from grpo import GRPOConfig
    from lora import inject_lora
    from model import build_model
    assert torch.cuda.is_available(), "scripts/bench.py gpu needs a CUDA GPU"
    dev, dt = "cuda", torch.bfloat16
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BANDWIDTH.items() if k in name), None)
    out = {"benchmark": "gpu", "device": name, "torch": torch.__version__, "models": {}}
    for cname, cfg in GPU_CONFIGS.items():
        model = build_model(cfg, device=dev, dtype=dt, seed=0).eval()
        hf_cfg = AutoConfig.for_model(cfg["architectures"][0].replace("ForCausalLM", "").lower(),
                                      **{k: v for k, v in cfg.items() if k != "architectures"})
        hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=dt).to(dev).eval()
        hf.load_state_dict(model.state_dict(), strict=False)  # same weights, by Hugging Face names
        tok = _RandomTokens(cfg["vocab_size"])
        prompt = list(range(100, 164))
        rows = []
        for batch in args.batches or [1, 16, 64]:
            s = run_sampler(model, tok, compile=True)
            s.generate([prompt], n=batch, max_new_tokens=8, stop_ids=())  # compile / capture
            torch.cuda.synchronize()
            t = time.perf_counter()
            s.generate([prompt], n=batch, max_new_tokens=args.new_tokens, stop_ids=())
            torch.cuda.synchronize()
            ours = batch * args.new_tokens / (time.perf_counter() - t)
            ids = torch.tensor([prompt] * batch, device=dev)
            hf.generate(ids, do_sample=True, max_new_tokens=8, min_new_tokens=8, top_k=0)
            torch.cuda.synchronize()
            t = time.perf_counter()
            hf.generate(ids, do_sample=True, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, top_k=0)
            torch.cuda.synchronize()
            theirs = batch * args.new_tokens / (time.perf_counter() - t)
            row = {"batch": batch, "ours_tok_s": round(ours, 1), "transformers_tok_s": round(theirs, 1),
                   "ratio": round(ours / theirs, 2)}
            if batch == 1 and peak:
                weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
                row["roofline_share"] = round(ours * weight_bytes / peak, 3)  # tokens/s x bytes per token / peak
            rows.append(row)
            print(json.dumps({cname: row}), file=sys.stderr, flush=True)
        inject_lora(model, r=128, alpha=32)
        learner = SharedPromptLearner(model, GRPOConfig(lr=1e-5, mu=1, activation_checkpointing=True))
        g = torch.Generator().manual_seed(0)
        arc_prompt = torch.randint(0, cfg["vocab_size"], (4000,), generator=g).tolist()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        t = time.perf_counter()
        outs = run_sampler(model, tok).generate([arc_prompt], n=16, max_new_tokens=512, stop_ids=())
        sample_s = time.perf_counter() - t
        learner.step(arc_prompt, [replace(o, reward=i / 16) for i, o in enumerate(outs)])
        torch.cuda.synchronize()
        out["models"][cname] = {"decode": rows, "grpo_arc_iteration_s": round(time.perf_counter() - t, 2),
                                "grpo_arc_sample_s": round(sample_s, 2),
                                "grpo_arc_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        del model, hf, learner
        torch.cuda.empty_cache()
        out["models"][cname]["together"] = together_steps(cfg, dev, dt, args.together)
    return out


def together_steps(cfg, device, dtype, ks, prompt_len=1024, group=16, new_tokens=128, r=64):
    """K problems' steps over one base model (together.py), on random weights of cfg's shape: each problem a prompt
    of its own (prompt_len random tokens), `group` samples of `new_tokens`, then the K groups learned in one pass
    (mu 1, each with its own adapter and AdamW). Per K: seconds of a joint step (sampling, learning) after one
    warm-up step, problem-steps per second and its ratio to K = 1, and the peak memory on a GPU."""
    from fast.together import FastTogether, FastTogetherStep
    from fast.shared_prompt import SharedPromptLearner
    from grpo import GRPOConfig
    from model import build_model
    from together import learn_together, problem_model
    cuda = torch.device(device).type == "cuda"
    base = build_model(cfg, device=device, dtype=dtype, seed=0).eval()
    tok, rows = _RandomTokens(cfg["vocab_size"]), []
    g = torch.Generator().manual_seed(1)
    for k in ks:
        together = FastTogether(base, k, ("q_proj", "v_proj"))
        models = [problem_model(base, s, r, 2 * r, ("q_proj", "v_proj")) for s in range(k)]
        for s, m in enumerate(models):
            with torch.no_grad():  # adapters that differ, as after some training (B = 0 changes nothing)
                for n, p in m.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 1e-3, generator=torch.Generator(device).manual_seed(s))
            together.put(s, m)
        learners = [SharedPromptLearner(m, GRPOConfig(lr=1e-5, mu=1)) for m in models]
        step = FastTogetherStep(together)
        sampler = Sampler(together.model, tok, step)
        prompts = [torch.randint(0, cfg["vocab_size"], (prompt_len,), generator=g).tolist() for _ in range(k)]
        times = []
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(2):  # the first is the warm-up
            t = time.perf_counter()
            step.prompt_slots = list(range(k))
            outs = sampler.generate(prompts, n=group, max_new_tokens=new_tokens, stop_ids=(),
                                    generator=[torch.Generator().manual_seed(s) for s in range(k)])
            if cuda:
                torch.cuda.synchronize()
            sampled = time.perf_counter()
            groups = [[replace(o, reward=i / group) for i, o in enumerate(outs[s * group:(s + 1) * group])]
                      for s in range(k)]
            learn_together(together, learners, prompts, groups)
            if cuda:
                torch.cuda.synchronize()
            times.append((sampled - t, time.perf_counter() - sampled))
        sample_s, learn_s = times[-1]
        row = {"together": k, "step_s": round(sample_s + learn_s, 3), "sample_s": round(sample_s, 3),
               "learn_s": round(learn_s, 3), "problem_steps_per_s": round(k / (sample_s + learn_s), 3)}
        if cuda:
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        del together, models, learners, step, sampler
        if cuda:
            torch.cuda.empty_cache()
    one = next((r["problem_steps_per_s"] for r in rows if r["together"] == 1), None)
    for row in rows:
        row["ratio_to_one"] = round(row["problem_steps_per_s"] / one, 2) if one else None
    return rows


class _RandomTokens:
    """The sampler's view of a tokenizer, for random-weight models: no text, no stop ids."""
    pad_id, stop_ids = 0, []

    def __init__(self, vocab):
        self.vocab_size = vocab

    def decode(self, ids, skip_special_tokens=True):
        return ""


def main():
    ap = argparse.ArgumentParser(prog="python -m scripts.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["sample", "grpo", "step", "repack", "together", "gpu"], help="which benchmark")
    ap.add_argument("--model", default=None, help="Hugging Face folder (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--batches", type=int, nargs="+", default=None,
                    help="batch sizes (sample: 1 8 16; repack: 16 8 4 2 1; gpu: 1 16 64)")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row (sample)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per setting; the best is reported")
    ap.add_argument("--weights", nargs="+", default=None, choices=["float32", "bfloat16", "int8"],
                    help="sample, grpo, step: our decoder's weight copies (float32: exact; bfloat16, int8: opt-in, "
                         "change numerics; sample prints their KL to float32) (default: sample, grpo float32 int8; "
                         "step float32)")
    ap.add_argument("--group", type=int, default=8, help="completions per group (grpo)")
    ap.add_argument("--iterations", type=int, default=3, help="timed iterations after one warm-up (grpo)")
    ap.add_argument("--budget", type=int, default=80,
                    help="oracle calls of the measured run (step: 20 of them warm start; together: each problem's)")
    ap.add_argument("--together", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                    help="together: problems at a time (1: one after another, each alone); gpu: the K of its sweep "
                         "of joint steps")
    ap.add_argument("--problems", type=int, default=16, help="together: how many problems (at most 18)")
    ap.add_argument("--task", default="semantle", help="together: the task (semantle; toy for a quick check)")
    ap.add_argument("--task-ids", default=None,
                    help="together: the problems, separated by commas (default: Semantle words outside the paper's ten)")
    ap.add_argument("--kl-coefs", type=float, nargs="+", default=[0.0, 0.1], help="KL coefficients to run (step)")
    ap.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                    help="step: run.py --dtype of each run (bfloat16: opt-in, changes numerics; its KL to float32 is printed)")
    ap.add_argument("--learner-dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                    help="grpo, step: also time the learner multiplying the frozen weights in this dtype "
                         "(run.py --learner-dtype; opt-in, changes numerics), with each of --weights")
    args = ap.parse_args()
    if args.what == "gpu" and not torch.cuda.is_available():
        print("error: scripts/bench.py gpu needs a CUDA GPU; none is visible to PyTorch here", file=sys.stderr)
        sys.exit(2)
    if args.what == "grpo" and "--new-tokens" not in sys.argv:
        args.new_tokens = 64
    if args.weights is None:  # sample, grpo: both copies by default; step: the float32 policy only
        args.weights = ["float32"] if args.what == "step" else ["float32", "int8"]
    missing = sorted({missing_product(w) for w in args.weights + args.learner_dtypes} - {None})
    if missing:  # figures under a low-precision label must be that dtype's
        print(f"error: scripts/bench.py: {'; '.join(missing)}; leave it out", file=sys.stderr)
        sys.exit(2)
    benches = {"sample": bench_sample, "grpo": bench_grpo, "step": bench_step, "repack": bench_repack,
               "together": bench_together, "gpu": bench_gpu}
    try:
        result = benches[args.what](args)
    except ModelError as e:  # e.g. --model names no folder and no embedded model
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except CopyRefused as e:  # low-precision copies where they would not be used: no figures under their label
        print(f"error: scripts/bench.py: {e}; leave it out", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
