"""deme-jax: Decouple-then-Merge finetuning of diffusion models in JAX."""

__version__ = "0.1.0"
