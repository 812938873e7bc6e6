"""A resume applies the recipe's learning rate and optimizer settings over the checkpoint's: its moments and
its place in the schedule are kept, the values the recipe sets are the ones trained with."""

from __future__ import annotations

import pytest
import torch
from transformers import get_scheduler

from clm_runner.rundir.changes import restored_on_resume
from clm_runner.train.resume_settings import apply_recipe_settings, recipe_settings

STEPS, AT = 20, 7


def optimizer_and_schedule(lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), kind: str = "linear"):
    torch.manual_seed(0)
    weights = torch.nn.Parameter(torch.randn(4))
    bias = torch.nn.Parameter(torch.zeros(4))
    groups = [{"params": [weights], "weight_decay": weight_decay}, {"params": [bias], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8)
    scheduler = get_scheduler(kind, optimizer, num_warmup_steps=3, num_training_steps=STEPS)
    return optimizer, scheduler


def trained_to(step: int, **recipe):
    """A checkpoint's optimizer and scheduler states after `step` steps of the old recipe."""
    optimizer, scheduler = optimizer_and_schedule(**recipe)
    for _ in range(step):
        loss = sum((p * p).sum() for group in optimizer.param_groups for p in group["params"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return optimizer.state_dict(), scheduler.state_dict()


@pytest.mark.parametrize("kind", ["linear", "cosine", "polynomial"])
def test_a_changed_learning_rate_and_weight_decay_apply_from_the_checkpoints_step(kind: str) -> None:
    saved_optimizer, saved_scheduler = trained_to(AT, lr=1e-3, weight_decay=0.1, kind=kind)
    optimizer, scheduler = optimizer_and_schedule(1e-4, weight_decay=0.01, betas=(0.8, 0.99), kind=kind)
    fresh = recipe_settings(optimizer, scheduler)
    optimizer.load_state_dict(saved_optimizer)
    scheduler.load_state_dict(saved_scheduler)
    applied = apply_recipe_settings(optimizer, scheduler, fresh)
    assert applied == {
        "learning_rate": (1e-3, 1e-4),
        "weight_decay": (0.1, 0.01),
        "adam_beta1": (0.9, 0.8),
        "adam_beta2": (0.999, 0.99),
    }
    # The oracle: the new recipe's own schedule, at the same step.
    oracle_optimizer, oracle = optimizer_and_schedule(1e-4, kind=kind)
    lrs = []
    for _ in range(AT):
        oracle_optimizer.step()
        oracle.step()
    for _ in range(STEPS - AT):
        assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in oracle_optimizer.param_groups]
        assert scheduler.get_last_lr() == oracle.get_last_lr()
        lrs.append(optimizer.param_groups[0]["lr"])
        oracle_optimizer.step(), oracle.step(), optimizer.step(), scheduler.step()
    assert lrs[0] > 0 or kind != "linear"
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.99)
    # The moments are the checkpoint's.
    moments = saved_optimizer["state"][0]["exp_avg"]
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], moments)


def test_the_same_recipe_changes_nothing() -> None:
    saved_optimizer, saved_scheduler = trained_to(AT, lr=1e-3, weight_decay=0.1)
    optimizer, scheduler = optimizer_and_schedule(1e-3, weight_decay=0.1)
    fresh = recipe_settings(optimizer, scheduler)
    optimizer.load_state_dict(saved_optimizer)
    scheduler.load_state_dict(saved_scheduler)
    before = ([dict(g, params=None) for g in optimizer.param_groups], scheduler.state_dict())
    assert apply_recipe_settings(optimizer, scheduler, fresh) == {}
    assert ([dict(g, params=None) for g in optimizer.param_groups], scheduler.state_dict()) == before


def test_a_schedule_without_base_rates_keeps_the_checkpoints_rate_and_takes_the_rest() -> None:
    """reduce_lr_on_plateau records no base rate (its reductions live in the groups' lr): the rate can't be
    told apart from a reduction, so it stays the checkpoint's (the run warns); the other settings apply."""
    torch.manual_seed(0)
    parameter = torch.nn.Parameter(torch.randn(2))
    old = torch.optim.AdamW([parameter], lr=1e-3, weight_decay=0.1)
    plateau = get_scheduler("reduce_lr_on_plateau", old, scheduler_specific_kwargs={"patience": 0})
    for _ in range(3):
        plateau.step(1.0)  # no improvement: reduced
    reduced = old.param_groups[0]["lr"]
    assert reduced < 1e-3
    optimizer = torch.optim.AdamW([parameter], lr=1e-4, weight_decay=0.2)
    scheduler = get_scheduler("reduce_lr_on_plateau", optimizer, scheduler_specific_kwargs={"patience": 0})
    fresh = recipe_settings(optimizer, scheduler)
    optimizer.load_state_dict(old.state_dict())
    scheduler.load_state_dict(plateau.state_dict())
    assert apply_recipe_settings(optimizer, scheduler, fresh) == {"weight_decay": (0.1, 0.2)}
    assert optimizer.param_groups[0]["lr"] == reduced


def test_the_run_warns_only_where_the_recipes_values_can_not_apply() -> None:
    from types import SimpleNamespace

    from transformers.trainer_utils import SchedulerType

    def args(deepspeed: str | None, schedule: str) -> SimpleNamespace:
        return SimpleNamespace(deepspeed=deepspeed, lr_scheduler_type=SchedulerType(schedule))

    changes = [
        "training.learning_rate: 0.001 -> 0.0001",
        "training.weight_decay: 0.0 -> 0.1",
        "data.x: 1 -> 2",
    ]
    assert restored_on_resume(changes, args(None, "linear")) is None
    plateau = restored_on_resume(changes, args(None, "reduce_lr_on_plateau"))
    assert plateau.startswith("The recipe changes training.learning_rate, but reduce_lr_on_plateau keeps")
    deepspeed = restored_on_resume(changes, args("ds.json", "linear"))
    assert deepspeed.startswith(
        "The recipe changes training.learning_rate, training.weight_decay, but DeepSpeed"
    )
    assert restored_on_resume(changes[2:], args("ds.json", "reduce_lr_on_plateau")) is None
