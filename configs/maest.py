"""Named configs of ``ex_maest.py`` (SPEC §4): the paper's settings, their inference twins, targets, demo.

Each named config only sets what differs from the defaults (the config scopes of
``configs/ingredients/``); the defaults are the recipe that produced the released models, i.e. what
upstream's code did (AdamW 2e-5 on every parameter, warm-up 5 epochs, 130 epochs, mixup 0.3, no
masking, class-balanced draws without replacement, batch 12, 200 000 draws an epoch, SWA from epoch
50 averaging every epoch and holding the learning rate at 2e-5 in place of the ramp-down).
``recipe_paper`` switches to the recipe upstream's config describes. Clip lengths are in seconds and
``input_t = seconds * 16000 // 256`` frames.
"""

from __future__ import annotations

from pathlib import Path

from sacred.config.config_dict import ConfigDict

from helpers.synthetic import LABELS as SYNTHETIC_LABELS

PASST = "passt_s_swa_p16_128_ap476"
DEIT = "passt_deit_bd_p16_384"
RANDOM = "maest-vit-b"


def _named(doc: str, **entries):
    """A dict named config that keeps a docstring (shown by `print_named_configs`)."""
    config = ConfigDict(entries)
    config.__doc__ = doc
    return config


def _paper_config(doc: str, seconds: int, arch: str, pretrained: bool, s_patchout_t: int):
    return _named(
        doc,
        datamodule={"clip_length": seconds},
        maest={"arch": arch, "pretrained": pretrained, "input_t": seconds * 16000 // 256, "s_patchout_t": s_patchout_t},
    )


# name: (docstring, clip seconds, init arch, pretrained, time patchout, released model of the twin)
PAPER = {
    # Section 4.2: impact of the initial weights (10 s).
    "maest_10s_random_weights": ("10 s, random initialisation", 10, RANDOM, False, 30, "discogs-maest-10s-fs-129e"),
    "maest_10s_from_deit": ("10 s, initialised from DeiT-B distilled 384", 10, DEIT, True, 30, "discogs-maest-10s-dw-75e"),
    "maest_10s_from_passt": ("10 s, initialised from PaSST (AudioSet)", 10, PASST, True, 30, "discogs-maest-10s-pw-129e"),
    # Section 4.3: input length (PaSST initialisation). 5 s has only 30 time patches: drop 15.
    "maest_discogs_5sec": ("5 s, PaSST init", 5, PASST, True, 15, "discogs-maest-5s-pw-129e"),
    "maest_discogs_10sec": ("10 s, PaSST init", 10, PASST, True, 30, "discogs-maest-10s-pw-129e"),
    "maest_discogs_20sec": ("20 s, PaSST init", 20, PASST, True, 60, "discogs-maest-20s-pw-129e"),
    "maest_discogs_30sec": ("30 s, PaSST init", 30, PASST, True, 90, "discogs-maest-30s-pw-129e"),
}


def maest_30s_teacher_student_pretrain():
    """30 s teacher-student (Section 4.4): CLS head on the labels, DIST head on the teacher's hard targets.

    Teacher logits come from `extract_logits` of a trained 30 s model, e.g.
    `python ex_maest.py extract_logits with maest_discogs_30sec_inference predict.out_dir=outputs/teacher_logits
    datamodule.groundtruth_predict=data/discogs/groundtruth-train.pk`.
    """
    datamodule = {"clip_length": 30, "teacher_dir": "outputs/teacher_logits", "teacher_threshold": 0.45}  # noqa: F841
    maest = {"arch": PASST, "pretrained": True, "input_t": 1875, "s_patchout_t": 90, "distilled_type": "separated"}  # noqa: F841
    module = {"teacher_student": True}  # noqa: F841


def maest_30s_teacher_student_inference():
    """The released 30 s teacher-student model (discogs-maest-30s-pw-73e-ts)."""
    datamodule = {"clip_length": 30}  # noqa: F841
    maest = {"arch": "discogs-maest-30s-pw-73e-ts", "pretrained": True, "input_t": 1875, "s_patchout_t": 90, "distilled_type": "separated"}  # noqa: F841


def maest_discogs_30sec_519l_inference():
    """The released 30 s model with 519 Discogs labels (discogs-maest-30s-pw-129e-519l)."""
    datamodule = {"clip_length": 30}  # noqa: F841
    maest = {"arch": "discogs-maest-30s-pw-129e-519l", "pretrained": True, "input_t": 1875, "s_patchout_t": 90, "n_classes": 519}  # noqa: F841


def recipe_paper():
    """The training recipe upstream's config describes, instead of what its code did (the default, which produced the released models).

    SpecAugment masking takes effect (upstream's `masking_func` discarded it); the warm-up /
    ramp-down schedule runs to the end (Lightning's SWA callback replaced it from epoch 49); SWA
    averages every 5 epochs (upstream's `swa_freq`, which only PaSST's callback read). Any key set
    on the command line still wins, e.g. `with recipe_paper module.masking=False`.
    """
    module = {"masking": True, "swa_lr_schedule": False, "swa_freq": 5}  # noqa: F841


def mini_train():
    """A few batches of training and validation, to check a setup end to end (on any number of tracks:
    the draw is with replacement, so a small dataset fills the default epoch)."""
    trainer = {"limit_train_batches": 5, "limit_val_batches": 5, "max_epochs": 2}  # noqa: F841
    datamodule = {"sampler_replacement": True}  # noqa: F841


MTT_TAGS = Path(__file__).resolve().parent.parent / "datasets" / "mtt" / "tags.txt"  # the 50 tags, in vector order
MTT_MELS_DIR = "data/mtt/mels"  # where `python -m datasets.mtt.preprocess` writes the mels and its ground-truth copies
MTT_SPLITS = ("train", "validation", "test", "all")


def prepared_groundtruth(mels_dir: str, split: str) -> str:
    """``<mels_dir>/groundtruth-<split>.pk``: where the dataset preparers write a split's ground truth."""
    return (Path(mels_dir) / f"groundtruth-{split}.pk").as_posix()


def mtt_groundtruth(mels_dir: str, split: str) -> str:
    """The MagnaTagATune ground truth of ``split`` for the mels in ``mels_dir``.

    The copy that `python -m datasets.mtt.preprocess extract` writes there, which holds only the clips
    whose mel exists (a partial download leaves out the others instead of failing them); where the
    preparer wrote none (mels prepared by other means), the full shipped one, datasets/mtt/.
    """
    if all(Path(prepared_groundtruth(mels_dir, name)).is_file() for name in MTT_SPLITS):
        return prepared_groundtruth(mels_dir, split)
    return f"datasets/mtt/groundtruth-{split}.pk"


def target_mtt():
    """MagnaTagATune (mels from datasets/mtt/preprocess.py): extract embeddings of every clip for
    `ex_tl.py with target_mtt_tl`, or fine-tune on its 50 tags (`with maest_discogs_30sec_inference finetune target_mtt`).

    The ground truth is the preparer's copy next to the mels (the clips whose mel exists), else the
    shipped one; `datamodule.base_dir=D` on the command line reads D's copies."""
    # labels: one per line of tags.txt ("female vocal" is one tag, so not split at every space)
    datamodule = {"base_dir": MTT_MELS_DIR, "labels": [t for t in MTT_TAGS.read_text().splitlines() if t.strip()]}  # noqa: F841
    # after base_dir, which the command line may have set: each ground truth follows it unless set itself
    datamodule["groundtruth_predict"] = mtt_groundtruth(datamodule["base_dir"], "all")
    datamodule["groundtruth_train"] = mtt_groundtruth(datamodule["base_dir"], "train")
    datamodule["groundtruth_val"] = mtt_groundtruth(datamodule["base_dir"], "validation")
    datamodule["groundtruth_test"] = mtt_groundtruth(datamodule["base_dir"], "test")
    predict = {"out_dir": "outputs/mtt/embeddings"}  # noqa: F841


GTZAN_GENRES = Path(__file__).resolve().parent.parent / "datasets" / "gtzan" / "genres.txt"  # the 10 genres, in vector order


def target_gtzan():
    """GTZAN genres, fault-filtered split (mels and ground truth from datasets/gtzan/preprocess.py): extract
    embeddings of every track for `ex_tl.py with target_gtzan_tl`, or fine-tune on its 10 genres
    (`with maest_discogs_30sec_inference finetune target_gtzan`). `datamodule.base_dir=D` on the command
    line reads the ground truth the preparer wrote in D."""
    datamodule = {"base_dir": "data/gtzan/mels", "labels": GTZAN_GENRES.read_text().split()}  # noqa: F841
    # written by the preparer next to the mels (the tracks whose mel exists); each follows base_dir unless set itself
    datamodule["groundtruth_predict"] = prepared_groundtruth(datamodule["base_dir"], "all")
    datamodule["groundtruth_train"] = prepared_groundtruth(datamodule["base_dir"], "train")
    datamodule["groundtruth_val"] = prepared_groundtruth(datamodule["base_dir"], "validation")
    datamodule["groundtruth_test"] = prepared_groundtruth(datamodule["base_dir"], "test")
    predict = {"out_dir": "outputs/gtzan/embeddings"}  # noqa: F841


def finetune():
    """Fine-tune a trained MAEST (a released model or your own checkpoint) on new labels.

    `python ex_maest.py with maest_discogs_30sec_inference finetune target_mtt` (MagnaTagATune's 50
    tags), or any data: `with maest_discogs_30sec_inference finetune OUT/dataset.json`; from your
    own checkpoint: `with finetune maest.checkpoint=x.ckpt OUT/dataset.json`. The backbone loads
    strictly and the heads start afresh for the data's classes (maest.reinit_heads). A fresh head
    needs a higher rate than the backbone, which should move little: lr 1e-4 for the heads with
    layer-wise decay 0.75 (block 11 7.5e-5, block 6 1.8e-5 ~ the pre-training rate, embeddings
    2.4e-6), weight decay 0.05 without the tokens, biases and norms, stochastic depth 0.1 (BEiT/MAE
    fine-tuning). Short schedule: 2 warm-up epochs, then a linear ramp-down to 1 % by epoch 30;
    no SWA (the best validation checkpoint is kept). 2000 draws an epoch with replacement suit a few
    hundred to tens of thousands of tracks (MTT: 30 epochs = 3 passes); `module.freeze_blocks=N`
    freezes the embeddings and the first N blocks.
    """
    maest = {"reinit_heads": True, "drop_path_rate": 0.1}  # noqa: F841
    datamodule = {"epoch_length": 2000, "sampler_replacement": True}  # noqa: F841
    module = {  # noqa: F841
        "lr": 1e-4,
        "layer_decay": 0.75,
        "weight_decay": 0.05,
        "no_weight_decay_tokens": True,
        "no_weight_decay_biases_norms": True,
        "warm_up_len": 2,
        "ramp_down_start": 2,
        "ramp_down_len": 28,
        "swa": False,
    }
    trainer = {"max_epochs": 30}  # noqa: F841


def demo():
    """The whole pipeline on a synthetic dataset the project generates itself; minutes on a laptop CPU.

    `python ex_maest.py with demo` trains a small MAEST (depth 4, width 192) from scratch;
    `python ex_maest.py extract_embeddings with demo` extracts its embeddings for `ex_tl.py with demo`.
    Outputs go to outputs/demo/ (train/, embeddings/, export/: run_name is "demo" on the synthetic
    data). With a prepared dataset instead (`with demo OUT/dataset.json`) no synthetic data is
    generated and the run gets its own folder; the inference commands with the same configs use its
    newest checkpoint (`inference_checkpoint="last"`).
    """
    seed = 0  # noqa: F841  (Sacred seeds python, numpy and torch with it: the demo is reproducible)
    synthetic_data = {"out_dir": "outputs/demo/data", "n_tracks": 300, "clip_length": 10.0, "seed": 0}  # noqa: F841
    inference_checkpoint = "last"  # noqa: F841  (the newest checkpoint of this config's training: outputs/demo/train/checkpoints/ on the demo's data)
    datamodule = {  # noqa: F841
        "base_dir": "outputs/demo/data",
        "groundtruth_train": "outputs/demo/data/groundtruth-train.pk",
        "groundtruth_val": "outputs/demo/data/groundtruth-validation.pk",
        "groundtruth_test": "outputs/demo/data/groundtruth-test.pk",
        "groundtruth_predict": "outputs/demo/data/groundtruth-all.pk",
        "clip_length": 5,
        "batch_size_train": 16,
        "batch_size_test": 32,
        "num_workers": 0,
        "epoch_length": 640,
        "sampler_replacement": True,  # 640 draws an epoch from ~210 tracks: without replacement needs epoch_length <= tracks
        "labels": list(SYNTHETIC_LABELS),  # recorded in the checkpoints: predict names the classes
    }
    maest = {"arch": "maest-demo", "pretrained": False, "n_classes": 10, "input_t": 312, "s_patchout_t": 6, "s_patchout_f": 1}  # noqa: F841
    module = {  # noqa: F841
        "lr": 5e-4,
        "weight_decay": 1e-2,
        "warm_up_len": 1,
        "ramp_down_start": 5,
        "ramp_down_len": 5,
        "swa_epoch_start": 6,  # the SWA phase is epochs 5-9 (0-based): the learning rate stays at 5e-4, no ramp-down
    }
    trainer = {"max_epochs": 10, "log_every_n_steps": 10}  # noqa: F841  (checkpoints: outputs/demo/train)
    predict = {"batch_size": 32, "num_workers": 0}  # noqa: F841  (outputs/demo/embeddings; block depth // 2 = 2)


def register_named_configs(ex) -> None:
    """Add every named config to ``ex``; names follow SPEC §4 exactly."""
    for name, (doc, seconds, arch, pretrained, s_patchout_t, released) in PAPER.items():
        ex.named_configs[f"{name}_pretrain"] = _paper_config(f"Pre-training: {doc}.", seconds, arch, pretrained, s_patchout_t)
        ex.named_configs[f"{name}_inference"] = _paper_config(
            f"Inference with the released {released} ({doc}).", seconds, released, True, s_patchout_t
        )
    ex.named_configs["maest_30s_from_passt_infer"] = _paper_config(
        "Alias of maest_discogs_30sec_inference (discogs-maest-30s-pw-129e).", 30, "discogs-maest-30s-pw-129e", True, 90
    )
    for config in (
        maest_30s_teacher_student_pretrain,
        maest_30s_teacher_student_inference,
        maest_discogs_30sec_519l_inference,
        recipe_paper,
        mini_train,
        target_mtt,
        target_gtzan,
        finetune,
        demo,
    ):
        ex.named_config(config)
