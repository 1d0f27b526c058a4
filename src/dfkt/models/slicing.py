"""A narrower student started from its teacher's weights: every tensor's leading slice, optionally of a copy of
the teacher whose channels were first sorted by importance (:func:`ranked_teacher`).

A half-width student (``lenet5_half`` for ``lenet5``, ``digits_cnn_half`` for ``digits_cnn``) has the
teacher's tensor names with fewer channels. Taking the first k channels of every tensor
keeps the channel choice consistent from one layer to the next, through residual sums and
channel-major flattening alike, with no knowledge of the graph: output channel i of a layer is
input channel i of the next in both networks. The student starts with filters the teacher
learned on real images instead of random ones; distillation then fine-tunes them. This is weight
selection (Xu et al., "Initializing Models with Larger Ones", ICLR 2024) with the same leading
indices in every layer, applied here to data-free distillation.

A layer that now sums over fewer inputs is scaled by (teacher inputs / student inputs), so its
pre-activations keep about their size (the correction of inverted dropout; our addition: on B2's
LeNet-5 the sliced student scores 33% on the test set with it and 28% without).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

from dfkt.errors import ConfigError


def leading_slice_state(student: nn.Module, teacher: nn.Module) -> dict[str, torch.Tensor]:
    """The student's state dict filled from the teacher's: equal shapes copied, fewer output or input
    channels sliced (and fan-in rescaled); counters keep the student's own value. Raises ConfigError
    unless the two have the same tensor names and every student tensor differs from the teacher's only
    in its first two dimensions: a shallower student (resnet34 -> resnet18) or one whose blocks differ
    (wrn16_2 -> wrn16_1, where the teacher projects a shortcut the student adds unchanged) is not the
    teacher with fewer channels."""
    target, source = student.state_dict(), teacher.state_dict()
    if target.keys() != source.keys():
        only_student = [name for name in target if name not in source]
        only_teacher = [name for name in source if name not in target]
        example = (
            f"the teacher has no {only_student[0]!r}" if only_student else f"the student has no {only_teacher[0]!r}"
        )
        raise ConfigError(
            f"student_init=teacher needs the student to be the teacher with fewer channels; {example} "
            f"({len(only_student)} student and {len(only_teacher)} teacher tensors unmatched). Use the "
            "teacher's half-width partner (e.g. lenet5 -> lenet5_half, digits_cnn -> digits_cnn_half) or "
            "student_init=random"
        )
    state = {}
    for name, mine in target.items():
        theirs = source[name]
        narrower = mine.dim() == theirs.dim() and all(
            s == t or (dim < 2 and s < t) for dim, (s, t) in enumerate(zip(mine.shape, theirs.shape, strict=True))
        )
        if not narrower:
            raise ConfigError(
                f"student_init=teacher: the student's {name} is {tuple(mine.shape)}, the teacher's "
                f"{tuple(theirs.shape)}; the student must be the teacher with fewer channels, or use "
                "student_init=random"
            )
        if not mine.is_floating_point():  # a counter (BatchNorm's num_batches_tracked), not a weight
            state[name] = mine.clone()
            continue
        piece = theirs[tuple(slice(0, n) for n in mine.shape)].clone().to(mine.dtype)
        if mine.dim() >= 2 and mine.shape[1] < theirs.shape[1]:
            piece *= theirs.shape[1] / mine.shape[1]
        state[name] = piece
    return state


CHANNEL_RANKINGS = ("leading", "filter_norm", "outgoing_norm")


def init_from_teacher(
    student: nn.Module, teacher: nn.Module, channels: str = "leading", example: torch.Tensor | None = None
) -> dict[str, torch.Tensor] | None:
    """Load the teacher's slice into ``student`` in place. ``channels`` says which of the teacher's channels each
    narrower layer keeps: ``leading`` (the first k), or the k ranked first by :func:`ranked_teacher` (which needs
    ``example``, an input batch). Returns None where the slice is the leading one (asked for, or the teacher is not
    a chain that can be ranked); else, by name of each narrower layer, the teacher's channel behind each of the
    student's output channels."""
    if channels not in CHANNEL_RANKINGS:
        raise ValueError(f"channels must be one of {', '.join(CHANNEL_RANKINGS)}, got {channels!r}")
    if channels != "leading" and example is None:
        raise ValueError(f"channels={channels} needs an example input batch, on which the ranked teacher is checked")
    ranked = None if channels == "leading" else ranked_teacher(teacher, example, channels)
    if ranked is None:
        student.load_state_dict(leading_slice_state(student, teacher))
        return None
    reordered, orders = ranked
    student.load_state_dict(leading_slice_state(student, reordered))
    kept = {name: student.get_submodule(name).weight.shape[0] for name in orders}
    return {name: order[: kept[name]] for name, order in orders.items() if kept[name] < len(order)}


