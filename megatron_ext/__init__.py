"""Model-agnostic extensions of megatron-core: modality routing, routed linear layers and norms, CPU/gloo mode."""
