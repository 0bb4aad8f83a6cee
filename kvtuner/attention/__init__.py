"""Decode attention straight on the packed KV stores (`decode`, `kernels`), and its hook into
transformers' AttentionInterface (`interface`)."""
