"""What `lmtrain export` and `lmtrain export --adapter` share: the dtypes they write, gathering one tensor at a
time from the devices, and the export target (refused, recovered and published whole by every process alike).

Every process takes part in gathering a tensor spread over several hosts; process 0 writes.
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import ml_dtypes
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from lmtrain.interop.families import HFInteropError
from lmtrain.storage.publish import Publisher, is_link

# --dtype -> (numpy dtype, safetensors code)
DTYPES = {"float32": (np.float32, "F32"), "bfloat16": (ml_dtypes.bfloat16, "BF16"), "float16": (np.float16, "F16")}
# Written last: an export directory without one is unfinished (the rule object stores rely on). A model export
# writes config.json last, a PEFT adapter export (--adapter) its adapter_config.json.
COMPLETE_MARKER, ADAPTER_MARKER = "config.json", "adapter_config.json"
PUBLISHER = Publisher(markers=(COMPLETE_MARKER, ADAPTER_MARKER), name="export", tool="lmtrain export")


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise HFInteropError(f"--dtype={dtype}: choose one of {', '.join(DTYPES)}.")


# ---------------------------------------------------------------------------------------------- tensors


@functools.cache
def _replicator(mesh):
    # One compiled identity per mesh, not one per tensor: it gathers a tensor spread over several hosts.
    return jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, PartitionSpec()))


def to_host(x: jax.Array) -> np.ndarray:
    """A whole array on this host; arrays spread over several hosts are gathered first (every process calls this)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(_replicator(x.sharding.mesh)(x).addressable_data(0))


@jax.jit
def _take_layer(stacked_LxN: jax.Array, layer: jax.Array) -> jax.Array:
    # The layer index is traced: one compilation per parameter shape, not one per (parameter, layer).
    return jax.lax.dynamic_index_in_dim(stacked_LxN, layer, 0, keepdims=False)


def layer_of(value, layer: int | None):
    """One layer of a stacked block parameter (the whole value for layer None), left on the devices."""
    if layer is None:
        return value
    return value[layer] if isinstance(value, np.ndarray) else _take_layer(value, np.int32(layer))


# ---------------------------------------------------------------------------------------------- the target


def new_staging_dir(out_dir: epath.Path) -> epath.Path:
    """A fresh hidden sibling of OUT_DIR to write an export into before it is published whole."""
    try:
        return PUBLISHER.staging_dir(out_dir)
    except OSError as e:
        staging = e.filename or "a staging directory"
        raise HFInteropError(f"cannot create {staging} next to {out_dir} ({e.strerror or e}); export into a "
                             "directory whose parent you can write.") from None


def recover_interrupted_export(out: epath.Path) -> list[str]:
    """Undo what a killed export left next to `out` (see lmtrain.storage.publish); returns what was done."""
    return PUBLISHER.recover(out)


def refuse_a_link(out: epath.Path) -> None:
    """A symbolic link as OUT is refused: publishing renames directories, which would replace the link itself (not
    what it points to) with the export."""
    if is_link(out):
        target = os.path.realpath(str(out))
        raise HFInteropError(f"{out} is a symbolic link (to {target}); export into {target} itself, or into a new "
                             "directory.")


def check_target(out: epath.Path, force: bool) -> None:
    """Refuse an OUT whose contents an export would destroy: a file, a non-empty directory without --force, or
    (even with --force) a directory that is not an earlier export."""
    if out.exists() and not out.is_dir():
        raise HFInteropError(f"{out} is a file; give lmtrain export a directory to create (or an empty one).")
    if not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
    if not force:
        raise HFInteropError(
            f"{out} is not empty ({shown}); choose a new directory, or pass --force to replace it (the old "
            "contents are kept until the new export is complete)."
        )
    subdirs = [n for n in entries if (out / n).is_dir()]
    if subdirs or not set(PUBLISHER.markers) & set(entries):
        why = f"it holds directories ({', '.join(subdirs[:3])})" if subdirs else "it has no config.json"
        raise HFInteropError(
            f"{out} does not look like an earlier model export ({why}); --force replaces only a directory of "
            "exported files. Export into a new directory and copy what you need."
        )


def agree_on_target(out: epath.Path, force: bool) -> None:
    """Process 0 checks the target; every process raises if it refused, before any of them starts gathering."""
    error = ""
    if jax.process_index() == 0:
        try:
            refuse_a_link(out)
            for note in recover_interrupted_export(out):
                print(f"lmtrain export: note: {note}", file=sys.stderr)
            check_target(out, force)
        except HFInteropError as e:
            error = str(e)
    if jax.process_count() > 1:
        refused = multihost_utils.broadcast_one_to_all(np.int32(bool(error)))
        if refused and not error:
            error = f"process 0 refused the export target {out}; see its message."
    if error:
        raise HFInteropError(error)
