"""LMFusion: a frozen Llama-3 text model with parallel image modules, trained on megatron-core."""

__version__ = "0.1.0"
