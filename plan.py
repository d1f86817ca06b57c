"""A run's plan, made before its first step [ours]: what it needs of this machine's memory, and how long it takes.

Memory is planned from the model's config.json and the prompt's length, not found out by the kernel's
out-of-memory killer (a 4k-token ARC prompt through the 1.5B coder model kept ~16 GB of activations for
backward). In bytes, float32:
  weights         4 a parameter
  decode copies   the packed weights of packing.PackedDecoder: optional, 2-3x faster decoding on a CPU
  sampling        the prompt's keys and values, each row's own, one layer's prefill activations, the logits
  learning        the activations kept for backward, ACTIVATION_BYTES a token and layer: the prompt's and one
                  micro-batch's (its tokens chosen to fit ACTIVATIONS_MAX); for a prompt that alone would pass
                  ACTIVATIONS_MAX, only each layer's input, the layers being recomputed in backward (activation
                  checkpointing); and one chunk of logits (shared_prompt.LOGITS_BYTES)
The activations are bounded on every machine; the decode copies are dropped when the peak would not fit what this
machine has; and a model that cannot fit even then is refused in one line that names a smaller one.

Time is estimated from what this machine measures just before the first step (a forward pass over the start of
the prompt and a few decode steps of a full group) times the passes a step makes; each step's line then gives the
time left from the steps so far.
"""
import math
import os
import time
from dataclasses import dataclass

GIB = 1 << 30
ACTIVATIONS_MAX = 2 * GIB  # activations kept for backward: beyond this the learner recomputes layers
OVERHEAD = GIB // 2  # the interpreter, PyTorch's own allocations, the tokenizer, the database
LOGITS_COPIES = 4  # a chunk of logits, its softmax, its gradient and the cross-entropy's own buffer


def activation_bytes(cfg, lora_r: int) -> int:
    """Bytes one token keeps for backward in one layer (LoRA adapters, frozen base): measured 205 KB for
    Qwen2.5-Coder-1.5B and 49 KB for SmolLM2-135M, which this formula gives: the MLP's four (I,) tensors (gate,
    up, their activation and product), ten (C,) ones (norms, residuals, attention output, adapters' inputs), the
    keys and values, and the adapters' (r,) outputs."""
    kv = cfg.num_key_value_heads * cfg.head_dim
    return 4 * (4 * cfg.intermediate_size + 10 * cfg.hidden_size + 2 * kv + 2 * lora_r)


def parameters(cfg) -> int:
    """Parameters of a model of this config (model.py's modules)."""
    C, I, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    layer = C * (q + 2 * kv) + q * C + 3 * C * I + 2 * C
    layer += (q + 2 * kv) * cfg.qkv_bias + C * cfg.o_bias + (2 * I + C) * cfg.mlp_bias + 2 * hd * cfg.qk_norm
    return cfg.vocab_size * C * (1 + (not cfg.tie_word_embeddings)) + cfg.num_hidden_layers * layer + C


def available_memory() -> int:
    """Bytes this process may still take: the kernel's MemAvailable, or less under a control group's limit."""
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    return min(avail, _cgroup_room())


