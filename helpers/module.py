"""Lightning training of a MAEST network: BCE, mixup, masking, SWA, metrics, teacher-student.

The module composes a network it is given (``models.MAEST``); every data decision lives in
``helpers.datamodule``. It keeps a stochastic-weight-averaged copy as ``net_swa`` so that its
checkpoints have the upstream layout (``net.<k>`` and ``net_swa.<k>``, SPEC §5.1).
"""

from __future__ import annotations

import copy
import logging
import time
import warnings

import lightning.pytorch as pl
from lightning.pytorch.utilities.warnings import PossibleUserWarning
import torch
import torch.nn.functional as F

from models import MAEST
from models.checkpoints import MODEL_RECORD_KEY, SAVED_AT_KEY, model_record

EPOCH_LOSSES_KEY = "maest_epoch_losses"  # a checkpoint's running sums of the epoch's training losses

from .augment import mixup, roll, spec_mask
from .metrics import macro_metrics
from .memory import release_freed_memory
from .schedules import exp_warmup_linear_down, with_swa_phase
from .step_in_backward import check_mode, step_in_backward

# The evaluation metrics are computed on every rank from the gathered predictions of all ranks, so
# they are not reduced again; Lightning would advise sync_dist=True for each, every epoch, under DDP.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('(val|test)_", category=PossibleUserWarning)

_logger = logging.getLogger(__name__)


