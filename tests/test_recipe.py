"""Training recipes: the default reproduces what produced the released models (upstream's code),
``recipe_paper`` is what upstream's config describes; each difference is its own key.

Upstream facts checked here: its masking had no effect, its balanced sampler drew without
replacement, Lightning's StochasticWeightAveraging replaced the learning-rate schedule from
epoch 49 (SWALR towards swa_lrs=2e-5) and averaged at the start of every epoch from then on.
"""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import StochasticWeightAveraging
from torch.optim.swa_utils import SWALR
from torch.utils.data import DataLoader

from ex_maest import ex
from helpers.module import MAESTModule
from helpers.sampler import BalancedSampler
from helpers.schedules import exp_warmup_linear_down, with_swa_phase
from models import get_maest
from tests.builders import maest_module

N_CLASSES = 4
N_FRAMES = 116
RECIPE_KEYS = {"masking", "swa_lr_schedule", "swa_freq"}  # what recipe_paper changes


def tiny_net():
    return get_maest("maest-tiny", n_classes=N_CLASSES, input_t=N_FRAMES)


def resolved(named_configs=(), updates=None) -> dict:
    r = ex.run("print_config", named_configs=list(named_configs), config_updates=updates or {}, options={"--loglevel": "ERROR"})
    assert r.status == "COMPLETED"
    return r.config


@pytest.fixture(scope="module")
def released():
    return resolved()


@pytest.fixture(scope="module")
def paper():
    return resolved(["recipe_paper"])


def module_from(config: dict, **overrides) -> MAESTModule:
    return MAESTModule(tiny_net(), **{**config["module"], **overrides})


