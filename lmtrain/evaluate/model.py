"""The model `lmtrain eval` scores: a WORKDIR's checkpoint (latest, best, a step, or `start`: the parameters its
training started from), or a Hugging Face directory; placed on the WORKDIR's training mesh when it fits the
devices present (else on one device), local or gs://."""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import numpy as np

from lmtrain.config import DEFAULT_AXIS_RULES
from lmtrain.data.tokenizer import load_tokenizer
from lmtrain.evaluate.metrics import EvalError
from lmtrain.interop.hf_import import load_hf_model, read_hf_labels
from lmtrain.model import ModelDef
from lmtrain.parallel.partitioning import axis_rules
from lmtrain.paths import as_path, local_dir
from lmtrain.tasks import task_class
from lmtrain.workdir import Workdir, is_hf_dir, place_on_mesh


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


def load_eval_model(path: str, which: str | int = "latest", mesh_shape: tuple[int, int, int] | None = None
                    ) -> EvalModel:
    """A WORKDIR (config.json and checkpoints/ or imported init_params) or a Hugging Face model directory."""
    root = as_path(path)
    if not (root / "config.json").exists():
        raise EvalError(f"{path} has no config.json; give an lmtrain WORKDIR or a Hugging Face model directory.")
    if is_hf_dir(root):
        return _load_hf(path, root, which, mesh_shape)
    return _load_workdir(path, Workdir(root), which, mesh_shape)


def _load_workdir(path: str, work: Workdir, which, mesh_shape) -> EvalModel:
    cfg = work.config
    task = cfg.task.name
    labels = work.labels()
    if task_class(task).has_labels and not labels:
        raise EvalError(f"{path} is a classifier with no labels.json (its classes in class order); train it with "
                        "lmtrain train, which writes the file, or import it with lmtrain import.")
    mesh, shardings = work.place(mesh_shape, "lmtrain eval")
    params = work.load_params(which, shardings)
    tokenizer_dir = work.tokenizer_dir
    if not (tokenizer_dir / "tokenizer.json").exists() and not (tokenizer_dir / "tokenizer_config.json").exists():
        raise EvalError(f"{path}: its tokenizer {tokenizer_dir} (data.tokenizer_dir) has no tokenizer.json; "
                        "evaluation encodes and decodes with the model's own tokenizer.")
    metrics = str(work.metrics_path) if work.metrics_path.exists() else ""
    return EvalModel(path, work.model_def, params, work.tokenizer(), tokenizer_dir, task, labels,
                     work.describe(which), metrics, mesh, tuple(tuple(r) for r in cfg.mesh.axis_rules))


# ----------------------------------------------------------------------------- Hugging Face directory


def _load_hf(path: str, root, which, mesh_shape) -> EvalModel:
    if which not in ("latest", None):
        raise EvalError(f"{path} is a Hugging Face directory: it has one set of weights, so --which {which} does "
                        "not apply.")
    rules = tuple(tuple(r) for r in DEFAULT_AXIS_RULES)
    placement = {}

    def shardings_fn(model_def):
        placement["mesh"], shardings = place_on_mesh(model_def, None, rules, mesh_shape, path, "lmtrain eval")
        return shardings  # None: one device

    try:
        with local_dir(root) as local:
            cfg, params = load_hf_model(local, shardings_fn)
            labels = read_hf_labels(local)
    except (ValueError, OSError) as e:  # HFInteropError is a ValueError
        raise EvalError(f"{path}: {e}") from None
    model_def = ModelDef(cfg)
    return EvalModel(path, model_def, params, load_tokenizer(root), root, "classify" if labels else "lm", labels,
                     "the Hugging Face weights", "", placement.get("mesh"), rules)


def param_count(params: dict) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
