"""Orbax checkpoints under WORKDIR/checkpoints: save asynchronously, keep the latest K plus the best,
resume from the latest complete one.

Each checkpoint holds three items: `state` (params, optimizer state, step, RNG), `data` (the data
iterator's position) and `meta` (tokens seen, validation loss, the resolved config). Orbax writes a
step into a temporary directory and renames it only once every item is complete, so a save that
was killed half-way is never listed as a step and never chosen for resume.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

ITEMS = ("state", "data", "meta")


class ProcessDataStateHandler(ocp.CheckpointHandler):
    """Each process writes its own data-iterator state, `process_I-of-N.json`, into the `data` item.

    Hosts read disjoint data, so their iterator positions differ; resuming with another
    process count is refused with a message rather than silently re-reading data.
    """

    def save(self, directory: epath.Path, args: ProcessDataStateSave) -> None:
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (directory / name).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: ProcessDataStateRestore | None = None) -> dict:
        path = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not path.exists():
            found = sorted(p.name for p in directory.iterdir())
            raise FileNotFoundError(
                f"{path} does not exist: the checkpoint's data positions were saved by {found}. "
                "Resume with the same number of processes."
            )
        return json.loads(path.read_text())

    def metadata(self, directory: epath.Path):
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(ProcessDataStateHandler, for_save=True)
@dataclasses.dataclass
class ProcessDataStateSave(ocp.args.CheckpointArgs):
    state: dict


@ocp.args.register_with_handler(ProcessDataStateHandler, for_restore=True)
@dataclasses.dataclass
class ProcessDataStateRestore(ocp.args.CheckpointArgs):
    pass


def checkpoint_dir(workdir: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(workdir).resolve() / "checkpoints"


class Checkpointer:
    def __init__(self, workdir: str | pathlib.Path, keep: int = 2, async_save: bool = True):
        preservation = policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=keep),
                # Ascending sort keeps the last n, so reverse=True keeps the lowest validation loss.
                policies.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1,
                               keep_checkpoints_without_metrics=False),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save, preservation_policy=preservation, create=True
        )
        self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, data_state: dict, meta: dict, val_loss: float | None = None) -> None:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ProcessDataStateSave(data_state), meta=ocp.args.JsonSave(meta)
        )
        metrics = None if val_loss is None else {"val_loss": float(val_loss)}
        self.manager.save(step, args=args, metrics=metrics, force=True)

    def restore(self, step: int, abstract_state: dict) -> tuple[dict, dict, dict]:
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ProcessDataStateRestore(), meta=ocp.args.JsonRestore()
        )
        out = self.manager.restore(step, args=args)
        return out["state"], out["data"], out["meta"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _read_meta(workdir: pathlib.Path, step: int) -> dict:
    path = checkpoint_dir(workdir) / str(step) / "meta" / "metadata"
    return json.loads(path.read_text()) if path.is_file() else {}


def select_step(workdir: str | pathlib.Path, which: str | int = "latest") -> int:
    """A complete checkpoint step of WORKDIR: 'latest', 'best' (lowest validation loss) or a number."""
    workdir = pathlib.Path(workdir)
    manager = ocp.CheckpointManager(checkpoint_dir(workdir), item_names=ITEMS)
    steps = sorted(manager.all_steps())
    manager.close()
    if not steps:
        raise FileNotFoundError(f"{checkpoint_dir(workdir)} holds no complete checkpoint; train first.")
    if which == "latest":
        return steps[-1]
    if which == "best":
        scored = [(m["val_loss"], s) for s in steps if (m := _read_meta(workdir, s)).get("val_loss") is not None]
        if not scored:
            raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)} has a validation loss; use 'latest'.")
        return min(scored)[1]
    step = int(which)
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {checkpoint_dir(workdir)}; it has steps {steps}.")
    return step


def restore_params(workdir: str | pathlib.Path, which: str | int = "latest", shardings=None):
    """(config, params) from a WORKDIR checkpoint, without the optimizer state.

    With `shardings` (a tree like the params of NamedShardings), each host reads only its shards.
    """
    from lmtrain.config import load_config
    from lmtrain.model import ModelConfig, ModelDef

    workdir = pathlib.Path(workdir)
    cfg = load_config(str(workdir / "config.json"))
    step = select_step(workdir, which)
    model_def = ModelDef(ModelConfig.from_config(cfg.model))
    shapes = model_def.shapes
    if shardings is None:
        replicated = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: replicated, shapes)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    path = checkpoint_dir(workdir) / str(step) / "state"
    with ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore(
            path,
            args=ocp.args.PyTreeRestore(
                item={"params": target},
                restore_args={"params": jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding), target)},
                partial_restore=True,
            ),
        )
    return cfg, restored["params"]


def save_init_params(workdir: str | pathlib.Path, params: dict) -> pathlib.Path:
    """Write params to WORKDIR/init_params (what `lmtrain import` produces, what train.init_from reads)."""
    path = pathlib.Path(workdir).resolve() / "init_params"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params)
    return path


def load_init_params(path: str | pathlib.Path, target: dict) -> dict:
    """Restore params written by `save_init_params` into `target` (ShapeDtypeStructs with shardings)."""
    path = pathlib.Path(path).resolve()
    if not path.exists():
        raise FileNotFoundError(f"train.init_from={path}: no such checkpoint directory.")
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, target)
