"""Learning diagnostics: is the policy moving, and toward better answers? [ours]

Logged in metrics.jsonl for every trained step, so a run shows whether test-time training did anything:
- kl: KL(pi_theta || pi_0) per completion token of the step's group, under the task prompt, exact over the
  vocabulary; pi_0 is the same network with LoRA switched off (the policy before any update).
- best_logp, best_logp_gain: log pi_theta(y* | x) of the best candidate's completion y* (summed over its
  tokens), and its gain over pi_0: how much more likely training has made the best answer found so far.
- dw_rel: ||dW||_F / ||W||_F of the adapted weights, dW = (alpha / r) B A, averaged over modules.
They run after the update, without gradient, in eval mode (no dropout, so no random draws), and leave the
adapters switched on: the run's samples and updates are the same with or without them (tests/test_search.py).
"""
import torch
import torch.nn.functional as F

from grpo import length_mask, pad
from lora import lora_modules

KL_CHUNK = 256  # positions whose two (V,) distributions are held at once (2 x 156 MB for a 152k vocabulary)


@torch.no_grad()
def policy_movement(learner, prompt_ids: list[int], completions: list[list[int]], best: list[int] | None) -> dict:
    """KL per token over `completions`, and log-probs of `best`, as continuations of the task prompt."""
    model = learner.model
    rows = [c for c in completions if c] + ([best] if best else [])
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # the learner batches similar lengths
    ids, lengths = pad([rows[i] for i in order], model.lm_head.weight.device)
    states, logp, logp_0 = {}, {}, {}  # micro-batch start -> pi_0's hidden states; pi_theta's, pi_0's log-probs

    def keep_states(rsl, h, x):  # pass 1, LoRA off: remember pi_0's hidden states (its logits come in pass 2)
        states[rsl.start] = h
        return torch.zeros(x.shape, device=h.device)

    def kl_head(rsl, h, x):  # pass 2, LoRA on: KL against pi_0 position by position, and both log-probs
        out = torch.empty(x.shape, device=h.device)
        logp[rsl.start], logp_0[rsl.start] = torch.empty_like(out), torch.empty_like(out)
        on, off, tgt = h.flatten(0, 1), states[rsl.start].flatten(0, 1), x.flatten()
        for i in range(0, on.shape[0], KL_CHUNK):
            lp = F.log_softmax(model.logits(on[i:i + KL_CHUNK]).float(), -1)  # (chunk, V)
            lq = F.log_softmax(model.logits(off[i:i + KL_CHUNK]).float(), -1)
            out.view(-1)[i:i + KL_CHUNK] = (lp.exp() * (lp - lq)).sum(-1)
            logp[rsl.start].view(-1)[i:i + KL_CHUNK] = lp.gather(-1, tgt[i:i + KL_CHUNK, None])[:, 0]
            logp_0[rsl.start].view(-1)[i:i + KL_CHUNK] = lq.gather(-1, tgt[i:i + KL_CHUNK, None])[:, 0]
        return out

    was_training = model.training
    model.eval()
    try:
        learner.base_logprobs(prompt_ids, ids, lengths, head=keep_states)
        kl = learner.logprobs(prompt_ids, ids, lengths, head=kl_head)
    finally:
        model.train(was_training)
    mask = length_mask(lengths.to(ids.device), ids.shape[1])
    pos = {i: k for k, i in enumerate(order)}  # original row -> sorted row
    group = [pos[i] for i in range(len(rows) - bool(best))]
    out = {"kl": float((kl[group] * mask[group]).sum() / mask[group].sum().clamp(min=1))}
    if best:
        b = pos[len(rows) - 1]
        start = max(k for k in logp if k <= b)  # the micro-batch holding row b
        width = logp[start].shape[1]
        out["best_logp"] = float((logp[start][b - start] * mask[b, :width]).sum())
        out["best_logp_gain"] = out["best_logp"] - float((logp_0[start][b - start] * mask[b, :width]).sum())
    return out


@torch.no_grad()
def adapter_change(model) -> float | None:
    """Mean over adapted modules of ||scale B A||_F / ||W||_F, via ||BA||_F^2 = sum((B^T B) * (A A^T)) (r x r)."""
    ratios = []
    for m in lora_modules(model).values():
        A, B = m.lora_A.weight.float(), m.lora_B.weight.float()  # (r, in), (out, r)
        dw = m.scale * torch.sqrt(((B.T @ B) * (A @ A.T)).sum().clamp(min=0))
        ratios.append(float(dw / m.base_layer.weight.float().norm()))
    return sum(ratios) / len(ratios) if ratios else None
