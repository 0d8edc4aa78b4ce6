"""LoRA: a low-rank update beside a frozen projection, y = x W + (alpha / r) * dropout(x) A B.

An adapter wraps one projection of `lmtrain.model.layers.dense`. Its factors carry logical axes
derived from the projection's own: A = [input dims..., r], B = [r, output dims...], so FSDP and tensor
parallelism shard them like the weight they adapt, the rank axis replicated. B starts at zero, so a
fresh adapter leaves the model unchanged; A starts as PEFT's default (Kaiming-uniform, bound
1/sqrt(fan_in)), so an exported adapter means the same thing in both libraries.

Which projections an adapter targets, and what LoRA freezes and trains, are parameter rules
(`lmtrain.param_rules`: one target vocabulary for every family, plus each family's module names).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


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

    def __call__(self, x, dtype, key=None):
        if key is not None and self.dropout > 0:
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        h = jnp.einsum(self.down_equation, x, self.a[...].astype(dtype))
        return jnp.einsum(self.up_equation, h, self.b[...].astype(dtype)) * jnp.asarray(self.scale, dtype)

    def delta(self) -> jax.Array:
        """(alpha / r) * A B, shaped like the adapted weight: what merging adds to it."""
        a, b = self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32)
        return jnp.tensordot(a, b, axes=1) * self.scale


def maybe_lora(cfg, target: str, shape: tuple, axes: tuple, equation: str, rngs: nnx.Rngs) -> LoRA | None:
    """The adapter for projection `target` when LoRA is on and targets it, else None."""
    if not cfg.lora_rank or target not in cfg.lora_targets:
        return None
    return LoRA(shape, axes, equation, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.weight_dtype, rngs)


def merged_params(params: dict, lora_rank: int, lora_alpha: float) -> dict:
    """The parameters with every adapter folded into its weight (W + (alpha / r) A B) and the adapters
    removed: an ordinary model, for export or fast inference."""
    scale = lora_alpha / lora_rank

    def merge(node: dict) -> dict:
        out = {k: merge(v) if isinstance(v, dict) else v for k, v in node.items() if not k.startswith("lora_")}
        for key, adapter in node.items():
            if not key.startswith("lora_"):
                continue
            weight = out[key[len("lora_"):]]
            a, b = adapter["a"].astype(jnp.float32), adapter["b"].astype(jnp.float32)
            stacked = weight.ndim == a.ndim + b.ndim - 3  # [L, in..., r] and [L, r, out...] share L
            if stacked:  # blocks: a leading layers axis on the weight and both factors
                layers, rank = a.shape[0], a.shape[-1]
                delta = jnp.einsum("lir,lro->lio", a.reshape(layers, -1, rank), b.reshape(layers, rank, -1))
            else:
                rank = a.shape[-1]
                delta = a.reshape(-1, rank) @ b.reshape(rank, -1)
            out[key[len("lora_"):]] = (weight.astype(jnp.float32) + scale * delta.reshape(weight.shape)).astype(weight.dtype)
        return out

    return merge(params)
