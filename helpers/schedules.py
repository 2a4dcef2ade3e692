"""Learning-rate schedules as epoch -> factor functions (for ``torch.optim.lr_scheduler.LambdaLR``).

Upstream MAEST (from PaSST) uses ``exp_warmup_linear_down(5, 50, 50, 0.01)``: an exponential
warm-up over 5 epochs, the full rate until epoch 50, a linear ramp down to 1 % over 50 epochs.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def exp_warmup_linear_down(
    warm_up_len: int, ramp_down_len: int, ramp_down_start: int, last_lr_value: float
) -> Callable[[int], float]:
    """Epoch -> learning-rate factor.

    - warm-up, ``epoch < warm_up_len``: ``exp(-5 (1 - t)^2)`` with ``t = epoch / warm_up_len``;
      as upstream, ``epoch`` is raised to at least 0.5, so epoch 0 is not the tiny ``exp(-5)``;
    - ``1.0`` up to and including ``ramp_down_start``;
    - linear from 1.0 to ``last_lr_value`` over the next ``ramp_down_len`` epochs;
    - ``last_lr_value`` after.
    """
    if warm_up_len < 0 or ramp_down_len < 0 or ramp_down_start < 0:
        raise ValueError(
            f"schedule lengths must be >= 0, got warm_up_len={warm_up_len}, ramp_down_len={ramp_down_len}, "
            f"ramp_down_start={ramp_down_start}"
        )
    if not 0.0 <= last_lr_value <= 1.0:
        raise ValueError(f"last_lr_value is a factor of the base rate in [0, 1], got {last_lr_value}")

    def factor(epoch: int) -> float:
        warm_up = 1.0
        if epoch < warm_up_len:
            phase = 1.0 - max(epoch, 0.5) / warm_up_len
            warm_up = math.exp(-5.0 * phase * phase)
        if epoch <= ramp_down_start:
            ramp_down = 1.0
        elif epoch - ramp_down_start < ramp_down_len:
            remaining = (ramp_down_len - (epoch - ramp_down_start)) / ramp_down_len
            ramp_down = last_lr_value + (1.0 - last_lr_value) * remaining
        else:
            ramp_down = last_lr_value
        return warm_up * ramp_down

    return factor
