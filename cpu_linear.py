"""nn.Linear on a CPU through the matrix-product library this machine measured fastest [ours, speed only].

The same product by three routes, which differ only in speed and in the order float32 sums are taken: MKL's
sgemm behind F.linear, the same library asked for W @ x^T (faster for the few rows of decoding on some CPUs),
and oneDNN's (faster than MKL on CPUs where MKL takes a slow path). Which route wins depends on the CPU, so it
is measured rather than chosen by vendor; README ("Speed") has the figures per machine.
model.py builds its projections from `Linear`; tests prove every route equal to F.linear.

Measured once per machine, not per process (`remembered`, shared with packing.py's kernels): the routes are
often near-ties, so timing them picked a different mix in each of four fresh processes on an AMD EPYC, and each
route rounds float32 sums its own way. A seeded run's samples then depended on which process ran it, and a run
resumed after a kill changed kernels halfway. The choice is kept in $MIGRATE_CACHE/kernels.json, per CPU, torch
version and thread count; delete the file to measure again.
"""
import fcntl
import hashlib
import json
import os
import platform
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def linear(x, weight, bias=None):
    """F.linear; on a CPU in float32, through whichever library multiplies fastest on this machine (chosen by
    measurement, see cpu_products): MKL's sgemm behind F.linear, the same with W @ x^T (few rows), or oneDNN's.
    The result is the same product up to float32 rounding."""
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
    transposed in place (a strided view, no copy): on an AMD EPYC (Zen 4) the learner's step spent 1.1 s of 2.6
    in mm, half again as long as the forward's products (README, "The same benchmarks on an AMD EPYC with
    AVX-512")."""

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


def cpu_info() -> dict:
    """/proc/cpuinfo's fields for the first CPU ("model name", "flags", ...); {} where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            first_cpu = f.read().split("\n\n")[0]
    except OSError:  # not Linux
        return {}
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first_cpu.splitlines() if ":" in line)}


def cache_dir() -> str:
    """The project's cache folder, $MIGRATE_CACHE or ~/.cache/migrate: the embedded models (default_model.py,
    which re-exports this) and the kernel choices (`remembered`). Here because model.py imports this module."""
    return os.environ.get("MIGRATE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "migrate")


def machine_key() -> str:
    """What a kernel timing holds for: the CPU (its name and a digest of its feature flags, since a virtual
    machine may name two kinds alike), the torch build and the threads a product runs on."""
    info = cpu_info()
    name = info.get("model name") or platform.processor() or platform.machine()
    flags = hashlib.sha256(info.get("flags", "").encode()).hexdigest()[:8]
    return f"{name} flags {flags} | torch {torch.__version__} | {torch.get_num_threads()} threads"


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
                tmp = f"{path}.{os.getpid()}"
                with open(tmp, "w") as f:
                    json.dump(known, f, indent=1, sort_keys=True)
                os.replace(tmp, path)  # readers never see half a file
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
    def forward(self, x):
        return linear(x, self.weight, self.bias)