def adamw(groups: list[dict], lr: float, weight_decay: float, fused: bool = True) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one pass over each parameter, no temporaries) where torch has it.

    The same update as the per-parameter loop up to float rounding; on a 2-core CPU the ViT-B step
    takes a third of the loop's time (benchmarks/bench_optimizer.py). Every parameter must be on a
    device with a fused kernel (CPU, CUDA): otherwise, or with ``fused=False``, torch's default
    (the multi-tensor or the loop kernel).
    """
    params = [p for g in groups for p in g["params"]]
    fused = fused and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused or None)


class MAESTModule(pl.LightningModule):
    """Pre-trains ``net`` on multi-label targets; validates and tests the live and the SWA network.

    Batches are ``(x (B, 1, F, T), keys, y (B, C))`` or, for teacher-student training,
    ``(x, keys, y, y_teacher)``.
    """

    def __init__(
        self,
        net: MAEST,
        *,
        lr: float,
        weight_decay: float,
        warm_up_len: int,
        ramp_down_start: int,
        ramp_down_len: int,
        last_lr_value: float,
        no_weight_decay_tokens: bool,
        no_weight_decay_biases_norms: bool,
        mixup_alpha: float,
        masking: bool,
        mask_p: float,
        n_time_masks: int,
        max_time_width: int,
        n_freq_masks: int,
        max_freq_width: int,
        roll_max_shift: int,
        swa: bool,
        swa_epoch_start: int,
        swa_freq: int,
        swa_lr_schedule: bool,
        swa_lr: float | None,
        swa_anneal_epochs: int,
        swa_anneal_strategy: str,
        teacher_student: bool,
        freeze_blocks: int,
        layer_decay: float,
        release_freed_memory: bool,
        step_in_backward: bool | str = "auto",
        arch: str | None = None,
        labels: list[str] | None = None,
    ):
        """No defaults: the ``module`` config scope (``configs/ingredients/module.py``) holds them,
        the recipe that produced the released models (README, "Training recipe").

        Args:
            no_weight_decay_tokens: no weight decay on the tokens and position embeddings
                (``MAEST.no_weight_decay()``); upstream decays every parameter.
            no_weight_decay_biases_norms: no weight decay on biases and LayerNorm weights (every
                parameter with at most one dimension, as timm); upstream decays them.
            masking: SpecAugment masking (``helpers.augment.spec_mask`` with ``mask_p``,
                ``n_time_masks``, ``max_time_width``, ``n_freq_masks``, ``max_freq_width``).
                Upstream configured it, but its code discarded the masked batch.
            swa_epoch_start: the SWA phase starts with this epoch, counted from 1 as Lightning's
                ``StochasticWeightAveraging`` (upstream's 50 is 0-based epoch 49).
            swa_freq: average the weights at the start of every ``swa_freq``-th epoch of the SWA
                phase (Lightning's callback, upstream's: every epoch; PaSST's callback: 5).
            swa_lr_schedule: from the SWA phase on, anneal the learning rate to ``swa_lr`` over
                ``swa_anneal_epochs`` (Lightning's SWALR, as upstream) instead of following the
                warm-up/ramp-down schedule to the end.
            swa_lr: the SWA-phase learning rate; None: ``lr`` (upstream: swa_lrs = lr = 2e-5).
            freeze_blocks: fine-tuning: train neither the first ``freeze_blocks`` transformer blocks
                nor, when it is above 0, the patch embedding, the CLS/DIST tokens and the position
                embeddings.
            layer_decay: layer-wise learning-rate decay (BEiT, MAE fine-tuning): block ``i``
                (0-based) trains with ``lr * layer_decay ** (depth - i)``, the embeddings with
                ``lr * layer_decay ** (depth + 1)``, the final norm and the heads with ``lr``; 1.0: off.
            release_freed_memory: on CPU, hand the heap memory a training step frees (the forward's
                temporaries, the activations freed in backward) back to the system during the step
                (``helpers.memory``): a lower peak.
            step_in_backward: update each parameter (and free its gradient) in backward, as soon as
                its gradient is complete (``helpers.step_in_backward``): the same weights, a lower
                peak. True, False, or "auto": on CPU, for large networks, where neither gradient
                clipping, accumulation, DDP nor an fp16 gradient scaler needs all gradients at once.
            arch, labels: the registry name of ``net`` and its label names, recorded in every
                checkpoint with ``net``'s architecture (SPEC §5.6) so that commands rebuild it from the file.
        """
        super().__init__()
        if swa_epoch_start < 0 or swa_freq < 1:
            raise ValueError(f"module.swa_epoch_start must be >= 0 and module.swa_freq >= 1, got {swa_epoch_start} and {swa_freq}")
        if teacher_student and net.config.distilled_type != "separated":
            raise ValueError("teacher-student training needs maest.distilled_type='separated' (a CLS head and a DIST head)")
        self.net = net.train()  # get_maest returns eval mode; Lightning switches modes for evaluation
        # The DIST head gets a loss only in teacher-student training ("mean" averages the CLS and
        # DIST tokens into `head`). Freeze it otherwise: DDP fails on a trainable parameter that
        # gets no gradient, and the optimiser has nothing to do for it.
        net.head_dist.requires_grad_(teacher_student)
        depth = net.config.depth
        if not 0 <= freeze_blocks <= depth:
            raise ValueError(f"module.freeze_blocks={freeze_blocks} must be in [0, {depth}] (the network has {depth} blocks)")
        if not 0 < layer_decay <= 1:
            raise ValueError(f"module.layer_decay={layer_decay} must be in (0, 1] (1.0: every layer trains with module.lr)")
        if freeze_blocks:
            for name, p in net.named_parameters():
                if _layer_id(name, depth) <= freeze_blocks:  # the embeddings (0) and blocks 0..freeze_blocks-1
                    p.requires_grad_(False)
            _logger.info("frozen: patch embedding, tokens, position embeddings and blocks 0-%d", freeze_blocks - 1)
        self.layer_decay = layer_decay
        self.release_freed_memory = release_freed_memory
        self._releaser = None
        self.step_in_backward = check_mode(step_in_backward)
        self._in_backward = None
        # The epoch's training losses: {name: sum of batch mean x batch size}, the sample count and the epoch they
        # belong to; in every checkpoint, so a run resumed mid-epoch logs the whole epoch's mean (Lightning's own
        # epoch aggregation starts again from the resumed batch).
        self._epoch_losses: dict[str, torch.Tensor] = {}
        self._epoch_samples = 0
        self._epoch_of_losses: int | None = None
        self.record = model_record(arch, net.config, labels)  # checks len(labels) == n_classes
        self.lr = lr
        self.weight_decay = weight_decay
        self.no_weight_decay_tokens = no_weight_decay_tokens
        self.no_weight_decay_biases_norms = no_weight_decay_biases_norms
        self.swa = swa
        self.swa_start = max(swa_epoch_start - 1, 0)  # 0-based, as Lightning's StochasticWeightAveraging.swa_start
        self.swa_freq = swa_freq
        self.schedule = exp_warmup_linear_down(warm_up_len, ramp_down_len, ramp_down_start, last_lr_value)
        if swa and swa_lr_schedule:
            swa_factor = ((lr if swa_lr is None else swa_lr) / lr) if lr > 0 else 0.0
            self.schedule = with_swa_phase(self.schedule, self.swa_start, swa_factor, swa_anneal_epochs, swa_anneal_strategy)
        self.mixup_alpha = mixup_alpha
        self.masking = masking
        self.mask = dict(p=mask_p, n_time_masks=n_time_masks, max_time_width=max_time_width, n_freq_masks=n_freq_masks, max_freq_width=max_freq_width)
        self.roll_max_shift = roll_max_shift
        self.teacher_student = teacher_student
        # The SWA copy is always there, so every checkpoint loads as SPEC §5.1 says; until the
        # first average it follows the live weights (Lightning's callback kept the initial ones).
        self.net_swa = copy.deepcopy(net).requires_grad_(False)  # only ever run inside evaluation loops
        self.register_buffer("swa_n_averaged", torch.zeros((), dtype=torch.long))
        self._outputs: dict[str, list] = {}

    # ------------------------------------------------------------------ optimisation
    def parameter_groups(self) -> list[dict]:
        """The trainable parameters of ``net`` for AdamW: one group, or a decayed group and a
        ``weight_decay=0`` group when ``no_weight_decay_tokens`` / ``no_weight_decay_biases_norms``;
        with ``layer_decay`` < 1 these groups are split by layer, each with its own ``lr``."""
        tokens = self.net.no_weight_decay() if self.no_weight_decay_tokens else set()
        depth = self.net.config.depth
        groups: dict[tuple[bool, int], list] = {}  # (weight decay, layer id) -> parameters, in first-seen order
        for name, p in self.net.named_parameters():
            if not p.requires_grad:
                continue
            skip = name in tokens or (self.no_weight_decay_biases_norms and p.ndim <= 1)
            layer = _layer_id(name, depth) if self.layer_decay != 1.0 else depth + 1
            groups.setdefault((not skip, layer), []).append(p)
        order = sorted(groups, key=lambda k: (not k[0], k[1]))  # decayed groups first, as before layer decay
        out = []
        for decayed, layer in order:
            group = {"params": groups[(decayed, layer)], "weight_decay": self.weight_decay if decayed else 0.0}
            if self.layer_decay != 1.0:
                group["lr"] = self.lr * self.layer_decay ** (depth + 1 - layer)
            out.append(group)
        return out

    def on_fit_start(self) -> None:
        if self.release_freed_memory and self.device.type == "cpu" and self._releaser is None:
            self._releaser = release_freed_memory(self.net.blocks)  # helpers/memory.py: the heap would keep activations freed in backward
        if self._in_backward is not None:  # left by a fit that ended in an error: it stepped that fit's optimizer
            self._in_backward.remove()
        self._in_backward = step_in_backward(self.trainer, self.step_in_backward, self.device) if self.automatic_optimization else None

    def on_fit_end(self) -> None:
        if self._releaser is not None:
            self._releaser.remove()
            self._releaser = None
        if self._in_backward is not None:
            self._in_backward.remove()
            self._in_backward = None

    def configure_optimizers(self):
        # Lightning refuses to clip the gradients of a fused optimizer under mixed precision (it
        # expects such a kernel to unscale them itself): with trainer.gradient_clip_val, the unfused one.
        clipping = self._trainer is not None and bool(self.trainer.gradient_clip_val)
        optimizer = adamw(self.parameter_groups(), lr=self.lr, weight_decay=self.weight_decay, fused=not clipping)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def training_step(self, batch, batch_idx):
        x, _, y, *teacher = batch
        if self.masking:
            x = spec_mask(x, **self.mask)
        if self.roll_max_shift:
            x = roll(x, self.roll_max_shift)
        if self.mixup_alpha > 0:
            x, y, *teacher = mixup(x, y, self.mixup_alpha, *teacher)
        parts = {}
        if self.teacher_student:
            logits, logits_dist = self.net.forward_heads(x)
            parts["train_loss_labels"] = F.binary_cross_entropy_with_logits(logits.float(), y)
            parts["train_loss_teacher"] = F.binary_cross_entropy_with_logits(logits_dist.float(), teacher[0])
            loss = (parts["train_loss_labels"] + parts["train_loss_teacher"]) / 2
        else:
            loss = F.binary_cross_entropy_with_logits(self.net(x).float(), y)
        # sync_dist: under DDP the logged loss is the mean over every rank's batch, not rank 0's alone (one scalar all-reduce)
        self.log("train_loss_step", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(y), sync_dist=True)
        self._add_epoch_losses(len(y), train_loss=loss, **parts)  # their epoch means: _log_epoch_losses
        return loss

    def _add_epoch_losses(self, batch_size: int, **losses: torch.Tensor) -> None:
        """Add a batch's mean losses, weighted by its size (on the loss's device: no synchronisation per step)."""
        for name, loss in losses.items():
            total = loss.detach().to(torch.float32 if loss.device.type == "mps" else torch.float64) * batch_size  # MPS has no float64
            self._epoch_losses[name] = self._epoch_losses[name].to(total.device) + total if name in self._epoch_losses else total
        self._epoch_samples += batch_size

    def _epoch_totals(self) -> tuple[list[str], torch.Tensor]:
        """The epoch's loss sums by name, then the sample count, of every rank together (a collective under DDP)."""
        names = sorted(self._epoch_losses)
        dtype = torch.float32 if self.device.type == "mps" else torch.float64  # MPS has no float64
        totals = torch.stack([self._epoch_losses[name].to(self.device, dtype) for name in names]
                             + [torch.tensor(float(self._epoch_samples), dtype=dtype, device=self.device)])
        if self._trainer is not None and self.trainer.world_size > 1:
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        return names, totals

    def _log_epoch_losses(self) -> None:
        """``<name>_epoch`` (``train_loss_epoch``, ...): the mean over every sample of the epoch, every rank's."""
        if not self._epoch_losses or self._epoch_of_losses != self.current_epoch:
            return
        names, totals = self._epoch_totals()
        epoch_name = {"train_loss": "train_loss_epoch"}  # the teacher-student parts keep their names, as before
        self.log_dict({epoch_name.get(name, name): (totals[i] / totals[-1]).float() for i, name in enumerate(names)},
                      on_step=False, on_epoch=True, prog_bar=False, sync_dist=False)

    def on_train_epoch_start(self) -> None:
        if self._epoch_of_losses != self.current_epoch:  # kept when a checkpoint of this epoch was resumed
            self._epoch_losses, self._epoch_samples, self._epoch_of_losses = {}, 0, self.current_epoch
        self._average_swa(self.current_epoch)

    def on_validation_epoch_start(self) -> None:
        # Lightning runs the end-of-epoch validation *before* on_train_epoch_end: update the SWA
        # network first, so that val_*_swa scores this epoch's SWA weights, not the last epoch's.
        trainer = self._trainer
        if (
            trainer is not None
            and trainer.state.fn == "fit"
            and not trainer.sanity_checking
            and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        ):
            self._update_swa()

    def on_train_epoch_end(self) -> None:
        self._update_swa()  # when no validation ran this epoch (idempotent: no harm when one did)
        self._log_epoch_losses()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[MODEL_RECORD_KEY] = self.record  # SPEC §5.6: commands rebuild the network from the file
        checkpoint[SAVED_AT_KEY] = time.time_ns()  # ckpt_path=last orders by it: a copied folder's files all have the copy's mtime
        if self._epoch_of_losses is not None:
            checkpoint[EPOCH_LOSSES_KEY] = self._epoch_losses_state()

    def _epoch_losses_state(self) -> dict:
        """The epoch's loss sums of every rank together (a collective under DDP: Lightning builds a checkpoint
        on every rank, and rank 0 writes it)."""
        names, totals = self._epoch_totals()
        totals = totals.cpu().double()
        return {"epoch": self._epoch_of_losses, "samples": int(totals[-1]), "sums": {name: float(totals[i]) for i, name in enumerate(names)}}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get(EPOCH_LOSSES_KEY)
        if state is not None:  # older checkpoints have none: the resumed epoch's mean is then of its remaining batches
            # Every rank's sums together: rank 0 goes on from them, the others from zero (the epoch's end adds them up).
            first = self._trainer is None or self.trainer.global_rank == 0
            self._epoch_of_losses, self._epoch_samples = int(state["epoch"]), int(state["samples"]) if first else 0
            self._epoch_losses = {name: torch.tensor(total if first else 0.0, dtype=torch.float64) for name, total in state["sums"].items()}

    @torch.no_grad()
    def _update_swa(self) -> None:
        """End of an epoch: until the first average (or without SWA), ``net_swa`` copies the live weights."""
        if self.swa and self.swa_n_averaged.item() > 0:
            return
        live, swa = self.net.state_dict(), self.net_swa.state_dict()
        for k in swa:
            swa[k].copy_(live[k])

    @torch.no_grad()
    def _average_swa(self, epoch: int) -> None:
        """Start of ``epoch``: average the live weights into ``net_swa`` (a running mean).

        As Lightning's ``StochasticWeightAveraging`` (upstream MAEST's) and PaSST's callback: at the
        start of every ``swa_freq``-th epoch from ``swa_start`` to the last, so the averaged
        snapshots are the weights after epochs ``swa_start - 1``, ``swa_start - 1 + swa_freq``, ...,
        and the last epoch's own updates are not in the average.
        """
        if not self.swa or epoch < self.swa_start or (epoch - self.swa_start) % self.swa_freq:
            return
        n = (epoch - self.swa_start) // self.swa_freq + 1  # this epoch's snapshot is the n-th
        if self.swa_n_averaged.item() >= n:
            return  # already in: a run resumed in the middle of this epoch
        self.swa_n_averaged += 1
        count = self.swa_n_averaged.item()
        live, swa = self.net.state_dict(), self.net_swa.state_dict()
        for k in swa:
            if swa[k].is_floating_point():
                swa[k].add_((live[k] - swa[k]) / count)

    # ------------------------------------------------------------------ evaluation
    def _nets(self):
        return [("", self.net), ("swa", self.net_swa)] if self.swa else [("", self.net)]

    def _eval_step(self, batch, stage: str):
        x, _, y, *teacher = batch
        out = self._outputs.setdefault(stage, [])
        record = {"y": y.detach().float().cpu()}
        for name, net in self._nets():
            logits = net(x).float()
            record[name] = torch.sigmoid(logits).cpu()
            record[name + "loss"] = F.binary_cross_entropy_with_logits(logits, y.float(), reduction="none").mean(1).cpu()
        out.append(record)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate a per-rank tensor over all ranks (ranks may hold different counts)."""
        if self._trainer is None or self._trainer.world_size == 1:
            return t
        n = torch.tensor([t.shape[0]], device=self.device)
        counts = self.all_gather(n).flatten().tolist()
        padded = torch.zeros((max(counts),) + tuple(t.shape[1:]), dtype=t.dtype, device=self.device)
        padded[: t.shape[0]] = t.to(self.device)
        gathered = self.all_gather(padded)  # (world, max, ...)
        return torch.cat([gathered[r, :c] for r, c in enumerate(counts)]).cpu()

    def _eval_epoch_end(self, stage: str) -> dict[str, float]:
        outputs = self._outputs.pop(stage, [])
        if not outputs and (self._trainer is None or self._trainer.world_size == 1):
            return {}
        y = self._gather(torch.cat([o["y"] for o in outputs]) if outputs else torch.zeros(0, self.net.n_classes))
        results = {}
        for name, _ in self._nets():
            suffix = f"_{name}" if name else ""
            scores = self._gather(torch.cat([o[name] for o in outputs]) if outputs else torch.zeros(0, self.net.n_classes))
            losses = self._gather(torch.cat([o[name + "loss"] for o in outputs]) if outputs else torch.zeros(0))
            m = macro_metrics(y.numpy(), scores.numpy())
            results.update({
                f"{stage}_loss{suffix}": float(losses.mean()),
                f"{stage}_roc{suffix}": m["roc_auc"],
                f"{stage}_ap{suffix}": m["pr_auc"],
            })
        # Every rank holds the same gathered values: log them without another reduction.
        self.log_dict(results, prog_bar=stage == "val", sync_dist=False, rank_zero_only=False)
        # Classes with no positive or no negative clip have no ROC-AUC: the averages leave them out.
        n_scored = m["n_classes_scored"]
        self.log(f"{stage}_n_classes_scored", float(n_scored), sync_dist=False, rank_zero_only=False)
        if n_scored < y.shape[1] and stage == "test":
            _logger.warning("test metrics average over %d of %d classes: the others have no positive or no negative clip", n_scored, y.shape[1])
        return {**results, f"{stage}_n_classes_scored": n_scored}

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")


def _layer_id(name: str, depth: int) -> int:
    """Layer of a parameter of ``MAEST`` for freezing and layer-wise decay (as BEiT): 0 the patch
    embedding, tokens and position embeddings, ``i + 1`` block ``i``, ``depth + 1`` the final norm and the heads."""
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    if name.startswith(("norm.", "head.", "head_dist.")):
        return depth + 1
    return 0
