"""Runs served K at a time in one process over one model (together.py): which runs can share a model, the memory
plan for K of them, and the loop that fills K slots, a finished run's slot taking the next [ours]. run.py's
--together and scripts/experiments.py --together come here."""
import json
import sys

from problem import Problem, Shared, UsageError

TOGETHER_SHARE = ("model", "device", "dtype", "lora_targets", "max_new_tokens", "temperature", "learner_dtype",
                  "activation_checkpointing")  # what runs served in one process share (one model, one batch)


def serve(queue, slots: int):
    """The runs of `queue`, (config.json's dict, resume?, the task or None) each, `slots` at a time: each step
    samples every running problem's rows in one batch and trains their groups in one pass. Runs that cannot share a
    model (TOGETHER_SHARE) are served one such set after another."""
    from together import step_together
    sets = {}  # TOGETHER_SHARE values -> [(cfg, resume, task)]
    for cfg, resume, task in queue:
        if cfg.get("sample_weights", "float32") != "float32" or cfg.get("compile"):
            raise UsageError(f"{cfg['out']}: runs served together decode through the model's own modules: drop "
                             "--sample-weights and --compile")
        sets.setdefault(tuple(json.dumps(cfg.get(k)) for k in TOGETHER_SHARE), []).append((cfg, resume, task))
    for queue in sets.values():
        cfg = queue[0][0]
        plan = plan_together(queue, min(slots, len(queue)))
        print(f"{len(queue)} runs of {cfg['model']}, {min(slots, len(queue))} at a time over one model"
              + (f"; {plan.describe()}" if plan else ""), file=sys.stderr, flush=True)
        shared = Shared(cfg, slots, plan)
        held = [None] * slots
        while queue or any(held):
            for k in range(len(held)):
                while held[k] is None and queue:  # a run already done at opening closes at once
                    cfg, resume, task = queue.pop(0)
                    problem = Problem(cfg, resume=resume, task=task, shared=shared)
                    if (reason := problem.search.done()) is not None:
                        problem.close(reason)
                        continue
                    shared.together.put(k, problem.model)
                    held[k] = problem
            running = [k for k, p in enumerate(held) if p]
            metrics = step_together([held[k].search for k in running], shared.sampler, running)
            for k, m in zip(running, metrics):
                held[k].record(m, name=str(held[k].task.task_id))
                if (reason := held[k].search.done()) is not None:
                    held[k].close(reason)
                    held[k] = None
        del shared  # the next set's model in place of this one's


def plan_together(queue, slots: int):
    """The memory plan of `slots` of these runs together (plan.plan_run), for the longest prompt among them; a
    number of slots that cannot fit is refused with the number that does."""
    from plan import DoesNotFit, plan_run, task_prompt_tokens
    from search import METHODS
    from tasks import load_task
    cfg = queue[0][0]
    counted = {}  # the prompt's text -> its tokens (problems of a task often share it)
    for c, _, task in queue:
        t = task or load_task(c["task"], c["task_id"], seed=c["seed"], options=c.get("task_options"))
        text = json.dumps(t.prompt()) + t.answer_prefix
        if text not in counted:
            counted[text] = task_prompt_tokens(cfg["model"], t)
        if task is None:
            t.close()
    tokens = max(counted.values())
    trains = any(METHODS[c["method"]].trains for c, _, _ in queue)
    refusals = {}  # k -> why k runs at a time cannot fit
    for k in range(slots, 0, -1):
        try:
            plan = plan_run(cfg, None, trains, prompt_tokens=tokens, problems=k)
        except DoesNotFit as e:
            refusals[k] = e
            continue
        if k == slots:
            return plan
        e = refusals[slots]
        raise UsageError(f"--together {slots} needs about {e.need / 1e9:.1f} GB of memory and {e.available / 1e9:.1f} "
                         f"GB are available; --together {k} fits")
    raise UsageError(str(refusals[1]))  # not even one alone: its refusal names the model that fits