def epoch_lrs(module: MAESTModule, n_epochs: int) -> list[float]:
    """The learning rate of every epoch, stepping the scheduler once an epoch as Lightning does."""
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(n_epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def lightning_swa_lrs(lr, schedule, swa_epoch_start, swa_lr, anneal_epochs, max_epochs, strategy="cos"):
    """What upstream ran: LambdaLR, swapped at the start of epoch swa_epoch_start - 1 for SWALR,
    built exactly as lightning.pytorch.callbacks.StochasticWeightAveraging.on_train_epoch_start."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    lrs = []
    for epoch in range(max_epochs):
        if epoch == swa_epoch_start - 1:
            optimizer.param_groups[0]["initial_lr"] = swa_lr
            scheduler = SWALR(optimizer, swa_lr=swa_lr, anneal_epochs=anneal_epochs, anneal_strategy=strategy,
                              last_epoch=max_epochs if strategy == "cos" else -1)
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


# ------------------------------------------------------------------------------------ configs
def test_the_default_config_is_the_released_recipe(released):
    module, datamodule = released["module"], released["datamodule"]
    assert module["masking"] is False  # upstream's masking_func discarded the masked batch
    assert datamodule["sampler_replacement"] is False  # WeightedRandomSampler(replacement=False)
    assert module["swa_lr_schedule"] is True  # Lightning's SWA callback swapped the schedule for SWALR
    assert (module["swa_epoch_start"], module["swa_freq"], module["swa_lr"]) == (50, 1, 2e-5)
    assert (module["swa_anneal_epochs"], module["swa_anneal_strategy"]) == (10, "cos")
    assert (module["lr"], module["weight_decay"]) == (2e-5, 1e-4)
    assert module["no_weight_decay_tokens"] is False and module["no_weight_decay_biases_norms"] is False


def test_recipe_paper_changes_exactly_the_recipe_keys(released, paper):
    assert (paper["module"]["masking"], paper["module"]["swa_lr_schedule"], paper["module"]["swa_freq"]) == (True, False, 5)
    changed = {k for k in released["module"] if released["module"][k] != paper["module"][k]}
    assert changed == RECIPE_KEYS
    assert paper["datamodule"] == released["datamodule"]  # upstream's config also says sampler_replace=False
    assert ex.named_configs["recipe_paper"].__doc__


def test_explicit_keys_override_the_recipe_and_swa_lr_follows_lr():
    config = resolved(["recipe_paper"], {"module": {"masking": False, "lr": 1e-4}, "datamodule": {"sampler_replacement": True}})
    assert config["module"]["masking"] is False and config["module"]["swa_freq"] == 5
    assert config["datamodule"]["sampler_replacement"] is True
    assert config["module"]["swa_lr"] == 1e-4  # derived from lr in the config scope
    assert resolved(updates={"module": {"lr": 1e-4, "swa_lr": 3e-6}})["module"]["swa_lr"] == 3e-6


# ------------------------------------------------------------------------------------ masking
def _input_seen_by_the_net(module: MAESTModule, x, y) -> torch.Tensor:
    seen = []
    handle = module.net.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    module.training_step((x, ["k"] * len(x), y), 0)
    handle.remove()
    return seen[0]


def test_released_masking_leaves_the_batch_alone_and_paper_masks_it(released, paper):
    torch.manual_seed(0)
    x = torch.randn(8, 1, 96, N_FRAMES) + 10  # no natural zeros
    y = (torch.rand(8, N_CLASSES) < 0.5).float()
    plain = dict(mixup_alpha=0.0)
    assert torch.equal(_input_seen_by_the_net(module_from(released, **plain), x, y), x)
    masked = _input_seen_by_the_net(module_from(paper, **plain), x, y)
    zero = masked[:, 0] == 0  # (B, F, T)
    assert zero.any(dim=(1, 2)).all()  # 20 time and 8 frequency masks: every sample is masked
    cols, rows = zero.all(dim=1), zero.all(dim=2)
    assert torch.equal(zero, cols[:, None, :] | rows[:, :, None])  # whole bands, zero = the normalised mean


# ------------------------------------------------------------------------------------ sampler
def test_released_sampler_draws_without_replacement(released):
    labels = np.eye(N_CLASSES, dtype=bool)[np.arange(40) % N_CLASSES]
    labels[:4] = True  # heavy tracks that a draw with replacement repeats
    draw = lambda replacement: list(BalancedSampler(labels, epoch_length=40, seed=0, replacement=replacement))  # noqa: E731
    assert sorted(draw(released["datamodule"]["sampler_replacement"])) == list(range(40))
    assert len(set(draw(True))) < 40


# ------------------------------------------------------------------------------------ learning rate
def test_released_lr_keeps_the_full_rate_after_the_warm_up_and_paper_ramps_down(released, paper):
    base = exp_warmup_linear_down(5, 50, 50, 0.01)
    released_lrs = epoch_lrs(module_from(released), 130)
    assert released_lrs == pytest.approx(lightning_swa_lrs(2e-5, base, 50, 2e-5, 10, 130), rel=1e-12)
    assert released_lrs[:5] == pytest.approx([2e-5 * base(e) for e in range(5)], rel=1e-12)
    assert released_lrs[5:] == pytest.approx([2e-5] * 125, rel=1e-12)  # swa_lrs = lr: the ramp-down never happened
    paper_lrs = epoch_lrs(module_from(paper), 130)
    assert paper_lrs == pytest.approx([2e-5 * base(e) for e in range(130)], rel=1e-12)
    assert paper_lrs[-1] == pytest.approx(2e-7)


@pytest.mark.parametrize("strategy, anneal_epochs", [("cos", 4), ("linear", 3), ("cos", 0)])
def test_swa_phase_equals_torch_swalr_as_lightning_builds_it(strategy, anneal_epochs):
    # A ramp-down already under way at the SWA start and an swa_lr far from it: every term matters.
    schedule = dict(warm_up_len=2, ramp_down_start=3, ramp_down_len=10, last_lr_value=0.1)
    module = maest_module(tiny_net(), lr=1e-3, **schedule, swa_epoch_start=7, swa_lr=2e-5,
                         swa_anneal_epochs=anneal_epochs, swa_anneal_strategy=strategy)
    base = exp_warmup_linear_down(2, 10, 3, 0.1)
    expected = lightning_swa_lrs(1e-3, base, 7, 2e-5, anneal_epochs, 20, strategy)
    assert epoch_lrs(module, 20) == pytest.approx(expected, rel=1e-12)
    # The phase starts at 0-based epoch 6 from the rate in force (at swa_lr at once without annealing).
    assert expected[6] == pytest.approx(2e-5 if anneal_epochs == 0 else 1e-3 * base(6))
    assert expected[5] == pytest.approx(1e-3 * base(5)) and expected[-1] == pytest.approx(2e-5)


def test_swa_phase_closed_form():
    factor = with_swa_phase(lambda e: 0.5, swa_start=3, swa_factor=0.1, anneal_epochs=4)
    cos = lambda t: (1 - math.cos(math.pi * t)) / 2  # noqa: E731
    assert [factor(e) for e in range(9)] == pytest.approx([0.5] * 4 + [0.5 - 0.4 * cos(k / 4) for k in (1, 2, 3)] + [0.1, 0.1])
    with pytest.raises(ValueError, match="anneal_strategy must be 'cos' or 'linear'"):
        with_swa_phase(lambda e: 1.0, 3, 0.1, 4, "exp")


def test_without_swa_or_swa_lr_schedule_the_schedule_runs_to_the_end():
    base = exp_warmup_linear_down(5, 50, 50, 0.01)
    for options in (dict(swa=False), dict(swa_lr_schedule=False)):
        assert epoch_lrs(maest_module(tiny_net(), **options), 110) == pytest.approx([2e-5 * base(e) for e in range(110)], rel=1e-12)


def test_scheduler_state_round_trip_continues_the_same_lrs():
    options = dict(lr=1e-3, warm_up_len=2, ramp_down_start=3, ramp_down_len=10, swa_epoch_start=5, swa_lr=1e-4, swa_anneal_epochs=4)
    uninterrupted = epoch_lrs(maest_module(tiny_net(), **options), 12)

    first = maest_module(tiny_net(), **options).configure_optimizers()
    for _ in range(6):  # killed after epoch 5, in the middle of the SWA annealing
        first["optimizer"].step()
        first["lr_scheduler"]["scheduler"].step()
    states = first["optimizer"].state_dict(), first["lr_scheduler"]["scheduler"].state_dict()

    resumed = maest_module(tiny_net(), **options).configure_optimizers()
    optimizer, scheduler = resumed["optimizer"], resumed["lr_scheduler"]["scheduler"]
    optimizer.load_state_dict(states[0])
    scheduler.load_state_dict(states[1])
    lrs = []
    for _ in range(6, 12):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx(uninterrupted[6:], rel=1e-12)


# ------------------------------------------------------------------------------------ SWA against Lightning's callback
def _items(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 96, N_FRAMES, generator=g)
    y = (torch.rand(n, N_CLASSES, generator=g) < 0.5).float()
    return [(x[i], f"t{i}", y[i]) for i in range(n)]


class _EpochLRs(pl.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def _fit(module, callbacks, max_epochs):
    trainer = pl.Trainer(max_epochs=max_epochs, accelerator="cpu", precision="32-true", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks)
    trainer.fit(module, train_dataloaders=DataLoader(_items(6), batch_size=3))


def test_swa_weights_and_lrs_equal_upstreams_lightning_callback():
    """Our module against a plain module under Lightning's StochasticWeightAveraging (upstream's)."""
    torch.manual_seed(0)
    net = tiny_net()
    options = dict(lr=1e-3, warm_up_len=1, ramp_down_start=2, ramp_down_len=4, mixup_alpha=0.0)
    ours = maest_module(copy.deepcopy(net), **options, swa_epoch_start=3, swa_lr=2e-4, swa_anneal_epochs=2)
    theirs = maest_module(copy.deepcopy(net), **options, swa=False)
    ours_lrs, theirs_lrs = _EpochLRs(), _EpochLRs()
    _fit(ours, [ours_lrs], max_epochs=6)
    swa = StochasticWeightAveraging(swa_lrs=2e-4, swa_epoch_start=3, annealing_epochs=2)
    _fit(theirs, [theirs_lrs, swa], max_epochs=6)

    assert ours_lrs.lrs == pytest.approx(theirs_lrs.lrs, rel=1e-12)
    assert len(set(ours_lrs.lrs)) >= 4  # warm-up, schedule, annealing, swa_lr
    # Lightning copies its average into the module at the end of training; averaged at the starts of epochs 2..5.
    assert ours.swa_n_averaged.item() == 4 == swa.n_averaged.item()
    for (name, ours_p), theirs_p in zip(ours.net_swa.named_parameters(), theirs.net.parameters()):
        torch.testing.assert_close(ours_p, theirs_p, rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------ weight decay
def _groups(module):
    optimizer = module.configure_optimizers()["optimizer"]
    names = {id(p): n for n, p in module.net.named_parameters()}
    return [({names[id(p)] for p in g["params"]}, g["weight_decay"]) for g in optimizer.param_groups]


def test_weight_decay_on_every_parameter_by_default_as_upstream():
    module = maest_module(tiny_net(), weight_decay=0.05)
    ((names, decay),) = _groups(module)
    assert decay == 0.05
    assert names == {n for n, p in module.net.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("tokens, biases_norms", [(True, False), (False, True), (True, True)])
def test_no_weight_decay_options_build_a_second_group(tokens, biases_norms):
    module = maest_module(tiny_net(), lr=0.1, weight_decay=0.05, no_weight_decay_tokens=tokens, no_weight_decay_biases_norms=biases_norms)
    (decayed, decay), (exempt, no_decay) = _groups(module)
    assert (decay, no_decay) == (0.05, 0.0)
    trainable = {n: p for n, p in module.net.named_parameters() if p.requires_grad}
    expected = set()
    if tokens:
        expected |= {"cls_token", "dist_token", "new_pos_embed", "freq_new_pos_embed", "time_new_pos_embed"}
    if biases_norms:
        expected |= {n for n, p in trainable.items() if p.ndim <= 1}
        assert {"blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "norm.bias"} <= expected
    assert exempt == expected and decayed == set(trainable) - expected
    assert "blocks.0.attn.qkv.weight" in decayed and not any(n.startswith("head_dist.") for n in decayed | exempt)
    # AdamW leaves the exempt group's weights untouched when the gradient is zero; the decayed ones shrink.
    optimizer = module.configure_optimizers()["optimizer"]
    before = {n: p.detach().clone() for n, p in trainable.items()}
    for p in trainable.values():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert all(torch.equal(trainable[n], before[n]) for n in exempt)
    assert not torch.equal(trainable["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])
