"""The optimizer step fused into backward (helpers.step_in_backward): the same weights, one gradient alive at a time."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

import helpers.step_in_backward as sib
from helpers.step_in_backward import StepInBackward, blockers, step_in_backward
from models import get_maest
from tests.builders import maest_module

N_CLASSES, N_FRAMES = 4, 116


def tiny_net():
    torch.manual_seed(0)
    return get_maest("maest-tiny", n_classes=N_CLASSES, input_t=N_FRAMES)


def groups(net, lr=1e-3):
    """Two groups with their own weight decay and learning rate, as the module's parameter_groups."""
    matrices = [p for p in net.parameters() if p.requires_grad and p.ndim > 1]
    vectors = [p for p in net.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": matrices, "weight_decay": 0.05}, {"params": vectors, "weight_decay": 0.0, "lr": lr / 3}]


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(3, 1, 96, N_FRAMES, generator=g), (torch.rand(3, N_CLASSES, generator=g) < 0.5).float()) for _ in range(n)]


def train(net, optimizer, data, precision="bf16"):
    net.train()
    for step, (x, y) in enumerate(data):
        optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(step)  # patchout and dropout draw the same in both runs
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.binary_cross_entropy_with_logits(net(x).float(), y)
        loss.backward()
        optimizer.step()
        for group in optimizer.param_groups:  # a schedule: the hooks read the group's current lr
            group["lr"] *= 0.7


def assert_same_training(a, optimizer_a, b, optimizer_b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    state_a, state_b = optimizer_a.state_dict(), optimizer_b.state_dict()
    assert state_a["param_groups"] == state_b["param_groups"]
    assert state_a["state"].keys() == state_b["state"].keys() and state_a["state"]
    for i, s in state_a["state"].items():
        for key, value in s.items():
            assert torch.equal(value, state_b["state"][i][key]), (i, key)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_weights_and_adamw_state_equal_one_step_over_all_parameters(fused, precision):
    plain = tiny_net()
    fused_net = copy.deepcopy(plain)
    optimizer = torch.optim.AdamW(groups(plain), lr=1e-3, fused=fused)
    optimizer_in_backward = torch.optim.AdamW(groups(fused_net), lr=1e-3, fused=fused)
    hooks = StepInBackward(optimizer_in_backward)
    data = batches(4)
    train(plain, optimizer, data, precision)
    train(fused_net, optimizer_in_backward, data, precision)
    assert_same_training(plain, optimizer, fused_net, optimizer_in_backward)
    assert all(p.grad is None for p in fused_net.parameters())  # each gradient went once its update was made
    before = [p.detach().clone() for p in plain.parameters()]
    assert not all(torch.equal(p, q) for p, q in zip(before, tiny_net().parameters()))  # the steps changed the weights
    hooks.remove()
    train(fused_net, optimizer_in_backward, batches(1, seed=1), precision)  # without hooks: the optimizer as before
    train(plain, optimizer, batches(1, seed=1), precision)
    assert_same_training(plain, optimizer, fused_net, optimizer_in_backward)


def test_only_one_gradient_is_alive_at_a_time_in_backward():
    # Without the hooks, backward ends with every gradient alive.
    plain = tiny_net()
    optimizer = torch.optim.AdamW(groups(plain), lr=1e-3, fused=True)
    count = []
    optimizer.register_step_pre_hook(lambda *_: count.append(sum(q.grad is not None for q in plain.parameters())))
    train(plain, optimizer, batches(1))
    assert count[0] > 20
    net = tiny_net()
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(groups(net), lr=1e-3, fused=True)
    alive = []
    for p in params:  # registered first: runs before the update hook, when this gradient is complete
        p.register_post_accumulate_grad_hook(lambda p: alive.append(sum(q.grad is not None for q in params)))
    StepInBackward(optimizer)
    train(net, optimizer, batches(2))
    assert len(alive) == 2 * count[0]  # every parameter with a gradient, in both steps
    assert max(alive) == 1


def lightning_trainer(tmp_path, **kwargs):
    return pl.Trainer(**{
        "max_steps": 3, "accelerator": "cpu", "precision": "bf16-mixed", "logger": False, "enable_checkpointing": False,
        "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0, "default_root_dir": tmp_path, **kwargs,
    })


def loader():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 1, 96, N_FRAMES, generator=g), (torch.rand(6, N_CLASSES, generator=g) < 0.5).float()
    y[:, 0], y[:, 1] = 1.0, 0.0
    return torch.utils.data.DataLoader([(x[i], f"k{i}", y[i]) for i in range(6)], batch_size=2)


class Used(pl.Callback):
    """Records, at every training batch, whether the module fused the step into backward."""

    def __init__(self):
        self.used = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.used.append(pl_module._in_backward is not None)


def fit(tmp_path, mode, **trainer_kwargs):
    module = maest_module(tiny_net(), lr=1e-3, step_in_backward=mode, swa=False, mixup_alpha=0.0)
    used = Used()
    trainer = lightning_trainer(tmp_path, callbacks=[used], **trainer_kwargs)
    torch.manual_seed(0)
    trainer.fit(module, train_dataloaders=loader())
    return module, trainer, used.used


