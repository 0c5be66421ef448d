"""scd: streaming video generation with Separable Causal Diffusion."""

__version__ = "0.1.0"
