"""A run's directory (WORKDIR) as every command reads it: its config.json, tokenizer, labels.json, done.json,
metrics.jsonl, the model its checkpoints hold and their parameters.

`Workdir.load_params` is the one way parameters leave a WORKDIR (train's init_from, eval, generate, export,
serve): 'latest', 'best' (by the run's train.early_stopping metric), a step number, or 'start' (what training
began with: the seed's initialisation under train.init_from). Parameters a checkpoint does not hold (frozen ones:
a LoRA run's base, frozen layers) are rebuilt as training built them, from 'start'.

`is_hf_dir` tells a Hugging Face model directory from a WORKDIR: both have a config.json, only Hugging Face's
names an architecture or model_type.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys

import jax

from lmtrain.config import config_from_dict, resolve_mesh_shape
from lmtrain.data.tokenizer import load_tokenizer
from lmtrain.errors import ConfigError
from lmtrain.model import ModelConfig, ModelDef, T5Config, build_model_def, model_config_for
from lmtrain.parallel.mesh import make_mesh
from lmtrain.parallel.partitioning import param_shardings
from lmtrain.paths import as_path
from lmtrain.tasks import task_class
from lmtrain.train.checkpoint import (
    CheckpointError,
    best_rule,
    checkpoint_dir,
    load_init_params,
    read_meta,
    restore_tree,
    select_step,
    stored_leaves,
)
from lmtrain.train.state import init_params_fn
from lmtrain.trees import flat_keys, nest_keys

CONFIG, LABELS, DONE, METRICS, TOKENIZER = "config.json", "labels.json", "done.json", "metrics.jsonl", "tokenizer"
WHICH = ("latest", "best", "start")  # and a step number


class WorkdirError(CheckpointError):
    """A WORKDIR that cannot be read as asked; the message names it and says what to do."""


def is_hf_dir(path) -> bool:
    """True for a Hugging Face model directory: a config.json that names an architecture or model_type. False for
    an lmtrain WORKDIR, a directory without config.json and an unreadable config.json."""
    try:
        raw = json.loads((as_path(path) / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and ("architectures" in raw or "model_type" in raw)


def read_labels(path) -> list[str] | None:
    """A labels.json: the class names in class order, as a JSON list (what the classify and token_classify tasks
    and `lmtrain import` write) or {"labels": [...]}; None when the file is not there."""
    path = as_path(path)
    if not path.is_file():
        return None
    try:
        labels = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WorkdirError(f"{path}: not valid JSON ({e}); it should list the class names in class order, "
                           "as [\"neg\", \"pos\"].") from None
    labels = labels.get("labels") if isinstance(labels, dict) else labels
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str | int) for x in labels):
        raise WorkdirError(f"{path}: should list the class names in class order, as [\"neg\", \"pos\"] (or "
                           "{\"labels\": [...]}). Restore the file, or delete it and train again to rewrite it.")
    return [str(x) for x in labels]


def parse_which(which) -> str | int:
    """'latest', 'best', 'start' or a step number (an int, or digits as a command line gives them)."""
    if isinstance(which, int) and not isinstance(which, bool) and which >= 0:
        return which
    if isinstance(which, str) and which.isdigit():
        return int(which)
    if which in WHICH:
        return which
    raise WorkdirError(f"which checkpoint '{which}': use 'latest', 'best', 'start' or a step number.")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def _step_dirs(workdir) -> list[int]:
    """The step numbers under WORKDIR/checkpoints (a save in progress has another name)."""
    directory = checkpoint_dir(workdir)
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def _merge(a: dict, b: dict) -> dict:
    """`a` with every leaf of `b` put in (nested dicts)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _select(full: dict, like: dict) -> dict:
    return {k: _select(full[k], v) if isinstance(v, dict) else full[k] for k, v in like.items()}


def _init_from_which(cfg) -> str | int:
    which = cfg.train.init_from_which
    return int(which) if str(which).isdigit() else which


def overlay_init_from(cfg, model_def: ModelDef, params: dict, target: dict) -> tuple[dict, list[str], list[str]]:
    """`params` with every parameter of `target` that train.init_from holds put in (a smaller vocabulary grown
    with mean rows, as training does): (params, paths left as they were, source paths not used)."""
    if not cfg.train.init_from:
        return params, [], []
    loaded, fresh, unused = load_init_params(cfg.train.init_from, target, _init_from_which(cfg),
                                             cfg.model.vocab_size, model_def.logical_axes)
    return _merge(params, loaded), fresh, unused


def start_params(cfg, model_def: ModelDef, target: dict) -> dict:
    """The parameters in `target` (ShapeDtypeStructs with shardings) as training started: the seed's
    initialisation (a fresh head), then every parameter train.init_from holds with the same shape."""
    if not jax.tree.leaves(target):
        return target  # nothing to make (a run with no frozen parameters)
    init = init_params_fn(model_def, cfg.train.seed)
    params = jax.jit(lambda: _select(init(), target), out_shardings=jax.tree.map(lambda t: t.sharding, target))()
    return overlay_init_from(cfg, model_def, params, target)[0]


