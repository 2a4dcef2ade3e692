"""Learning-rate schedules as epoch -> factor functions (for ``torch.optim.lr_scheduler.LambdaLR``).

Upstream MAEST (from PaSST) configures ``exp_warmup_linear_down(5, 50, 50, 0.01)``: an exponential
warm-up over 5 epochs, the full rate until epoch 50, a linear ramp down to 1 % over 50 epochs.
Its SWA callback replaced that schedule from epoch 49 (``with_swa_phase``), so the released
models never had the ramp-down: they trained at the full rate after the warm-up.
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


def with_swa_phase(
    schedule: Callable[[int], float],
    swa_start: int,
    swa_factor: float,
    anneal_epochs: int = 10,
    anneal_strategy: str = "cos",
) -> Callable[[int], float]:
    """``schedule`` until epoch ``swa_start`` (0-based), then Lightning's SWA learning-rate phase.

    Lightning's ``StochasticWeightAveraging`` (upstream MAEST's SWA, ``swa_lrs=2e-5``) swaps the
    schedule for ``torch.optim.swa_utils.SWALR`` at the start of epoch ``swa_start``: the factor
    anneals from the one in force, ``f0 = schedule(swa_start)``, to ``swa_factor`` over
    ``anneal_epochs`` epochs, ``f0 + (swa_factor - f0) * a(min(1, (epoch - swa_start) / anneal_epochs))``
    with ``a(t) = (1 - cos(pi t)) / 2`` ("cos") or ``a(t) = t`` ("linear"), then stays at
    ``swa_factor`` (from ``swa_start`` itself when ``anneal_epochs=0``). SWALR computes the same
    values step by step; this closed form keeps the scheduler a ``LambdaLR`` whose state is its epoch.
    """
    if swa_start < 0 or anneal_epochs < 0:
        raise ValueError(f"swa_start and anneal_epochs must be >= 0, got swa_start={swa_start}, anneal_epochs={anneal_epochs}")
    if swa_factor < 0:
        raise ValueError(f"swa_factor (the SWA learning rate / the peak learning rate) must be >= 0, got {swa_factor}")
    anneals = {"cos": lambda t: (1.0 - math.cos(math.pi * t)) / 2.0, "linear": lambda t: t}
    if anneal_strategy not in anneals:
        raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
    anneal = anneals[anneal_strategy]
    start_factor = schedule(swa_start)

    def factor(epoch: int) -> float:
        if epoch < swa_start:
            return schedule(epoch)
        t = 1.0 if anneal_epochs == 0 else min(1.0, (epoch - swa_start) / anneal_epochs)
        return start_factor + (swa_factor - start_factor) * anneal(t)

    return factor
