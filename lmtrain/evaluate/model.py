"""The model `lmtrain eval` scores: a WORKDIR's checkpoint (latest, best, a step, or `start`: the parameters its
training started from), or a Hugging Face directory; placed on the WORKDIR's training mesh when it fits the
devices present (else on one device), local or gs://."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys

import jax
import numpy as np

from lmtrain import config as config_lib
from lmtrain.config import DEFAULT_AXIS_RULES, ConfigError, resolve_mesh_shape
from lmtrain.data.tokenizer import load_tokenizer
from lmtrain.evaluate.metrics import EvalError
from lmtrain.interop.hf_import import load_hf_model, read_hf_labels
from lmtrain.model import ModelDef
from lmtrain.parallel.mesh import make_mesh
from lmtrain.parallel.partitioning import axis_rules, param_shardings
from lmtrain.paths import as_path, local_dir
from lmtrain.tasks import task_class, workdir_model_config
from lmtrain.trees import flat_keys, nest_keys


@dataclasses.dataclass
class EvalModel:
    path: str  # as the user named it
    model_def: ModelDef
    params: dict
    tokenizer: object  # a transformers tokenizer
    tokenizer_dir: object  # its directory (epath), for the shards' fingerprint check
    task: str  # what it was trained for: its config's task.name (a Hugging Face directory: lm or classify)
    labels: list[str] | None  # a classifier's classes in class-id order
    checkpoint: str  # which parameters, in words
    metrics_jsonl: str = ""  # the training log, for the report's loss curve
    mesh: object = None  # a jax Mesh when the parameters are sharded over several devices
    rules: tuple = ()

    @property
    def head(self) -> str:
        return self.model_def.cfg.head

    @property
    def batch_multiple(self) -> int:
        """Eval batches must split evenly over the mesh's data-parallel axes."""
        return 1 if self.mesh is None else int(self.mesh.shape["data"] * self.mesh.shape["fsdp"])

    def context(self):
        """Where the model runs: its mesh's axis rules (activation sharding), or nothing on one device."""
        if self.mesh is None:
            return contextlib.nullcontext()
        return axis_rules(self.mesh, self.rules)


def read_labels(path) -> list[str] | None:
    """labels.json of a WORKDIR: {"labels": [...]} (the classify task) or a bare list (lmtrain import)."""
    path = as_path(path)
    if not path.exists():
        return None
    try:
        labels = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: not valid JSON ({e}); it should list the classes in class order.") from None
    labels = labels.get("labels") if isinstance(labels, dict) else labels
    if not isinstance(labels, list) or not labels:
        raise EvalError(f"{path}: should hold the classes in class order, as {{\"labels\": [...]}}.")
    return [str(x) for x in labels]


def load_eval_model(path: str, which: str | int = "latest", mesh_shape: tuple[int, int, int] | None = None
                    ) -> EvalModel:
    """A WORKDIR (config.json and checkpoints/ or imported init_params) or a Hugging Face model directory."""
    root = as_path(path)
    config_path = root / "config.json"
    if not config_path.exists():
        raise EvalError(f"{path} has no config.json; give an lmtrain WORKDIR or a Hugging Face model directory.")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise EvalError(f"{config_path}: not valid JSON ({e}).") from None
    if "architectures" in raw or "model_type" in raw:
        return _load_hf(path, root, which, mesh_shape)
    return _load_workdir(path, root, raw, which, mesh_shape)


# ----------------------------------------------------------------------------- placement


def _mesh_and_shardings(model_def: ModelDef, mesh_cfg, rules, mesh_shape, where: str):
    """(mesh, param shardings) over the training mesh (or `mesh_shape`); (None, one device) when it is a single
    device or does not fit the devices here."""
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    single = (None, jax.tree.map(lambda _: one, model_def.shapes))
    n = jax.device_count()
    try:
        if mesh_shape is None:
            if mesh_cfg is None:
                return single
            mesh_shape = resolve_mesh_shape(mesh_cfg, n)
        elif math.prod(mesh_shape) > n:
            raise ConfigError(f"--mesh {','.join(map(str, mesh_shape))} needs {math.prod(mesh_shape)} devices; "
                              f"{n} are present.")
    except ConfigError as e:
        if jax.process_count() > 1:
            raise EvalError(f"{where}: the mesh does not fit the {n} devices of this job ({e}).") from None
        print(f"lmtrain eval: note: {where}'s mesh does not fit the {n} device(s) here ({e}); evaluating on one "
              "device.", file=sys.stderr)
        return single
    if math.prod(mesh_shape) == 1:
        return single
    mesh = make_mesh(tuple(mesh_shape), jax.devices()[: math.prod(mesh_shape)])
    try:
        return mesh, param_shardings(model_def.logical_axes, mesh, rules, model_def.shapes)
    except ValueError as e:
        raise EvalError(f"{where}: mesh {tuple(mesh_shape)}: {e}") from None


def _target(model_def: ModelDef, shardings) -> dict:
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), model_def.shapes, shardings)


# ----------------------------------------------------------------------------- WORKDIR


