"""Orbax checkpoints under WORKDIR/checkpoints: save asynchronously, keep the latest K plus the best,
verify, and resume from the latest good one.

Each checkpoint holds three items: `state` (params, optimizer state, step, RNG), `data` (each
process's data-iterator position) and `meta` (tokens seen, evaluation metrics, early-stopping state,
the resolved config). Orbax finalises a step atomically (a rename locally, a commit file on cloud
storage), so a save killed half-way is never listed. After a save is final, process 0 writes
`lmtrain_checksums.json` (xxh3-128 of every file); resume checks it and falls back to the previous
checkpoint, with a warning, when a file is missing, truncated or changed.

The best checkpoint is tracked by Orbax's metrics, which it writes to disk only when `best_fn` is
set: that is what lets the best survive a restart.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import xxhash
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from lmtrain.errors import ConfigError
from lmtrain.paths import as_path, files_under
from lmtrain.storage.atomic import atomic_write_text
from lmtrain.tasks.base import default_mode
from lmtrain.train.disk_full import is_disk_full
from lmtrain.train.state import _path_keys
from lmtrain.trees import nest_keys

ITEMS = ("state", "data", "meta")


class _QuietOrbax(logging.Filter):
    """Orbax logs these on every save without metrics and every read-only open; they are expected here."""

    EXPECTED = ("did not provide metrics", "read_only=True", "Given directory is read only",
                "Metadata file does not exist")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in self.EXPECTED)


def _quiet_expected_orbax_notices() -> None:
    """Drop the notices `_QuietOrbax` lists. Called where lmtrain first opens an Orbax checkpointer, not at import:
    importing a library module changes no logging state."""
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _QuietOrbax) for f in absl_logger.filters):
        absl_logger.addFilter(_QuietOrbax())


CHECKSUMS = "lmtrain_checksums.json"
DAMAGED_SUFFIX = ".damaged"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's name for a step being written: <step>.orbax-checkpoint-tmp-<time>


class CheckpointError(ConfigError):
    """A checkpoint that cannot be written or read; the message names it and says what to do."""


def warn(message: str) -> None:
    if jax.process_index() == 0:
        print(f"lmtrain: warning: {message}", file=sys.stderr, flush=True)


class ProcessDataStateHandler(ocp.CheckpointHandler):
    """Each process writes its own data-iterator state, `process_I-of-N.json`, into the `data` item.

    Hosts read different rows, so their iterator positions differ; resuming with another process
    count is refused with a message rather than silently re-reading data.
    """

    def save(self, directory: epath.Path, args: ProcessDataStateSave) -> None:
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (directory / name).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: ProcessDataStateRestore | None = None) -> dict:
        path = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not path.exists():
            found = sorted(p.name for p in directory.iterdir())
            raise CheckpointError(
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


def checkpoint_dir(workdir) -> epath.Path:
    return as_path(workdir) / "checkpoints"


# ---------------------------------------------------------------------------------------------- checksums


# Orbax's own bookkeeping, rewritten when it publishes a step (after the table is written): not hashed.
UNHASHED = (CHECKSUMS, "_CHECKPOINT_METADATA", "commit_success.txt")


def _files(step_dir: epath.Path) -> list[tuple[str, epath.Path]]:
    return [(name, path) for name, path in files_under(step_dir) if name not in UNHASHED]


def _hash_file(path: epath.Path) -> str:
    h = xxhash.xxh3_128()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(step_dir: epath.Path) -> None:
    """Hash every file of a finished checkpoint; written last, so its presence means 'all hashed'."""
    step_dir = as_path(step_dir)
    table = {name: {"xxh3_128": _hash_file(p), "bytes": p.stat().length} for name, p in _files(step_dir)}
    atomic_write_text(step_dir / CHECKSUMS, json.dumps({"files": table}, indent=1, sort_keys=True))


def _names_a_file_inside(name) -> bool:
    """A relative name without '..' (what write_checksums writes), so that it cannot lead out of the directory."""
    if not isinstance(name, str) or not name or name.startswith(("/", "\\")):
        return False
    return ".." not in posixpath.normpath(name.replace("\\", "/")).split("/")


def verify_checksums(step_dir: epath.Path) -> str | None:
    """None when every listed file is present and unchanged; else what is wrong (the first problem)."""
    step_dir = as_path(step_dir)
    path = step_dir / CHECKSUMS
    if not path.exists():
        return None  # saved by a run that stopped before hashing: accepted as it is
    try:
        table = json.loads(path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
        return f"{path} is unreadable"
    for name, want in sorted(table.items()):
        if not _names_a_file_inside(name):  # the table is a file on disk: it must not lead out of the step
            return f"{path} lists '{name}', which is not a file inside {step_dir}"
        file = step_dir / name
        if not file.exists():
            return f"{file} is missing"
        size = file.stat().length
        if size != want["bytes"]:
            return f"{file} has {size} bytes, {want['bytes']} were written"
        if _hash_file(file) != want["xxh3_128"]:
            return f"{file} has changed since it was written (checksum mismatch)"
    return None


def _agree(value: int) -> int:
    """Process 0's value on every process."""
    if jax.process_count() == 1:
        return value
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


