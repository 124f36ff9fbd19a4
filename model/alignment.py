"""Alignment objectives: regularisers on UNITER's self-attention, computed inside
UniterEncoder (IAIS is the first two; model/iais.py registers them).

An objective is a class registered under a name with :func:`register_objective`. The
encoder is built with the run's objectives; at the layer an objective asks for, it hands
it an :class:`AttentionView` of the positive pairs and adds the named loss terms it
returns to the encoder's losses. The training step weights each term by its objective's
schedule (:meth:`AlignmentObjective.weight`) and logs it under its name. Adding one is a
module with the registered class plus the line in model/__init__.py that imports it.
"""
import difflib
from dataclasses import dataclass

import torch

SIDES = ("L", "V")  # whose self-attention a batch aligns: L the text's (text side), V the image's (image side)
OBJECTIVES = {}  # name -> AlignmentObjective subclass


@dataclass(frozen=True)
class AttentionView:
    """What an objective receives about the positive pairs of a batch.

    scores: raw attention scores QK^T/sqrt(d) [P, heads, N, N] of the hidden states entering
    the objective's layer, in the padded layout [text padded to max_tl | boxes];
    txt_mask/img_mask: 0/1 [P, N] marking the words (no [CLS]/[SEP]) and the valid boxes;
    max_tl: where the boxes start; n_words/n_boxes: the ones of each mask row, as ints;
    side: 'L' or 'V', whose self-attention this batch aligns; fused: the fast attention
    path is on (same values as the original's computation)."""
    scores: torch.Tensor
    txt_mask: torch.Tensor
    img_mask: torch.Tensor
    max_tl: int
    n_words: tuple
    n_boxes: tuple
    side: str
    fused: bool = True


class AlignmentObjective:
    """Base class. ``layer``: the index of the layer whose input attention it reads (-1:
    the last, as IAIS); ``terms``: the names of the loss terms it returns;
    ``needs_position_masks``: its batches must come in the padded layout with the word and
    box masks (the datasets' IAIS layout)."""
    name = None
    layer = -1
    terms = ()
    needs_position_masks = True

    def __call__(self, view):
        """{term: 0-dim tensor} of the batch seen through ``view`` (an AttentionView)."""
        raise NotImplementedError

    def weight(self, done_steps, num_train_steps):
        """The weight of every term of this objective in the step after ``done_steps``
        steps of ``num_train_steps``."""
        return 1.0


def register_objective(cls):
    """Class decorator: makes ``cls`` (with its ``name`` and ``terms``) selectable as
    ``--alignment NAME``."""
    if not cls.name or not cls.terms:
        raise ValueError(f"{cls.__name__} needs a name and at least one term")
    if cls.name in OBJECTIVES and OBJECTIVES[cls.name] is not cls:
        raise ValueError(f"alignment objective {cls.name!r} is registered twice")
    OBJECTIVES[cls.name] = cls
    return cls


def build_objectives(names):
    """The objectives called ``names`` (in that order, each once), ValueError naming the
    known ones for an unknown name."""
    out = []
    for name in dict.fromkeys(names):
        if name not in OBJECTIVES:
            close = difflib.get_close_matches(name, OBJECTIVES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown alignment objective {name!r} (known: {', '.join(sorted(OBJECTIVES))}){hint}")
        out.append(OBJECTIVES[name]())
    terms = [t for o in out for t in o.terms]
    if len(set(terms)) != len(terms):
        raise ValueError(f"alignment objectives {list(names)} return loss terms of the same name: {terms}")
    return tuple(out)


def encoder_layers(objectives, n_layers):
    """{layer index: [objectives reading that layer's input]} for an encoder of ``n_layers``."""
    by_layer = {}
    for objective in objectives:
        index = objective.layer % n_layers
        by_layer.setdefault(index, []).append(objective)
    return by_layer
