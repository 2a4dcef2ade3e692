"""The ``predict`` ingredient: extraction and prediction (blocks, output folder, clips, batching, precision, devices, labels)."""

from __future__ import annotations

from sacred import Ingredient

predict_ing = Ingredient("predict")


@predict_ing.config
def predict_config():
    transformer_block = None  # block(s) of the embeddings and timestamps, 0-based: an int, a list (e.g. [3, 6]) or "all"; None: depth // 2 (6 of 12, the paper's best, "the 7th block")
    out_dir = None  # extraction output: <out_dir>/<key>.embeddings.npy / .logits.npy / .timestamps.npy; None: outputs/<run_name>/embeddings
    hop = "full"  # "full": consecutive clips; "half": half-overlapping clips
    batch_size = 16  # clips per forward pass
    num_workers = 2  # DataLoader workers reading mel files (extraction) or decoding audio files (`predict`)
    precision = "bf16"  # weights and matmuls of extraction and prediction: "bf16" (fastest accurate), "fp32" (exact), "fp16" (CUDA only)
    compile = False  # torch.compile the transformer blocks (pays on long extraction runs; the first batch compiles)
    device = "auto"  # "cpu", "cuda" or "auto"
    devices = 1  # extraction processes per node (GPUs, or CPU processes); > 1 launches them as DDP training does
    num_nodes = 1  # machines of a multi-node extraction (torchrun or SLURM sets the ranks; see README)
    audio = []  # `predict` command: audio files or folders (wav, flac, ogg, mp3, m4a, opus, aiff, ...: helpers.audio.AUDIO_EXTENSIONS)
    top_k = 5  # `predict`: labels per file
    output = None  # `predict`: a .json or .tsv file to write (None: print JSON)
    labels_file = None  # `predict`, `export_hf`: label names, one per line (None: the arch's Discogs labels)