def _cgroup_room() -> int:
    """Limit minus usage of this process's memory control group (v2, else v1); unlimited where there is none."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = [line.strip().split(":", 2) for line in f]
    except OSError:
        return 1 << 62
    for _, controllers, path in lines:
        for limit, usage, base in (("memory.max", "memory.current", "/sys/fs/cgroup") if controllers == "" else
                                   ("memory.limit_in_bytes", "memory.usage_in_bytes", "/sys/fs/cgroup/memory")
                                   if "memory" in controllers.split(",") else (None, None, None),):
            if limit is None:
                continue
            try:
                with open(os.path.join(base + path, limit)) as f:
                    cap = f.read().strip()
                with open(os.path.join(base + path, usage)) as f:
                    used = int(f.read())
            except (OSError, ValueError):
                continue
            if cap != "max" and int(cap) < 1 << 60:
                return int(cap) - used
    return 1 << 62


@dataclass
class MemoryPlan:
    weights: int
    copies: int  # bytes of decode copies built (0: decoding through the modules)
    copies_while_learning: bool  # kept while the learner runs (else freed after each group's sampling, rebuilt)
    sampling: int
    learning: int  # 0 for methods that do not train
    checkpointing: bool  # the learner recomputes layers in backward
    tokens_per_microbatch: int  # the learner's micro-batch, sized to ACTIVATIONS_MAX
    available: int

    @property
    def peak(self) -> int:
        copies_learning = self.copies if self.copies_while_learning else 0
        return self.weights + max(self.copies + self.sampling, copies_learning + self.learning) + OVERHEAD

    def describe(self) -> str:
        gb = lambda b: f"{b / 1e9:.1f} GB"
        parts = [f"weights {gb(self.weights)}"]
        if self.copies:
            parts.append(f"decode copies {gb(self.copies)}" + ("" if self.copies_while_learning or not self.learning
                                                              else ", freed while learning"))
        parts.append(f"sampling {gb(self.sampling)}")
        if self.learning:
            parts.append(f"learning {gb(self.learning)}" + (", layers recomputed in backward" if self.checkpointing
                                                             else ""))
        line = f"memory: about {gb(self.peak)} at most ({'; '.join(parts)}) of {gb(self.available)} available"
        return line


class DoesNotFit(Exception):
    """The run cannot fit the memory available even without optional copies: (bytes it needs, bytes available)."""


def plan_memory(cfg, *, prompt_tokens: int, rows: int, max_new_tokens: int, lora_r: int, trains: bool,
                copies_bytes: int, available: int | None = None, checkpointing: bool = False,
                tokens_per_microbatch: int = 4096) -> MemoryPlan:
    """The plan for a model config `cfg` (model.ModelConfig) searching with `rows` completions a step of at most
    `max_new_tokens` after a prompt of `prompt_tokens`; `copies_bytes` the decode copies it would like (0: none).
    The copies are kept throughout if that fits, else freed while the learner runs (rebuilding them costs a few
    seconds a step), else not made (decoding is then 2-3x slower), and then the learner keeps less (smaller
    micro-batches, layers recomputed); if even that does not fit, DoesNotFit."""
    from shared_prompt import LOGITS_BYTES
    available = available_memory() if available is None else available
    f, L, C = 4, cfg.num_hidden_layers, cfg.hidden_size
    kv_token = L * 2 * cfg.num_key_value_heads * cfg.head_dim * f  # keys and values of one token, every layer
    layer_work = (3 * cfg.intermediate_size + 6 * C) * f  # one layer's transient activations, a token
    Tp, own = prompt_tokens, 2 * max_new_tokens + 128  # a row's own tokens: an NS prompt's program, its answer
    sampling = (Tp * kv_token + rows * own * kv_token + Tp * layer_work
                + 3 * rows * cfg.vocab_size * f)  # the last positions' logits, their sampling copy, exp
    act = activation_bytes(cfg, lora_r)
    fixed = LOGITS_COPIES * LOGITS_BYTES + Tp * kv_token  # a chunk of logits; the base policy's prompt pass

    def learner(bound):
        """(bytes, checkpointing, micro-batch tokens) with at most `bound` of activations kept for backward."""
        if not trains:
            return 0, False, tokens_per_microbatch
        if checkpointing or Tp * L * act > bound:  # each layer's input kept; one layer recomputed at a time
            mb = min(tokens_per_microbatch, max(64, bound // (L * C * f)))
            return ((Tp + mb) * L * C * f + max(Tp, mb) * act + 2 * Tp * kv_token
                    + rows * Tp * kv_token // L + fixed), True, mb
        # every activation kept: the micro-batch gets what the prompt leaves of the bound
        mb = min(tokens_per_microbatch, max(64, (bound - Tp * L * act) // (L * act)))
        return (Tp + mb) * L * act + 2 * Tp * kv_token + rows * Tp * kv_token + fixed, False, mb

    weights = parameters(cfg) * f
    if not cfg.tie_word_embeddings:  # the input embedding is read a row at a time from the mapped file
        weights -= cfg.vocab_size * C * f
    # copies kept; freed while the learner runs; not made; then smaller micro-batches, recomputing layers
    options = [(copies_bytes, True, ACTIVATIONS_MAX), (copies_bytes, False, ACTIVATIONS_MAX)] if copies_bytes else []
    options += [(0, False, ACTIVATIONS_MAX >> k) for k in range(6)]
    for copies, keep, bound in options:
        learning, ckpt, mb = learner(bound)
        plan = MemoryPlan(weights, copies, keep, sampling, learning, ckpt, mb, available)
        if plan.peak <= available:
            return plan
    raise DoesNotFit(plan.peak, available)


# ---------------------------------------------------------------- time


@dataclass
class Rates:
    """What this machine measured just before the first step."""
    prompt_token: float  # seconds a prompt token takes in a forward pass (batch 1)
    decode_step: float  # seconds a decode step of a full group takes
    copies: float  # seconds building the decode copies takes (each step, when they are freed while learning)
    probe_seconds: float  # what measuring them took


def measure(model, sampler, prompt_ids: list[int], rows: int, probe_tokens: int = 128) -> Rates:
    """A forward pass over the start of the task prompt, and a few decode steps of `rows` rows from it (with its
    own generator: the run's draws are untouched). The decode copies are built here once, as the first step would."""
    import torch
    t0 = time.perf_counter()
    head = prompt_ids[:probe_tokens]
    with torch.no_grad():
        t = time.perf_counter()
        model.hidden_states(torch.tensor([head], device=model.lm_head.weight.device))
        per_token = (time.perf_counter() - t) / len(head)
    gen = torch.Generator().manual_seed(0)
    free, sampler.free_copies = sampler.free_copies, False
    spent = []
    for new in (2, 1, 7):  # the copies built and one decode step; then the same prefill with no step, or six
        t = time.perf_counter()
        sampler.generate([head], n=rows, max_new_tokens=new, stop_ids=(), generator=gen)
        spent.append(time.perf_counter() - t)
    sampler.free_copies = free
    if free:
        sampler.packed.release()
    decode = max(spent[2] - spent[1], 1e-6) / 6
    copies = max(0.0, spent[0] - spent[1] - decode) if free else 0.0  # kept copies are mostly reused
    return Rates(per_token, decode, copies, time.perf_counter() - t0)


def step_seconds(rates: Rates, *, prompt_tokens: int, rows: int, max_new_tokens: int, trains: bool,
                 checkpointing: bool, diagnostics: float, kl_pull: bool) -> tuple[float, float]:
    """(short, long) estimates of one step's seconds: completions a quarter of max_new_tokens long on average,
    or all of it. Sampling prefills the prompt once (neighbourhood prompts add their own part) and decodes until
    its longest row ends; training runs the prompt and the trained completions forward and backward (a backward
    costs about two forward passes; checkpointing adds one); diagnostics add two no-gradient passes."""
    out = []
    for share in (0.25, 1.0):
        tokens = rows * max_new_tokens * share  # completion tokens of the group
        decode_steps = max_new_tokens * min(1.0, 2 * share)  # the longest row outlasts the mean
        sample = 1.3 * prompt_tokens * rates.prompt_token + decode_steps * rates.decode_step + rates.copies
        learn = 0.0
        if trains:
            passes = 3 + checkpointing + kl_pull
            learn = passes * (prompt_tokens + tokens) * rates.prompt_token
            learn += diagnostics * (sample + learn)  # at most that share of the run (search.py)
        out.append(sample + learn)
    return out[0], out[1]


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def expected(steps: float, per_step: tuple[float, float]) -> str:
    lo, hi = (math.ceil(steps) * s for s in per_step)
    return f"{minutes(lo)}-{minutes(hi)}" if minutes(lo) != minutes(hi) else minutes(hi)
