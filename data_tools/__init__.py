"""Offline data tools: build WebDataset shards of VAE latents (build_shards) and check them (inspect_shards)."""
