"""A run's plan, made before its first step [ours]: what it needs of this machine's memory, and how long it takes.

Memory is planned from the model's config.json and the prompt's length, not found out by the kernel's
out-of-memory killer (a 4k-token ARC prompt through the 1.5B coder model kept ~16 GB of activations for
backward). In bytes, float32:
  weights         4 a parameter
  decode copies   the packed weights of packing.PackedDecoder: optional, several times faster decoding on a CPU
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

from lora import LORA_TARGETS
from model import count_parameters

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


def available_memory() -> int:
    """Bytes this process may still take: the kernel's MemAvailable, or less under a control group's limit."""
    try:
        with open("/proc/meminfo") as f:
            avail = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
    except OSError:
        avail = None
    if avail is None:  # not Linux, or a kernel too old to say: what is free
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return min(avail, _cgroup_room())


def _cgroup_room() -> int:
    """The least room left under any memory limit of this process's control group and its parents (v2), or of its
    v1 memory group: limit minus usage, the inactive page cache counted as free, as MemAvailable counts it."""
    room = 1 << 62
    try:
        with open("/proc/self/cgroup") as f:
            lines = [line.strip().split(":", 2) for line in f]
    except OSError:
        return room
    for _, controllers, path in lines:
        if controllers == "":  # v2: every level's limit binds
            files, parts = ("memory.max", "memory.current", "inactive_file"), path.strip("/").split("/")
            folders = ["/sys/fs/cgroup/" + "/".join(parts[:i]) for i in range(len(parts), -1, -1)]
        elif "memory" in controllers.split(","):  # v1: the group, or the mount's root inside a container
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
            folders = ["/sys/fs/cgroup/memory" + path, "/sys/fs/cgroup/memory"]
        else:
            continue
        for folder in folders:
            try:
                with open(os.path.join(folder, files[0])) as f:
                    cap = f.read().strip()
                with open(os.path.join(folder, files[1])) as f:
                    used = int(f.read())
                with open(os.path.join(folder, "memory.stat")) as f:
                    inactive = next((int(l.split()[1]) for l in f if l.split()[0] == files[2]), 0)
            except (OSError, ValueError):
                continue
            if cap != "max" and int(cap) < 1 << 60:
                room = min(room, int(cap) - used + inactive)
    return room


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

    resident: int = 0  # kept through both: the sampler's cache, the adapters and their optimiser state

    @property
    def peak(self) -> int:
        copies_learning = self.copies if self.copies_while_learning else 0
        return (self.weights + self.resident + max(self.copies + self.sampling, copies_learning + self.learning)
                + OVERHEAD)

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
    """The run cannot fit the memory available even without optional copies: `need` and `available` bytes."""

    def __init__(self, need: int, available: int, message: str = ""):
        super().__init__(message or f"needs about {need / 1e9:.1f} GB, {available / 1e9:.1f} GB available")
        self.need, self.available = need, available


def plan_memory(cfg, *, prompt_tokens: int, rows: int, max_new_tokens: int, lora_r: int, trains: bool,
                copies_bytes: int, available: int | None = None, checkpointing: bool = False,
                tokens_per_microbatch: int = 4096, dtype_bytes: int = 4, lora_modules: int = 2,
                problems: int = 1) -> MemoryPlan:
    """The plan for a model config `cfg` (model.ModelConfig) searching with `rows` completions a step of at most
    `max_new_tokens` after a prompt of `prompt_tokens`; `copies_bytes` the decode copies it would like (0: none).
    The copies are kept throughout if that fits, else (or first, when they outweigh the learner's memory) freed while
    the learner runs and rebuilt for each group's sampling, else not made (decoding through the modules is slower),
    and then the learner keeps less (smaller micro-batches, layers recomputed); if even that does not fit,
    DoesNotFit. `problems` > 1: that many searches together over the one model (together.py), each with its
    prompt, rows, adapter and optimiser, prefilled and learned in one pass, no decode copies, each row's cache
    holding its whole prompt."""
    from fast.shared_prompt import LOGITS_BYTES
    available = available_memory() if available is None else available
    f, L, C = dtype_bytes, cfg.num_hidden_layers, cfg.hidden_size
    kv_token = L * 2 * cfg.num_key_value_heads * cfg.head_dim * f  # keys and values of one token, every layer
    layer_work = (3 * cfg.intermediate_size + 6 * C) * f  # one layer's transient activations, a token
    Tp, own = prompt_tokens, 2 * max_new_tokens + 128  # a row's own tokens: an NS prompt's program, its answer
    K = problems
    if K > 1:  # every problem's rows hold their whole prompt (no prefix row is shared across adapters)
        own, copies_bytes = own + Tp, 0
        # a micro-batch need not exceed every problem's completions at once
        tokens_per_microbatch = min(tokens_per_microbatch, K * rows * (max_new_tokens + 1))
    sampling = K * Tp * layer_work + 3 * K * rows * cfg.vocab_size * 4  # a prefill's layer; logits, sampling copy, exp
    act = activation_bytes(cfg, lora_r)
    fixed = LOGITS_COPIES * LOGITS_BYTES  # a chunk of logits: float32 whatever the model's dtype

    def learner(bound):
        """(bytes, checkpointing, micro-batch tokens) with at most `bound` of activations kept for backward."""
        if not trains:
            return 0, False, tokens_per_microbatch
        P = K * Tp  # the prompts' tokens, in one pass
        if checkpointing or P * L * act > bound:  # each layer's input kept; one layer recomputed at a time
            mb = min(tokens_per_microbatch, max(64, bound // (L * C * f)))
            return ((P + mb) * L * C * f + max(P, mb) * act + 2 * P * kv_token
                    + K * rows * Tp * kv_token // L + fixed), True, mb
        # every activation kept: the micro-batch gets what the prompt leaves of the bound
        mb = min(tokens_per_microbatch, max(64, (bound - P * L * act) // (L * act)))
        return (P + mb) * L * act + 2 * P * kv_token + K * rows * Tp * kv_token + fixed, False, mb

    weights = count_parameters(cfg) * f
    if not cfg.tie_word_embeddings and f == 4:  # float32: the input embedding is read a row at a time from the
        weights -= cfg.vocab_size * C * f  # mapped file (another dtype is a converted copy, all resident)
    # The sampler's cache stays allocated (the prompt's and each row's keys and values); the adapters' weights,
    # gradients and AdamW moments (4 x 4 bytes a parameter; `lora_modules` adapted products a layer, ~C wide);
    # the base policy's prompt pass, kept for the run; and, with kept copies, the adapted products' old copies while
    # their new ones are built after each update.
    prompt_row = Tp if K == 1 else 0  # alone, the prompt's keys and values: one row every sample reads
    resident = K * (prompt_row + rows * own) * kv_token
    if trains:
        resident += K * (16 * L * lora_modules * lora_r * 2 * C + Tp * kv_token)
    rebuilt = L * (C + 2 * cfg.num_key_value_heads * cfg.head_dim + cfg.num_attention_heads * cfg.head_dim) * C * f
    # Copies kept through learning; freed while the learner runs (first, when they outweigh what it needs: the peak is
    # then the larger of the two, not their sum, for one rebuild a step); not made; then smaller micro-batches,
    # recomputing layers.
    big = trains and copies_bytes > learner(ACTIVATIONS_MAX)[0]
    options = ([(copies_bytes, False, ACTIVATIONS_MAX)] if big else
               [(copies_bytes, True, ACTIVATIONS_MAX), (copies_bytes, False, ACTIVATIONS_MAX)]) if copies_bytes else []
    # K problems' prompts are K times one's: first try keeping them all (the recomputing is slower), if that fits
    options += [(0, False, ACTIVATIONS_MAX * K)] if K > 1 else []
    options += [(0, False, ACTIVATIONS_MAX >> k) for k in range(6)]
    for copies, keep, bound in options:
        learning, ckpt, mb = learner(bound)
        plan = MemoryPlan(weights, copies, keep, sampling, learning, ckpt, mb, available,
                          resident + (rebuilt if trains and copies and keep else 0))
        if plan.peak <= available:
            return plan
    raise DoesNotFit(plan.peak, available)


def plan_run(cfg: dict, task, trains: bool, prompt_tokens: int | None = None,
             available: int | None = None, problems: int = 1) -> MemoryPlan | None:
    """The memory plan of the run config.json `cfg` describes, on a CPU (None on a GPU, or for a model folder without
    config.json). Before the model is fetched `prompt_tokens` is None and the prompt's characters stand in for its
    tokens (a digit is a token for Qwen's tokenizer; the tokenizers here merge more than that elsewhere). A run that
    cannot fit raises DoesNotFit, its message naming an embedded model that fits. `problems`: that many such runs
    together over one model (run.py --together)."""
    from weights.default_model import EMBEDDED, canonical, model_config
    from fast.packing import KERNELS, PACK_MIN
    mcfg = model_config(cfg["model"])
    if cfg["device"] != "cpu" or mcfg is None:
        return None
    if available is None:
        available = available_memory() if cfg.get("memory") is None else \
            int(min(available_memory(), cfg["memory"] * 1e9))
    weights = cfg.get("sample_weights", "float32")
    tokens = prompt_tokens or task_prompt_tokens(cfg["model"], task)

    def plan_for(mc):
        per = KERNELS["mkl" if weights == "float32" else weights].bytes_per_weight
        wide = min(mc.hidden_size, mc.num_key_value_heads * mc.head_dim) >= PACK_MIN and cfg["dtype"] == "float32"
        products = count_parameters(mc) - mc.vocab_size * mc.hidden_size * (not mc.tie_word_embeddings)
        return plan_memory(mc, prompt_tokens=tokens, rows=cfg["alpha"] + cfg["beta"] + cfg["gamma"],
                           max_new_tokens=cfg["max_new_tokens"], lora_r=cfg["lora_r"], trains=trains,
                           copies_bytes=products * per if wide and not cfg.get("compile") else 0,
                           available=available, checkpointing=cfg.get("activation_checkpointing", False),
                           dtype_bytes=2 if cfg["dtype"] == "bfloat16" else 4,
                           lora_modules=len(cfg.get("lora_targets", LORA_TARGETS)), problems=problems)
    try:
        return plan_for(mcfg)
    except DoesNotFit as e:
        name = canonical(cfg["model"])
        where = "the --memory limit" if cfg.get("memory") else "this machine"
        fits = []
        for other, entry in EMBEDDED.items():
            try:
                fit = plan_for(model_config(other))
            except DoesNotFit:
                continue
            if other != name:
                fits.append(f"--model {other} fits (about {fit.peak / 1e9:.1f} GB; it serves {entry.can})")
        raise DoesNotFit(e.need, e.available, f"{name} needs about {e.need / 1e9:.1f} GB of memory for this run and "
                         f"{where} has {e.available / 1e9:.1f} GB available; "
                         + (" or ".join(fits) if fits else "no embedded model fits")) from None


def task_prompt_tokens(model, task) -> int:
    """The task prompt's tokens, counted with the model's tokenizer where its folder is here; before a fetch, its
    characters (a digit is a token for Qwen's tokenizer; elsewhere the tokenizers here merge several characters)."""
    from weights.default_model import EMBEDDED, cache_dir, canonical, is_embedded
    from tokenizer import Tokenizer
    folder = os.path.join(cache_dir(), EMBEDDED[canonical(model)].folder) if is_embedded(model) else \
        None if model == "tiny" else model
    if folder and os.path.exists(os.path.join(folder, "tokenizer.json")):
        tok = Tokenizer(folder)
        return len(tok.encode(tok.apply_chat_template(task.prompt()) + task.answer_prefix))
    return len(task.answer_prefix) + sum(len(m["content"]) for m in task.prompt()) + 32


# ---------------------------------------------------------------- time


@dataclass
class Rates:
    """What this machine measured just before the first step."""
    prompt_token: float  # seconds a prompt token takes in a forward pass (batch 1)
    decode_step: float  # seconds a decode step of a full group takes
    copies: float  # seconds building the decode copies takes (each step, when they are freed while learning)
    probe_seconds: float  # what measuring them took


def measure(model, sampler, prompt_ids: list[int], rows: int, probe_tokens: int = 128) -> Rates | None:
    """A forward pass over the start of the task prompt, and a few decode steps of `rows` rows from it, with the
    model in eval mode and the random state put back (a run's draws, its dropout and the kernel timings' inputs
    are untouched). The decode copies are built here once, as the first step would. None for a compiled decode step,
    whose probe would compile new shapes."""
    import torch
    if sampler.step.static:
        return None
    t0 = time.perf_counter()
    head = prompt_ids[:probe_tokens]
    device = model.lm_head.weight.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    was_training, free = model.training, sampler.step.free_copies
    model.eval()
    sampler.step.free_copies = False
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            t = time.perf_counter()
            model.hidden_states(torch.tensor([head], device=device))
            sync()
            per_token = (time.perf_counter() - t) / len(head)
            gen = torch.Generator().manual_seed(0)
            spent = []
            for new in (2, 1, 7):  # the copies built and one decode step; then the same prefill, no step or six
                t = time.perf_counter()
                sampler.generate([head], n=rows, max_new_tokens=new, stop_ids=(), generator=gen)
                sync()
                spent.append(time.perf_counter() - t)
    finally:
        model.train(was_training)
        sampler.step.free_copies = free
    if free:
        sampler.step.release()
    decode = max(spent[2] - spent[1], 1e-6) / 6
    copies = max(0.0, spent[0] - spent[1] - decode) if free else 0.0  # kept copies are mostly reused
    return Rates(per_token, decode, copies, time.perf_counter() - t0)


def step_seconds(rates: Rates, *, prompt_tokens: int, rows: int, max_new_tokens: int, trains: bool,
                 checkpointing: bool, diagnostics: float, kl_pull: bool) -> tuple[float, float]:
    """(short, long) estimates of one step's seconds, for completions a quarter or half of max_new_tokens long on
    average. Sampling prefills the prompt once (neighbourhood prompts add their own part) and decodes until its
    longest row ends (at the limit, early in a run); training runs the prompt and the trained completions (about
    half a group: zero-reward members leave the loss) forward and backward (a backward costs about two forward
    passes; checkpointing adds one, the KL pull's reference one); the diagnostics take at most their share."""
    out = []
    for share in (0.25, 0.5):
        sample = 1.3 * prompt_tokens * rates.prompt_token + max_new_tokens * rates.decode_step + rates.copies
        learn = 0.0
        if trains:
            passes = 3 + checkpointing + kl_pull
            learn = passes * (prompt_tokens + rows * max_new_tokens * share / 2) * rates.prompt_token
        out.append((sample + learn) * (1 + diagnostics * trains))
    return out[0], out[1]


def minutes(seconds: float) -> str:
    """A duration as people say it: seconds below a minute and a half, whole minutes above."""
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def expected(steps: float, per_step: tuple[float, float]) -> str:
    """The range a run of `steps` steps takes at (short, long) seconds a step."""
    lo, hi = (math.ceil(steps) * s for s in per_step)
    return f"{minutes(lo)}-{minutes(hi)}" if minutes(lo) != minutes(hi) else minutes(hi)
