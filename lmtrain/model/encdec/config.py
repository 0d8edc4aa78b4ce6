"""The T5-family encoder-decoder's hyper-parameters: its own dataclass, beside (not inside) ModelConfig.

It also answers the handful of attributes the shared building blocks read (`Norm`, the adapters): `norm`,
`use_bias`, `compute_dtype`, `weight_dtype`, so those blocks serve both model kinds unchanged.
"""

from __future__ import annotations

import dataclasses

from lmtrain.errors import ConfigError
from lmtrain.model.adapters import adapter_method
from lmtrain.model.layers import SharedModelProperties
from lmtrain.param_rules import FAMILY_NAMES, LoRAError, resolve_targets

MLPS = ("relu", "gated-gelu")  # T5 v1.0 and T5 v1.1 / Flan-T5 feed-forwards, as transformers' feed_forward_proj

T5_LORA_NAMES = FAMILY_NAMES["t5"]  # PEFT's module names for T5's projections -> lmtrain's LoRA targets


@dataclasses.dataclass(frozen=True)
class T5Config(SharedModelProperties):
    """Static hyper-parameters of a T5 encoder-decoder (hashable, so modules can close over them)."""

    vocab_size: int
    d_model: int
    n_layers: int  # encoder blocks
    n_heads: int
    head_dim: int  # T5's d_kv: need not be d_model / n_heads
    d_ff: int
    n_decoder_layers: int = 0  # 0: as many as the encoder
    mlp: str = "gated-gelu"  # 'relu' (T5 v1.0) or 'gated-gelu' (v1.1, Flan-T5)
    relative_buckets: int = 32
    relative_max_distance: int = 128
    norm_eps: float = 1e-6
    tie_embeddings: bool = False  # the LM head reuses the shared token embedding
    scale_decoder_outputs: bool = False  # multiply the decoder output by d_model**-0.5 before the head (T5 v1.0)
    vocab_pad_multiple: int = 128
    dropout: float = 0.0  # on the embeddings, each sublayer's output and the feed-forward's hidden layer
    pad_id: int = 0
    eos_id: int = 1
    decoder_start_id: int = 0  # T5 starts decoding from the pad token
    dtype: str = "float32"
    param_dtype: str = "float32"
    logits_dtype: str = "float32"
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple = ()  # canonical targets (q, k, v, o, gate, up, down) after `from_config`
    adapter: str = "lora"  # the adapter method (lmtrain.model.adapters.ADAPTERS) when lora_rank > 0

    # What the shared blocks (lmtrain.model.layers.Norm) read: T5's norm is RMSNorm without bias or centring.
    norm = "rmsnorm"
    use_bias = False
    head = "seq2seq"  # what export and the LoRA rules read of a model's head: the LM head over the decoder

    def __post_init__(self):
        if self.mlp not in MLPS:
            raise ConfigError(f"model.mlp='{self.mlp}' is not a T5 feed-forward; choose one of {', '.join(MLPS)}.")

    @classmethod
    def from_config(cls, model_cfg) -> T5Config:
        """From a `model:` mapping; LoRA targets may be canonical names or T5's PEFT module names."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in model_cfg.items() if k in fields}
        if not values.get("head_dim"):  # the shared config's 0: d_model // n_heads
            values["head_dim"] = values["d_model"] // values["n_heads"]
        values["lora_targets"] = resolve_lora_targets(values.get("lora_targets") or (), values.get("mlp", "gated-gelu")) \
            if values.get("lora_rank") else ()
        cfg = cls(**values)
        if cfg.lora_rank:
            adapter_method(cfg).check(cfg)  # an unknown model.adapter is a ConfigError here
        return cfg

    def for_training(self) -> T5Config:
        """Training keeps float32 master weights whatever the storage dtype (as ModelConfig.for_training)."""
        return dataclasses.replace(self, param_dtype="float32")

    @property
    def decoder_layers(self) -> int:
        return self.n_decoder_layers or self.n_layers

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim



def resolve_lora_targets(names, mlp: str) -> tuple[str, ...]:
    """Canonical LoRA targets from canonical or PEFT module names (T5's among them), as decoders resolve them."""
    try:
        return resolve_targets(names, mlp)
    except LoRAError as e:
        raise ConfigError(str(e)) from None
