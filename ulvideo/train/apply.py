"""Activation checkpointing applied to a model from outside (the networks know nothing of it).

Every `nn.ModuleList` named `blocks` (the encoder's and decoder's residual blocks, the
transformers' blocks) has each entry's forward recomputed in the backward pass instead of keeping
its activations: memory for depth, one extra forward of compute.
"""
from __future__ import annotations

import functools

import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    run.__ulvideo_checkpointed__ = True
    return run


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Wrap every block of every `blocks` ModuleList in `model`; returns how many were wrapped."""
    count = 0
    for module in model.modules():
        blocks = getattr(module, "blocks", None)
        if not isinstance(blocks, nn.ModuleList):
            continue
        for block in blocks:
            if not getattr(block.forward, "__ulvideo_checkpointed__", False):
                block.forward = _checkpointed(block.forward)
                count += 1
    return count