def ranked_teacher(
    teacher: nn.Module, example: torch.Tensor, ranking: str
) -> tuple[nn.Module, dict[str, torch.Tensor]] | None:
    """A copy of ``teacher`` computing the same function with each layer's output channels sorted by importance,
    largest first, and (by layer name) the order applied; None when the teacher is not a chain.

    ``filter_norm`` ranks a channel by the L1 norm of its filter, as Li et al. ("Pruning Filters for Efficient
    ConvNets", ICLR 2017) prune; ``outgoing_norm`` by the L1 norm of the weights the next layer reads it with, times
    the scale |γ|/√(σ² + ε) of a BatchNorm between them: how much of it reaches the next layer. The leading slice
    of the sorted copy keeps the most important channels instead of the first ones: with the B2 LeNet-5 teacher of
    benchmarks/analysis/student_init.md (twenty-seventh session) the sliced half-width student scores 44%
    (filter_norm) and 61% (outgoing_norm) on the test set at its start, against 22% for the leading slice. A chain:
    convolution and linear layers, registered in the order they run, each feeding only the next one (through
    BatchNorm, activations, pooling and a channel-major flatten). The sort is checked, not assumed: the copy must
    give the teacher's outputs on ``example``, else None (a residual sum ties channels across layers, so sorting one
    layer alone changes the function)."""
    state = {name: tensor.detach().cpu().clone() for name, tensor in teacher.state_dict().items()}
    norms = nn.BatchNorm1d | nn.BatchNorm2d
    chain = [
        (name, module)
        for name, module in teacher.named_modules()
        if not list(module.children()) and (isinstance(module, norms) or any(True for _ in module.parameters(False)))
    ]
    layers = [name for name, module in chain if isinstance(module, nn.Conv2d | nn.Linear)]
    if not layers or any(f"{name}.weight" not in state for name in layers):  # none, or a reparametrised weight
        return None
    scores = channel_scores(chain, state, ranking)
    if scores is None:
        return None
    orders: dict[str, torch.Tensor] = {}
    previous: torch.Tensor | None = None  # the order of the last layer's outputs
    for name, module in chain:
        if isinstance(module, nn.Conv2d | nn.Linear):
            weight = state[f"{name}.weight"]
            if previous is not None:  # read the inputs in their new order; a flatten reads blocks of a channel
                block, rest = divmod(weight.shape[1], len(previous))
                if rest or (isinstance(module, nn.Conv2d) and block != 1):
                    return None
                weight = weight[:, (previous[:, None] * block + torch.arange(block)).flatten()]
            order = (
                torch.arange(weight.shape[0])  # the classes keep their order
                if name == layers[-1]
                else scores[name].argsort(descending=True, stable=True)
            )
            state[f"{name}.weight"] = weight[order]
            if module.bias is not None:
                state[f"{name}.bias"] = state[f"{name}.bias"][order]
            orders[name], previous = order, order
        elif isinstance(module, norms) and previous is not None and module.num_features == len(previous):
            for key in ("weight", "bias", "running_mean", "running_var"):
                if f"{name}.{key}" in state:
                    state[f"{name}.{key}"] = state[f"{name}.{key}"][previous]
        else:
            return None
    reordered = copy.deepcopy(teacher)
    reordered.load_state_dict(state)
    if not computes_the_same(teacher, reordered, example):
        return None
    return reordered, orders


