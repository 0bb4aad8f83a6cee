"""kvtuner: layer-wise mixed-precision KV-cache quantization."""

__version__ = "0.1.0"
