"""The T5-family encoder-decoder: config, blocks, model and cached greedy generation."""

from lmtrain.model.encdec.config import T5_LORA_NAMES, T5Config
from lmtrain.model.encdec.generate import generate_greedy, pad_inputs
from lmtrain.model.encdec.model import T5, T5ModelDef

__all__ = ["T5", "T5_LORA_NAMES", "T5Config", "T5ModelDef", "generate_greedy", "pad_inputs"]
