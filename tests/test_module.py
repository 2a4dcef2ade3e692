"""MAESTModule with a tiny MAEST: losses, training-only augmentation, evaluation, SWA, optimiser, schedule."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from helpers.augment import mixup
from helpers.metrics import macro_metrics
from helpers.schedules import exp_warmup_linear_down
from models import get_maest
from tests.builders import maest_module

N_CLASSES = 4
N_FRAMES = 116  # 11 time patches = the 11 time embeddings: no random embedding offset in training
NO_AUGMENTATION = dict(mixup_alpha=0.0, masking=False, roll_max_shift=0)


def tiny_net(**overrides):
    return get_maest("maest-tiny", n_classes=N_CLASSES, input_t=N_FRAMES, **overrides)


def make_batch(n=4, seed=0, teacher=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 96, N_FRAMES, generator=g)
    y = (torch.rand(n, N_CLASSES, generator=g) < 0.5).float()
    y[:, 0], y[:, 1] = 1.0, 0.0  # every batch has a positive and a negative of some class
    keys = [f"track{seed}-{i}.mmap" for i in range(n)]
    if teacher:
        return x, keys, y, (torch.rand(n, N_CLASSES, generator=g) < 0.3).float()
    return x, keys, y


def items(n, seed=0):
    """An in-memory dataset of (x, key, y) items with every class positive and negative somewhere."""
    x, keys, y = make_batch(n, seed)
    y[::2, 2], y[1::2, 2] = 1.0, 0.0
    return [(x[i], keys[i], y[i]) for i in range(n)]


def trainer(**kwargs):
    options = dict(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, precision="32-true",
    )
    return pl.Trainer(**{**options, **kwargs})


def training_loss(module, batch, seed=0):
    torch.manual_seed(seed)
    return module.training_step(batch, 0).item()


# ---------------------------------------------------------------------------------- training loss
def test_training_loss_is_bce_of_the_net_without_augmentation():
    module = maest_module(tiny_net(), **NO_AUGMENTATION)
    x, keys, y = make_batch()
    x_before = x.clone()
    loss = module.training_step((x, keys, y), 0)
    loss.backward()
    # Every trainable parameter gets a gradient (DDP requires it): the unused DIST head is frozen.
    no_grad = [n for n, p in module.net.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    assert not module.net.head_dist.weight.requires_grad
    assert module.net.training  # the module trains the network it is given (get_maest returns eval mode)
    expected = F.binary_cross_entropy_with_logits(module.net(x), y)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
    assert torch.equal(x, x_before)  # the batch is not modified in place


@pytest.mark.parametrize(
    "augmentation, net_overrides",
    [
        (dict(masking=True), {}),
        (dict(mixup_alpha=0.3), {}),
        (dict(roll_max_shift=20), {}),
        ({}, dict(s_patchout_t=5)),
        ({}, dict(s_patchout_f=3)),
        ({}, dict(u_patchout=30)),
    ],
    ids=["mask", "mixup", "roll", "patchout_t", "patchout_f", "patchout_u"],
)
def test_each_augmentation_changes_the_training_loss(augmentation, net_overrides):
    torch.manual_seed(0)
    plain_net = tiny_net()
    augmented_net = tiny_net(**net_overrides)
    augmented_net.load_state_dict(plain_net.state_dict())
    batch = make_batch()
    plain = training_loss(maest_module(plain_net, **NO_AUGMENTATION), batch)
    augmented = training_loss(maest_module(augmented_net, **{**NO_AUGMENTATION, **augmentation}), batch)
    # Without augmentation the loss is exactly reproducible (previous test): any change is the augmentation.
    assert abs(augmented - plain) > 1e-6
    assert training_loss(maest_module(plain_net, **NO_AUGMENTATION), batch) == plain


def test_evaluation_is_deterministic_and_without_augmentation():
    torch.manual_seed(0)
    net = tiny_net(s_patchout_t=5, s_patchout_f=2, u_patchout=10)
    module = maest_module(net, mixup_alpha=0.3, masking=True, roll_max_shift=20).eval()
    x, keys, y = make_batch()
    module.validation_step((x, keys, y), 0)
    module.validation_step((x, keys, y), 1)
    first, second = module._outputs["val"]
    plain = copy.deepcopy(net).eval()
    logits = plain(x)
    for record in (first, second):
        torch.testing.assert_close(record[""], torch.sigmoid(logits), rtol=0, atol=1e-6)
        torch.testing.assert_close(record["swa"], torch.sigmoid(logits), rtol=0, atol=1e-6)
        torch.testing.assert_close(
            record["loss"], F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(1), rtol=0, atol=1e-6
        )
        assert torch.equal(record["y"], y)


def test_validation_metrics_cover_every_clip_once():
    """Metrics are computed once over all clips (batches 3, 3, 1), not averaged over batches."""
    torch.manual_seed(0)
    net = tiny_net()
    module = maest_module(net, swa_epoch_start=0)
    data = items(7)
    (results,) = trainer().validate(module, dataloaders=DataLoader(data, batch_size=3))

    x = torch.stack([d[0] for d in data])
    y = torch.stack([d[2] for d in data])
    with torch.no_grad():
        logits = net.eval()(x)
    expected = macro_metrics(y.numpy(), torch.sigmoid(logits).numpy())
    assert results["val_loss"] == pytest.approx(F.binary_cross_entropy_with_logits(logits, y).item(), abs=1e-6)
    assert results["val_roc"] == pytest.approx(expected["roc_auc"], abs=1e-6)
    assert results["val_ap"] == pytest.approx(expected["pr_auc"], abs=1e-6)
    # Before any SWA update the SWA copy equals the live network.
    for name in ("loss", "roc", "ap"):
        assert results[f"val_{name}_swa"] == pytest.approx(results[f"val_{name}"], abs=1e-6)
    assert "val" not in module._outputs  # the epoch's outputs are released


def test_without_swa_only_the_live_network_is_evaluated():
    module = maest_module(tiny_net(), swa=False)
    (results,) = trainer().validate(module, dataloaders=DataLoader(items(6), batch_size=3))
    assert set(results) == {"val_loss", "val_roc", "val_ap", "val_n_classes_scored"}  # one count: it depends on the labels only


# ---------------------------------------------------------------------------------- teacher-student
def test_teacher_student_loss_is_the_mean_of_label_and_teacher_bce():
    net = tiny_net(distilled_type="separated")
    module = maest_module(net, teacher_student=True, **NO_AUGMENTATION)
    x, keys, y, teacher = make_batch(teacher=True)
    loss = module.training_step((x, keys, y, teacher), 0)
    logits, logits_dist = net.forward_heads(x)
    labels = F.binary_cross_entropy_with_logits(logits, y)
    distilled = F.binary_cross_entropy_with_logits(logits_dist, teacher)
    torch.testing.assert_close(loss, (labels + distilled) / 2, rtol=0, atol=1e-6)
    assert abs(labels.item() - distilled.item()) > 1e-3  # the two terms are distinct


def test_teacher_student_mixup_mixes_teacher_targets_with_the_same_partner():
    """With mixup on, the teacher targets are mixed like the labels (same lambda, same partner)."""
    net = tiny_net(distilled_type="separated")
    module = maest_module(net, teacher_student=True, mixup_alpha=0.3, mask_p=0.0)
    x, keys, y, _ = make_batch(teacher=True)
    # Teacher targets equal to the labels: mixed with the same lambda and partner, they equal the mixed labels.
    loss = training_loss(module, (x, keys, y, y.clone()))
    torch.manual_seed(0)
    xm, ym = mixup(x, y, 0.3)
    logits, logits_dist = net.forward_heads(xm)
    expected = (F.binary_cross_entropy_with_logits(logits, ym) + F.binary_cross_entropy_with_logits(logits_dist, ym)) / 2
    assert loss == pytest.approx(expected.item(), abs=1e-6)


def test_teacher_student_needs_separated_heads():
    with pytest.raises(ValueError, match="distilled_type='separated'"):
        maest_module(tiny_net(distilled_type="mean"), teacher_student=True)


# ---------------------------------------------------------------------------------- SWA
def _set_weights(net, value):
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(value)


def test_swa_is_the_running_mean_of_the_averaged_epochs():
    module = maest_module(tiny_net(), swa_epoch_start=3, swa_freq=2)  # the SWA phase starts at 0-based epoch 2
    swa_values = {}
    for epoch in range(7):
        module._average_swa(epoch)  # start of the epoch: the weights after epoch - 1 (every weight = epoch)
        _set_weights(module.net, float(epoch + 1))  # training: the weights after epoch e are all e + 1
        module._update_swa()
        swa_values[epoch] = module.net_swa.blocks[0].attn.qkv.weight[0, 0].item()
        weights = [p for p in module.net_swa.parameters()]
        assert all(torch.equal(p, torch.full_like(p, swa_values[epoch])) for p in weights)
    # Until the first average the SWA copy follows the live network; then the starts of epochs
    # 2, 4, 6 (the weights after epochs 1, 3, 5: 2, 4, 6) are averaged.
    assert swa_values == {0: 1.0, 1: 2.0, 2: 2.0, 3: 2.0, 4: 3.0, 5: 3.0, 6: 4.0}
    state = module.state_dict()
    assert state["swa_n_averaged"].item() == 3
    assert any(k.startswith("net.") for k in state) and any(k.startswith("net_swa.") for k in state)
    assert {k[len("net."):] for k in state if k.startswith("net.")} == {k[len("net_swa."):] for k in state if k.startswith("net_swa.")}

    restored = maest_module(tiny_net(), swa_epoch_start=3, swa_freq=2)
    restored.load_state_dict(state)
    assert restored.swa_n_averaged.item() == 3  # a resumed run continues the running mean
    restored._average_swa(6)  # resumed in the middle of epoch 6: its start is already averaged
    assert restored.swa_n_averaged.item() == 3
    assert torch.equal(restored.net_swa.head[1].weight, module.net_swa.head[1].weight)


def test_swa_disabled_keeps_following_the_live_network():
    module = maest_module(tiny_net(), swa=False, swa_epoch_start=0, swa_freq=1)
    for epoch in range(3):
        _set_weights(module.net, float(epoch + 1))
        module._average_swa(epoch)
        module._update_swa()
        assert torch.equal(module.net_swa.head[1].weight, module.net.head[1].weight)
    assert module.swa_n_averaged.item() == 0


class _Snapshots(pl.Callback):
    """The live weights at the end of every training epoch."""

    def __init__(self):
        self.weights = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.weights.append({k: v.clone() for k, v in pl_module.net.state_dict().items()})


def test_swa_in_training_is_updated_before_the_epochs_validation():
    torch.manual_seed(0)
    module = maest_module(tiny_net(), lr=1e-3, swa_epoch_start=3, swa_freq=1, **NO_AUGMENTATION)
    snapshots = _Snapshots()
    val_data = items(6, seed=1)
    fit = trainer(max_epochs=4, callbacks=[snapshots])
    fit.fit(module, train_dataloaders=DataLoader(items(8), batch_size=4), val_dataloaders=DataLoader(val_data, batch_size=6))

    key = "blocks.0.attn.qkv.weight"
    # The starts of epochs 2 and 3 are averaged: the weights after epochs 1 and 2 (not the last epoch's).
    expected = (snapshots.weights[1][key] + snapshots.weights[2][key]) / 2
    torch.testing.assert_close(module.net_swa.state_dict()[key], expected)
    assert module.swa_n_averaged.item() == 2
    assert not torch.equal(module.net_swa.state_dict()[key], module.net.state_dict()[key])
    # The last validation scored this epoch's SWA weights (not the previous epoch's).
    x = torch.stack([d[0] for d in val_data])
    y = torch.stack([d[2] for d in val_data])
    with torch.no_grad():
        swa_loss = F.binary_cross_entropy_with_logits(module.net_swa.eval()(x), y).item()
    assert fit.callback_metrics["val_loss_swa"].item() == pytest.approx(swa_loss, abs=1e-6)


# ---------------------------------------------------------------------------------- optimiser, schedule
@pytest.mark.parametrize("teacher_student", [False, True])
def test_optimizer_holds_only_the_live_network(teacher_student):
    net = tiny_net(distilled_type="separated" if teacher_student else "mean")
    module = maest_module(net, lr=1e-3, weight_decay=0.05, teacher_student=teacher_student)
    config = module.configure_optimizers()
    optimizer = config["optimizer"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # The DIST head is trained only by teacher-student training (no loss reaches it otherwise).
    trained = {name for name, p in module.net.named_parameters() if any(p is q for q in params)}
    expected = {name for name, _ in module.net.named_parameters() if teacher_student or not name.startswith("head_dist.")}
    assert trained == expected and len(params) == len(expected)
    assert all(p.requires_grad for p in params)
    assert not any(p.requires_grad for p in module.net_swa.parameters())
    assert optimizer.param_groups[0]["weight_decay"] == 0.05
    assert config["lr_scheduler"]["interval"] == "epoch"


class _LearningRates(pl.Callback):
    def __init__(self):
        self.per_batch = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.per_batch.append((trainer.current_epoch, trainer.optimizers[0].param_groups[0]["lr"]))


def test_learning_rate_follows_the_schedule_once_per_epoch():
    lr, schedule = 1e-3, dict(warm_up_len=2, ramp_down_start=2, ramp_down_len=2, last_lr_value=0.1)
    module = maest_module(tiny_net(), lr=lr, **schedule, **NO_AUGMENTATION)
    rates = _LearningRates()
    trainer(max_epochs=5, callbacks=[rates], limit_val_batches=0).fit(
        module, train_dataloaders=DataLoader(items(6), batch_size=3)
    )
    factor = exp_warmup_linear_down(schedule["warm_up_len"], schedule["ramp_down_len"], schedule["ramp_down_start"], schedule["last_lr_value"])
    expected = [(epoch, lr * factor(epoch)) for epoch in range(5) for _ in range(2)]  # 2 batches an epoch
    assert [e for e, _ in rates.per_batch] == [e for e, _ in expected]
    assert [r for _, r in rates.per_batch] == pytest.approx([r for _, r in expected], rel=1e-9)
    # warm-up, plateau, ramp-down and floor are all visited
    assert len({round(r, 12) for _, r in rates.per_batch}) == 5


def test_bf16_mixed_training_runs_and_keeps_float32_weights():
    torch.manual_seed(0)
    module = maest_module(tiny_net(), lr=1e-3)
    before = module.net.head[1].weight.clone()
    fit = trainer(max_epochs=1, precision="bf16-mixed")
    fit.fit(module, train_dataloaders=DataLoader(items(8), batch_size=4), val_dataloaders=DataLoader(items(6, seed=1), batch_size=6))
    assert module.net.head[1].weight.dtype == torch.float32
    assert not torch.equal(module.net.head[1].weight, before)
    assert 0.0 < fit.callback_metrics["val_loss"].item() < 2.0


def test_the_epochs_loss_sums_in_a_checkpoint_are_every_ranks_and_rank_0_goes_on_from_them():
    """Under DDP each rank sums its own batches' losses; the checkpoint (built on every rank, written by
    rank 0) holds the sums of all ranks, so on resume rank 0 starts from them and the others from zero."""
    from types import SimpleNamespace

    from helpers.module import EPOCH_LOSSES_KEY

    def on_rank(rank):
        module = maest_module(tiny_net())
        module._trainer = SimpleNamespace(world_size=2, global_rank=rank, strategy=SimpleNamespace(
            reduce=lambda totals, reduce_op: totals * 2 if reduce_op == "sum" else None))  # two ranks with equal sums
        return module

    saving = on_rank(0)
    saving._epoch_of_losses = 1
    saving._add_epoch_losses(4, train_loss=torch.tensor(0.5))
    saving._add_epoch_losses(2, train_loss=torch.tensor(0.25))
    checkpoint = {}
    saving.on_save_checkpoint(checkpoint)
    assert checkpoint[EPOCH_LOSSES_KEY] == {"epoch": 1, "samples": 12, "sums": {"train_loss": 5.0}}

    first, other = on_rank(0), on_rank(1)
    for module in (first, other):
        module.on_load_checkpoint(checkpoint)
    assert first._epoch_of_losses == other._epoch_of_losses == 1
    assert (first._epoch_samples, float(first._epoch_losses["train_loss"])) == (12, 5.0)
    assert (other._epoch_samples, float(other._epoch_losses["train_loss"])) == (0, 0.0)
