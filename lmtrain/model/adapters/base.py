"""What an adapter method declares: the contract between one method module and the generic code.

An adapter wraps one projection of `lmtrain.model.layers.dense` (`einsum(equation, x, W)`, W of `shape` with
logical `axes`) and adds its contribution to the projection's output. Its module sits beside the weight it adapts,
named `prefix + weight` (LoRA: `lora_wq` beside `wq`), so a parameter path says which weight an adapter belongs to.
The generic code (building, merging, freezing, export) goes through these methods and never names a method.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class PeftFormat:
    """How a method's adapters are written as a PEFT adapter directory (lmtrain.interop.lora_export/lora_import)."""

    peft_type: str  # adapter_config.json's peft_type, e.g. 'LORA'
    tensor_names: tuple[str, ...]  # per adapted module, the tensors' name suffixes, e.g. ('lora_A.weight', ...)


class AdapterMethod:
    """One adapter method. Subclass it, set `name`, `prefix` and `title`, implement `build` and `merge`,
    and register an instance with `lmtrain.model.adapters.register_adapter`."""

    name: str = ""  # the value of model.adapter that selects it
    prefix: str = ""  # its modules' attribute prefix, e.g. 'lora_' (parameters 'blocks/attn/lora_wq/a')
    title: str = ""  # how error messages and rule names call it, e.g. 'LoRA'
    peft: PeftFormat | None = None  # None: no PEFT adapter export/import (the merged export still works)

    def build(self, cfg, shape: tuple[int, ...], axes: tuple, equation: str, rngs: nnx.Rngs) -> nnx.Module:
        """The adapter module of one projection. `module(x, base, dtype, key)` returns what it adds to the
        projection's output, given its input `x` and `base` = einsum(equation, x, W) before any bias (`key`: its
        dropout key in training, else None). Its parameters' logical axes derive from `axes`, so they shard like W."""
        raise NotImplementedError

    def merge(self, weight: jax.Array, adapter: dict, cfg) -> jax.Array:
        """`weight` (one projection's, without a layers axis) with `adapter` (the module's parameters as a dict)
        folded in: the weight of the ordinary projection that computes what the adapted one computes."""
        raise NotImplementedError

    def check(self, cfg) -> None:
        """Raise a ConfigError naming the model.* key when the settings do not suit this method (default: none)."""

    def param_rules(self, head: str) -> list[tuple[str, tuple]]:
        """The parameter rules an adapter run adds, each named for error messages: the base freezes, the adapters
        train, and so does a new task head (its weights are not in the pretrained model)."""
        key = f"model.lora_rank ({self.title}"
        rules = [(f"{key} freezes the base)", (r".", "freeze")),
                 (f"{key} trains the adapters)", (rf"(^|/){self.prefix}", "train"))]
        if head != "lm":
            rules.append((f"{key} trains the new {head} head)", (r"^head/", "train")))
        return rules
