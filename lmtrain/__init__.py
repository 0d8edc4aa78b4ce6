"""lmtrain: train language models for a task, from tokenizer to Hugging Face export, in JAX/Flax."""

__version__ = "0.1.0"
