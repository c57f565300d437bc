"""arc: a compiler for autoregressive decoding."""

__version__ = "0.1.0"
