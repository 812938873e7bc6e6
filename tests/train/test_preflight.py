"""The stand-in checks of [training] agree with the Trainer itself: what they refuse, a real Trainer fails on
(or silently drops, where clm-runner's policy refuses that too); what they accept, a real Trainer trains with.

The oracle is transformers' own Trainer training a tiny GPT-2 for 3 steps with the same TrainingArguments, so
the optimizer, the scheduler and activation checkpointing are built and run as a real run builds them."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from helpers import tiny_gpt2_config

from clm_runner.errors import RecipeError
from clm_runner.train.preflight import check_trainer_keys


def training_args(tmp_path: Path, **keys):
    from transformers import TrainingArguments

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TrainingArguments(
            output_dir=str(tmp_path / "out"),
            report_to="none",
            use_cpu=True,
            max_steps=3,
            per_device_train_batch_size=2,
            save_strategy="no",
            disable_tqdm=True,
            **keys,
        )


def refused(args) -> str | None:
    from transformers import GPT2LMHeadModel

    try:
        check_trainer_keys(args, meta_model=lambda: GPT2LMHeadModel(tiny_gpt2_config()).to("meta"))
    except RecipeError as exc:
        return str(exc)
    return None


def trainer_fails(args) -> bool:
    """Whether a real Trainer fails to train with these arguments (3 steps of a tiny GPT-2)."""
    from transformers import GPT2LMHeadModel, Trainer

    torch.manual_seed(0)
    ids = torch.randint(0, 2048, (6, 16))
    data = [{"input_ids": row, "labels": row} for row in ids]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Trainer(model=GPT2LMHeadModel(tiny_gpt2_config()), args=args, train_dataset=data).train()
    except Exception:  # noqa: BLE001 - the oracle: any failure counts
        return True
    return False


ACCEPTED = [
    {},
    {"optim": "sgd", "optim_args": "momentum=0.9,nesterov=true"},
    {"optim": "adafactor"},
    {"optim": "rmsprop", "optim_args": "alpha=0.9"},
    {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": 0.1}},
    {"lr_scheduler_type": "cosine_with_restarts", "lr_scheduler_kwargs": {"num_cycles": 2}},
    {"lr_scheduler_type": "warmup_stable_decay", "lr_scheduler_kwargs": {"num_decay_steps": 1}},
    {"lr_scheduler_type": "polynomial", "lr_scheduler_kwargs": {"power": 2.0}},
    {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}},
    {
        "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": {"use_reentrant": True, "every_n_layers": 1},
    },
    {"torch_compile": True, "torch_compile_backend": "eager"},
]

REFUSED_FAILING = [
    ({"optim": "adamw_torch", "optim_args": "bogus"}, "must be key=value pairs"),
    ({"lr_scheduler_kwargs": {"foo": 1}}, "unexpected keyword argument 'foo'"),
    ({"lr_scheduler_type": "cosine_with_min_lr"}, "min_lr"),
    ({"lr_scheduler_type": "warmup_stable_decay"}, "num_decay_steps"),
    ({"lr_scheduler_type": "polynomial", "lr_scheduler_kwargs": {"power": "x"}}, "can't be built"),
    ({"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"foo": 1}}, "torch.utils.checkpoint"),
    ({"fsdp": "full_shard"}, "this run is one process"),
    ({"optim": "sgd", "optim_args": "momentum=fast"}, "can't be built"),
]

REFUSED_DROPPED = [  # the Trainer trains, silently without the setting: refused by policy
    ({"optim": "adamw_torch", "optim_args": "foo=1"}, "does not read 'foo'"),
    ({"optim": "sgd", "optim_args": "momentun=0.9"}, "does not read 'momentun'"),
    ({"lr_scheduler_type": "constant", "lr_scheduler_kwargs": {"num_cycles": 2}}, "takes no arguments"),
    (  # non-reentrant checkpointing hands unknown keys to the layer's forward, which GPT-2's ignores
        {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False, "foo": 1}},
        "torch.utils.checkpoint",
    ),
]


@pytest.mark.parametrize("keys", ACCEPTED, ids=lambda k: ",".join(map(str, k.values())) or "defaults")
def test_accepted_keys_train(tmp_path: Path, keys: dict) -> None:
    args = training_args(tmp_path, **keys)
    assert refused(args) is None
    assert not trainer_fails(args)


@pytest.mark.parametrize(("keys", "fragment"), REFUSED_FAILING, ids=lambda k: str(k))
def test_refused_keys_fail_in_the_trainer(tmp_path: Path, keys: dict, fragment: str) -> None:
    args = training_args(tmp_path, **keys)
    message = refused(args)
    assert message is not None and fragment in message and "\n" not in message
    assert trainer_fails(args)


@pytest.mark.parametrize(("keys", "fragment"), REFUSED_DROPPED, ids=lambda k: str(k))
def test_keys_the_trainer_would_drop_are_refused(tmp_path: Path, keys: dict, fragment: str) -> None:
    args = training_args(tmp_path, **keys)
    message = refused(args)
    assert message is not None and fragment in message
    assert not trainer_fails(args)
