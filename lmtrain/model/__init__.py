"""The decoder-only transformer (GPT-2 and Llama families through config switches)."""

from lmtrain.model.transformer import ModelConfig, ModelDef, Transformer

__all__ = ["ModelConfig", "ModelDef", "Transformer"]
