"""Device defaults by device, measured throughput and MFU, and torch.compile giving eager's losses."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import tiny_gpt2_config
from tolerances import TRAINED_STEPS_RTOL
from transformers import TrainerControl

from clm_runner.train import device as performance
from clm_runner.train.device import DeviceInfo, describe, describe_line, device_defaults, peak_flops
from clm_runner.train.measure import ThroughputCallback

H100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", 1, True, (9, 0), True)
T4 = DeviceInfo("cuda", "Tesla T4", 1, False, (7, 5), True)


def fake_cuda(
    monkeypatch, *, name: str, bf16: bool, capability: tuple[int, int], triton: bool = True
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(performance, "_triton_available", lambda: triton)
    monkeypatch.setattr(performance, "dataloader_workers", lambda gpus: 4)


def test_cpu_gets_fp32_and_no_pinned_memory(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # Pinned memory only speeds copies to a GPU; on a CPU torch warns about it at every run.
    assert device_defaults({"learning_rate": 1e-3}) == {"dataloader_pin_memory": False}
    assert device_defaults({"dataloader_pin_memory": True}) == {}
    described = describe({})
    assert (described["device"], described["precision"], described["torch_compile"]) == ("cpu", "fp32", False)
    assert described["dataloader_num_workers"] == 0


def test_use_cpu_wins_over_a_visible_gpu(monkeypatch) -> None:
    fake_cuda(monkeypatch, name="NVIDIA H100 80GB HBM3", bf16=True, capability=(9, 0))
    assert device_defaults({"use_cpu": True}) == {"dataloader_pin_memory": False}  # the CPU default


def test_cuda_with_bf16_gets_bf16_tf32_compile_workers(monkeypatch) -> None:
    fake_cuda(monkeypatch, name="NVIDIA H100 80GB HBM3", bf16=True, capability=(9, 0))
    assert device_defaults({}) == {
        "bf16": True,
        "tf32": True,
        "torch_compile": True,
        "dataloader_num_workers": 4,
        "dataloader_persistent_workers": True,
        "dataloader_pin_memory": True,
    }
    described = describe({})
    assert described["precision"] == "bf16" and described["tf32"] and described["torch_compile"]
    assert described["optim"] == "adamw_torch_fused"  # transformers' default on torch >= 2.8, kept
    line = describe_line(described)
    assert (
        "H100" in line
        and "bf16 + TF32" in line
        and "torch.compile" in line
        and "4 dataloader workers" in line
    )


def test_older_cuda_gets_fp16_and_no_tf32(monkeypatch) -> None:
    fake_cuda(monkeypatch, name="Tesla T4", bf16=False, capability=(7, 5))
    chosen = device_defaults({})
    assert chosen["fp16"] is True
    assert "bf16" not in chosen and "tf32" not in chosen  # TrainingArguments refuses tf32 before Ampere
    assert chosen["torch_compile"] is True


def test_recipe_keys_are_never_overridden() -> None:
    user = {"bf16": False, "torch_compile": False, "dataloader_num_workers": 0, "tf32": False}
    chosen = device_defaults(user, H100)
    assert not set(chosen) & set(user)
    assert "fp16" not in chosen  # the recipe said something about precision: it decides
    assert chosen == {"dataloader_pin_memory": True}
    described = describe(user, H100)
    assert described["precision"] == "fp32" and not described["torch_compile"]
    assert described["set_by_recipe"] == ["bf16", "dataloader_num_workers", "tf32", "torch_compile"]


def test_compile_rule() -> None:
    assert device_defaults({}, H100)["torch_compile"] is True
    assert device_defaults({}, dataclasses.replace(H100, triton_available=False))["torch_compile"] is False
    assert device_defaults({}, dataclasses.replace(T4, capability=(6, 1)))["torch_compile"] is False
    assert device_defaults({"fsdp": "full_shard"}, H100)["torch_compile"] is False


def test_dataloader_workers_leave_a_core_per_rank(monkeypatch) -> None:
    monkeypatch.setattr(performance.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert performance.dataloader_workers(1) == 4
    assert performance.dataloader_workers(8) == 1
    monkeypatch.setattr(performance.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert performance.dataloader_workers(1) == 1


def test_peak_table() -> None:
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989.4e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756.5e12
    assert peak_flops("NVIDIA H200", "bf16") == 989.4e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "tf32") == 156.0e12
    assert peak_flops("Tesla V100-SXM2-16GB", "bf16") is None  # no bf16 on Volta
    assert peak_flops("Some Future GPU", "bf16") is None


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_throughput_counts_steps_only_and_mfu_follows_the_formula() -> None:
    clock, trained = FakeClock(), [0]
    callback = ThroughputCallback(
        tokens_trained=lambda: trained[0], flops_per_token=1_000, peak_flops_total=1e6, clock=clock
    )
    state = SimpleNamespace(global_step=0, max_steps=3, epoch=0.0)

    def step(seconds: float, tokens: int, **flags: bool) -> None:
        control = TrainerControl(**flags)
        callback.on_step_begin(None, state, control)
        clock.now += seconds
        trained[0] += tokens
        state.global_step += 1
        callback.on_step_end(None, state, control)

    callback.on_train_begin(None, state, TrainerControl())
    step(2.0, 100)
    step(3.0, 100, should_log=True, should_evaluate=True)
    logs = {"loss": 1.0}
    callback.annotate_log(state, logs)
    # A fake clock whose times are whole seconds: the rates are the same float expressions, rounded alike.
    assert logs["tokens_per_second"] == round(200 / 5.0, 1)
    assert logs["mfu"] == round(1_000 * (200 / 5.0) / 1e6, 4)
    clock.now += 7.0  # logging
    callback.on_log(None, state, TrainerControl(), logs=logs)
    clock.now += 50.0  # evaluation: not training time
    callback.on_evaluate(None, state, TrainerControl())
    step(1.0, 60, should_training_stop=True)
    callback.on_train_end(None, state, TrainerControl())
    clock.now += 30.0  # after training: never counted
    metrics = callback.metrics()
    assert metrics["train_tokens"] == 260
    assert metrics["train_tokens_per_second"] == round(260 / 6.0, 1)
    assert metrics["train_mfu"] == round(1_000 * (260 / 6.0) / 1e6, 4)
    assert "train_peak_gpu_memory_gb" not in metrics  # CPU


def test_no_mfu_without_a_known_peak() -> None:
    callback = ThroughputCallback(tokens_trained=lambda: 0, flops_per_token=1_000, peak_flops_total=None)
    logs = {"loss": 1.0}
    callback.annotate_log(SimpleNamespace(), logs)
    assert "mfu" not in logs and "mfu" not in callback.metrics()


def tiny_run_losses(tmp_path, name: str, steps: int = 3, **extra) -> list[float]:
    from transformers import GPT2LMHeadModel, TrainingArguments, default_data_collator, set_seed

    from clm_runner.train.trainer import ClmTrainer

    set_seed(0)
    # No dropout: inductor draws its masks from its own RNG, so with dropout the losses differ by design.
    config = tiny_gpt2_config(
        n_layer=2, n_positions=32, vocab_size=97, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    model = GPT2LMHeadModel(config)
    blocks = np.random.default_rng(0).integers(0, 97, size=(16, 32)).astype(np.int64)
    dataset = [{"input_ids": row, "labels": row} for row in blocks]
    args = TrainingArguments(
        output_dir=str(tmp_path / name),
        per_device_train_batch_size=4,
        max_steps=steps,
        logging_steps=1,
        learning_rate=1e-2,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        **extra,
    )
    trainer = ClmTrainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_compiled_graph_gives_eager_losses(tmp_path) -> None:
    """Dynamo capture + AOT autograd (the compile path minus code generation) on the CPU, in seconds."""
    eager = tiny_run_losses(tmp_path, "eager")
    compiled = tiny_run_losses(tmp_path, "compiled", torch_compile=True, torch_compile_backend="aot_eager")
    assert len(eager) == 3
    # AOT autograd decomposes some ops (layer norm, GELU) into others: equally valid float32 kernels whose
    # rounding differs, compounding over the steps (see tolerances.TRAINED_STEPS_RTOL).
    assert compiled == pytest.approx(eager, rel=TRAINED_STEPS_RTOL)
    assert eager[-1] != eager[0]  # the steps did train


@pytest.mark.slow
def test_inductor_compile_gives_eager_losses(tmp_path) -> None:
    """The default backend (inductor, C++ code generated with gcc): about a minute of compiling on 2 cores."""
    eager = tiny_run_losses(tmp_path, "eager")
    compiled = tiny_run_losses(tmp_path, "compiled", torch_compile=True)
    assert compiled == pytest.approx(eager, rel=TRAINED_STEPS_RTOL)  # fused kernels, reordered sums
