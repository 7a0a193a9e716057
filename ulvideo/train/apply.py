"""What is applied to a model from outside (the networks know nothing of it): activation
checkpointing and compilation.

Activation checkpointing: every `nn.ModuleList` named `blocks` (the encoder's and decoder's
residual blocks, the transformers' blocks) has each entry's forward recomputed in the backward
pass instead of keeping its activations: memory for depth, one extra forward of compute.

Compilation: `compile_networks` puts `torch.compile` (inductor) on the outermost networks of a
model (the modules of `ulvideo.nets`: encoder, prior, decoder, base transformer, the start-up
readout), each as one graph, so the element-wise work around the convolutions and matmuls (norms,
adaLN modulation, activations, residual adds, position embeddings) runs as fused kernels. It
composes with activation checkpointing (a checkpointed block is traced as one recomputed region)
and with DeepSpeed (the networks are compiled, not the engine; their parameters, state-dict keys,
checkpoints and exports are those of the eager networks). Shapes are static: each clip shape (a
data bucket, a sampling resolution) compiles once on its first call, and grad and no-grad calls
compile separately; a recompile is cheaper than it sounds (the FX graph cache reuses the work across
processes) and static shapes let inductor specialise every kernel's indexing. Streamed and tiled
passes (`ulvideo.streaming`) carry per-chunk state in their modules and run eager.
"""
from __future__ import annotations

import functools

import torch
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


# Attributes `nets.layers.streaming` / `shared_statistics` attach to modules for a streamed or tiled pass.
_STATE_ATTRIBUTES = ("stream", "frame_stats")


def _is_network(module: nn.Module) -> bool:
    return type(module).__module__.startswith("ulvideo.nets.")


def _compile(net: nn.Module, **options) -> bool:
    if getattr(net.forward, "__ulvideo_compiled__", False):
        return False
    eager = net.forward
    compiled = torch.compile(eager, **options)
    stateful = [m for m in net.modules() if any(hasattr(type(m), a) for a in _STATE_ATTRIBUTES)]

    @functools.wraps(eager)
    def forward(*args, **kwargs):
        # a streamed or tiled pass: its cache slot and statistics change every call, so a compiled
        # graph would recompile per chunk and step
        if any(a in vars(m) for m in stateful for a in _STATE_ATTRIBUTES):
            return eager(*args, **kwargs)
        return compiled(*args, **kwargs)

    forward.__ulvideo_compiled__ = True
    net.forward = forward
    return True


def compile_networks(model: nn.Module, fullgraph: bool = False, backend: str = "inductor") -> list[str]:
    """torch.compile every outermost `ulvideo.nets` module in `model` (or `model` itself if it is
    one), in place, with static shapes; returns their names. `fullgraph=True` makes a graph break an
    error; `backend="aot_eager"` traces forward and backward without generating kernels (the tests)."""
    names = []

    def visit(module: nn.Module, prefix: str) -> None:
        if _is_network(module):
            if _compile(module, fullgraph=fullgraph, dynamic=False, backend=backend):
                names.append(prefix or type(module).__name__)
            return
        for name, child in module.named_children():
            visit(child, f"{prefix}.{name}" if prefix else name)

    visit(model, "")
    return names
