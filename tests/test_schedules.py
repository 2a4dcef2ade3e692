import math

import pytest
import torch

from helpers.schedules import exp_warmup_linear_down


def test_upstream_maest_schedule_values():
    f = exp_warmup_linear_down(warm_up_len=5, ramp_down_len=50, ramp_down_start=50, last_lr_value=0.01)
    assert f(0) == pytest.approx(math.exp(-5 * 0.9**2))  # epoch 0 counts as 0.5, as upstream
    assert f(2) == pytest.approx(math.exp(-5 * 0.6**2))
    assert f(5) == 1.0
    assert f(50) == 1.0
    assert f(75) == pytest.approx(0.01 + 0.99 * 0.5)
    assert f(100) == pytest.approx(0.01)
    assert f(130) == pytest.approx(0.01)
    values = [f(e) for e in range(131)]
    assert all(a <= b for a, b in zip(values[:6], values[1:6]))  # warm-up rises
    assert all(a >= b for a, b in zip(values[50:], values[51:]))  # ramp-down falls


def test_schedule_drives_lambda_lr():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, exp_warmup_linear_down(2, 2, 3, 0.5))
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.1 * math.exp(-5 * 0.75**2), 0.1 * math.exp(-5 * 0.5**2), 0.1, 0.1, 0.075, 0.05, 0.05]
    assert lrs == pytest.approx(expected)


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="warm_up_len=-1"):
        exp_warmup_linear_down(-1, 50, 50, 0.01)
    with pytest.raises(ValueError, match="last_lr_value"):
        exp_warmup_linear_down(5, 50, 50, 2.0)
    assert exp_warmup_linear_down(0, 0, 0, 0.1)(0) == 1.0
    assert exp_warmup_linear_down(0, 0, 0, 0.1)(1) == 0.1
