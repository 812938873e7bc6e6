"""Describe a causal LM from its config alone: module tree, parameter counts and FLOPs per token."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from clm_runner.errors import ModelError
from clm_runner.models.flops import (
    _attention_shape,
    _flops_from_counts,
    _forward_flops,
    _require_positive_seq_len,
    embedding_parameter_count,
    matmul_parameter_count,
)
from clm_runner.models.loading import build_meta_model


@dataclasses.dataclass(frozen=True)
class ParameterInfo:
    """One parameter held directly by a module."""

    name: str
    shape: tuple[int, ...]
    numel: int
    trainable: bool
    # Full dotted name of the parameter this one is the same tensor as (first seen wins), else None.
    tied_to: str | None


@dataclasses.dataclass(frozen=True)
class ModuleNode:
    """A module in the tree; `repeat` > 1 stands for that many identical consecutive siblings."""

    name: str
    path: str
    class_name: str
    parameters: tuple[ParameterInfo, ...]
    children: tuple[ModuleNode, ...]
    # Parameters of one copy of this subtree, tied tensors counted only where they are first seen.
    num_parameters: int
    repeat: int = 1
    # Path of the module whose weights this module shares when all its own parameters are tied there.
    tied_to: str | None = None

    @property
    def total_parameters(self) -> int:
        return self.num_parameters * self.repeat


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    """What `clm-runner model` reports about a model built from its config (no weights loaded)."""

    model_type: str
    class_name: str
    root: ModuleNode
    total_parameters: int
    trainable_parameters: int
    embedding_parameters: int
    # N of the FLOPs formula: see `matmul_parameter_count`.
    matmul_parameters: int
    tied_parameters: tuple[tuple[str, str], ...]
    num_layers: int
    # d of the FLOPs formula: num_attention_heads * head_dim, equal to hidden_size for GPT-2.
    attention_width: int
    seq_len: int
    flops_per_token: int
    forward_flops_per_token: int
    adapter_parameters: int = 0
    """LoRA adapter parameters (the trainable ones) in an adapter run; 0 when every weight trains."""

    def to_dict(self) -> dict:
        """Plain data for `clm-runner model --json`: every count, the FLOPs and the module tree."""
        return dataclasses.asdict(self)


def _parameter_owners(model: nn.Module) -> dict[str, str]:
    """Map each parameter name to the name under which the same tensor is first reached (itself if untied)."""
    first_name_by_identity: dict[int, str] = {}
    owners: dict[str, str] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        owners[name] = first_name_by_identity.setdefault(id(parameter), name)
    return owners


def _own_parameters(module: nn.Module, path: str, owners: dict[str, str]) -> tuple[ParameterInfo, ...]:
    infos = []
    for name, parameter in module.named_parameters(recurse=False, remove_duplicate=False):
        full_name = f"{path}.{name}" if path else name
        owner = owners[full_name]
        infos.append(
            ParameterInfo(
                name=name,
                shape=tuple(parameter.shape),
                numel=parameter.numel(),
                trainable=parameter.requires_grad,
                tied_to=None if owner == full_name else owner,
            )
        )
    return tuple(infos)


def _module_tied_to(parameters: tuple[ParameterInfo, ...]) -> str | None:
    """The owning module's path when every parameter of this module is a tie into that one module."""
    if not parameters or any(p.tied_to is None for p in parameters):
        return None
    owner_modules = {p.tied_to.rsplit(".", 1)[0] if "." in p.tied_to else "" for p in parameters}
    return owner_modules.pop() if len(owner_modules) == 1 else None


def _signature(node: ModuleNode) -> tuple:
    """Structure of a subtree without its position: equal signatures mean identical blocks."""
    return (
        node.class_name,
        node.repeat,
        tuple((p.name, p.shape, p.trainable, p.tied_to is not None) for p in node.parameters),
        tuple((child.name, _signature(child)) for child in node.children),
    )


