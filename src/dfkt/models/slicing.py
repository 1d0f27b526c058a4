"""A narrower student started from its teacher's weights: every tensor's leading slice.

A half-width student (``lenet5_half`` for ``lenet5``, ``wrn16_1`` for ``wrn16_2``) has the
teacher's parameter names with fewer channels. Taking the first k channels of every tensor
keeps the channel choice consistent from one layer to the next, through residual sums and
channel-major flattening alike, with no knowledge of the graph: output channel i of a layer is
input channel i of the next in both networks. The student starts with filters the teacher
learned on real images instead of random ones; distillation then fine-tunes them.

A layer that now sums over fewer inputs is scaled by (teacher inputs / student inputs), so its
pre-activations keep about their size (the same correction as inverted dropout).
"""

from __future__ import annotations

import torch
from torch import nn

from dfkt.errors import ConfigError


def leading_slice_state(student: nn.Module, teacher: nn.Module) -> dict[str, torch.Tensor]:
    """The student's state dict filled from the teacher's: equal shapes copied, narrower ones
    sliced (and fan-in rescaled). Raises ConfigError when the two do not share parameter names or a
    student tensor is larger than the teacher's in some dimension."""
    target, source = student.state_dict(), teacher.state_dict()
    missing = [name for name in target if name not in source]
    if missing:
        raise ConfigError(
            f"student_init=teacher needs a student built like the teacher with fewer channels; the teacher "
            f"has no {missing[0]!r} ({len(missing)} of the student's {len(target)} tensors missing). Use the "
            "teacher's half-width partner (e.g. lenet5 -> lenet5_half) or student_init=random"
        )
    state = {}
    for name, mine in target.items():
        theirs = source[name]
        if mine.dim() != theirs.dim() or any(s > t for s, t in zip(mine.shape, theirs.shape, strict=True)):
            raise ConfigError(
                f"student_init=teacher: the student's {name} is {tuple(mine.shape)}, the teacher's "
                f"{tuple(theirs.shape)}; the student must be the teacher with fewer channels, or use "
                "student_init=random"
            )
        piece = theirs[tuple(slice(0, n) for n in mine.shape)].clone().to(mine.dtype)
        if mine.dim() >= 2 and mine.is_floating_point() and mine.shape[1] < theirs.shape[1]:
            piece *= theirs.shape[1] / mine.shape[1]
        state[name] = piece
    return state


def init_from_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """Load :func:`leading_slice_state` into ``student`` in place."""
    student.load_state_dict(leading_slice_state(student, teacher))
