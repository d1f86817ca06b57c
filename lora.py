"""LoRA, written by us: a low-rank update around a frozen `nn.Linear`, saved and loaded in PEFT's format.

y = base(x) + (alpha / r) * B(A(dropout(x))), with A random (Kaiming-uniform, as PEFT), B zero, so a fresh
adapter changes nothing. `enabled` switches the update off, giving the base policy (reference log-probs, KL)
from the same network without a second copy (shared/STYLE.md, rule 9). Module names follow PEFT
(`base_layer`, `lora_A`, `lora_B`), so `adapter_model.safetensors` keys are PEFT's and the adapter loads in
`peft` onto the `transformers` model with the same logits.
"""
import contextlib
import glob
import json
import math
import os
import shutil
import tempfile

import torch
import torch.nn as nn


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        assert r > 0, f"LoRA rank must be positive, got {r}"
        self.base_layer = base
        # Adapter weights stay float32 whatever the base dtype (as PEFT does): AdamW steps of 1e-5 vanish in
        # bfloat16's 8-bit mantissa.
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True

    def forward(self, x):
        y = self.base_layer(x)
        return y + self.delta(x).to(y.dtype) if self.enabled else y

    def delta(self, x):
        """The low-rank update alone, scale * B(A(dropout(x))), in float32 (together.py adds it per problem)."""
        return self.lora_B(self.lora_A(self.dropout(x).float())) * self.scale

    def merged_weight(self):
        """W + scale * B A as a new tensor (export, and the sampler's packed copy); the base stays untouched."""
        w = self.base_layer.weight
        return (w.float() + self.scale * (self.lora_B.weight @ self.lora_A.weight)).to(w.dtype)


def lora_modules(model) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


LORA_TARGETS = ("q_proj", "v_proj")  # the paper's (and the reference's) adapted projections


def inject_lora(model, r=16, alpha=32, targets=LORA_TARGETS, dropout=0.0) -> list[str]:
    """Wrap every nn.Linear whose name ends with a target suffix; freeze everything else. Returns the names."""
    if lora_modules(model):
        raise ValueError("this model already has LoRA adapters; wrapping twice is refused")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.split(".")[-1] in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, LoRALinear(module, r, alpha, dropout))
            wrapped.append(name)
    if not wrapped:
        raise ValueError(f"no linear layer matches the LoRA targets {list(targets)}")
    return wrapped


def lora_parameters(model) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


@contextlib.contextmanager
def lora_disabled(model):
    """The base policy, for reference log-probs: the same network with every update switched off."""
    mods = lora_modules(model).values()
    saved = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, s in zip(mods, saved):
            m.enabled = s


def _peft_key(name, ab):
    return f"base_model.model.{name}.{ab}.weight"


def save_adapter(model, folder, base_model=None):
    """Write adapter_config.json + adapter_model.safetensors (PEFT's key names) atomically: into a temporary
    folder beside `folder`, then renamed over it, so a kill never leaves a half-written adapter."""
    from safetensors.torch import save_file
    mods = lora_modules(model)
    assert mods, "no LoRA adapters to save"
    first = next(iter(mods.values()))
    state = {}
    for name, m in mods.items():
        state[_peft_key(name, "lora_A")] = m.lora_A.weight.detach().float().contiguous().cpu()
        state[_peft_key(name, "lora_B")] = m.lora_B.weight.detach().float().contiguous().cpu()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": first.r, "lora_alpha": first.alpha, "lora_dropout": getattr(first.dropout, "p", 0.0),
              "target_modules": sorted({n.split(".")[-1] for n in mods}), "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
              "use_rslora": False, "use_dora": False, "modules_to_save": None}
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    for stale in glob.glob(os.path.join(parent, ".adapter.*")):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=".adapter.", dir=parent)
    old = folder + ".old"
    try:
        save_file(state, os.path.join(tmp, ADAPTER_WEIGHTS))
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
            json.dump(config, f, indent=2)
        if os.path.exists(folder):
            # Renames are atomic: at every instant `folder` or `folder.old` holds a complete adapter. An
            # `old` left by a kill between the two renames is stale whenever `folder` exists.
            shutil.rmtree(old, ignore_errors=True)
            os.rename(folder, old)
        os.rename(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_adapter_config(folder) -> dict:
    with open(os.path.join(folder, ADAPTER_CONFIG)) as f:
        return json.load(f)


def load_adapter(model, folder):
    """Load a PEFT LoRA adapter into a model, injecting the wrappers first if it has none."""
    from safetensors.torch import load_file
    if not os.path.exists(os.path.join(folder, ADAPTER_CONFIG)) and os.path.exists(folder + ".old"):
        folder = folder + ".old"  # killed between the two renames of save_adapter
    cfg = read_adapter_config(folder)
    if not lora_modules(model):
        inject_lora(model, cfg["r"], cfg["lora_alpha"], tuple(cfg["target_modules"]), cfg.get("lora_dropout", 0))
    state = load_file(os.path.join(folder, ADAPTER_WEIGHTS))
    mods = lora_modules(model)
    expected = {_peft_key(n, ab) for n in mods for ab in ("lora_A", "lora_B")}
    if set(state) != expected:
        raise ValueError(f"adapter in {folder} does not fit this model: missing "
                         f"{sorted(expected - set(state))[:3]}, unexpected {sorted(set(state) - expected)[:3]}")
    with torch.no_grad():
        for name, m in mods.items():
            m.lora_A.weight.copy_(state[_peft_key(name, "lora_A")])
            m.lora_B.weight.copy_(state[_peft_key(name, "lora_B")])


def merge_lora(model):
    """Fold every update into its base weight and remove the wrappers (for export as a plain model)."""
    for name, m in lora_modules(model).items():
        with torch.no_grad():
            m.base_layer.weight.copy_(m.merged_weight())
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, m.base_layer)
    return model
