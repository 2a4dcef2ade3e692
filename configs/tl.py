"""Named configs of the probing experiment ``ex_tl.py``; ``register(ex)`` adds them.

Each one only sets what differs from the defaults of ``ex_tl.py``'s config scope.
"""

from __future__ import annotations

from configs.maest import MTT_MELS_DIR, mtt_groundtruth


def target_mtt_tl():
    """Probe MagnaTagATune (50 tags) on embeddings from `ex_maest.py extract_embeddings with target_mtt`.

    The ground truth is the one target_mtt reads: the preparer's copies in data/mtt/mels (the clips
    whose mel exists), else the shipped split."""
    embeddings_dir = "outputs/mtt/embeddings"  # predict.out_dir of the extraction run
    groundtruth_train = mtt_groundtruth(MTT_MELS_DIR, "train")  # the usual MTT split, less the clips without a mel
    groundtruth_val = mtt_groundtruth(MTT_MELS_DIR, "validation")
    groundtruth_test = mtt_groundtruth(MTT_MELS_DIR, "test")
    out_dir = "outputs/mtt/probe"
    token = "cdt"  # CLS, DIST and mean of patch tokens side by side (paper's downstream setting)
    combine = "concat"
    hidden_size = 512  # one hidden layer of 512 units, dropout 0.5
    dropout = 0.5
    batch_size = 128
    max_epochs = 30
    warm_up_len = 3


def target_gtzan_tl():
    """Probe GTZAN's 10 genres (one per track, fault-filtered split) on embeddings from
    `ex_maest.py extract_embeddings with target_gtzan` (mels from `python -m datasets.gtzan.preprocess all`)."""
    embeddings_dir = "outputs/gtzan/embeddings"  # predict.out_dir of the extraction run
    groundtruth_train = "data/gtzan/mels/groundtruth-train.pk"  # written by the preparer: the tracks whose mel exists
    groundtruth_val = "data/gtzan/mels/groundtruth-validation.pk"
    groundtruth_test = "data/gtzan/mels/groundtruth-test.pk"
    out_dir = "outputs/gtzan/probe"
    task = "multiclass"  # one genre per track (one-hot ground truth): softmax + cross-entropy, accuracy
    token = "cdt"  # CLS, DIST and mean of patch tokens side by side (paper's downstream setting)
    combine = "concat"
    hidden_size = 512  # one hidden layer of 512 units, dropout 0.5
    dropout = 0.5
    lr = 1e-3  # 443 training tracks, 14 steps an epoch at batch 32: larger steps than MTT's (untuned; see probe_search)
    batch_size = 32
    max_epochs = 50
    warm_up_len = 3


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
    trainer = {"accelerator": "cpu", "devices": 1}


def probe_search():
    """Hyper-parameter search: combine with a target (`ex_tl.py with target_mtt_tl probe_search`).

    Trains every combination of `search_grid` (default: lr 1e-4..3.2e-3 x 0/1/2 hidden layers of
    512 x dropout 0.1/0.5, 24 trials), picks the best on validation `selection_metric`, retrains it
    with `search_seeds` seeds and reports the test mean and standard deviation in results.json,
    with the plot search.png and the resumable journal trials.jsonl.
    """
    search = True  # run the grid instead of one probe


def register(ex) -> None:
    """Add the probing named configs to the Sacred experiment ``ex``."""
    for config in (target_mtt_tl, target_gtzan_tl, demo, probe_search):
        ex.named_config(config)
