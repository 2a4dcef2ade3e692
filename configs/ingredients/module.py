"""The ``module`` ingredient: the training recipe (optimiser, schedule, mixup, masking, SWA) of the LightningModule."""

from __future__ import annotations

from sacred import Ingredient


module_ing = Ingredient("module")


@module_ing.config
def module_config():
    # Defaults: the recipe that produced the released models; the named config `recipe_paper`
    # (configs/maest.py) switches to the one upstream's config describes (README, "Training recipe").
    lr = 2e-5  # AdamW peak learning rate
    weight_decay = 1e-4  # AdamW weight decay (upstream: on every parameter)
    no_weight_decay_tokens = False  # no weight decay on the tokens and position embeddings (MAEST.no_weight_decay())
    no_weight_decay_biases_norms = False  # no weight decay on biases and LayerNorm weights (as timm)
    warm_up_len = 5  # epochs of exponential warm-up
    ramp_down_start = 50  # epoch where the linear ramp-down starts (released models: the SWA phase replaced it from epoch 49)
    ramp_down_len = 50  # epochs of the ramp-down
    last_lr_value = 0.01  # final learning rate as a fraction of the peak
    mixup_alpha = 0.3  # Beta(alpha, alpha) mixup of inputs and targets; 0 disables it
    masking = False  # SpecAugment masking (released models: none, upstream's code discarded the masked batch)
    mask_p = 0.2  # masking: a time mask covers at most this fraction of the frames (torchaudio's p; not a probability)
    n_time_masks = 20  # masking: time masks per input
    max_time_width = 8  # masking: time masks are 0 to max_time_width - 1 frames wide (torchaudio's time_mask_param)
    n_freq_masks = 8  # masking: frequency masks per input
    max_freq_width = 5  # masking: frequency masks are 0 to max_freq_width - 1 bands wide (torchaudio's freq_mask_param)
    roll_max_shift = 0  # random circular time shift in frames (0 = off)
    swa = True  # keep a stochastic-weight-averaged network (checkpoints hold it as net_swa)
    swa_epoch_start = 50  # the SWA phase starts with this epoch, counted from 1 (Lightning's swa_epoch_start: 50 = 0-based epoch 49)
    swa_freq = 1  # average the weights at the start of every n-th epoch of the SWA phase (released models: every epoch)
    swa_lr_schedule = True  # in the SWA phase the learning rate anneals to swa_lr (Lightning's SWALR) instead of the ramp-down
    swa_lr = lr  # learning rate of the SWA phase (upstream's swa_lrs=2e-5, its lr)
    swa_anneal_epochs = 10  # epochs from the learning rate in force to swa_lr (Lightning's annealing_epochs)
    swa_anneal_strategy = "cos"  # "cos" or "linear" (Lightning's annealing_strategy)
    teacher_student = False  # loss = mean(BCE(CLS head, labels), BCE(DIST head, teacher targets))
    freeze_blocks = 0  # fine-tuning: train neither the first n blocks nor (n > 0) the patch embedding, tokens and position embeddings
    layer_decay = 1.0  # layer-wise lr decay (BEiT/MAE fine-tuning): block i gets lr * layer_decay ** (depth - i), embeddings ** (depth + 1), heads lr
    step_in_backward = "auto"  # update each parameter in backward once its gradient is complete (same weights; ViT-B step peak RSS -10%; helpers/step_in_backward.py)
    release_freed_memory = True  # CPU training on Linux: memory freed during a step goes back to the system (ViT-B step peak RSS -8%; helpers/memory.py)


@module_ing.capture
def build_module(net, _config, arch: str | None = None, labels: list[str] | None = None):
    from helpers.module import MAESTModule  # Lightning: imported when a module is built, not at start

    return MAESTModule(net, arch=arch, labels=labels, **_config)