# ---------------------------------------------------------------------------------------------- the manager


@dataclasses.dataclass
class Restored:
    step: int
    state: dict
    data_state: dict
    meta: dict


class Checkpointer:
    def __init__(self, workdir, keep: int = 2, async_save: bool = True, best_metric: str = "val_loss",
                 best_mode: str = "min", checksums: bool = True):
        self.directory = checkpoint_dir(workdir)
        self.best_metric, self.best_mode = best_metric, best_mode
        self.checksums = checksums
        self._unhashed: list[int] = []
        self._in_flight: int | None = None  # the step of the latest save (asynchronous: maybe not final yet)
        preservation = policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=keep),
                # BestN sorts ascending and keeps the last n: reverse=True keeps the lowest for 'min'.
                policies.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min", n=1,
                               keep_checkpoints_without_metrics=False),
            ]
        )
        async_options = ocp.AsyncOptions(post_finalization_callback=self._after_finalize) if async_save else None
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            preservation_policy=preservation,
            # Orbax writes metrics to disk, and reloads them after a restart, only when best_fn is set.
            best_fn=lambda m: m[best_metric],
            best_mode=best_mode,
            create=True,
            cleanup_tmp_directories=True,
            async_options=async_options,
        )
        _quiet_expected_orbax_notices()
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    # -- saving

    def _after_finalize(self) -> None:
        """Runs once a save's files are all written (in Orbax's background thread when saving asynchronously).

        Orbax calls this before it publishes the step: locally the files are still in
        `<step>.orbax-checkpoint-tmp-<time>`, renamed afterwards (on gs:// they are already under `<step>`).
        So the table is written into whichever directory holds the step now, and is published with it.
        """
        pending, self._unhashed = self._unhashed, []
        if not self.checksums or jax.process_index() != 0:
            return
        for step in pending:
            step_dir = self._directory_being_saved(step)
            if step_dir is not None:
                write_checksums(step_dir)

    def _directory_being_saved(self, step: int) -> epath.Path | None:
        final = self.directory / str(step)
        if final.exists():
            return final
        prefix = f"{step}{TMP_SUFFIX}"
        tmps = sorted((p for p in self.directory.iterdir() if p.name.startswith(prefix)),
                      key=lambda p: p.name[len(prefix):].lstrip("-").zfill(20))
        return tmps[-1] if tmps else None  # the newest: older ones are stale saves, cleaned up at start

    def save(self, step: int, state: dict, data_state: dict, meta: dict, metrics: dict | None = None) -> None:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ProcessDataStateSave(data_state), meta=ocp.args.JsonSave(meta)
        )
        if metrics is not None and self.best_metric not in metrics:
            metrics = None
        # The previous save's hashing runs in Orbax's thread until its save is final: wait for it, so that
        # it cannot take this step (whose files do not exist yet) off the list. Its error names its step.
        self.wait()
        try:
            self._unhashed.append(step)
            self._in_flight = step
            self.manager.save(step, args=args, metrics=metrics, force=True)
            if not self.manager._options.enable_async_checkpointing:  # noqa: SLF001
                self._after_finalize()
        except Exception as e:  # noqa: BLE001 - a full disk is a user's problem with a clear fix
            self._raise_if_disk_full(e, step)
            raise

    def _raise_if_disk_full(self, error: BaseException, step: int | None) -> None:
        if is_disk_full(error):
            kept = [s for s in self.steps() if step is None or s != step]
            raise CheckpointError(
                f"the disk is full: saving checkpoint {step if step is not None else ''} in {self.directory} failed "
                f"(No space left on device). The earlier checkpoints {kept} are kept and intact. Free space (or "
                "lower checkpoint.keep) and run the same command to resume from the latest of them."
            ) from None

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._raise_if_disk_full(e, self._in_flight)
            raise

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()

    # -- listing and restoring

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _set_aside(self, step: int, problem: str) -> None:
        """Move a damaged checkpoint out of Orbax's view (kept for inspection, never deleted)."""
        if jax.process_index() == 0:
            src = self.directory / str(step)
            dst = self.directory / f"{step}{DAMAGED_SUFFIX}-{int(time.time())}"
            warn(f"checkpoint {src} is damaged ({problem}); it is moved to {dst.name} and the previous "
                 "checkpoint is used instead.")
            src.rename(dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"lmtrain_set_aside_{step}")
        self.manager.reload()

    def restore_latest(self, abstract_state: dict) -> Restored | None:
        """The latest checkpoint that verifies and loads; damaged ones are set aside with a warning."""
        while True:
            steps = self.steps()
            if not steps:
                return None
            step = steps[-1]
            problem = verify_checksums(self.directory / str(step)) if jax.process_index() == 0 else None
            if _agree(problem is not None):
                self._set_aside(step, problem or "its checksums do not match on process 0")
                continue
            mismatch = self._layout_mismatch(step, abstract_state)
            if mismatch:  # not damage: this config builds another state; setting the step aside would lose it
                raise CheckpointError(
                    f"checkpoint {self.directory / str(step)} holds a different training state than this config "
                    f"builds ({mismatch}). Resume with the config it was trained with (its config.json), or use a "
                    "new --workdir with --config.train.init_from=THIS_WORKDIR to start from its weights.")
            try:
                return self._restore(step, abstract_state)
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - the layout matches, so any read failure is damage (Orbax raises bare Exception)
                if jax.process_count() > 1:
                    raise CheckpointError(f"checkpoint {self.directory / str(step)} could not be read ({e}). "
                                          "Move it out of the checkpoints directory and run again.") from None
                self._set_aside(step, f"reading it failed: {str(e).splitlines()[0][:200]}")

    def _layout_mismatch(self, step: int, abstract_state: dict) -> str | None:
        """What differs between the arrays stored in `step` and `abstract_state` (paths and shapes), or None.
        Unreadable metadata counts as no mismatch: it is damage, which the restore finds."""
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        absl_logger.setLevel(logging.ERROR)  # Orbax warns that the item has no step metadata of its own
        try:
            stored = stored_leaves(self.directory / str(step) / "state", None)
        except Exception:  # noqa: BLE001
            return None
        finally:
            absl_logger.setLevel(level)
        want = {_path_keys(k): tuple(v.shape) for k, v in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
        diffs = [f"{'/'.join(map(str, k))}: stored {stored.get(k)}, expected {want.get(k)}"
                 for k in sorted(set(want) | set(stored), key=str) if stored.get(k) != want.get(k)]
        return "; ".join(diffs[:3]) + (f" and {len(diffs) - 3} more" if len(diffs) > 3 else "") if diffs else None

    def _restore(self, step: int, abstract_state: dict) -> Restored:
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ProcessDataStateRestore(), meta=ocp.args.JsonRestore()
        )
        out = self.manager.restore(step, args=args)
        return Restored(step, out["state"], out["data"], out["meta"])

    def read_meta(self, step: int) -> dict:
        path = self.directory / str(step) / "meta" / "metadata"
        return json.loads(path.read_text()) if path.exists() else {}


