"""MAEST for the HEAR 2021 benchmark: ``load_model``, ``get_scene_embeddings``, ``get_timestamp_embeddings``.

    import hear_maest
    model = hear_maest.load_model("weights/discogs-maest-30s-pw-129e-swa.ckpt").to("cuda")
    scene = hear_maest.get_scene_embeddings(audio, model)              # (n_sounds, 2304)
    frames, times_ms = hear_maest.get_timestamp_embeddings(audio, model)  # (n_sounds, n, 768), (n_sounds, n)

Checked with the published validator: ``hear-validator hear_maest --model <checkpoint>``.
See ``hear_maest.api`` for the choices (block 6, CLS + DIST + patch-mean tokens, 160 ms frames).
"""

from .api import HEARMAEST, get_scene_embeddings, get_timestamp_embeddings, load_model, timestamps_ms
from .loading import load_maest, recognise_arch

__all__ = ["HEARMAEST", "get_scene_embeddings", "get_timestamp_embeddings", "load_model", "timestamps_ms", "load_maest", "recognise_arch"]
