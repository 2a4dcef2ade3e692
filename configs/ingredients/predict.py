"""The ``predict`` ingredient: extraction and prediction (block, output folder, clips, batching, device, labels)."""

from __future__ import annotations

from sacred import Ingredient

predict_ing = Ingredient("predict")


@predict_ing.config
def predict_config():
    transformer_block = None  # block of the embeddings, 0-based; None: depth // 2 (6 of 12, the paper's best, "the 7th block")
    out_dir = None  # extraction output: <out_dir>/<key>.embeddings.npy / .logits.npy; None: outputs/<run_name>/embeddings
    hop = "full"  # "full": consecutive clips; "half": half-overlapping clips
    batch_size = 16  # clips per forward pass
    num_workers = 2  # DataLoader workers reading mel files
    bf16 = False  # bf16 autocast (fp16 on GPUs without bf16) for faster extraction and prediction
    device = "auto"  # "cpu", "cuda" or "auto"
    audio = []  # `predict` command: audio files or folders (wav, flac, ogg, mp3)
    top_k = 5  # `predict`: labels per file
    output = None  # `predict`: a .json or .tsv file to write (None: print JSON)
    labels_file = None  # `predict`, `export_hf`: label names, one per line (None: the arch's Discogs labels)