# ---------------------------------------------------------------------------------------------- reading a WORKDIR


def read_meta(workdir, step: int) -> dict:
    path = checkpoint_dir(workdir) / str(step) / "meta" / "metadata"
    return json.loads(path.read_text()) if path.exists() else {}


def best_rule(workdir) -> tuple[str, str]:
    """The metric and direction that define 'best' in this WORKDIR (from its config.json)."""
    path = as_path(workdir) / "config.json"
    try:
        es = json.loads(path.read_text())["train"]["early_stopping"]
        metric, mode = es.get("metric", "val_loss"), es.get("mode", "")
    except (OSError, KeyError, json.JSONDecodeError, TypeError):
        metric, mode = "val_loss", ""
    if not mode:
        mode = default_mode(metric)
    return metric, mode


def select_step(workdir, which: str | int = "latest") -> int:
    """A complete checkpoint step of WORKDIR: 'latest', 'best' (by the run's early_stopping metric) or a number."""
    directory = checkpoint_dir(workdir)
    steps = []
    if directory.exists():
        _quiet_expected_orbax_notices()
        manager = ocp.CheckpointManager(directory, item_names=ITEMS,
                                        options=ocp.CheckpointManagerOptions(read_only=True))
        steps = sorted(manager.all_steps())
        manager.close()
    if not steps:
        raise CheckpointError(f"{directory} holds no complete checkpoint; train first.")
    if which == "latest":
        return steps[-1]
    if which == "best":
        metric, mode = best_rule(workdir)
        scored = []
        for s in steps:
            value = (read_meta(workdir, s).get("eval") or {}).get(metric)
            if value is None and metric == "val_loss":
                value = read_meta(workdir, s).get("val_loss")
            if value is not None:
                scored.append((value if mode == "min" else -value, s))
        if not scored:
            raise CheckpointError(f"no checkpoint in {directory} has the metric '{metric}'; use 'latest' or a step.")
        return min(scored)[1]
    step = int(which)
    if step not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {directory}; it has steps {steps}.")
    return step


