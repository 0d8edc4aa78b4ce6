"""The models: the decoder-only / encoder transformer (GPT-2, Llama and BERT through config switches) and the
T5-family encoder-decoder (lmtrain.model.encdec), chosen by `model.arch`."""

from __future__ import annotations

import dataclasses

from lmtrain.errors import ConfigError
from lmtrain.model.encdec import T5Config, T5ModelDef
from lmtrain.model.transformer import ModelConfig, ModelDef, Transformer

ARCHS = ("transformer", "t5")  # model.arch: lmtrain.model.transformer, or the encoder-decoder lmtrain.model.encdec


def model_config_for(model_cfg, head: str = "lm") -> ModelConfig | T5Config:
    """The model a config's `model:` section describes: a T5Config for model.arch='t5', else a ModelConfig with
    `head`."""
    arch = model_cfg.get("arch", "transformer")
    if arch == "t5":
        return T5Config.from_config(model_cfg)
    if arch != "transformer":
        raise ConfigError(f"model.arch='{arch}' is unknown. Choose one of: {', '.join(ARCHS)}.")
    return dataclasses.replace(ModelConfig.from_config(model_cfg), head=head)


def build_model_def(cfg: ModelConfig | T5Config) -> ModelDef | T5ModelDef:
    """The functional model (init, apply, shapes, logical_axes) of either kind of config."""
    return T5ModelDef(cfg) if isinstance(cfg, T5Config) else ModelDef(cfg)


__all__ = ["ARCHS", "ModelConfig", "ModelDef", "T5Config", "T5ModelDef", "Transformer", "build_model_def",
           "model_config_for"]