def _load_workdir(path: str, root, raw: dict, which, mesh_shape) -> EvalModel:
    cfg = config_lib.config_from_dict(raw, str(root / "config.json"))
    task = cfg.task.name
    labels = read_labels(root / "labels.json")
    if task_class(task).has_labels and not labels:
        raise EvalError(f"{path} is a classifier with no labels.json (its classes in class order); train it with "
                        "lmtrain train, which writes the file, or import it with lmtrain import.")
    model_def = ModelDef(workdir_model_config(cfg, root))
    mesh, shardings = _mesh_and_shardings(model_def, cfg.mesh, cfg.mesh.axis_rules, mesh_shape, path)
    params, checkpoint = _workdir_params(root, cfg, model_def, _target(model_def, shardings), which)
    tokenizer_dir = as_path(cfg.data.tokenizer_dir) if cfg.data.tokenizer_dir else root / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").exists() and not (tokenizer_dir / "tokenizer_config.json").exists():
        raise EvalError(f"{path}: its tokenizer {tokenizer_dir} (data.tokenizer_dir) has no tokenizer.json; "
                        "evaluation encodes and decodes with the model's own tokenizer.")
    metrics = root / "metrics.jsonl"
    return EvalModel(path, model_def, params, load_tokenizer(tokenizer_dir), tokenizer_dir, task, labels, checkpoint,
                     str(metrics) if metrics.exists() else "", mesh, tuple(tuple(r) for r in cfg.mesh.axis_rules))


def _has_steps(root) -> bool:
    directory = root / "checkpoints"
    return directory.exists() and any(p.name.isdigit() for p in directory.iterdir())


def _workdir_params(root, cfg, model_def: ModelDef, target: dict, which) -> tuple[dict, str]:
    """(params, which checkpoint in words). Parameters a checkpoint does not hold (frozen ones, which training
    rebuilds from its base) come from where training started: the seed's initialisation under train.init_from."""
    from lmtrain.train import checkpoint as ckpt

    if which == "start" or (which == "latest" and not _has_steps(root)):
        if not cfg.train.init_from and which != "start":
            raise EvalError(f"{root} holds no checkpoint and no train.init_from; train it first.")
        return start_params(cfg, model_def, target), _start_words(cfg)
    step = ckpt.select_step(root, which)
    state_dir = ckpt.checkpoint_dir(root) / str(step) / "state"
    stored = ckpt._stored_leaves(state_dir, "params")
    flat = flat_keys(target)
    held = {k: v for k, v in flat.items() if stored.get(k) == tuple(v.shape)}
    if not held:
        raise EvalError(f"{state_dir}: none of its parameters fits the model in {root / 'config.json'}.")
    params = ckpt._restore_tree(state_dir, nest_keys(held), "params")
    missing = {k: v for k, v in flat.items() if k not in held}
    if missing:
        params = _merge(params, start_params(cfg, model_def, nest_keys(missing)))
    how = {"latest": "latest", "best": f"best by {ckpt._best_rule(root)[0]}"}.get(which, "")
    return params, f"step {step}" + (f" ({how})" if how else "")


def _start_words(cfg) -> str:
    base = f"train.init_from={cfg.train.init_from} ({cfg.train.init_from_which})" if cfg.train.init_from else "no base"
    return f"start: the parameters training began with (seed {cfg.train.seed} initialisation, then {base})"


def start_params(cfg, model_def: ModelDef, target: dict) -> dict:
    """The parameters in `target` as training started: the seed's initialisation (a fresh head), then every
    parameter train.init_from holds with the same shape."""
    from lmtrain.train import checkpoint as ckpt

    def init():
        full = model_def.init(jax.random.fold_in(jax.random.key(cfg.train.seed), 0))
        return _select(full, target)

    params = jax.jit(init, out_shardings=jax.tree.map(lambda t: t.sharding, target))()
    if cfg.train.init_from:
        which = cfg.train.init_from_which
        which = int(which) if str(which).isdigit() else which
        loaded, _, _ = ckpt.load_init_params(cfg.train.init_from, target, which, cfg.model.vocab_size,
                                             model_def.logical_axes)  # a grown vocabulary: mean rows, as training
        params = _merge(params, loaded)
    return params


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _select(full: dict, like: dict) -> dict:
    return {k: _select(full[k], v) if isinstance(v, dict) else full[k] for k, v in like.items()}


# ----------------------------------------------------------------------------- Hugging Face directory


def _load_hf(path: str, root, which, mesh_shape) -> EvalModel:
    if which not in ("latest", None):
        raise EvalError(f"{path} is a Hugging Face directory: it has one set of weights, so --which {which} does "
                        "not apply.")
    placement = {}

    def shardings_fn(model_def):
        placement["mesh"], shardings = _mesh_and_shardings(model_def, None, _default_rules(), mesh_shape, path)
        return shardings

    try:
        with local_dir(root) as local:
            cfg, params = load_hf_model(local, shardings_fn)
            labels = read_hf_labels(local)
    except (ValueError, OSError) as e:  # HFInteropError is a ValueError
        raise EvalError(f"{path}: {e}") from None
    model_def = ModelDef(cfg)
    return EvalModel(path, model_def, params, load_tokenizer(root), root, "classify" if labels else "lm", labels,
                     "the Hugging Face weights", "", placement.get("mesh"), _default_rules())


def _default_rules() -> tuple:
    return tuple(tuple(r) for r in DEFAULT_AXIS_RULES)


def param_count(params: dict) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