def workdir_model_config(cfg, workdir) -> ModelConfig | T5Config:
    """The model a WORKDIR's checkpoints hold, from the WORKDIR alone (its config.json and labels.json), without
    the training data; an encoder-decoder (model.arch='t5') has neither head nor labels."""
    if cfg.model.get("arch", "transformer") != "transformer":
        return model_config_for(cfg.model).for_training()
    model_cfg = ModelConfig.from_config(cfg.model).for_training()
    head = task_class(cfg.task.name).head
    labels = read_labels(as_path(workdir) / LABELS)
    return dataclasses.replace(model_cfg, head=head, num_labels=len(labels) if labels else model_cfg.num_labels)


def targets(model_def: ModelDef, shardings=None) -> dict:
    """ShapeDtypeStructs of the model's parameters with `shardings` (a tree like the params), or on one device."""
    if shardings is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, model_def.shapes)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), model_def.shapes,
                        shardings)


def place_on_mesh(model_def: ModelDef, mesh_cfg, rules, mesh_shape=None, where: str = "the model",
                  command: str = "lmtrain"):
    """(mesh, param shardings) over the training mesh `mesh_cfg` (or `mesh_shape`, (data, fsdp, tensor));
    (None, None) for one device: a one-device mesh, no mesh_cfg (a Hugging Face directory) and no mesh_shape,
    or, in a single process, a mesh that does not fit the devices here (with a note on stderr)."""
    n = jax.device_count()
    try:
        if mesh_shape is None:
            if mesh_cfg is None:
                return None, None
            mesh_shape = resolve_mesh_shape(mesh_cfg, n)
        elif math.prod(mesh_shape) > n:
            raise ConfigError(f"mesh {tuple(mesh_shape)} needs {math.prod(mesh_shape)} devices; {n} are present.")
        if math.prod(mesh_shape) == 1:
            return None, None
        devices = jax.devices()[: math.prod(mesh_shape)]
        dcn_data = mesh_cfg.get("dcn_data", -1) if mesh_cfg is not None else -1
        mesh = make_mesh(tuple(mesh_shape), devices, dcn_data=dcn_data if len(devices) == n else 1)
    except ConfigError as e:
        if jax.process_count() > 1:
            raise WorkdirError(f"{where}: its mesh does not fit the {n} devices of this job ({e}). Run with the "
                               "devices the model was trained on, or from a single process.") from None
        print(f"{command}: note: {where}'s mesh does not fit the {n} device(s) here ({e}); the parameters are "
              "restored onto one device.", file=sys.stderr)
        return None, None
    try:
        return mesh, param_shardings(model_def.logical_axes, mesh, rules, model_def.shapes)
    except ValueError as e:
        raise WorkdirError(f"{where}: mesh {tuple(mesh_shape)}: {e}") from None


