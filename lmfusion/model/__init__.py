"""LMFusion model pieces.

* ``attention``: the one attention-mask definition (causal text, bidirectional images, packed documents) and the
  core-attention backends (reference, SDPA, FlexAttention; Transformer Engine's is refused, see there).
* ``image_io``: image latents <-> hidden states (U-Net down/up blocks or linear patchify), timestep-conditioned.

Import the submodules directly (``from lmfusion.model.attention import AttentionMask``); this package imports
nothing itself, so importing it stays cheap.
"""
