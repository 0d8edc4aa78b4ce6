"""LoRA: a low-rank update beside a frozen projection, y = x W + (alpha / r) * dropout(x) A B.

An adapter wraps one projection of `lmtrain.model.layers.dense`. Its factors carry logical axes
derived from the projection's own: A = [input dims..., r], B = [r, output dims...], so FSDP and tensor
parallelism shard them like the weight they adapt, the rank axis replicated. B starts at zero, so a
fresh adapter leaves the model unchanged; A starts as PEFT's default (Kaiming-uniform, bound
1/sqrt(fan_in)), so an exported adapter means the same thing in both libraries.

`LoRAMethod` is what the adapter registry (`lmtrain.model.adapters.ADAPTERS['lora']`) knows of it: how it
wraps a projection, how it merges, and its PEFT format. Which projections an adapter targets is a parameter rule
(`lmtrain.param_rules`: one target vocabulary for every family and method, plus each family's module names).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lmtrain.model.adapters.base import AdapterMethod, PeftFormat


def _split_equation(equation: str) -> tuple[str, str, str]:
    """'bld,dnh->blnh' -> (x spec, contracted dims 'd', output dims 'nh')."""
    inputs, out = equation.split("->")
    x_spec, w_spec = inputs.split(",")
    contracted = "".join(c for c in w_spec if c in x_spec)
    produced = "".join(c for c in w_spec if c not in x_spec)
    return x_spec, contracted, produced


class LoRA(nnx.Module):
    """The adapter of one projection `einsum(equation, x, W)` whose weight has `shape` and logical `axes`."""

    def __init__(self, shape: tuple[int, ...], axes: tuple, equation: str, rank: int, alpha: float, dropout: float,
                 dtype, rngs: nnx.Rngs):
        x_spec, contracted, produced = _split_equation(equation)
        w_spec = equation.split("->")[0].split(",")[1]
        n_in = len(contracted)
        if w_spec[:n_in] != contracted:
            raise ValueError(f"LoRA needs the contracted dims first in {equation}")
        in_shape, out_shape = shape[:n_in], shape[n_in:]
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        a = jax.random.uniform(rngs.params(), (*in_shape, rank), jnp.float32, -bound, bound)
        self.a = nnx.Param(a.astype(dtype), logical_axes=(*axes[:n_in], "lora_rank"))
        self.b = nnx.Param(jnp.zeros((rank, *out_shape), dtype), logical_axes=("lora_rank", *axes[n_in:]))
        self.scale, self.dropout = alpha / rank, dropout
        x_out = "".join(c for c in x_spec if c not in contracted)
        self.down_equation = f"{x_spec},{contracted}r->{x_out}r"
        self.up_equation = f"{x_out}r,r{produced}->{equation.split('->')[1]}"

    def __call__(self, x, base, dtype, key=None):
        """(alpha / r) dropout(x) A B; `base` (the projection's x W) is not needed."""
        if key is not None and self.dropout > 0:
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        h = jnp.einsum(self.down_equation, x, self.a[...].astype(dtype))
        return jnp.einsum(self.up_equation, h, self.b[...].astype(dtype)) * jnp.asarray(self.scale, dtype)

    def delta(self) -> jax.Array:
        """(alpha / r) * A B, shaped like the adapted weight: what merging adds to it."""
        a, b = self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32)
        return jnp.tensordot(a, b, axes=1) * self.scale


class LoRAMethod(AdapterMethod):
    """model.adapter='lora': a LoRA adapter of rank model.lora_rank, scale lora_alpha / lora_rank."""

    name, prefix, title = "lora", "lora_", "LoRA"
    peft = PeftFormat(peft_type="LORA", tensor_names=("lora_A.weight", "lora_B.weight"))

    def build(self, cfg, shape, axes, equation, rngs) -> LoRA:
        return LoRA(shape, axes, equation, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.weight_dtype, rngs)

    def merge(self, weight: jax.Array, adapter: dict, cfg) -> jax.Array:
        """W + (alpha / r) A B, in float32, back in the weight's dtype."""
        a, b = adapter["a"].astype(jnp.float32), adapter["b"].astype(jnp.float32)
        rank = a.shape[-1]
        delta = a.reshape(-1, rank) @ b.reshape(rank, -1)
        scale = cfg.lora_alpha / cfg.lora_rank
        return (weight.astype(jnp.float32) + scale * delta.reshape(weight.shape)).astype(weight.dtype)


METHOD = LoRAMethod()
