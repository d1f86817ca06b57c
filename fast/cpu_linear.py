"""nn.Linear on a CPU through the matrix-product library this machine measured fastest [ours, speed only].

The same product by three routes, which differ only in speed and in the order float32 sums are taken: MKL's
sgemm behind F.linear, the same library asked for W @ x^T (faster for the few rows of decoding on some CPUs),
and oneDNN's (faster than MKL on CPUs where MKL takes a slow path). Which route wins depends on the CPU, so it
is measured rather than chosen by vendor; docs/performance.md has the figures per machine.
model.py and lora.py build plain nn.Linear; `use_fast_linear(model)`, applied where a model runs (run.py, scripts/bench.py,
as gpt-fast compiles its decode step where it is used), routes them here; tests prove every route equal to F.linear.

Measured once per machine, not per process (`remembered`, shared with fast/packing.py's kernels): the routes are
often near-ties, so timing them could pick a different mix in each fresh process, and each
route rounds float32 sums its own way. A seeded run's samples then depended on which process ran it, and a run
resumed after a kill changed kernels halfway. The choice is kept in $MIGRATE_CACHE/kernels.json, per CPU, torch
version and thread count; delete the file to measure again.
"""
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from atomic import write_atomically


_PRODUCT_DTYPE = [torch.float32]  # what `linear` multiplies frozen float32 weights in (see `frozen_products`)


@contextlib.contextmanager
def frozen_products(dtype):
    """Within it, `linear` multiplies a frozen float32 weight (requires_grad False: the base model under LoRA)
    in `dtype`, forward and input gradient, from a copy of the weight kept in that dtype; the activations are
    rounded to `dtype` for the product only, and sums, outputs and gradients stay float32. For the learner
    (GRPOConfig.learner_dtype): a CPU with bfloat16 instructions multiplies faster than in float32. Trained
    weights (the adapters) always multiply in float32."""
    saved, _PRODUCT_DTYPE[0] = _PRODUCT_DTYPE[0], dtype
    try:
        yield
    finally:
        _PRODUCT_DTYPE[0] = saved


def linear(x, weight, bias=None):
    """F.linear; on a CPU in float32, through whichever library multiplies fastest on this machine (chosen by
    measurement, see cpu_products): MKL's sgemm behind F.linear, the same with W @ x^T (few rows), or oneDNN's.
    The result is the same product up to float32 rounding (within `frozen_products`, up to its dtype's)."""
    if (_PRODUCT_DTYPE[0] is not torch.float32 and x.dtype == weight.dtype == torch.float32
            and not weight.requires_grad and x.numel() > 0):
        return _LowPrecisionLinear.apply(x, low_precision_copy(weight, _PRODUCT_DTYPE[0]), bias)
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.numel() == 0
            or torch.compiler.is_compiling()):  # a compiled step is the compiler's to lower
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    how = cpu_products(rows)
    if how == "onednn":
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or
                                         (bias is not None and bias.requires_grad)):
            return _OneDNNLinear.apply(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    if how == "mm" and rows <= 32:
        y = torch.mm(weight, x.reshape(rows, x.shape[-1]).t()).t()  # (rows, out), column-major
        # Back to row-major (a few KB): kernels downstream, SDPA's flash path among them, need a unit last stride.
        y = y.contiguous()
        if bias is not None:
            y = y + bias
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class _OneDNNLinear(torch.autograd.Function):
    """oneDNN's product forward and input gradient; the weight gradient as F.linear's.

    The input gradient grad @ W is the forward's product with W transposed, as many flops: by aten's mm it is
    MKL's sgemm, the library the measurement that chose this route found slower on this CPU. oneDNN reads W
    transposed in place (a strided view, no copy), where aten's mm took longer than the forward's products
    (docs/performance.md, "The same benchmarks on an AMD EPYC with AVX-512")."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.mkldnn._linear_pointwise(grad, weight.t(), None, "none", [], "")  # (..., in)
        if ctx.needs_input_grad[1]:
            gw = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.reshape(-1, grad.shape[-1]).sum(0)
        return gx, gw, gb


def low_precision_copy(weight, dtype):
    """`weight` in `dtype`, converted once and kept on the tensor until the weight changes (its version
    counter: merge_lora writes into it)."""
    kept = getattr(weight, "_low_precision", None)
    if kept is None or kept[0] != weight._version or kept[1].dtype != dtype:
        kept = (weight._version, weight.detach().to(dtype))
        weight._low_precision = kept
    return kept[1]


class _LowPrecisionLinear(torch.autograd.Function):
    """x @ W^T with x rounded to W_low's dtype, W_low a frozen weight's low-precision copy; output float32.
    The input gradient is the same product with W_low read transposed. No weight gradient: W is frozen."""

    @staticmethod
    def forward(ctx, x, w_low, bias):
        ctx.save_for_backward(w_low)
        ctx.has_bias = bias is not None
        y = F.linear(x.to(w_low.dtype), w_low).float()
        return y if bias is None else y + bias  # the bias added in float32

    @staticmethod
    def backward(ctx, grad):
        (w_low,) = ctx.saved_tensors
        gx = gb = None
        if ctx.needs_input_grad[0]:
            gx = F.linear(grad.to(w_low.dtype), w_low.t()).float()  # (..., in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.reshape(-1, grad.shape[-1]).sum(0)
        return gx, None, gb


def cpu_info() -> dict:
    """/proc/cpuinfo's fields for the first CPU ("model name", "flags", ...); {} where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            first_cpu = f.read().split("\n\n")[0]
    except OSError:  # not Linux
        return {}
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first_cpu.splitlines() if ":" in line)}


