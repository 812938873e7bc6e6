"""DDP without the per-step search for unused parameters: `ddp_find_unused_parameters` false, checked once.

With find_unused_parameters, DDP walks the autograd graph after every forward pass to find the parameters
that will get no gradient; the Trainer turns it on unless the model uses gradient checkpointing. A causal
LM, full or LoRA, gives every trainable parameter a gradient, so where the recipe leaves the key unset a
multi-process run settles it once the model is built (`settle_for_model`; recipe.toml records the value):
the same walk, done once on a one-token forward pass before DDP wraps the model, gives false, and a model
that leaves a trainable parameter unused (GPT-2 with add_cross_attention, a mixture of experts whose router
skips experts) trains with true instead, and the run says so; a recipe that set false itself is refused,
naming the parameters (DDP would stop with an error at the second step, after a first step whose gradients
it did not all-reduce). Until then the key is unset (None), so the same recipe run again sees no change
against what an earlier attempt settled (clm_runner.rundir.changes.SETTLED_WITH_THE_MODEL).
"""

from __future__ import annotations

import logging
from typing import Any

from clm_runner.errors import RecipeError

logger = logging.getLogger("clm_runner")

KEY = "ddp_find_unused_parameters"
SHOWN = 3
"""How many unused parameter names a message lists."""


def unused_trainable_parameters(model: Any) -> list[str]:
    """Names of the trainable parameters a forward pass does not reach (what DDP's search finds).

    One token through the model in training mode (dropout and layer drop as in training), with the RNG
    states forked so training draws the same numbers as without the check; no backward pass, no gradient.
    """
    import torch

    trainable = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        return []
    device = next(model.parameters()).device
    tokens = torch.zeros((1, 1), dtype=torch.long, device=device)
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad():
            outputs = model(input_ids=tokens, use_cache=False)
    finally:
        model.train(was_training)
    roots = [t for t in _tensors(outputs) if t.grad_fn is not None]
    reached = _reached_leaves(roots)
    return [name for key, name in trainable.items() if key not in reached]


def _tensors(outputs: Any) -> list[Any]:
    import torch

    values = outputs.values() if hasattr(outputs, "values") else outputs
    if isinstance(values, torch.Tensor):
        return [values]
    return [v for v in values if isinstance(v, torch.Tensor)]


def _reached_leaves(roots: list[Any]) -> set[int]:
    """id() of every leaf tensor (parameter) whose gradient the graph behind `roots` would accumulate."""
    reached: set[int] = set()
    seen: set[Any] = set()
    stack = [t.grad_fn for t in roots]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: the leaf it accumulates into
        if variable is not None:
            reached.add(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return reached


def find_unused_setting(recipe_training: dict[str, Any], args: Any, model: Any) -> bool:
    """The value of ddp_find_unused_parameters to train `model` with (run it before DDP wraps the model).

    The recipe's true stands. Otherwise the model is checked: false where it uses every trainable parameter,
    true where it does not (said in a warning), a RecipeError where the recipe said false. With gradient
    checkpointing the Trainer's own choice is false too, and the walk cannot see inside checkpointed
    layers, so it is false unchecked.
    """
    chosen = recipe_training.get(KEY)
    if chosen:
        return True
    if args.gradient_checkpointing or getattr(args, "activation_checkpointing", False):
        return False
    try:
        unused = unused_trainable_parameters(model)
    except Exception as exc:  # a model whose forward needs more than tokens: keep DDP's search, to be safe
        if chosen is False:
            return False
        logger.warning("Could not check which parameters the model uses (%s): training.%s = true.", exc, KEY)
        return True
    if not unused:
        return False
    names = ", ".join(unused[:SHOWN]) + (f" and {len(unused) - SHOWN} more" if len(unused) > SHOWN else "")
    if chosen is False:
        raise RecipeError(
            f"training.{KEY} = false, but the model leaves {len(unused)} trainable parameters without a "
            f"gradient ({names}): DDP would stop at the second step. Remove the key (clm-runner then sets it "
            "to true for this model) or set it to true."
        )
    logger.warning(
        "The model leaves %d trainable parameters without a gradient (%s): training.%s = true, so DDP "
        "searches for them after every forward pass.",
        len(unused),
        names,
        KEY,
    )
    return True


def settle_for_model(setup: Any, model: Any) -> Any:
    """`setup` (a RunSetup) with ddp_find_unused_parameters settled for the built `model`, on every rank.

    Rank 0 checks and decides (one warning, one error); the other ranks take its value. The recorded
    recipe (recipe.toml, run.json) gets the value the run trains with.
    """
    import dataclasses

    from clm_runner.train.distributed import decide_on_rank0

    value = decide_on_rank0(lambda: find_unused_setting(setup.recipe.training, setup.args, model))
    setup.args.ddp_find_unused_parameters = value
    if setup.recorded_kwargs.get(KEY) == value:
        return setup
    return dataclasses.replace(
        setup,
        kwargs={**setup.kwargs, KEY: value},
        recorded_kwargs={**setup.recorded_kwargs, KEY: value},
    )
