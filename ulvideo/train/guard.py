"""The update check: an optimizer step is applied only when it is sound, at every ZeRO stage.

DeepSpeed applies a step in the AdamW it wraps (its "basic optimizer"), on the fp32 master weights
(ZeRO 1-3: this rank's partition, ZeRO-0: the full weights) after the gradients are reduced,
unscaled and clipped; the wrappers then copy the master into the weights the model runs with. The
check runs right there, instead of that AdamW's step: it works out the update the step would make,
without making it, and lets the step through only when on every rank

  * every gradient is finite,
  * the new first and second moments are finite (`g²` of a huge but finite gradient is not), and
  * every new weight `w` is finite with `|w| <= sqrt(float32 max) ~ 1.8e19` (`BOUND`), so that `w²`
    -- in any norm, variance or dot product over the weights -- is still a number.

Otherwise nothing is written: weights, moments and the step count stay, the wrapper copies the
unchanged master back, and the engine sees `overflow`, leaves the LR schedule alone and counts a
skipped step. Every test is an `isfinite` or a max-abs comparison, which cannot overflow (unlike a
norm: the sum of squares of weights of 1e29 is inf in float32), computed chunk by chunk in the
optimizer's own arithmetic. The decision is one all-reduce and one host sync per step, the same
as DeepSpeed's own overflow check.

    check = UpdateCheck.install(engine)   # after deepspeed.initialize
    ...
    engine.step()                         # the boundary step
    if not engine.was_step_applied(): print(check.reason)
"""
from __future__ import annotations

import math

import torch

BOUND = math.sqrt(torch.finfo(torch.float32).max)  # largest |w| whose square is a float32 number
CHUNK = 1 << 24  # elements per pass: bounds the temporaries (a few times 64 MiB in fp32)
NONFINITE_GRADIENT = "a non-finite loss or gradient"


def _adam_hyper(group: dict) -> tuple[float, float, float, float, float]:
    if group.get("amsgrad") or group.get("maximize"):
        raise ValueError("the update check models AdamW without amsgrad or maximize")
    b1, b2 = group["betas"]
    return float(group["lr"]), float(b1), float(b2), float(group["eps"]), float(group.get("weight_decay", 0.0))


# what can be wrong with an update, the root cause last: the ranks report the largest code
PROBLEMS = {1: "an update that would take weights to {size:.3g}, beyond +-{bound:.3g} (learning rate {lr:.3g})",
            2: "an Adam moment that would overflow (a gradient too large to square)", 3: NONFINITE_GRADIENT}


@torch.no_grad()
def adamw_update_problem(optimizer: torch.optim.Optimizer, device: torch.device | None = None) -> torch.Tensor:
    """(code in PROBLEMS or 0, the largest new |w|) of the AdamW step `optimizer` is about to take,
    found without changing anything, as a float64 tensor on `device` (no host sync here). Decoupled
    weight decay and bias correction as torch.optim.AdamW, DeepSpeed's FusedAdam and
    DeepSpeedCPUAdam (adamw mode) compute them."""
    bad_grad = bad_moment = size = None
    for group in optimizer.param_groups:
        lr, b1, b2, eps, wd = _adam_hyper(group)
        for p in group["params"]:
            if p.grad is None:
                continue
            state = optimizer.state.get(p, {})
            t = float(state.get("step", group.get("step", 0))) + 1
            c1, c2 = 1 - b1 ** t, math.sqrt(1 - b2 ** t)
            g, w = p.grad.reshape(-1), p.detach().reshape(-1)
            m, v = state.get("exp_avg"), state.get("exp_avg_sq")
            m = None if m is None else m.reshape(-1)
            v = None if v is None else v.reshape(-1)
            for i in range(0, g.numel(), CHUNK):
                gc = g[i:i + CHUNK].to(w.dtype)
                m1 = gc * (1 - b1) if m is None else m[i:i + CHUNK] * b1 + gc * (1 - b1)
                v1 = gc * gc * (1 - b2) if v is None else v[i:i + CHUNK] * b2 + gc * gc * (1 - b2)
                w1 = w[i:i + CHUNK] * (1 - lr * wd) - (lr / c1) * m1 / (v1.sqrt() / c2 + eps)
                found = (~torch.isfinite(gc).all(), ~(torch.isfinite(m1).all() & torch.isfinite(v1).all()),
                         torch.nan_to_num(w1.abs(), nan=math.inf).max().double())  # NaN counts as inf
                if size is None:
                    bad_grad, bad_moment, size = found
                else:
                    bad_grad, bad_moment, size = bad_grad | found[0], bad_moment | found[1], torch.maximum(size, found[2])
    out = torch.zeros(2, dtype=torch.float64, device=device)
    if size is not None:
        code = torch.where(bad_grad, 3.0, torch.where(bad_moment, 2.0, torch.where(size > BOUND, 1.0, 0.0)))
        out = torch.stack([code.double(), size]).to(out.device)
    return out


class UpdateCheck:
    """Replaces `basic.step` (the AdamW inside DeepSpeed's wrapper `outer`) by a checked step; see the
    module docstring. `reason` says why the last refused step was refused (`size`: the largest new
    |w| it would have made, when that was the reason)."""

    def __init__(self, basic: torch.optim.Optimizer, outer, device: torch.device | str = "cpu"):
        for group in basic.param_groups:
            _adam_hyper(group)
        self.basic, self.outer, self.device = basic, outer, torch.device(device)
        self.apply = basic.step
        self.reason: str | None = None
        self.size = 0.0
        self.refused = False
        basic.step = self.step

    @classmethod
    def install(cls, engine) -> "UpdateCheck":
        basic = engine.basic_optimizer
        # one AdamW call per optimizer step, so a step is refused or applied whole: one parameter
        # group (the loop passes one list of parameters) and, under ZeRO-3, one sub-group
        groups = len(getattr(engine.optimizer, "fp16_groups", basic.param_groups))
        if len(basic.param_groups) != 1 or groups != 1:
            raise RuntimeError(f"the update check needs one parameter group, DeepSpeed made {groups}")
        return cls(basic, engine.optimizer, engine.device)

    def step(self, *args, **kwargs):
        found = adamw_update_problem(self.basic, self.device)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # ZeRO: each rank checked its own partition; all of them step, or none
            torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX)
        code, self.size = int(found[0].item()), float(found[1].item())
        self.refused = code > 0
        if self.outer is self.basic or self.refused:
            self.outer.overflow = self.refused  # what the engine reads to skip the LR schedule
        if self.refused:
            lr = float(self.basic.param_groups[0]["lr"])
            self.reason = PROBLEMS[code].format(size=self.size, bound=BOUND, lr=lr)
            return None
        return self.apply(*args, **kwargs)
