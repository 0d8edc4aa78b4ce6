"""`lmtrain import HF_BASE_DIR WORKDIR --adapter PEFT_DIR`: a PEFT LoRA adapter continues training in lmtrain.

The base model's weights become WORKDIR/init_params as in a plain import; the adapter's lora_A/lora_B join them as
the LoRA parameters, and its r, lora_alpha, lora_dropout and target_modules become model.lora_*. Training then
freezes the base and trains the adapters from where PEFT left them.

Everything is checked before a file is written: a PEFT method other than plain LoRA (DoRA, trained biases, layer
subsets), a target that matches no projection lmtrain can adapt, a tensor that fits no module of the base, ranks
or scales that differ between modules (lmtrain trains one rank and one alpha). PEFT's modules_to_save (a
classifier head) replace the base's tensors and train fully.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import jax
import numpy as np
from etils import epath

from lmtrain.interop.families import Family, HFInteropError, TensorRule
from lmtrain.interop.hf_model import model_config_from_hf, place, read_json
from lmtrain.interop.lora_export import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    FUSED_METADATA,
    PEFT_PREFIX,
    PROJECTIONS,
    SOURCE_ADAPTER_CONFIG,
    TARGETS,
    Projection,
    module_names,
    projections,
)
from lmtrain.model.adapters import ADAPTERS
from lmtrain.model.layers import ModelConfig
from lmtrain.model.transformer import ModelDef
from lmtrain.paths import as_path
from lmtrain.storage.safetensors import SafetensorsReader
from lmtrain.trees import flat_paths, nest_paths

LORA = ADAPTERS["lora"]  # PEFT's LoRA layout is what this reader converts (its peft_type and tensor names)

# adapter_config.json settings that change what the adapter computes in ways lmtrain's LoRA does not reproduce:
# (key, the value(s) lmtrain reproduces, what to do).
_UNSUPPORTED = (
    ("use_dora", (False, None), "DoRA adapters have a magnitude vector lmtrain's LoRA does not have"),
    ("bias", ("none", None), "the adapter trained the base model's biases"),
    ("lora_bias", (False, None), "the adapter has biases on lora_B"),
    ("layers_to_transform", (None, []), "the adapter covers only some layers; lmtrain adapts every block"),
    ("layers_pattern", (None, [], ""), "the adapter covers only some layers; lmtrain adapts every block"),
    ("exclude_modules", (None, [], ""), "the adapter excludes some modules; lmtrain adapts every block alike"),
    ("target_parameters", (None, []), "the adapter targets parameters rather than modules"),
    ("trainable_token_indices", (None, {}, []), "the adapter trains some token embeddings"),
    ("layer_replication", (None, []), "the adapter replicates layers"),
    ("use_qalora", (False, None), "QA-LoRA pools its inputs"),
    ("alora_invocation_tokens", (None, []), "activated LoRA applies only after invocation tokens"),
)


def _matches(targets, name: str) -> bool:
    """PEFT's rule: a string target_modules is a full-match regex; a list entry matches a name or a dotted suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _pattern_value(patterns: dict, name: str, default):
    """rank_pattern / alpha_pattern as PEFT reads them: the first key that matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


@dataclasses.dataclass
class PeftAdapter:
    """A PEFT LoRA adapter, checked against a base model and converted to lmtrain's layout (host arrays)."""

    directory: epath.Path
    config: dict
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]
    lora: dict[str, tuple[np.ndarray, np.ndarray]]  # 'blocks/attn/wq' -> (A [L, in..., r], B [L, r, out...])
    saved: dict[str, np.ndarray]  # modules_to_save: lmtrain parameter path -> value (replaces the base's)
    notes: list[str]

    def configure(self, cfg) -> None:
        """Set model.lora_* (and train the modules_to_save) in an lmtrain config."""
        cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_dropout = self.rank, self.alpha, self.dropout
        cfg.model.lora_targets = self.targets
        cfg.model.adapter = LORA.name
        if self.saved:
            cfg.optimizer.param_rules = tuple(cfg.optimizer.param_rules) + tuple(
                (f"^{re.escape(p)}$", "train") for p in sorted(self.saved))

    def add_to(self, params: dict, model_cfg: ModelConfig, shardings: dict) -> dict:
        """`params` (the base's, possibly sharded) with the adapters added and the modules_to_save replaced."""
        shapes = flat_paths(ModelDef(model_cfg).shapes)
        flat_shardings = flat_paths(shardings)
        flat = flat_paths(params)
        for path, (a, b) in self.lora.items():
            parent, name = path.rsplit("/", 1)
            for factor, value in (("a", a), ("b", b)):
                key = f"{parent}/{model_cfg.adapter_method.prefix}{name}/{factor}"
                if shapes[key].shape != value.shape:  # a conversion bug, not the user's input
                    raise AssertionError(f"{key}: built {value.shape}, the model wants {shapes[key].shape}")
                flat[key] = place(value.astype(shapes[key].dtype), flat_shardings[key])
        for path, value in self.saved.items():
            flat[path] = place(value.astype(shapes[path].dtype), flat_shardings[path])
        if sorted(flat) != sorted(shapes):
            raise AssertionError(f"adapter import built {sorted(set(flat) ^ set(shapes))} wrongly")
        return nest_paths(flat)