def computes_the_same(teacher: nn.Module, reordered: nn.Module, example: torch.Tensor) -> bool:
    """Whether ``reordered`` gives ``teacher``'s outputs on ``example`` (both in eval mode; the teacher's mode is
    restored)."""
    was_training = teacher.training
    parameter = next(teacher.parameters())
    example = example.to(parameter.device, parameter.dtype)
    try:
        with torch.no_grad():
            expected, got = teacher.eval()(example), reordered.eval()(example)
    finally:
        teacher.train(was_training)
    return torch.allclose(expected, got, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def channel_scores(
    chain: list[tuple[str, nn.Module]], state: dict[str, torch.Tensor], ranking: str
) -> dict[str, torch.Tensor] | None:
    """By layer name, the importance of each output channel of the chain's convolution and linear layers (see
    :func:`ranked_teacher`), from the teacher's ``state``; None when a layer is not followed as a chain would be."""
    scores = {}
    for i, (name, module) in enumerate(chain):
        if not isinstance(module, nn.Conv2d | nn.Linear):
            continue
        weight = state[f"{name}.weight"]
        if ranking == "filter_norm":
            scores[name] = weight.abs().flatten(1).sum(1)
            continue
        following, scale = chain[i + 1 :], torch.ones(weight.shape[0])
        if following and isinstance(following[0][1], nn.BatchNorm1d | nn.BatchNorm2d):
            norm_name, norm = following.pop(0)
            if norm.num_features != weight.shape[0]:
                return None
            if f"{norm_name}.running_var" in state:
                scale = scale / (state[f"{norm_name}.running_var"] + norm.eps).sqrt()
            if f"{norm_name}.weight" in state:
                scale = scale * state[f"{norm_name}.weight"].abs()
        if not following:  # the classifier: not ranked
            continue
        reader_name, reader = following[0]
        if not isinstance(reader, nn.Conv2d | nn.Linear) or f"{reader_name}.weight" not in state:
            return None
        read = state[f"{reader_name}.weight"]
        if read.shape[1] % len(scale):
            return None
        scores[name] = read.abs().transpose(0, 1).reshape(len(scale), -1).sum(1) * scale  # flatten: blocks of a channel
    return scores


def narrower_layers(student: nn.Module, teacher: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(student layer, teacher layer) for every convolution and linear layer the two networks name alike
    where the student has fewer output channels: after :func:`init_from_teacher`, the student's output
    channel i of such a layer approximates the teacher's channel i (with ranked channels, the i-th of those
    init_from_teacher returns). The classifier (as many outputs in both) is left out."""
    teacher_layers = dict(teacher.named_modules())
    pairs = []
    for name, mine in student.named_modules():
        theirs = teacher_layers.get(name)
        if isinstance(mine, nn.Conv2d | nn.Linear) and type(theirs) is type(mine):
            if mine.weight.shape[0] < theirs.weight.shape[0]:
                pairs.append((mine, theirs))
    return pairs


class LayerOutputs:
    """The last output of each given module, kept by forward hooks while ``recording`` is true (so the
    many teacher passes of synthesis keep no reference to their graphs)."""

    def __init__(self, modules: list[nn.Module]):
        self.outputs: list[torch.Tensor | None] = [None] * len(modules)
        self.recording = False
        for index, module in enumerate(modules):
            module.register_forward_hook(self._hook(index))

    @contextlib.contextmanager
    def record(self) -> Iterator[None]:
        """Keep the outputs of the forward passes inside."""
        self.recording = True
        try:
            yield
        finally:
            self.recording = False

    def _hook(self, index: int):
        def keep(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if self.recording:
                self.outputs[index] = output

        return keep