def _collapse_repeats(children: list[ModuleNode]) -> list[ModuleNode]:
    """Merge runs of identical siblings with integer names (h.0 ... h.11) into one node with `repeat`."""
    collapsed: list[ModuleNode] = []
    run: list[ModuleNode] = []

    def flush() -> None:
        if not run:
            return
        if len(run) == 1:
            collapsed.append(run[0])
        else:
            first, last = run[0], run[-1]
            collapsed.append(dataclasses.replace(first, name=f"{first.name}..{last.name}", repeat=len(run)))
        run.clear()

    for child in children:
        if child.name.isdigit() and run and _signature(child) == _signature(run[0]):
            run.append(child)
            continue
        flush()
        if child.name.isdigit():
            run.append(child)
        else:
            collapsed.append(child)
    flush()
    return collapsed


def _class_label(module: nn.Module) -> str:
    """The class name; a PEFT layer says it is one ("lora.Linear" wraps GPT-2's Conv1D too)."""
    cls = type(module)
    if cls.__module__.startswith("peft.tuners."):
        return f"{cls.__module__.split('.')[2]}.{cls.__name__}"
    return cls.__name__


def module_tree(model: nn.Module) -> ModuleNode:
    """The model's module tree with own parameters, per-subtree counts, ties and collapsed repeats."""
    owners = _parameter_owners(model)

    def visit(module: nn.Module, name: str, path: str) -> ModuleNode:
        parameters = _own_parameters(module, path, owners)
        children = [
            visit(child, child_name, f"{path}.{child_name}" if path else child_name)
            for child_name, child in module.named_children()
        ]
        own_count = sum(p.numel for p in parameters if p.tied_to is None)
        num_parameters = own_count + sum(child.num_parameters for child in children)
        return ModuleNode(
            name=name,
            path=path,
            class_name=_class_label(module),
            parameters=parameters,
            children=tuple(_collapse_repeats(children)),
            num_parameters=num_parameters,
            tied_to=_module_tied_to(parameters),
        )

    return visit(model, "", "")


def describe_model(config: Any, seq_len: int | None = None, adapter: Any = None) -> ModelSummary:
    """Summarise the causal LM that `config` defines, built on the meta device (nothing allocated).

    `seq_len` is the context length for FLOPs per token; default: the config's max_position_embeddings
    (n_positions for GPT-2). `adapter` (an AdapterPlan): the LoRA adapters are put in the tree, and only
    they count as trainable.
    """
    if seq_len is None:
        seq_len = getattr(config.get_text_config(), "max_position_embeddings", None)
        if seq_len is None:
            raise ModelError(
                f"config of type {type(config).__name__!r} has no max_position_embeddings; "
                "pass the training block size as seq_len"
            )
    _require_positive_seq_len(seq_len)
    model = build_meta_model(config)
    adapter_parameters = 0
    if adapter is not None:
        from clm_runner.models.adapters import inject_adapters

        model = inject_adapters(model, adapter.lora).get_base_model()  # the base, adapters put in place
        adapter_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    owners = _parameter_owners(model)
    unique = list(model.named_parameters())
    num_layers, attention_width = _attention_shape(config)
    matmul_parameters = matmul_parameter_count(model)
    training_flops = _flops_from_counts(
        matmul_parameters, num_layers, attention_width, seq_len, adapter_parameters
    )
    return ModelSummary(
        model_type=getattr(config, "model_type", ""),
        class_name=type(model).__name__,
        root=module_tree(model),
        total_parameters=sum(p.numel() for _, p in unique),
        trainable_parameters=sum(p.numel() for _, p in unique if p.requires_grad),
        embedding_parameters=embedding_parameter_count(model),
        matmul_parameters=matmul_parameters,
        tied_parameters=tuple((name, owner) for name, owner in owners.items() if name != owner),
        num_layers=num_layers,
        attention_width=attention_width,
        seq_len=seq_len,
        flops_per_token=training_flops,
        forward_flops_per_token=_forward_flops(matmul_parameters, num_layers, attention_width, seq_len),
        adapter_parameters=adapter_parameters,
    )