def restore_tree(path: epath.Path, target: dict, item: str | None = None) -> dict:
    """Restore `target` (ShapeDtypeStructs with shardings) from a PyTree checkpoint, reading only its leaves."""
    restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, dtype=t.dtype), target)
    item_tree = {item: target} if item else target
    args_tree = {item: restore_args} if item else restore_args
    _quiet_expected_orbax_notices()
    with ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=item_tree, restore_args=args_tree,
                                                                    partial_restore=True))
    return restored[item] if item else restored


def save_init_params(workdir, params: dict) -> epath.Path:
    """Write params to WORKDIR/init_params (what `lmtrain import` produces, what train.init_from reads)."""
    path = as_path(workdir) / "init_params"
    _quiet_expected_orbax_notices()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params)
    return path


def stored_leaves(path: epath.Path, item: str | None) -> dict[tuple, tuple]:
    """{path tuple: shape} of the arrays stored in a PyTree checkpoint (optionally under `item`)."""
    _quiet_expected_orbax_notices()
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(path)
    tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", None) or meta
    if hasattr(tree, "tree"):
        tree = tree.tree
    if item:
        tree = tree[item]
    out = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in keypath)
        out[keys] = tuple(getattr(leaf, "shape", ()) or ())
    return out


def load_init_params(spec: str, target: dict, which: str | int = "latest", vocab_size: int = 0,
                     logical_axes: dict | None = None) -> tuple[dict, list[str], list[str]]:
    """Parameters to start from: `lmtrain import`'s init_params directory, or a WORKDIR's checkpoint.

    Every parameter of `target` (ShapeDtypeStructs with shardings) that the source holds with the same
    shape is read; the rest keep their fresh initialisation (a new classification head on a language
    model, for example). Returns (params read, paths left fresh, source paths not used).

    With `vocab_size` and the model's `logical_axes`: a source with a smaller vocabulary (a tokenizer
    extended by shard_data --add-special-tokens) has its embedding and untied head grown along the
    vocab axis, each new row the mean of the source's rows, as transformers' resize_token_embeddings does.
    """
    path = as_path(spec)
    source_vocab = _source_vocab_size(path)
    if not path.exists():
        raise CheckpointError(f"train.init_from={spec}: no such directory.")
    item = None
    if (path / "checkpoints").exists() and any(p.name.isdigit() for p in (path / "checkpoints").iterdir()):
        step = select_step(path, which)  # a WORKDIR: its latest, best or numbered checkpoint
        path, item = checkpoint_dir(path) / str(step) / "state", "params"
    elif (path / "init_params").exists():  # a WORKDIR written by `lmtrain import`
        path = path / "init_params"
    stored = stored_leaves(path, item)
    flat_target = {tuple(getattr(k, "key", k) for k in kp): leaf
                   for kp, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
    grow = _vocab_growth(flat_target, stored, logical_axes, source_vocab, vocab_size)
    usable = {k: v for k, v in flat_target.items() if stored.get(k) == tuple(v.shape) or k in grow}
    if not usable:
        raise CheckpointError(f"train.init_from={spec}: none of its parameters fits this model "
                              "(different names or shapes). Check model.* against the source's config.json.")
    fresh = sorted("/".join(map(str, k)) for k in flat_target if k not in usable)
    unused = sorted("/".join(map(str, k)) for k in stored if k not in flat_target)
    as_stored = {k: jax.ShapeDtypeStruct(stored[k], v.dtype, sharding=_replicated(v.sharding)) if k in grow else v
                 for k, v in usable.items()}
    params = restore_tree(path, nest_keys(as_stored), item)
    for keys, axis in grow.items():
        leaf = params
        for key in keys[:-1]:
            leaf = leaf[key]
        leaf[keys[-1]] = _grown(leaf[keys[-1]], axis, source_vocab, vocab_size, flat_target[keys])
    return params, fresh, unused


def _source_vocab_size(path: epath.Path) -> int:
    """model.vocab_size of an init_from source (its WORKDIR's config.json), 0 when it has none."""
    for config in (path / "config.json", path.parent / "config.json" if path.name == "init_params" else None):
        if config is not None and config.is_file():
            try:
                return int(json.loads(config.read_text())["model"]["vocab_size"])
            except (ValueError, KeyError, TypeError):
                return 0
    return 0


def _vocab_growth(flat_target: dict, stored: dict, logical_axes: dict | None, source_vocab: int,
                  vocab_size: int) -> dict[tuple, int]:
    """{path: vocab axis} of the parameters to grow: over the vocab, stored for a smaller vocabulary."""
    if not logical_axes or not 0 < source_vocab < vocab_size:
        return {}
    axes = {tuple(getattr(k, "key", k) for k in kp): names for kp, names in
            jax.tree_util.tree_flatten_with_path(logical_axes, is_leaf=lambda x: isinstance(x, tuple))[0]}
    grow = {}
    for keys, leaf in flat_target.items():
        names, shape = axes.get(keys, ()), stored.get(keys)
        if "vocab" in names and shape is not None and len(shape) == len(leaf.shape):
            axis = names.index("vocab")
            same_elsewhere = all(a == b for i, (a, b) in enumerate(zip(shape, leaf.shape)) if i != axis)
            if same_elsewhere and shape[axis] >= source_vocab:
                grow[keys] = axis
    return grow


def _replicated(sharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()) if isinstance(
        sharding, jax.sharding.NamedSharding) else sharding


def _grown(array, axis: int, source_vocab: int, vocab_size: int, target: jax.ShapeDtypeStruct):
    """`array`'s first source_vocab rows (along `axis`), then rows up to vocab_size that are their mean, then
    zeros to the target's padded size."""
    old = np.moveaxis(np.asarray(array.addressable_data(0)), axis, 0)[:source_vocab]
    rows = np.zeros((target.shape[axis], *old.shape[1:]), old.dtype)
    rows[:source_vocab] = old
    rows[source_vocab:vocab_size] = old.astype(np.float32).mean(axis=0).astype(old.dtype)
    full = np.moveaxis(rows, 0, axis)
    return jax.make_array_from_callback(target.shape, target.sharding, lambda index: full[index])