def read_peft_adapter(adapter_dir: str | os.PathLike, hf_dir: str | os.PathLike) -> PeftAdapter:
    """Read and check the PEFT adapter in `adapter_dir` against the HF base model in `hf_dir`."""
    directory = as_path(adapter_dir)
    if not directory.is_dir():
        raise HFInteropError(f"--adapter {directory}: no such directory; give a PEFT adapter directory "
                             f"({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}).")
    config_path, weights = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise HFInteropError(f"{directory} has no {ADAPTER_CONFIG}; is it a PEFT adapter directory?")
    if not weights.is_file():
        pickle = " (it has adapter_model.bin, a pickle, which lmtrain never opens: re-save the adapter with " \
                 "safe_serialization=True)" if (directory / "adapter_model.bin").exists() else ""
        raise HFInteropError(f"{directory} has no {ADAPTER_WEIGHTS}{pickle}.")
    config = read_json(config_path, "a PEFT adapter configuration (an object)")
    where = str(config_path)
    if config.get("peft_type") != LORA.peft.peft_type:  # the adapter method this reader converts
        raise HFInteropError(f"{where}: peft_type is {config.get('peft_type')!r}; lmtrain imports LoRA adapters "
                             "(peft_type 'LORA').")
    for key, allowed, why in _UNSUPPORTED:
        if config.get(key) not in allowed:
            raise HFInteropError(f"{where}: {key}={config[key]!r}: {why}, which lmtrain does not reproduce. Import a "
                                 f"plain LoRA adapter ({key}={allowed[0]!r}).")
    r, alpha = config.get("r"), config.get("lora_alpha")
    dropout = config.get("lora_dropout") or 0.0
    for key, value in (("r", r), ("lora_alpha", alpha)):
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise HFInteropError(f"{where}: {key}={value!r}; it must be a positive number.")
    if not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise HFInteropError(f"{where}: lora_dropout={dropout!r}; it must be in [0, 1).")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            raise HFInteropError(f"{where}: target_modules {targets!r} is not a regular expression ({e}).") from None
    elif not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        raise HFInteropError(f"{where}: target_modules={targets!r}; it must name the adapted modules (a list such "
                             "as [\"q_proj\", \"v_proj\"], or a regular expression).")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}

    family, fields, _ = model_config_from_hf(hf_dir)
    cfg = ModelConfig.from_config(fields)
    projs = projections(cfg, family)  # a family without LoRA names is an error here
    matched = _matched_projections(cfg, family, projs, targets, where)

    reader = SafetensorsReader([weights], error=HFInteropError)
    names = {n[len(PEFT_PREFIX):] if n.startswith(PEFT_PREFIX) else n: n for n in reader.names()}
    used: set[str] = set()

    def tensor(module_tensor: str) -> np.ndarray | None:
        """A tensor by its HF name, whether or not the adapter was trained with the base model's prefix."""
        for candidate in (module_tensor, module_tensor.removeprefix(family.base_prefix), family.base_prefix + module_tensor):
            if candidate in names:
                used.add(names[candidate])
                return np.asarray(reader.read(names[candidate]), np.float32)
        return None

    fused_parts = json.loads(reader.metadata(weights).get(FUSED_METADATA, "{}"))
    lora: dict[str, tuple[list, list]] = {}
    scales: dict[str, tuple[int, float]] = {}  # module -> (rank per part, scale)
    use_rslora = bool(config.get("use_rslora"))
    for proj in matched:
        module_r = _pattern_value(rank_pattern, proj.module.format(i=0), r)
        module_alpha = _pattern_value(alpha_pattern, proj.module.format(i=0), alpha)
        scale = module_alpha / (math.sqrt(module_r) if use_rslora else module_r)
        outs = [math.prod(factor_dims(cfg, t)[1]) for t in proj.targets]
        want_in = math.prod(factor_dims(cfg, proj.targets[0])[0])
        for layer in range(cfg.n_layers):
            name = proj.name(layer)
            a_name, b_name = (f"{name}.{suffix}" for suffix in LORA.peft.tensor_names)
            a, b = tensor(a_name), tensor(b_name)
            if a is None or b is None:
                raise HFInteropError(f"{weights}: tensor '{PEFT_PREFIX}{a_name if a is None else b_name}' "
                                     f"is missing; target_modules in {ADAPTER_CONFIG} adapts {name}.")
            if a.ndim != 2 or b.ndim != 2 or a.shape != (module_r, want_in) or b.shape != (sum(outs), module_r):
                raise HFInteropError(
                    f"{weights}: {name} has lora_A {list(a.shape)} and lora_B {list(b.shape)}; the base model and "
                    f"{ADAPTER_CONFIG} (r={module_r}) imply [{module_r}, {want_in}] and [{sum(outs)}, {module_r}]. "
                    "Check that the adapter was trained on this base model.")
            parts = _split(proj, a, b, outs, fused_parts.get(proj.module))
            for target, (pa, pb) in parts.items():
                path = proj.rule.lm[proj.targets.index(target)]
                lora.setdefault(path, ([], []))
                lora[path][0].append(pa)
                lora[path][1].append(pb)
                scales[path] = (pa.shape[0], scale)

    saved = _modules_to_save(cfg, family, config, tensor, where)
    extra = sorted(set(reader.names()) - used)
    if extra:
        raise HFInteropError(f"{weights}: tensor '{extra[0]}'" + (f" (and {len(extra) - 1} more)" if len(extra) > 1
                             else "") + f" belongs to no module that target_modules or modules_to_save name in this "
                             f"{family.name} base model; importing would lose it. Check that the adapter was trained "
                             "on this base model.")
    ranks = {rank for rank, _ in scales.values()}
    scale_values = sorted({s for _, s in scales.values()})
    if len(ranks) > 1 or not math.isclose(scale_values[0], scale_values[-1], rel_tol=1e-6):
        shown = ", ".join(f"{path}: r={rank}, alpha/r={s:g}" for path, (rank, s) in sorted(scales.items()))
        raise HFInteropError(f"{where}: lmtrain trains one rank and one scale (model.lora_rank, model.lora_alpha) for "
                             f"every target, and this adapter's differ ({shown}). Import an adapter with one r and "
                             "lora_alpha (no rank_pattern or alpha_pattern that changes alpha/r).")
    rank, scale = ranks.pop(), scale_values[0]
    notes = []
    if use_rslora:
        notes.append(f"use_rslora: the scale lora_alpha/sqrt(r) = {scale:g} is kept as model.lora_alpha = {scale * rank:g}"
                     f" with model.lora_rank = {rank}")
    order = {t: i for i, t in enumerate(TARGETS)}
    targets_lm = tuple(sorted({_target_of(p) for p in lora}, key=order.__getitem__))
    stacked = {}
    for path, (a_layers, b_layers) in lora.items():
        stacked[path] = _to_lmtrain(cfg, path, np.stack(a_layers), np.stack(b_layers))
    return PeftAdapter(directory, config, rank, scale * rank, float(dropout), targets_lm, stacked, saved, notes)