class Workdir:
    """An lmtrain WORKDIR (local or gs://). Reading is lazy: a WORKDIR without labels or metrics is fine."""

    def __init__(self, path: str | os.PathLike):
        self.path = as_path(path)

    def __repr__(self) -> str:
        return f"Workdir({str(self.path)!r})"

    # -- files

    def require_config_file(self) -> None:
        """A directory with a config.json (what every WORKDIR has), checked without reading it: commands check this
        first, before they look at their outputs or the checkpoints."""
        if self.path.exists() and not self.path.is_dir():
            raise WorkdirError(f"{self.path} is a file, not an lmtrain WORKDIR (a directory with config.json and "
                               "checkpoints/).")
        if not (self.path / CONFIG).is_file():
            raise WorkdirError(f"{self.path} has no config.json; is it an lmtrain WORKDIR? Give the --workdir of a "
                               "training run (or of `lmtrain import`).")

    @functools.cached_property
    def config(self):
        """The resolved config the run was trained with (config.json)."""
        path = self.path / CONFIG
        self.require_config_file()
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WorkdirError(f"{path}: not valid JSON ({e}).") from None
        if is_hf_dir(self.path):
            raise WorkdirError(f"{self.path} is a Hugging Face model directory, not an lmtrain WORKDIR; import it "
                               "with lmtrain import HF_DIR WORKDIR.")
        return config_from_dict(raw, str(path))

    @property
    def tokenizer_dir(self):
        """data.tokenizer_dir when the run named one, else WORKDIR/tokenizer (where `lmtrain import` puts it)."""
        named = self.config.data.tokenizer_dir
        return as_path(named) if named else self.path / TOKENIZER

    def tokenizer(self):
        return load_tokenizer(self.tokenizer_dir)

    def labels(self) -> list[str] | None:
        """A classifier's class names in class order (labels.json); None when the run has none."""
        return read_labels(self.path / LABELS)

    def done(self) -> dict | None:
        """done.json, which a finished run writes; None while it runs or when it stopped early."""
        path = self.path / DONE
        try:
            return json.loads(path.read_text()) if path.exists() else None
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            return None

    @property
    def metrics_path(self):
        return self.path / METRICS

    def metrics(self) -> list[dict]:
        """The training log's records (metrics.jsonl); a line cut short by a kill is skipped."""
        if not self.metrics_path.exists():
            return []
        records = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    # -- the model

    def model_config(self) -> ModelConfig | T5Config:
        return workdir_model_config(self.config, self.path)

    @functools.cached_property
    def model_def(self) -> ModelDef:
        return build_model_def(self.model_config())

    def place(self, mesh_shape=None, command: str = "lmtrain"):
        """(mesh, param shardings) on the training mesh (or `mesh_shape`); (None, None) for one device."""
        return place_on_mesh(self.model_def, self.config.mesh, self.config.mesh.axis_rules, mesh_shape,
                             str(self.path), command)

    # -- checkpoints

    def has_checkpoints(self) -> bool:
        return bool(_step_dirs(self.path))

    def select_step(self, which: str | int = "latest") -> int:
        """The complete checkpoint step that `which` ('latest', 'best' or a step number) names."""
        which = parse_which(which)
        if which == "start":
            raise WorkdirError(f"{self.path}: 'start' names the parameters training began with, not a checkpoint.")
        if not self.has_checkpoints():
            hint = (" or use 'start' for the parameters training starts from (train.init_from="
                    f"{self.config.train.init_from})") if self.config.train.init_from else ""
            raise WorkdirError(f"{self.path} holds no complete checkpoint in {checkpoint_dir(self.path)}; train "
                               f"it first{hint}.")
        return select_step(self.path, which)

    def describe(self, which: str | int = "latest") -> str:
        """Which parameters `which` names, in words: 'step 400 (best by val_accuracy=0.91)', 'step 400 (latest)'."""
        which = parse_which(which)
        cfg = self.config
        if which == "start" or (which == "latest" and not self.has_checkpoints() and cfg.train.init_from):
            base = f"train.init_from={cfg.train.init_from} ({cfg.train.init_from_which})" if cfg.train.init_from \
                else "no base"
            return f"start: the parameters training began with (seed {cfg.train.seed} initialisation, then {base})"
        step = self.select_step(which)
        if which == "latest":
            return f"step {step} (latest)"
        if which != "best":
            return f"step {step}"
        metric, _ = best_rule(self.path)
        meta = read_meta(self.path, step)
        value = (meta.get("eval") or {}).get(metric, meta.get(metric))
        shown = f"{value:.4g}" if isinstance(value, int | float) else "?"
        return f"step {step} (best by {metric}={shown})"

    def trained_paths(self, which: str | int = "latest") -> set[str]:
        """The parameter paths a checkpoint holds: exactly those its run trained (frozen ones are not saved)."""
        step = self.select_step(which)
        return {"/".join(map(str, k)) for k in stored_leaves(checkpoint_dir(self.path) / str(step) / "state",
                                                             "params")}

    def load_params(self, which: str | int = "latest", shardings=None, *, mesh=None) -> dict:
        """The parameters `which` names ('latest', 'best', a step number or 'start'), placed by `shardings` (a tree
        like the params) or on `mesh` with the run's axis rules, else on one device. Each host reads only its
        shards. 'latest' of a WORKDIR not trained yet (an `lmtrain import`) is 'start'."""
        which = parse_which(which)
        cfg, model_def = self.config, self.model_def
        if mesh is not None:
            shardings = param_shardings(model_def.logical_axes, mesh, cfg.mesh.axis_rules, model_def.shapes)
        target = targets(model_def, shardings)
        if which == "start" or (which == "latest" and not self.has_checkpoints() and cfg.train.init_from):
            return start_params(cfg, model_def, target)
        state_dir = checkpoint_dir(self.path) / str(self.select_step(which)) / "state"
        stored, flat = stored_leaves(state_dir, "params"), flat_keys(target)
        wrong = [f"{'/'.join(map(str, k))}: stored {stored[k]}, expected {tuple(v.shape)}"
                 for k, v in flat.items() if k in stored and stored[k] != tuple(v.shape)]
        if wrong:
            raise WorkdirError(f"{state_dir} holds parameters of another shape than {self.path / CONFIG} builds "
                               f"({'; '.join(wrong[:3])}). Restore the WORKDIR's config.json.")
        held = {k: v for k, v in flat.items() if k in stored}
        if not held:
            raise WorkdirError(f"{state_dir}: none of its parameters fits the model in {self.path / CONFIG}. "
                               "Restore the WORKDIR's config.json.")
        try:
            params = restore_tree(state_dir, nest_keys(held), "params")
        except Exception as e:  # noqa: BLE001 - the layout matched, so a failed read is damage (Orbax raises bare Exception)
            raise WorkdirError(f"checkpoint {state_dir.parent} of {self.path} could not be read ({_first_line(e)}); "
                               "it is damaged or was copied in part. Use another step (its steps: "
                               f"{_step_dirs(self.path)}) or copy the checkpoint again.") from None
        missing = {k: v for k, v in flat.items() if k not in held}
        return _merge(params, start_params(cfg, model_def, nest_keys(missing))) if missing else params


def restore_params(workdir, which: str | int = "latest", shardings=None):
    """(config, params) of a WORKDIR's checkpoint: `Workdir(workdir).load_params(which, shardings)`."""
    work = Workdir(workdir)
    return work.config, work.load_params(which, shardings)
