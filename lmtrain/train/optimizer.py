"""Optax optimizers, learning-rate schedules, and the parameter-rules table built from `config.optimizer`.

`optimizer.param_rules` maps parameter-path regexes to labels (train, freeze, decay, no_decay, lr=X).
`ParamPlan` is the table applied to one model: which parameters train, which get weight decay, and
each one's learning-rate multiplier. Frozen parameters never reach the optimizer: the step splits
them off before differentiating, so they have no optimizer state and no update, weight decay included.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmtrain.config import OPTIMIZERS, SCHEDULES, ConfigError, check_param_rules
from lmtrain.trees import flat_paths, nest_paths


def learning_rate_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr` (step 0 takes lr / warmup_steps, so no step is wasted at lr 0), then
    cosine, linear, constant or warmup-stable-decay (WSD)."""
    lr, warmup, end = opt_cfg.lr, opt_cfg.warmup_steps, opt_cfg.lr * opt_cfg.min_lr_ratio
    rest = max(total_steps - warmup, 1)
    if opt_cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, rest, alpha=opt_cfg.min_lr_ratio)
    elif opt_cfg.schedule == "linear":
        after = optax.linear_schedule(lr, end, rest)
    elif opt_cfg.schedule == "constant":
        after = optax.constant_schedule(lr)
    elif opt_cfg.schedule == "wsd":
        decay = max(int(rest * opt_cfg.wsd_decay_fraction), 1)
        after = optax.join_schedules(
            [optax.constant_schedule(lr), optax.linear_schedule(lr, end, decay)], [rest - decay]
        )
    else:
        raise ConfigError(f"optimizer.schedule='{opt_cfg.schedule}' is unknown. Choose one of: {', '.join(SCHEDULES)}.")
    if warmup == 0:
        return after
    warm = lambda step: lr * (jnp.minimum(step, warmup - 1) + 1) / warmup  # noqa: E731
    return optax.join_schedules([warm, after], [warmup])


# ---------------------------------------------------------------------------------------------- parameter rules


def param_paths(tree: Mapping) -> dict[str, object]:
    """{'blocks/attn/wq': leaf, ...} for a nested dict of parameters (or of their shapes)."""
    return flat_paths(tree)


def shapes_at(shapes: Mapping, path: str) -> tuple[int, ...]:
    node = shapes
    for key in path.split("/"):
        node = node[key]
    return tuple(node.shape)


