"""Checkpoints: Hugging Face Llama import/export (:mod:`lmfusion.checkpoint.hf`).

A *base* checkpoint is a converted Hugging Face Llama: the text model only, full (TP=1) tensors in megatron naming
(``embedding.word_embeddings.weight``, ``decoder.layers.N....``, ``output_layer.weight``), safetensors, plus
``lmfusion_config.json``, ``conversion.json`` and the tokenizer files. It is read-only; every TP/PP layout slices
it at load (:func:`lmfusion.checkpoint.hf.load_base_state`). Training checkpoints refer to a base and hold only
what changes.
"""
