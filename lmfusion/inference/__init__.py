"""Inference: load a checkpoint or export (:mod:`.load`), text generation with a KV cache (:mod:`.text`), text ->
image with classifier-free guidance, editing and image -> text (:mod:`.image`), interleaved chat (:mod:`.chat`),
VLM understanding (:mod:`.vlm`), writing an export (:mod:`.export`). The command line (``lmfusion generate|caption|
chat``) is :mod:`.cli`.
"""