@dataclasses.dataclass(frozen=True)
class ParamPlan:
    """The rules table applied to a model: per parameter path, whether it trains, decays, and its lr multiplier."""

    trainable: dict[str, bool]
    decay: dict[str, bool]
    lr_mult: dict[str, float]
    frozen_layers: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # blocks lo..hi, inclusive

    @classmethod
    def from_rules(cls, shapes: Mapping, rules, weight_decay_default: bool = True, where: str = "optimizer.param_rules",
                   names: list[str] | None = None) -> ParamPlan:
        """`names[i]` says where rule i came from in error messages (default: `where[i]`)."""
        paths = list(param_paths(shapes))
        trainable = dict.fromkeys(paths, True)
        decay = dict.fromkeys(paths, weight_decay_default)
        lr_mult = dict.fromkeys(paths, 1.0)
        frozen_layers: dict[str, tuple[int, int]] = {}
        tables = {"trainable": trainable, "decay": decay, "lr_mult": lr_mult, "frozen_layers": frozen_layers}
        for i, (regex, prop, value) in enumerate(check_param_rules(rules)):
            name = names[i] if names else f"{where}[{i}]"
            hits = [p for p in paths if regex.search(p)]
            if not hits:
                raise ConfigError(
                    f"{name}: regex {regex.pattern!r} matches no parameter. "
                    f"Parameters look like: {', '.join(paths[:6])}, ...")
            if prop == "frozen_layers":
                stacked = [p for p in hits if p.startswith("blocks/")]
                if len(stacked) != len(hits):
                    raise ConfigError(f"{name}: a layer range applies to block parameters (blocks/...), not to "
                                      f"{', '.join(p for p in hits if p not in stacked)}.")
                n_layers = shapes_at(shapes, stacked[0])[0]
                if value[1] >= n_layers:
                    raise ConfigError(f"{name}: blocks {value[0]}-{value[1]} do not exist; the model has "
                                      f"{n_layers} blocks (0-{n_layers - 1}).")
            for p in hits:
                tables[prop][p] = value
        if not any(trainable.values()):
            raise ConfigError(f"{where} freeze every parameter; nothing would train.")
        return cls(trainable, decay, lr_mult, {p: r for p, r in frozen_layers.items() if trainable[p]})

    def layer_masks(self, shapes: Mapping) -> dict:
        """{path: bool [n_layers]} (True: the block trains) for block parameters frozen in part."""
        masks = {}
        for path, (lo, hi) in self.frozen_layers.items():
            mask = np.ones(shapes_at(shapes, path)[0], bool)
            mask[lo : hi + 1] = False
            masks[path] = mask
        return nest_paths(masks)

    def split(self, params: Mapping) -> tuple[dict, dict]:
        """(trainable, frozen) sub-dicts of `params`; each holds only its own leaves."""
        flat = param_paths(params)
        return (nest_paths({p: v for p, v in flat.items() if self.trainable[p]}),
                nest_paths({p: v for p, v in flat.items() if not self.trainable[p]}))

    @staticmethod
    def merge(trainable: Mapping, frozen: Mapping) -> dict:
        return nest_paths({**param_paths(frozen), **param_paths(trainable)})

    def counts(self, shapes: Mapping) -> tuple[int, int]:
        """(trainable, frozen) parameter counts."""
        sizes = {p: math.prod(s.shape) for p, s in param_paths(shapes).items()}
        train = sum(n for p, n in sizes.items() if self.trainable[p])
        return train, sum(sizes.values()) - train

    def _tree(self, table: Mapping, params: Mapping):
        return nest_paths({p: table[p] for p in param_paths(params)})


# ---------------------------------------------------------------------------------------------- optimizers


def _scale_per_param(mults):
    """Multiply each parameter's update by its learning-rate multiplier (a static tree of floats)."""

    def update(updates, state, params=None):
        return jax.tree.map(lambda u, m: u * m if m != 1.0 else u, updates, mults), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(opt_cfg, total_steps: int, plan: ParamPlan | None = None, trainable_shapes: Mapping | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer over the trainable parameters, and the learning-rate schedule.

    With a plan, weight decay follows its `decay` table and updates are scaled by `lr_mult`.
    """
    schedule = learning_rate_schedule(opt_cfg, total_steps)
    mask = (lambda params: plan._tree(plan.decay, params)) if plan is not None else None  # noqa: E731
    name = opt_cfg.name
    if name == "adamw":
        core = optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                           weight_decay=opt_cfg.weight_decay, mask=mask)
    elif name == "lion":
        core = optax.lion(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, weight_decay=opt_cfg.weight_decay, mask=mask)
    elif name == "adafactor":
        core = optax.adafactor(schedule, weight_decay_rate=opt_cfg.weight_decay or None, weight_decay_mask=mask,
                               multiply_by_parameter_scale=False)
    elif name == "sgd":
        core = optax.chain(
            optax.add_decayed_weights(opt_cfg.weight_decay, mask) if opt_cfg.weight_decay else optax.identity(),
            optax.sgd(schedule, momentum=opt_cfg.momentum),
        )
    else:
        raise ConfigError(f"optimizer.name='{name}' is unknown. Choose one of: {', '.join(OPTIMIZERS)}.")
    if plan is not None and trainable_shapes is not None and any(m != 1.0 for m in plan.lr_mult.values()):
        core = optax.chain(core, _scale_per_param(plan._tree(plan.lr_mult, trainable_shapes)))
    if opt_cfg.clip_norm:
        core = optax.chain(optax.clip_by_global_norm(opt_cfg.clip_norm), core)
    return core, schedule
