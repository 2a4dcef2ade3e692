"""Exchange formats: a MAEST model to and from other frameworks' files, in one place.

- ``models.exchange.hf``: Hugging Face ``ASTForAudioClassification`` directories, import
  (``read_hf_state_dict``, ``maest_from_hf``; ``get_maest(checkpoint=DIR)`` uses it) and export
  (``export_hf``). Its feature extractor stays in ``models/feature_extraction.py``: transformers
  copies that file and the modules it imports (``mel``, ``inference``) into an exported directory.
- ``models.exchange.onnx``: ONNX export (``export_onnx``), checked with onnxruntime.

Dependencies point one way: ``models.registry`` -> ``models.exchange.hf`` -> ``models.checkpoints``;
``models.checkpoints`` reads files and knows nothing of these formats. transformers, safetensors,
onnx and onnxscript are imported only inside the functions that need them
(``requirements-extras.txt``).
"""
