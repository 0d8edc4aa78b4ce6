"""The train state (params, optimizer state, step, RNG), its shardings, and its sharded initialisation.

Shapes are worked out abstractly first; the jitted init then writes each shard straight to its
device, so a model is never materialised whole on one device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lmtrain.model import ModelDef
from lmtrain.parallel.partitioning import AxisRules, param_shardings
from lmtrain.param_rules import ParamPlan


def init_params_fn(model_def: ModelDef, seed: int):
    """The model's initial parameters, as every run with this seed draws them."""
    return lambda: model_def.init(jax.random.fold_in(jax.random.key(seed), 0))


def init_state_fn(model_def: ModelDef, tx: optax.GradientTransformation, seed: int, plan: ParamPlan | None = None):
    """The initial train state: `params` (trainable), `frozen` (the rest), the optimizer state of the
    trainable ones, the step and the RNG."""

    def init() -> dict:
        key = jax.random.key(seed)
        params = init_params_fn(model_def, seed)()
        trainable, frozen = plan.split(params) if plan is not None else (params, {})
        return {
            "params": trainable,
            "frozen": frozen,
            "opt_state": tx.init(trainable),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.fold_in(key, 1)),
        }

    return init


def _path_keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)


def _factored_spec(spec: PartitionSpec, param_shape: tuple, leaf_shape: tuple) -> PartitionSpec | None:
    """The sharding of an optimizer leaf derived from its parameter: the same shape takes the same
    spec; Adafactor's factored row/column statistics drop the reduced dimension."""
    full = tuple(spec) + (None,) * (len(param_shape) - len(tuple(spec)))
    if leaf_shape == param_shape:
        return PartitionSpec(*full)
    if len(param_shape) >= 2 and leaf_shape == param_shape[:-1]:
        return PartitionSpec(*full[:-1])
    if len(param_shape) >= 2 and leaf_shape == param_shape[:-2] + param_shape[-1:]:
        return PartitionSpec(*(full[:-2] + full[-1:]))
    return None


def state_shardings(abstract_state: dict, model_def: ModelDef, mesh: Mesh, rules: AxisRules) -> dict:
    """Shardings for every leaf of the state.

    Optimizer-state leaves that mirror a parameter (Adam moments, momentum, Adafactor's factored
    statistics) take that parameter's sharding, found by the longest matching path suffix; anything
    else (counters) is replicated.
    """
    p_shardings = param_shardings(model_def.logical_axes, mesh, rules, model_def.shapes)
    by_path = {}
    for path, sharding in jax.tree_util.tree_flatten_with_path(p_shardings)[0]:
        by_path[_path_keys(path)] = (sharding, tuple(_lookup_shape(model_def.shapes, path)))
    replicated = NamedSharding(mesh, PartitionSpec())

    def opt_leaf(path, leaf):
        keys = _path_keys(path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None:
                spec = _factored_spec(hit[0].spec, hit[1], tuple(leaf.shape))
                if spec is not None:
                    return NamedSharding(mesh, spec)
        return replicated

    def subset(tree_abstract):
        return jax.tree_util.tree_map_with_path(lambda path, _: by_path[_path_keys(path)][0], tree_abstract)

    return {
        "params": subset(abstract_state["params"]),
        "frozen": subset(abstract_state.get("frozen", {})),
        "opt_state": jax.tree_util.tree_map_with_path(opt_leaf, abstract_state["opt_state"]),
        "step": replicated,
        "rng": replicated,
    }



def _lookup_shape(tree, path):
    node = tree
    for k in path:
        node = node[getattr(k, "key", k)]
    return node.shape


def create_sharded_state(model_def: ModelDef, tx, seed: int, mesh: Mesh, rules: AxisRules, plan: ParamPlan | None = None):
    """(state, shardings, abstract_state): the state initialised directly into its shards."""
    init = init_state_fn(model_def, tx, seed, plan)
    abstract = jax.eval_shape(init)
    shardings = state_shardings(abstract, model_def, mesh, rules)
    state = jax.jit(init, out_shardings=shardings)()
    return state, shardings, abstract


def abstract_with_shardings(abstract: dict, shardings: dict) -> dict:
    """ShapeDtypeStructs carrying shardings: the restore target for Orbax."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
