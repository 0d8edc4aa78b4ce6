"""Adapter methods (LoRA, ...): a registry, and the generic code that builds, finds, merges and strips adapters.

`model.adapter` names the method (default 'lora'); `model.lora_rank > 0` turns adapters on, on the projections
`model.lora_targets` names, and `lora_alpha`/`lora_dropout` are the method's to read. A new method is one module
here (a `base.AdapterMethod` subclass) plus one line in `ADAPTERS`; a plugin calls `register_adapter` instead.
The model's layers call `attach` and `adapter_of`, `lmtrain.param_rules` asks the method for its rules, and the
exports call `merged_params` / `without_adapters`: none of them names a method.
"""

from __future__ import annotations

import jax
from flax import nnx

from lmtrain.errors import ConfigError
from lmtrain.model.adapters import lora
from lmtrain.model.adapters.base import AdapterMethod, PeftFormat

ADAPTERS: dict[str, AdapterMethod] = {
    "lora": lora.METHOD,
}

__all__ = ["ADAPTERS", "AdapterMethod", "PeftFormat", "adapter_method", "adapter_of", "adapters_on", "attach",
           "merged_params", "register_adapter", "without_adapters"]


def register_adapter(method: AdapterMethod) -> AdapterMethod:
    """Add a method (from a plugin module) under `method.name`; registering the same class again is a no-op."""
    if not (isinstance(method, AdapterMethod) and method.name and method.prefix):
        raise TypeError(f"register_adapter needs an AdapterMethod with a name and a prefix, not {method!r}")
    known = ADAPTERS.get(method.name)
    if known is not None and type(known) is not type(method):
        raise ValueError(f"adapter method '{method.name}' is already registered ({type(known).__name__})")
    clash = [m.name for m in ADAPTERS.values() if m.prefix == method.prefix and m.name != method.name]
    if clash:
        raise ValueError(f"adapter method '{method.name}': prefix '{method.prefix}' is already '{clash[0]}''s")
    ADAPTERS[method.name] = method
    return method


def adapter_method(cfg) -> AdapterMethod:
    """The method `cfg.adapter` names; an unknown name is the user's model.adapter to fix."""
    name = getattr(cfg, "adapter", "lora")
    if name not in ADAPTERS:
        raise ConfigError(f"model.adapter='{name}' is unknown. Adapter methods: {', '.join(sorted(ADAPTERS))} "
                          "(a plugin module adds more through lmtrain.model.adapters.register_adapter).")
    return ADAPTERS[name]


def adapters_on(cfg) -> bool:
    return bool(cfg.lora_rank)


def attach(module: nnx.Module, weight: str, cfg, target: str, shape: tuple, axes: tuple, equation: str,
           rngs: nnx.Rngs) -> None:
    """Give `module` the adapter of its projection `weight` (canonical target `target`), or None when adapters are
    off or do not target it, as attribute `prefix + weight` (so the parameter path names the weight it adapts)."""
    method = adapter_method(cfg)
    on = adapters_on(cfg) and target in cfg.lora_targets
    setattr(module, method.prefix + weight, method.build(cfg, shape, axes, equation, rngs) if on else None)


def adapter_of(module: nnx.Module, weight: str):
    """The adapter `attach` gave `module`'s projection `weight` (None: none), for `dense(..., adapter=...)`."""
    return getattr(module, adapter_method(module.cfg).prefix + weight, None)


def _is_stacked(path: tuple[str, ...]) -> bool:
    """Blocks' parameters carry a leading layers axis (lmtrain.model.transformer, encdec.model)."""
    return "blocks" in path


def merged_params(params: dict, cfg) -> dict:
    """The parameters with every adapter folded into its weight (the method's `merge`) and the adapters removed:
    an ordinary model, for export or fast inference. Stacked block weights merge one layer at a time."""
    method = adapter_method(cfg)
    prefix = method.prefix

    def merge_one(path: tuple[str, ...], weight, adapter: dict):
        if _is_stacked(path):
            return jax.vmap(lambda w, a: method.merge(w, a, cfg))(weight, adapter)
        return method.merge(weight, adapter, cfg)

    def walk(node: dict, path: tuple[str, ...]) -> dict:
        out = {k: walk(v, (*path, k)) if isinstance(v, dict) else v for k, v in node.items() if not k.startswith(prefix)}
        for key, adapter in node.items():
            if key.startswith(prefix):
                weight = key[len(prefix):]
                out[weight] = merge_one((*path, weight), out[weight], adapter)
        return out

    return walk(params, ())


def without_adapters(params: dict, cfg) -> dict:
    """The parameters of the base model the adapters apply to."""
    prefix = adapter_method(cfg).prefix

    def strip(node: dict) -> dict:
        return {k: strip(v) if isinstance(v, dict) else v for k, v in node.items() if not k.startswith(prefix)}

    return strip(params)
