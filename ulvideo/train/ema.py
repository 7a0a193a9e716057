"""The exponential moving average of the trained weights, kept in float32 (what exports hold)."""
from __future__ import annotations

import torch


class EMA:
    """Exponential moving average of the trained module's weights, kept in float32.

    ZeRO-0/1/2: every rank holds the full parameters after each step, so every rank keeps the same
    full EMA. ZeRO-3: every rank keeps the EMA of its own partition only (`param.ds_tensor`, the
    slice [rank·n, (rank+1)·n) of the flattened, zero-padded parameter): no per-step all-gather and
    1/world of the memory. `state_dict()` consolidates the full weights (a collective under ZeRO-3:
    every rank calls it, rank 0 receives them). Only applied steps are absorbed, and the update
    check (ulvideo/train/guard.py) applies only steps whose weights are finite and bounded, so the
    EMA needs no check of its own (nor the collective and host sync one would cost every step).
    """

    def __init__(self, module: torch.nn.Module, decay: float, warmup: bool = False):
        self.decay = decay
        self.warmup = warmup
        self.params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.sharded = any(hasattr(p, "ds_tensor") for _, p in self.params)
        self.rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.shadow = {n: self._local(p).detach().float().clone() for n, p in self.params}
        self.buffers = {n: b.detach().float().clone() for n, b in module.named_buffers()}

    @staticmethod
    def _local(p: torch.Tensor) -> torch.Tensor:
        return p.ds_tensor if hasattr(p, "ds_tensor") else p

    def decay_at(self, step: int) -> float:
        """Decay used by the update that ends optimizer step `step` (1-based). With warm-up it is
        min(decay, (1 + step) / (10 + step)), so early averages do not drag in the initial weights."""
        return min(self.decay, (1.0 + step) / (10.0 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int | None = None) -> None:
        """Absorb the current weights (call after every applied optimizer step)."""
        decay = self.decay if step is None else self.decay_at(step)
        current = [self._local(p).detach().float() for _, p in self.params]
        torch._foreach_lerp_([self.shadow[n] for n, _ in self.params], current, 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 weights and buffers on CPU (under ZeRO-3: on rank 0; other ranks get {})."""
        if not self.sharded:
            return {n: v.cpu() for n, v in {**self.shadow, **self.buffers}.items()}
        out = {}
        for n, p in self.params:  # one parameter at a time bounds the gathering memory
            part = self.shadow[n]
            parts = [torch.empty_like(part) for _ in range(self.world)] if self.rank == 0 else None
            torch.distributed.gather(part, parts, dst=0)
            if self.rank == 0:
                out[n] = torch.cat(parts)[: p.ds_numel].view(p.ds_shape).cpu()
        return {**out, **{n: b.cpu() for n, b in self.buffers.items()}} if self.rank == 0 else {}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """From full weights (any world size wrote them): each rank takes its own slice under ZeRO-3."""
        for n, _ in self.params:
            mine = self.shadow[n]
            src = state[n].to(mine.device, torch.float32).flatten()
            if self.sharded:
                src = src[self.rank * mine.numel():(self.rank + 1) * mine.numel()]
                mine.zero_()
                mine[: src.numel()].copy_(src)
            else:
                mine.copy_(src.view_as(mine))
        for n in self.buffers:
            if n in state:
                self.buffers[n].copy_(state[n])
