"""`lmtrain eval` of a WORKDIR whose task declares no scorer of its own (`Task.eval_kind` is None: a plugin
task, mlm, token_classify): the generic scoring. The task's own jitted eval step, after its `prepare` as in
training, is summed over a split of the shards, and its `eval_metrics` turn the sums into the metrics of
eval.json (without training's `val_` prefix: the split may be the test split).
"""

from __future__ import annotations

import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lmtrain import config as config_lib
from lmtrain.evaluate.metrics import EvalError
from lmtrain.evaluate.model import EvalModel, load_eval_model
from lmtrain.evaluate.report import EvalResult
from lmtrain.parallel.partitioning import logical_to_spec
from lmtrain.paths import as_path
from lmtrain.tasks import Task, make_task, task_class
from lmtrain.tasks.generation_eval import round_up
from lmtrain.workdir import start_params


def generic_task_config(path: str):
    """The config of `path` when it is an lmtrain WORKDIR whose task has no scorer of its own, else None."""
    config_path = as_path(path) / "config.json"
    if not config_path.exists():
        return None
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError:
        return None  # load_eval_model reports it
    if "architectures" in raw or "model_type" in raw:  # a Hugging Face directory
        return None
    cfg = config_lib.config_from_dict(raw, str(config_path))
    return cfg if task_class(cfg.task.name).eval_kind is None else None


def eval_config(cfg, path: str, data: str, rows: int):
    """The WORKDIR's config reading `data` (a shard directory), `rows` rows a batch, every fold as it is."""
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.data.source, cfg.data.shards_dir, cfg.data.batch_size = "shards", data, rows
        cfg.data.cv_folds, cfg.data.cv_fold = 0, 0
        cfg.data.tokenizer_dir = cfg.data.tokenizer_dir or str(as_path(path) / "tokenizer")
    return cfg


def evaluate_workdir(path: str, which, data: str, split: str | None, names: tuple[str, ...] | None, batch_size: int,
                     max_examples: int, mesh_shape, log=print) -> EvalResult:
    """Score the WORKDIR `path` on split `split` of the shards `data` with its task's own eval step and metrics."""
    cfg = generic_task_config(path)
    if cfg is None:
        raise EvalError(f"{path} is not a WORKDIR of a task that lmtrain eval scores with the task's own eval step.")
    t0 = time.perf_counter()
    model = load_eval_model(path, which, mesh_shape)
    rows = round_up(max(batch_size, 1), model.batch_multiple)
    cfg = eval_config(cfg, path, data, rows)
    task = make_task(cfg)
    bundle = task.make_data(as_path(path), 0, 1)
    split = split or ("test" if "test" in bundle.splits else "validation")
    if split not in bundle.splits:
        raise EvalError(f"{data} has no '{split}' split (it has {', '.join(bundle.splits)}); pick another with "
                        "--split.")
    max_batches = math.ceil(max_examples / rows) if max_examples else 0
    log(f"lmtrain eval: model {path}, {model.checkpoint}; scoring the {split} split of {data} with task "
        f"{cfg.task.name}'s eval step", flush=True)
    with model.context():
        sums, batches = summed_eval(task, model, cfg, bundle.eval_batches(max_batches, split))
    metrics = task_metrics(task, sums, names)
    extra = {"split": split, "batches": batches, "batch_rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    return EvalResult(model=path, task=cfg.task.name, metrics=metrics, checkpoint=model.checkpoint,
                      data=f"{data} ({split})", metrics_jsonl=model.metrics_jsonl, extra=extra)


def summed_eval(task: Task, model: EvalModel, cfg, batches) -> tuple[dict, int]:
    """The task's eval sums over `batches` (on device, read once) and the number of batches."""
    eval_step = task.eval_step(model.model_def)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), model.params)
    aux = task.init_aux(model.model_def, start_params(cfg, model.model_def, target)) if task.uses_aux() else None
    step = jax.jit(lambda params, aux_, batch: eval_step(params, task.prepare(aux_, batch)))
    place = batch_placement(model)
    sums, n = None, 0
    for batch in batches:
        out = step(model.params, aux, {k: place(v) for k, v in batch.items()})
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        n += 1
    if sums is None:
        raise EvalError("the split holds no examples to score.")
    return jax.tree.map(np.asarray, jax.device_get(sums)), n


def batch_placement(model: EvalModel):
    """Batches split over the mesh's data-parallel axes (every process reads the whole batch), or as they are."""
    if model.mesh is None:
        return jnp.asarray
    axes = logical_to_spec(("batch",), model.rules, model.mesh)[0]

    def place(x):
        x = np.asarray(x)
        sharding = NamedSharding(model.mesh, PartitionSpec(axes, *([None] * (x.ndim - 1))))
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return place


def task_metrics(task: Task, sums: dict, names: tuple[str, ...] | None) -> dict:
    """eval_metrics of the sums, named without `val_`, arrays as lists; only `names` when given."""
    raw = task.eval_metrics(sums)
    if not raw:
        raise EvalError("the split holds no examples to score (the task's eval sums are empty).")
    metrics = {k.removeprefix("val_"): (np.asarray(v).tolist() if np.ndim(v) else float(v)) for k, v in raw.items()}
    if getattr(task, "labels", None) and "confusion_matrix" in metrics:
        metrics["labels"] = [str(label) for label in task.labels]  # the report draws the matrix
    if names is None:
        return metrics
    unknown = [n for n in names if n not in metrics]
    if unknown:
        raise EvalError(f"--metrics: {', '.join(unknown)} not among task {task.name}'s metrics "
                        f"({', '.join(k for k in metrics if '/' not in k)}).")
    return {n: metrics[n] for n in names}