def _target_of(path: str) -> str:
    return PROJECTIONS[path]


def _matched_projections(cfg: ModelConfig, family: Family, projs: list[Projection], targets, where: str
                         ) -> list[Projection]:
    """The projections target_modules picks (in every block alike); anything else it picks is an error."""
    matched = []
    for proj in projs:
        hits = [_matches(targets, proj.name(layer)) for layer in range(cfg.n_layers)]
        if any(hits) and not all(hits):
            raise HFInteropError(f"{where}: target_modules {targets!r} adapts {proj.module} in some blocks only; lmtrain "
                                 "adapts every block alike.")
        if all(hits):
            matched.append(proj)
    leaves = {proj.module.format(i=layer) for proj in projs for layer in range(cfg.n_layers)}
    others = sorted(m.format(i=0) for m in module_names(cfg, family)
                    if _matches(targets, m.format(i=0)) and m.format(i=0) not in leaves)
    if others:
        raise HFInteropError(f"{where}: target_modules {targets!r} matches {others[0]}, which is not a projection "
                             "lmtrain can adapt (LoRA adapts q, k, v, o, gate, up and down). Remove it from "
                             "target_modules, or merge the adapter into the base in PEFT and import the merged model.")
    if not matched:
        names = sorted({p.module.split("{i}.")[-1] for p in projs})
        raise HFInteropError(f"{where}: target_modules {targets!r} matches no projection of this {family.name} base "
                             f"model (its projections: {', '.join(names)}). Check that the adapter belongs to this base.")
    return matched


