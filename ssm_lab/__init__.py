"""ssm_lab: train and compare Transformers, Mamba-style SSMs and hybrids side by side in JAX."""

__version__ = "0.1.0"