def _format_shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(size) for size in shape) + "]"


def _node_label(node: ModuleNode, name: str | None = None) -> str:
    name = node.name if name is None else name
    if node.repeat > 1:
        label = f"{name} = {node.repeat} x {node.class_name}"
    else:
        label = f"{name}: {node.class_name}" if name else node.class_name
    if node.tied_to is not None:
        label += f" (tied to {node.tied_to})"
    if node.parameters:
        label += "  " + ", ".join(f"{p.name} {_format_shape(p.shape)}" for p in node.parameters)
    return label


def _node_count(node: ModuleNode) -> tuple[str, str]:
    """(right-aligned count, note) for the count column."""
    if node.tied_to is not None:
        return "shared", ""
    if node.repeat > 1:
        return f"{node.total_parameters:,}", f"({node.repeat} x {node.num_parameters:,} per block)"
    return f"{node.num_parameters:,}", ""


def _displayed(node: ModuleNode) -> tuple[ModuleNode, str]:
    """A container holding only one run of identical blocks is shown as that run: `h = 12 x GPT2Block`."""
    if len(node.children) == 1 and node.children[0].repeat > 1 and not node.parameters:
        return node.children[0], node.name
    return node, node.name


def _tree_lines(root: ModuleNode) -> list[tuple[str, tuple[str, str]]]:
    shown, name = _displayed(root)
    lines = [(_node_label(shown, name), _node_count(shown))]

    def walk(parent: ModuleNode, prefix: str) -> None:
        for index, child in enumerate(parent.children):
            last = index == len(parent.children) - 1
            shown, name = _displayed(child)
            lines.append(
                (prefix + ("└── " if last else "├── ") + _node_label(shown, name), _node_count(shown))
            )
            walk(shown, prefix + ("    " if last else "│   "))

    walk(shown, "")
    return lines


def render_summary(summary: ModelSummary) -> str:
    """Readable text: module tree with shapes and counts, then totals and FLOPs per token."""
    lines = _tree_lines(summary.root)
    label_width = max(len(label) for label, _ in lines)
    count_width = max(len(count) for _, (count, _) in lines)
    header = f"{summary.class_name} ({summary.model_type}), built from config only; no weights loaded"
    note = "counts: parameters per module; modules under an 'N x Block' line are counted for one block"
    body = [
        f"{label.ljust(label_width)}  {count.rjust(count_width)}  {extra}".rstrip()
        for label, (count, extra) in lines
    ]
    ties = [f"  {alias} -> {owner}" for alias, owner in summary.tied_parameters] or ["  none"]
    training_flops = f"{summary.flops_per_token:,}"
    formula_terms = (
        f"N={summary.matmul_parameters:,} (all but lookup-only embeddings), "
        f"L={summary.num_layers}, d={summary.attention_width}, T={summary.seq_len}"
    )
    if summary.adapter_parameters:
        share = 100.0 * summary.trainable_parameters / summary.total_parameters
        trainable = f"{summary.trainable_parameters:,} ({share:.4f}%: the LoRA adapters; the base is frozen)"
        formula = f"  = 4*(N-N_a) + 6*N_a + 12*L*d*T with N_a={summary.adapter_parameters:,} (adapters), "
    else:
        trainable = f"{summary.trainable_parameters:,}"
        formula = "  = 6*N + 12*L*d*T with "
    totals = [
        f"total parameters:      {summary.total_parameters:,} (tied weights counted once)",
        f"trainable parameters:  {trainable}",
        f"embedding parameters:  {summary.embedding_parameters:,} (token and position tables)",
        f"FLOPs per token (train, forward+backward) at seq_len {summary.seq_len}: {training_flops}",
        formula + formula_terms,
        f"FLOPs per token (forward only): {summary.forward_flops_per_token:,}",
        f"total_parameters: {summary.total_parameters}",
    ]
    return "\n".join([header, note, "", *body, "", "tied parameters:", *ties, "", *totals]) + "\n"
