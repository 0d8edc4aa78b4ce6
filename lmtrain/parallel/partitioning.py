"""Map logical axis names to mesh axes.

Model code names axes (`embed`, `heads`, `batch`...), never devices. A rules table from the config
turns those names into PartitionSpecs over the mesh, for parameters (from their `logical_axes`
metadata) and for activations (through `constrain`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lmtrain.config import ConfigError

AxisRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

_ACTIVE: contextvars.ContextVar[tuple[Mesh, AxisRules] | None] = contextvars.ContextVar("lmtrain_axis_rules", default=None)


def logical_to_spec(axes: Sequence[str | None], rules: AxisRules, mesh: Mesh | None = None) -> PartitionSpec:
    """PartitionSpec for logical `axes`. A mesh axis is used at most once; axes of size 1 are dropped."""
    table = {}
    for name, target in rules:
        table.setdefault(name, target)
    used: set[str] = set()
    spec = []
    for axis in axes:
        target = table.get(axis) if axis is not None else None
        if target is None:
            spec.append(None)
            continue
        targets = (target,) if isinstance(target, str) else tuple(target)
        kept = tuple(
            t for t in targets if t not in used and (mesh is None or mesh.shape.get(t, 1) > 1)
        )
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return PartitionSpec(*spec)


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules: AxisRules):
    """Within this context, `constrain` pins activations to the mesh by the given rules."""
    token = _ACTIVE.set((mesh, tuple(tuple(r) for r in rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical axes; a no-op outside `axis_rules`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, rules, mesh)))


def param_shardings(logical_axes_tree, mesh: Mesh, rules: AxisRules, shapes_tree=None):
    """NamedShardings for a tree whose leaves are tuples of logical axis names.

    With `shapes_tree`, a dimension that the mesh axes do not divide evenly raises an error naming the parameter.
    """
    is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)  # noqa: E731

    def one(path, axes):
        spec = logical_to_spec(axes, rules, mesh)
        if shapes_tree is not None:
            shape = _lookup(shapes_tree, path).shape
            for dim, (size, part) in enumerate(zip(shape, spec)):
                if part is None:
                    continue
                parts = (part,) if isinstance(part, str) else part
                n = 1
                for p in parts:
                    n *= mesh.shape[p]
                if size % n:
                    name = "/".join(str(getattr(k, "key", k)) for k in path)
                    raise ConfigError(
                        f"parameter '{name}' dim {dim} (size {size}, logical axis '{axes[dim]}') does not divide "
                        f"evenly over mesh axes {parts} of total size {n}. Change the model size or the mesh."
                    )
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, logical_axes_tree, is_leaf=is_axes)


def _lookup(tree, path):
    node = tree
    for k in path:
        node = node[getattr(k, "key", getattr(k, "idx", k))]
    return node
