"""A Hugging Face model directory as lmtrain reads it: its config.json, the family and lmtrain `model.*` fields it
implies, and host arrays placed on the devices. Shared by `lmtrain import` (hf_import) and `lmtrain import
--adapter` (lora_import); no code from the directory is ever run.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from etils import epath

from lmtrain.interop.families import Family, HFConfig, HFInteropError, classifier_labels, family_for_hf_config
from lmtrain.paths import as_path


def read_json(path: epath.Path, what: str = "a JSON object") -> dict:
    """A JSON object from a user's file; anything else is an HFInteropError naming the file."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise HFInteropError(f"{path} does not exist.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFInteropError(f"{path}: not valid JSON ({e}). Restore the file (re-download or re-save it).") from None
    if not isinstance(value, dict):
        raise HFInteropError(f"{path}: holds a JSON {type(value).__name__}, not {what}. Restore the file.")
    return value


def read_hf_config(hf_dir: epath.Path) -> HFConfig:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise HFInteropError(f"{hf_dir} has no config.json; point lmtrain at a Hugging Face model directory.")
    return HFConfig(read_json(path, "a model configuration (an object)"), str(path))


def hf_model_dir(hf_dir: str | os.PathLike) -> epath.Path:
    path = as_path(hf_dir)
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise HFInteropError(f"{path} {what}; point lmtrain at a Hugging Face model directory (config.json and "
                             "model.safetensors).")
    return path


def model_config_from_hf(hf_dir: str | os.PathLike, param_dtype: str = "float32") -> tuple[
        Family, dict, list[str]]:
    """(family, lmtrain `model.*` fields, notes) for the HF model in `hf_dir`."""
    hf_dir = hf_model_dir(hf_dir)
    hf = read_hf_config(hf_dir)
    family = family_for_hf_config(hf, hf.source)
    hf.family = family.name
    fields, notes = family.config_to_lm(hf)
    if family.is_classifier(hf):
        fields.update(head="classify", num_labels=len(classifier_labels(hf)))
    fields["param_dtype"] = param_dtype
    return family, fields, notes


def place(host: np.ndarray, sharding) -> jax.Array:
    """Each device (of this host) gets only its slice of `host`."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
