"""The ``export`` ingredient: Hugging Face and ONNX export."""

from __future__ import annotations

from sacred import Ingredient

export_ing = Ingredient("export")


@export_ing.config
def export_config():
    out_dir = None  # export_hf: the Hugging Face directory; export_onnx: where model.onnx goes; None: outputs/<run_name>/export
    onnx_with_mel = False  # export_onnx: input raw 16 kHz audio of any length; the graph cuts clips (datamodule.clip_length, predict.hop) as predict
    onnx_block = None  # export_onnx: output the embeddings of this block ((B, 3, D); per clip with onnx_with_mel) instead of logits
    onnx_opset = 18  # export_onnx: ONNX opset version (18: torch's exporter's own; 17 only for plain logits graphs)
    hf_allow_separated = False  # export_hf: allow a teacher-student model (AST has one head: its logits will differ)
    hf_max_length = None  # export_hf: AST frames; None: the model's clip (datamodule.clip_length, else input_t), exact logits; "hub": the published models' 316/626/1256/1876; or frames