def factor_dims(cfg: ModelConfig, target: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input dims, output dims) of a projection's lmtrain weight, after the layers axis: the dims of A and B."""
    d, f, hd = cfg.d_model, cfg.d_ff, cfg.resolved_head_dim
    return {"q": ((d,), (cfg.n_heads, hd)), "k": ((d,), (cfg.n_kv_heads, hd)), "v": ((d,), (cfg.n_kv_heads, hd)),
            "o": ((cfg.n_heads, hd), (d,)), "gate": ((d,), (f,)), "up": ((d,), (f,)), "down": ((f,), (d,))}[target]


def _split(proj: Projection, a: np.ndarray, b: np.ndarray, outs: list[int], recorded: list[str] | None
           ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(A [r, in], B [out, r]) per lmtrain target of one module. A fused projection that lmtrain exported (its parts
    recorded, B still block-diagonal) splits back into the original adapters; any other fused adapter gives each
    part the whole A and its rows of B, which is exact (each part's delta is B_part A) at the adapter's rank."""
    if len(proj.targets) == 1:
        return {proj.targets[0]: (a, b)}
    bounds = np.cumsum([0, *outs])
    rows = {t: slice(bounds[i], bounds[i + 1]) for i, t in enumerate(proj.targets)}
    if recorded and set(recorded) <= set(proj.targets) and a.shape[0] % len(recorded) == 0:
        r = a.shape[0] // len(recorded)
        cols = {t: slice(j * r, (j + 1) * r) for j, t in enumerate(recorded)}
        block_diagonal = all(not b[rows[t], cols[u]].any() for t in proj.targets for u in recorded if t != u)
        if block_diagonal:
            return {t: (a[cols[t]], b[rows[t], cols[t]]) for t in recorded}
    return {t: (a, b[rows[t]]) for t in proj.targets}


def _to_lmtrain(cfg: ModelConfig, path: str, a_layers: np.ndarray, b_layers: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's per-layer A [L, r, in] and B [L, out, r] as lmtrain's A [L, in dims..., r] and B [L, r, out dims...],
    shaped like the adapted weight's dims (the inverse of lora_export.peft_factors)."""
    n_layers, rank = a_layers.shape[:2]
    in_dims, out_dims = factor_dims(cfg, _target_of(path))
    return (np.ascontiguousarray(a_layers.transpose(0, 2, 1)).reshape(n_layers, *in_dims, rank),
            np.ascontiguousarray(b_layers.transpose(0, 2, 1)).reshape(n_layers, rank, *out_dims))


def _modules_to_save(cfg: ModelConfig, family: Family, config: dict, tensor, where: str) -> dict[str, np.ndarray]:
    """modules_to_save tensors as lmtrain parameters. PEFT lists names it may not find (a SEQ_CLS adapter lists
    both 'classifier' and 'score'), so only modules with tensors in the file count; those must be whole."""
    names = config.get("modules_to_save") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise HFInteropError(f"{where}: modules_to_save={names!r}; it must be a list of module names or null.")
    saved: dict[str, list] = {}
    rules: dict[str, tuple[TensorRule, int | None]] = {}
    for rule in family.rules(cfg):
        for layer in range(cfg.n_layers) if rule.per_layer else [None]:
            hf_name = rule.hf_name(layer)
            module = hf_name.rsplit(".", 1)[0]
            if not any(module.endswith(n) for n in names):  # PEFT's own test for modules_to_save
                continue
            value = tensor(hf_name)
            if value is None:
                continue
            rules[hf_name] = (rule, layer)
            for path, part in zip(rule.lm, rule.to_lm(value), strict=True):
                saved.setdefault(path, [None] * cfg.n_layers if rule.per_layer else [None])
                saved[path][layer or 0] = part
    out = {}
    for path, parts in saved.items():
        if any(p is None for p in parts):
            raise HFInteropError(f"{where}: modules_to_save holds {path} for some blocks only; lmtrain needs every "
                                 "block's tensor.")
        out[path] = np.stack(parts) if path.startswith("blocks/") else parts[0]
    return out


def write_source_config(adapter: PeftAdapter, workdir: epath.Path) -> None:
    """Keep the adapter's adapter_config.json in the WORKDIR (what `lmtrain export --adapter` names as the base)."""
    if jax.process_index() == 0:
        (workdir / SOURCE_ADAPTER_CONFIG).write_text(json.dumps(adapter.config, indent=2, sort_keys=True))
