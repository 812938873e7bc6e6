"""Device defaults: the precision, compile and data-loading settings a run gets where its recipe is silent.

One place decides them, so the choice printed at start, the TrainingArguments and the run manifest agree:

- CUDA with bf16 (Ampere and newer): bf16 mixed precision and TF32 matmuls.
- Older CUDA (Volta, Turing): fp16 mixed precision; accelerate adds the dynamic loss scaler.
- CPU (or `use_cpu = true`, or Apple MPS): fp32, nothing added.
- On CUDA, `torch_compile` where it works: Triton importable and compute capability >= 7.0 (Triton's
  floor), and no DeepSpeed/FSDP in the recipe (their own wrappers decide compilation).
- On CUDA, dataloader workers (persistent, pinned memory) so batches are ready before the GPU asks.

SDPA attention and fused AdamW are already transformers' defaults (5.x) and are kept as they are.
Every key is only a default: a key the recipe's [training] sets is never touched.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

# Keys this module may add; a recipe that sets any of them (to any value) keeps its own.
PRECISION_KEYS = ("bf16", "fp16")
PERFORMANCE_KEYS = (
    "bf16",
    "fp16",
    "tf32",
    "torch_compile",
    "dataloader_num_workers",
    "dataloader_pin_memory",
    "dataloader_persistent_workers",
)
MAX_DATALOADER_WORKERS = 4  # token blocks are memory-mapped rows: a few workers keep any GPU fed
MIN_COMPILE_CAPABILITY = (7, 0)  # Triton generates no kernels below Volta

# Dense (no sparsity) peak tensor throughput per GPU in FLOP/s, from the vendors' data sheets, by the
# precision the matmuls run in. Matched against torch.cuda.get_device_name() by substring, first hit
# wins, so the more specific names come first. fp16 equals bf16 on every chip listed that has bf16.
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    ("H100 PCIe", {"bf16": 756.5e12, "fp16": 756.5e12, "tf32": 378.0e12, "fp32": 51.2e12}),
    ("H100 NVL", {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60.0e12}),
    ("H100", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),  # SXM
    ("GH200", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    ("A100", {"bf16": 312.0e12, "fp16": 312.0e12, "tf32": 156.0e12, "fp32": 19.5e12}),
    ("A10G", {"bf16": 70.0e12, "fp16": 70.0e12, "tf32": 35.0e12, "fp32": 31.2e12}),
    ("A10", {"bf16": 125.0e12, "fp16": 125.0e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    ("L40S", {"bf16": 362.1e12, "fp16": 362.1e12, "tf32": 183.0e12, "fp32": 91.6e12}),
    ("L4", {"bf16": 121.0e12, "fp16": 121.0e12, "tf32": 60.0e12, "fp32": 30.3e12}),
    ("RTX 4090", {"bf16": 165.2e12, "fp16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12}),
    ("V100", {"fp16": 125.0e12, "fp32": 15.7e12}),
    ("T4", {"fp16": 65.0e12, "fp32": 8.1e12}),
)


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """What the defaults depend on, probed once (tests build one by hand)."""

    kind: str  # "cuda", "mps" or "cpu"
    name: str
    count: int  # visible accelerators of this kind; 0 on CPU
    bf16_supported: bool
    capability: tuple[int, int] | None
    triton_available: bool


def probe_device(user_training: Mapping[str, Any]) -> DeviceInfo:
    """The device TrainingArguments will pick: CUDA if visible (unless `use_cpu`), else MPS, else CPU."""
    import torch

    if user_training.get("use_cpu"):
        return DeviceInfo("cpu", "CPU (use_cpu = true)", 0, False, None, False)
    if torch.cuda.is_available():
        return DeviceInfo(
            kind="cuda",
            name=torch.cuda.get_device_name(0),
            count=torch.cuda.device_count(),
            bf16_supported=bool(torch.cuda.is_bf16_supported()),
            capability=tuple(torch.cuda.get_device_capability(0)),
            triton_available=_triton_available(),
        )
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return DeviceInfo("mps", "Apple MPS", 1, False, None, False)
    return DeviceInfo("cpu", "CPU", 0, False, None, False)


def _triton_available() -> bool:
    try:
        from torch.utils._triton import has_triton
    except ImportError:  # a torch without the helper has no inductor GPU backend we rely on
        return False
    return bool(has_triton())


def device_defaults(user_training: Mapping[str, Any], device: DeviceInfo | None = None) -> dict[str, Any]:
    """TrainingArguments keys to add to `user_training` (never one it sets) for the device in use."""
    return _choose(user_training, device or probe_device(user_training))[0]


def _choose(user_training: Mapping[str, Any], device: DeviceInfo) -> tuple[dict[str, Any], list[str]]:
    chosen: dict[str, Any] = {}
    reasons: list[str] = []
    if device.kind != "cuda":
        reasons.append(f"{device.name}: fp32, no compile, data loaded in the main process")
        if "dataloader_pin_memory" not in user_training:
            chosen["dataloader_pin_memory"] = False  # pinned memory speeds host-to-GPU copies only
        return chosen, reasons

    precision_set = any(key in user_training for key in PRECISION_KEYS)
    if device.bf16_supported:
        if not precision_set:
            chosen["bf16"] = True
            reasons.append("bf16 mixed precision (the GPU supports bf16)")
        if "tf32" not in user_training:
            chosen["tf32"] = True
            reasons.append("TF32 for the fp32 matmuls left")
    elif not precision_set:
        chosen["fp16"] = True
        reasons.append("fp16 mixed precision with loss scaling (no bf16 on this GPU)")

    if "torch_compile" not in user_training:
        compiles, why = compile_works(user_training, device)
        chosen["torch_compile"] = compiles
        reasons.append(why)

    if "dataloader_num_workers" not in user_training:
        workers = dataloader_workers(device.count)
        chosen["dataloader_num_workers"] = workers
        if workers > 0 and "dataloader_persistent_workers" not in user_training:
            # Respawning workers at every epoch and evaluation costs seconds each time.
            chosen["dataloader_persistent_workers"] = True
        reasons.append(f"{workers} dataloader workers")
    if "dataloader_pin_memory" not in user_training:
        chosen["dataloader_pin_memory"] = True
        reasons.append("pinned memory")
    return chosen, reasons


def compile_works(user_training: Mapping[str, Any], device: DeviceInfo) -> tuple[bool, str]:
    """Whether torch.compile is on by default here, with the reason in words."""
    if device.kind != "cuda":
        return False, "no torch.compile off CUDA (compiling costs more than it saves on short CPU runs)"
    if not device.triton_available:
        return False, "no torch.compile: Triton is not installed"
    if device.capability is not None and device.capability < MIN_COMPILE_CAPABILITY:
        return False, f"no torch.compile: compute capability {device.capability} is below Triton's 7.0"
    wrapped = [key for key in ("deepspeed", "fsdp") if user_training.get(key)]
    if wrapped:
        return False, f"no torch.compile by default with {', '.join(wrapped)}"
    return True, "torch.compile of the model"


def dataloader_workers(gpus_per_node: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # Leave each rank's own process a core of its own.
    per_rank = cpus // max(1, gpus_per_node) - 1
    return max(0, min(MAX_DATALOADER_WORKERS, per_rank))


def describe(user_training: Mapping[str, Any], device: DeviceInfo | None = None) -> dict[str, Any]:
    """The run's effective performance settings and who chose each, for the manifest (run.json)."""
    device = device or probe_device(user_training)
    chosen, reasons = _choose(user_training, device)
    effective = {**dict(user_training), **chosen}
    return {
        "device": device.kind,
        "device_name": device.name,
        "device_count": device.count,
        "precision": precision_of(effective),
        "tf32": bool(effective.get("tf32")) if device.kind == "cuda" else False,
        "torch_compile": bool(effective.get("torch_compile", False)),
        "dataloader_num_workers": int(effective.get("dataloader_num_workers", 0)),
        "dataloader_pin_memory": bool(effective.get("dataloader_pin_memory", True)) and device.kind == "cuda",
        "optim": str(effective.get("optim", _training_arguments_default("optim"))),
        "defaults_applied": chosen,
        "set_by_recipe": sorted(key for key in PERFORMANCE_KEYS if key in user_training),
        "reasons": reasons,
    }