def test_lightning_training_gives_the_same_weights_and_optimizer_state(tmp_path):
    fused, fused_trainer, used = fit(tmp_path / "a", True)
    plain, plain_trainer, not_used = fit(tmp_path / "b", False)
    assert used == [True] * 3 and not_used == [False] * 3
    assert_same_training(plain.net, plain_trainer.optimizers[0], fused.net, fused_trainer.optimizers[0])
    assert fused._in_backward is None  # the hooks go when fitting ends
    p = next(fused.net.parameters())
    F.binary_cross_entropy_with_logits(fused.net(loader().dataset[0][0][None]), torch.zeros(1, N_CLASSES)).backward()
    assert p.grad is not None


def test_auto_fuses_only_large_gradients_on_cpu(tmp_path, monkeypatch):
    assert fit(tmp_path / "a", "auto")[2] == [False] * 3  # maest-tiny's gradients: far below MIN_GRADIENT_BYTES
    monkeypatch.setattr(sib, "MIN_GRADIENT_BYTES", 0)
    assert fit(tmp_path / "b", "auto")[2] == [True] * 3
    assert fit(tmp_path / "c", "auto", gradient_clip_val=1.0)[2] == [False] * 3  # clipping needs every gradient


@pytest.mark.parametrize(
    "trainer_kwargs, reason",
    [
        ({"accumulate_grad_batches": 2}, r"trainer.accumulate_grad_batches=2"),
        ({"gradient_clip_val": 0.5}, r"trainer.gradient_clip_val=0.5"),
    ],
)
def test_forcing_it_where_every_gradient_is_needed_is_refused_with_the_reason(tmp_path, trainer_kwargs, reason):
    with pytest.raises(ValueError, match=rf"module.step_in_backward=True cannot fuse the optimizer step into backward with {reason}.*"
                                         r"set module.step_in_backward='auto' or False"):
        fit(tmp_path, True, **trainer_kwargs)


def test_blockers_name_ddp_and_the_fp16_scaler():
    class Trainer:
        world_size, accumulate_grad_batches, gradient_clip_val, precision, optimizers = 2, 1, None, "16-mixed", [object()]

        class precision_plugin:  # noqa: N801 (Lightning's attribute)
            scaler = object()

    assert blockers(Trainer()) == ["2 processes (DDP averages the gradients after backward)",
                                   "trainer.precision='16-mixed' (its gradient scaler unscales the gradients after backward)"]
    with pytest.raises(ValueError, match=r"module.step_in_backward must be True, False or 'auto', got 'on'"):
        step_in_backward(Trainer(), "on", torch.device("cpu"))
    with pytest.raises(ValueError, match=r"module.step_in_backward must be True, False or 'auto', got 1"):
        maest_module(tiny_net(), step_in_backward=1)


def test_gradient_clipping_works_under_bf16_mixed_with_the_unfused_adamw(tmp_path):
    # Lightning refuses to clip for a fused optimizer under mixed precision: the module then builds the unfused one.
    norms = []

    class Norms(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            trainer.optimizers[0].register_step_post_hook(  # the gradients as clipped and used
                lambda optimizer, *_: norms.append(torch.linalg.vector_norm(torch.stack(
                    [p.grad.norm() for g in optimizer.param_groups for p in g["params"] if p.grad is not None])).item()))

    module = maest_module(tiny_net(), lr=1e-3, swa=False, mixup_alpha=0.0)
    trainer = lightning_trainer(tmp_path, gradient_clip_val=1e-3, callbacks=[Norms()])
    trainer.fit(module, train_dataloaders=loader())
    assert not trainer.optimizers[0].defaults["fused"]
    assert len(norms) == 3 and max(norms) <= 1e-3 * (1 + 1e-4)
    unclipped = maest_module(tiny_net(), lr=1e-3, swa=False, mixup_alpha=0.0)
    trainer = lightning_trainer(tmp_path, max_steps=1)
    trainer.fit(unclipped, train_dataloaders=loader())
    assert trainer.optimizers[0].defaults["fused"]


def test_a_resumed_optimizer_state_is_stepped_as_before():
    # Resuming loads the optimizer's state after the hooks are in place: load_state_dict replaces the group dicts.
    net = tiny_net()
    optimizer = torch.optim.AdamW(groups(net), lr=1e-3, fused=True)
    train(net, optimizer, batches(2))
    checkpoint = copy.deepcopy({"net": net.state_dict(), "optimizer": optimizer.state_dict()})
    train(net, optimizer, batches(2, seed=1))  # the uninterrupted run
    resumed = tiny_net()
    resumed_optimizer = torch.optim.AdamW(groups(resumed), lr=1e-3, fused=True)
    StepInBackward(resumed_optimizer)
    resumed.load_state_dict(checkpoint["net"])
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    train(resumed, resumed_optimizer, batches(2, seed=1))
    assert_same_training(net, optimizer, resumed, resumed_optimizer)


def test_a_fit_after_one_that_failed_steps_its_own_optimizer(tmp_path):
    module = maest_module(tiny_net(), lr=1e-3, step_in_backward=True, swa=False, mixup_alpha=0.0)

    class Fail(pl.Callback):
        def on_train_batch_end(self, *args):
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        lightning_trainer(tmp_path, callbacks=[Fail()]).fit(module, train_dataloaders=loader())
    first = module._in_backward.optimizer
    trainer = lightning_trainer(tmp_path, max_steps=2)
    trainer.fit(module, train_dataloaders=loader())
    assert trainer.optimizers[0] is not first
    assert all(state["step"].item() == 1 for state in first.state.values())  # the failed fit's one step, no more
    steps = [state["step"].item() for state in trainer.optimizers[0].state.values()]
    assert len(steps) == len(first.state) and set(steps) == {2}  # both steps of this fit went to its own optimizer
