"""Hugging Face Llama and LLaVA-NeXT import/export: the base checkpoint format (:mod:`.llama`; VLM bases
:mod:`.llava`) and ``lmfusion convert-hf`` / ``lmfusion export-hf`` (:mod:`.convert`).

A *base* checkpoint is a converted Hugging Face Llama: the text model only, full (TP=1) tensors in megatron naming
(``embedding.word_embeddings.weight``, ``decoder.layers.N....``, ``output_layer.weight``), safetensors, plus
``lmfusion_config.json``, ``conversion.json`` and the tokenizer files. It is read-only; every TP/PP layout slices
it at load (:func:`load_base_state`). Training checkpoints refer to a base and hold only what changes
(:mod:`lmfusion.rundir`).
"""

from lmfusion.hf.convert import add_subparser, convert_hf, export_hf
from lmfusion.hf.llama import (BASE_CONFIG, BOI_TOKEN, CONVERSION, DEFAULT_MAX_SHARD_SIZE, EOI_TOKEN, HF_CONFIG,
                               INDEX_FILE, SINGLE_FILE, TOKENIZER_FILES, BaseWeights, base_shapes, hf_config_of,
                               hf_config_to_model_kwargs, hf_eos_token_ids, hf_to_megatron, load_base_state,
                               megatron_to_hf, read_hf_llama, read_json, tokenizer_token_id, write_safetensors)

__all__ = ["add_subparser", "convert_hf", "export_hf", "BASE_CONFIG", "BOI_TOKEN", "CONVERSION",
           "DEFAULT_MAX_SHARD_SIZE", "EOI_TOKEN", "HF_CONFIG", "INDEX_FILE", "SINGLE_FILE", "TOKENIZER_FILES",
           "BaseWeights", "base_shapes", "hf_config_of", "hf_config_to_model_kwargs", "hf_eos_token_ids",
           "hf_to_megatron", "load_base_state", "megatron_to_hf", "read_hf_llama", "read_json", "tokenizer_token_id",
           "write_safetensors"]