def cache_dir() -> str:
    """The project's cache folder, $MIGRATE_CACHE or ~/.cache/migrate: the embedded models (weights/default_model.py,
    which re-exports this) and the kernel choices (`remembered`, its first user, below)."""
    return os.environ.get("MIGRATE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "migrate")


# Settings that cap the instructions a library uses (to test or measure as on an older CPU): the same CPU then
# multiplies through other kernels, at other speeds, so a choice timed without them does not hold with them.
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE", "ONEDNN_MAX_CPU_ISA",
            "DNNL_MAX_CPU_ISA")


def cpu_name(info: dict) -> str:
    """The CPU's own name from /proc/cpuinfo (`info`, as cpu_info() reads it), else what platform knows."""
    return info.get("model name") or platform.processor() or platform.machine()


def isa_caps() -> dict:
    """The instruction caps set in the environment (ISA_CAPS): work measured as on an older CPU."""
    return {k: os.environ[k] for k in ISA_CAPS if os.environ.get(k)}


def machine_key() -> str:
    """What a kernel timing holds for: the CPU (its name and a digest of its feature flags, since a virtual
    machine may name two kinds alike), any instruction caps set (ISA_CAPS), the torch build and the threads a
    product runs on."""
    info = cpu_info()
    flags = hashlib.sha256(info.get("flags", "").encode()).hexdigest()[:8]
    caps = "".join(f" {k}={v}" for k, v in isa_caps().items())
    return f"{cpu_name(info)} flags {flags}{caps} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def machine(device: str = "cpu") -> dict:
    """What a figure was measured on: the CPU by name and instruction set (a virtual machine may name two kinds
    alike, "Intel(R) Xeon(R) Processor"), the threads, any instruction caps, torch and Python; the GPU's name
    when the work ran on one. Benchmarks and every run's summary.json carry it beside their seconds."""
    info = cpu_info()
    name = cpu_name(info)
    if "cpu family" in info:  # tells apart the kinds a generic name hides
        name += f" (family {info['cpu family']} model {info.get('model', '?')})"
    caps = isa_caps()  # measured as on an older CPU
    gpu = {"gpu": torch.cuda.get_device_name(device)} if device.startswith("cuda") else {}
    return {"cpu": name, "isa": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), **gpu,
            **({"isa_caps": caps} if caps else {})}


def remembered(key: str, measure):
    """The kernel choice `key` on this machine: `measure()` (a JSON value) the first time any process asks,
    its stored answer every time after. A lock makes one process measure while the others wait for its
    answer. An unwritable cache degrades to measuring in each process, as before."""
    folder = cache_dir()
    path, full = os.path.join(folder, "kernels.json"), f"{machine_key()} | {key}"
    try:
        os.makedirs(folder, exist_ok=True)
        with open(path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                with open(path) as f:
                    known = json.load(f)
            except (OSError, ValueError):  # none yet, or a damaged file: measured again and rewritten
                known = {}
            if full not in known:
                known[full] = measure()

                def write(tmp):
                    with open(tmp, "w") as f:
                        json.dump(known, f, indent=1, sort_keys=True)
                write_atomically(path, write)  # readers never see half a file
            return known[full]
    except OSError:
        return measure()


_CPU_PRODUCTS = {}  # 1 (few rows) or 2 (many) -> "onednn" | "mm" | "mkl"


def cpu_products(rows) -> str:
    """How this machine multiplies float32 weights fastest, measured once for few rows (<= 32: decoding,
    short completions) and once for many (prompts, training), on a matrix of a typical shape."""
    bucket = 1 if rows <= 32 else 2
    if bucket not in _CPU_PRODUCTS:
        _CPU_PRODUCTS[bucket] = remembered(f"linear {'<= 32' if bucket == 1 else '> 32'} rows",
                                           lambda: _fastest_product(bucket))
    return _CPU_PRODUCTS[bucket]


def _fastest_product(bucket) -> str:
    """The fastest route for the bucket's row count on a (3072, 768) weight: best of five after a warm-up."""
    n = 16 if bucket == 1 else 256
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(3072, 768, generator=g), torch.randn(n, 768, generator=g)
    ways = {"mkl": lambda: F.linear(x, w), "mm": lambda: torch.mm(w, x.t()).t().contiguous()}
    if torch.backends.mkldnn.is_available():
        ways["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    if bucket == 2:
        ways.pop("mm")  # W @ x^T only ever helps few rows
    best = {}
    with torch.no_grad():
        for name, f in ways.items():
            f()
            best[name] = float("inf")
            for _ in range(5):
                t = time.perf_counter()
                f()
                best[name] = min(best[name], time.perf_counter() - t)
    return min(best, key=best.get)


class Linear(nn.Linear):
    """nn.Linear through `linear`: the same parameters, names and state dict."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


def use_fast_linear(model):
    """Route every nn.Linear of `model` through `linear` (the product library this machine measured fastest), in
    place: the modules keep their weights and names, only their forward changes. Call it after inject_lora, so the
    adapters' products go the same way. Returns the model."""
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = Linear
    return model
