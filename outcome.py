"""What a run tells its user: the line each step prints with the time left, the summary.json it leaves, the
closing lines in plain words (what was found, what training did, what to run next) and the plot. run.py calls
these; scripts/experiments.py reads the summaries they write.
"""
import math
import os
import sys


def progress(m, budget, left, name=""):
    """A step's line; `name` (the problem) where several problems print theirs."""
    best = "-" if m["best_reward"] is None else f"{m['best_reward']:.3f}"
    line = (f"{name + ' | ' if name else ''}step {m['step']:4d} | calls {m['oracle_calls']:5d}/{budget} | best {best} | "
            f"group mean {m['group_reward_mean'] or 0:.3f} | {m['seconds']:.1f} s | {left}")
    end = "\r" if sys.stderr.isatty() and not name else "\n"
    print(line, end=end, file=sys.stderr, flush=True)


def what_learned(cfg, metrics) -> list[str]:
    """In plain words, whether training moved the policy and toward what (the learning diagnostics)."""
    from search import METHODS
    if not METHODS[cfg["method"]].trains or not metrics:
        return []
    trained = [m for m in metrics if m.get("loss") is not None]
    if not trained:
        return ["Nothing was trained: no group had a spread of rewards (every member of every group scored the same), "
                "so the policy did not move."]
    kl = [(m["step"], m["kl"]) for m in metrics if m.get("kl") is not None]
    onp = [m["on_policy_reward"] for m in metrics if m.get("on_policy_reward") is not None]
    line = f"Training updated the policy on {len(trained)} of {len(metrics)} steps"
    if kl:
        line += (f": KL to the base model {', '.join(f'{v:.3f} (step {s})' for s, v in kl[-3:])} nats a token")
    if len(onp) > 1:
        line += f"; the mean reward of its own samples went {onp[0]:.3f} -> {onp[-1]:.3f} (first step -> last)"
    repeats = metrics[-1].get("repeat_share")
    if repeats:
        line += f"; {repeats:.0%} of the last step's samples only repeated known answers"
    return [line + "."]


def what_next(cfg, summary) -> list[str]:
    """What to run next: the untrained baseline on the same problem and seed, then several seeds, paired."""
    from weights.default_model import canonical
    task, tid, seed = cfg["task"], summary["task_id"], cfg["seed"]
    other = "random" if cfg["method"] != "random" else "migrate"
    methods = " ".join(dict.fromkeys(["random", cfg["method"], "migrate"] if other == "migrate" else
                                     ["random", cfg["method"]]))
    model = canonical(cfg["model"]) if canonical(cfg["model"]) != _task_model(task) else None
    one = f" --task-id {tid}" if tid is not None else ""  # a task file may have no ids
    spec = f"{task}:{tid}" if tid is not None else task
    name = os.path.splitext(os.path.basename(task))[0]
    return [f"Next: the same problem {'untrained' if other == 'random' else 'with MiGrATe'}, on this seed: "
            f"python run.py --task {task}{one} --method {other} --seed {seed}" + (f" --model {model}" if model else ""),
            f"      several seeds, paired: python -m scripts.experiments --tasks {spec} --methods {methods} "
            f"--seeds 0 1 2 --out experiments/{name}" + (f" -- --model {model}" if model else "")]


def _task_model(task):
    from tasks import task_class
    return task_class(task).model


def time_left(history, calls_left) -> str:
    """The time left, from the steps so far: their mean seconds, times the steps the calls left take at their
    mean new calls a step."""
    from plan import minutes
    if calls_left <= 0:
        return "done"
    calls = sum(m["new_calls"] for m in history)
    if not calls:
        return "time left unknown (no new candidate yet)"
    seconds = sum(m["seconds"] for m in history) / len(history) * math.ceil(calls_left * len(history) / calls)
    return f"about {minutes(seconds)} left"


def summarise(cfg, task, db, search, reason, wall):
    from fast.cpu_linear import machine
    from tasks import Score
    best = db.best()
    scored = db.scored()
    return {"task": cfg["task"], "task_id": task.task_id, "method": cfg["method"], "seed": cfg["seed"],
            "model": cfg["model"] or "SmolLM2-135M-Instruct", "stop_reason": reason,
            "best_reward": best.reward if best else None, "best_candidate": best.key if best else None,
            "solved": search.solved, "oracle_calls": db.oracle_calls(), "budget": cfg["budget"],
            "steps": search.step_idx, "wall_seconds": round(wall, 1), "machine": machine(cfg["device"]),
            "prompt_tokens": len(search.task_prompt),
            "curve": compact_curve(db.curve()),
            "final": task.evaluate([(r.key, Score(r.reward, r.info)) for r in scored])}


def compact_curve(curve):
    """(oracle calls, best so far) only where the best changes, and the last point: the curve at any call
    count follows from it (scripts/experiments.py rebuilds its tables and plots from summary.json alone)."""
    out = [c for i, c in enumerate(curve) if i == 0 or c[1] != curve[i - 1][1]]
    return out + ([curve[-1]] if curve and out[-1] != curve[-1] else [])


def plot(curve, metrics, path, title):
    """Three panels: the best reward against oracle calls; per step, what the policy samples (on-policy mean
    reward, shares of failed and repeated completions); and how far training has moved it (KL to the base
    policy per token, log-prob gain of the best answer), for trained methods."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    if curve:
        ax.step([c for c, _ in curve], [r for _, r in curve], where="post")
    ax.set(xlabel="oracle calls", ylabel="best reward so far", title=title)
    steps = [m["step"] for m in metrics]
    for key, label in (("on_policy_reward", "on-policy mean reward"), ("failed_share", "share failed to parse"),
                       ("repeat_share", "share only repeating known candidates")):
        pts = [(s, m.get(key)) for s, m in zip(steps, metrics) if m.get(key) is not None]
        if pts:
            ax2.plot(*zip(*pts), marker=".", label=label)
    ax2.set(xlabel="step", title="what the policy samples")
    if ax2.lines:
        ax2.legend(fontsize=8)
    kl = [(s, m["kl"]) for s, m in zip(steps, metrics) if m.get("kl") is not None]
    gain = [(s, m["best_logp_gain"]) for s, m in zip(steps, metrics) if m.get("best_logp_gain") is not None]
    if kl:
        ax3.plot(*zip(*kl), marker="o", color="C3", label="KL(policy || base) per token")
        ax3.set_ylabel("KL per token", color="C3")
        twin = ax3.twinx()
        if gain:  # dashed, square markers: on its own axis it can lie exactly over the KL line
            twin.plot(*zip(*gain), marker="s", linestyle="--", color="C4", label="log-prob gain of the best answer")
        twin.set_ylabel("log p(best answer) gain, nats", color="C4")
        ax3.legend(handles=ax3.lines + twin.lines, fontsize=8, loc="upper left")
    else:
        ax3.text(0.5, 0.5, "no training: nothing moves", ha="center", va="center", transform=ax3.transAxes)
    ax3.set(xlabel="step", title="how far training moved the policy")
    from matplotlib.ticker import MaxNLocator
    for a in (ax, ax2, ax3):
        a.grid(alpha=0.3)
    for a in (ax2, ax3):
        a.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