def describe_line(description: Mapping[str, Any]) -> str:
    """One line for the start of a run: the device and what it gets, saying which keys override it."""
    parts = [description["precision"] + (" + TF32" if description["tf32"] else "")]
    parts.append("torch.compile" if description["torch_compile"] else "eager")
    workers = description["dataloader_num_workers"]
    parts.append(f"{workers} dataloader workers" if workers else "main-process data loading")
    if description["dataloader_pin_memory"]:
        parts.append("pinned memory")
    parts.append(f"optim {description['optim']}")
    line = f"Performance: {description['device_name']} -> " + ", ".join(parts)
    if description["defaults_applied"]:
        line += (
            " (device defaults; any [training] key overrides: "
            + ", ".join(description["defaults_applied"])
            + ")"
        )
    return line


def precision_of(training: Mapping[str, Any]) -> str:
    """The precision the matmuls run in: bf16, fp16, tf32 (fp32 storage, TF32 tensor cores) or fp32."""
    if training.get("bf16"):
        return "bf16"
    if training.get("fp16"):
        return "fp16"
    if training.get("tf32"):
        return "tf32"
    return "fp32"


def peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of one GPU at `precision`, or None where the device is not in the table."""
    for pattern, peaks in PEAK_FLOPS:
        if pattern.lower() in device_name.lower():
            return peaks.get(precision)
    return None


def _training_arguments_default(name: str) -> Any:
    from transformers import TrainingArguments

    field = {f.name: f for f in dataclasses.fields(TrainingArguments)}[name]
    value = field.default
    return getattr(value, "value", value)  # enums (OptimizerNames) as their string
