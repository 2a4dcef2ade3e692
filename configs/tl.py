"""Named configs of the probing experiment ``ex_tl.py``; ``register(ex)`` adds them.

Each one only sets what differs from the defaults of ``ex_tl.py``'s config scope.
"""

from __future__ import annotations


def target_mtt_tl():
    """Probe MagnaTagATune (50 tags) on embeddings from `ex_maest.py extract_embeddings with target_mtt`."""
    embeddings_dir = "outputs/mtt/embeddings"  # predict.out_dir of the extraction run
    groundtruth_train = "datasets/mtt/groundtruth-train.pk"  # the usual MTT split, shipped with the repo
    groundtruth_val = "datasets/mtt/groundtruth-validation.pk"
    groundtruth_test = "datasets/mtt/groundtruth-test.pk"
    out_dir = "outputs/mtt/probe"
    token = "cdt"  # CLS, DIST and mean of patch tokens side by side (paper's downstream setting)
    combine = "concat"
    hidden_size = 512  # one hidden layer of 512 units, dropout 0.5
    dropout = 0.5
    batch_size = 128
    max_epochs = 30
    warm_up_len = 3
    ramp_down_start = 10


def demo():
    """Probe the demo embeddings of `ex_maest.py extract_embeddings with demo`: a few CPU epochs, seconds."""
    embeddings_dir = "outputs/demo/embeddings"
    groundtruth_train = "outputs/demo/data/groundtruth-train.pk"
    groundtruth_val = "outputs/demo/data/groundtruth-validation.pk"
    groundtruth_test = "outputs/demo/data/groundtruth-test.pk"
    out_dir = "outputs/demo/probe"
    token = "cdt"
    combine = "concat"
    hidden_size = 32  # a small probe for a small dataset
    dropout = 0.1
    lr = 1e-2  # few tracks: larger steps and more epochs than the paper, still seconds on CPU
    batch_size = 16
    max_epochs = 20
    warm_up_len = 2
    ramp_down_start = 10
    trainer = {"accelerator": "cpu", "devices": 1}


def register(ex) -> None:
    """Add the probing named configs to the Sacred experiment ``ex``."""
    for config in (target_mtt_tl, demo):
        ex.named_config(config)
