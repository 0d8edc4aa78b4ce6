"""The trainer's data interface: a resumable per-host train iterator and deterministic validation batches.

Every source yields batch dicts from `packing.rows_to_batch` (inputs, targets, loss_mask,
segment_ids, positions), holding this host's rows of the global batch. Which rows those are is
given by (data_index, data_count), derived by the trainer from the batch sharding: hosts that hold
the same rows (a tensor axis across hosts) get the same data_index and read identical batches.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator

import numpy as np

from lmtrain.config import ConfigError
from lmtrain.data import packing
from lmtrain.data.cleaning import is_validation_doc
from lmtrain.data.tokenizer import eos_id, load_tokenizer, train_bpe_tokenizer
from lmtrain.paths import as_path


@dataclasses.dataclass
class DataBundle:
    train: Iterator[dict]  # with get_state() / set_state(dict)
    eval_batches: Callable[..., Iterator[dict]]  # (max_batches=0 for all, split="validation") -> batches
    tokenizer: object
    example_format: str = "text"  # text (lm), sft, chat (both the sft task), classify
    labels: list | None = None  # classify: the classes in class-id order (the manifest's)
    splits: tuple[str, ...] = ("train", "validation")  # what eval_batches can read besides train


# The task each example format trains (task.name in the config).
FORMAT_TASKS = {"text": "lm", "sft": "sft", "chat": "sft", "classify": "classify", "ner": "token_classify"}
# Tasks that train on another task's format: masked language modelling reads the language model's text.
SHARED_FORMATS = {"mlm": "text"}


class PackedRowsIterator:
    """Endless, shuffled batches over in-memory packed rows; the state is the number of batches served.

    Epoch e visits the rows in the permutation drawn from (seed, e). Data slice d of D takes rows
    [d * B/D, (d + 1) * B/D) of each global batch, matching jax.make_array_from_process_local_data.
    """

    def __init__(self, rows: dict[str, np.ndarray], global_batch: int, seed: int, data_index: int, data_count: int):
        packing.check_data_slice(global_batch, data_index, data_count)
        self.rows = rows
        self.n_rows = len(rows["tokens"])
        if self.n_rows < global_batch:
            raise ConfigError(
                f"data: only {self.n_rows} training sequences, fewer than data.batch_size={global_batch}. "
                "Lower data.batch_size or data.seq_len, or add data."
            )
        self.global_batch, self.seed = global_batch, seed
        self.local_batch = global_batch // data_count
        self.host_offset = data_index * self.local_batch
        self.batches_per_epoch = self.n_rows // global_batch
        self.step = 0
        self._perm_epoch, self._perm = -1, None

    @property
    def epoch(self) -> int:
        return self.step // self.batches_per_epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
            self._perm_epoch = epoch
        return self._perm

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        epoch, i = divmod(self.step, self.batches_per_epoch)
        start = i * self.global_batch + self.host_offset
        idx = self._permutation(epoch)[start : start + self.local_batch]
        self.step += 1
        return packing.rows_to_batch(self.rows["tokens"][idx], self.rows["segment_ids"][idx], self.rows["positions"][idx])

    def get_state(self) -> dict:
        return {"kind": "packed_rows", "step": self.step, "seed": self.seed, "n_rows": self.n_rows}

    def set_state(self, state: dict) -> None:
        if state.get("n_rows") != self.n_rows or state.get("seed") != self.seed:
            raise ConfigError(
                f"data: the checkpoint's data iterator state {state} does not match this data "
                f"({self.n_rows} rows, seed {self.seed}); the corpus or data.seq_len changed since the run started."
            )
        self.step = int(state["step"])


def _eval_batches_fn(rows: dict[str, np.ndarray], global_batch: int, data_index: int, data_count: int):
    """Deterministic validation batches over the packed rows; the last one is filled with padding rows
    (segment 0, so no loss), so a split smaller than one batch is still evaluated."""
    local = global_batch // data_count
    n_rows = len(rows["tokens"])
    n_batches = -(-n_rows // global_batch)
    if n_batches * global_batch > n_rows:
        pad = n_batches * global_batch - n_rows
        rows = {k: np.concatenate([v, np.zeros((pad, v.shape[1]), v.dtype)]) for k, v in rows.items()}

    def batches(max_batches: int = 0, split: str = "validation") -> Iterator[dict]:
        if split != "validation":
            raise ConfigError(f"data.source=builtin has a validation split only, not '{split}'.")
        count = n_batches if not max_batches else min(max_batches, n_batches)
        for b in range(count):
            s = b * global_batch + data_index * local
            yield packing.rows_to_batch(
                rows["tokens"][s : s + local], rows["segment_ids"][s : s + local], rows["positions"][s : s + local]
            )

    return batches


def _builtin_tokenizer(tok_dir, train_docs: list[str], vocab_size: int):
    """The WORKDIR's tokenizer, trained on the first start by process 0 while the others wait for it."""
    import jax

    if not tok_dir.exists() and jax.process_index() == 0:
        train_bpe_tokenizer(train_docs, vocab_size, tok_dir)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("lmtrain_builtin_tokenizer")
    return load_tokenizer(tok_dir)


def _builtin_data(cfg, workdir: os.PathLike, data_index: int, data_count: int) -> DataBundle:
    from lmtrain.data.builtin_corpus import builtin_documents

    d = cfg.data
    check_task(cfg, "text", "")
    docs = builtin_documents(d.max_docs)
    train_docs = [t for t in docs if not is_validation_doc(t, d.val_fraction)]
    val_docs = [t for t in docs if is_validation_doc(t, d.val_fraction)]
    folds, fold = cv_settings(cfg)
    if folds:  # cross-validation: fold `fold` of the training documents validates, the others train
        from lmtrain.data.shards import cv_fold_of

        in_fold = [cv_fold_of(t.encode("utf-8"), folds) == fold for t in train_docs]
        val_docs = [t for t, held in zip(train_docs, in_fold) if held]
        train_docs = [t for t, held in zip(train_docs, in_fold) if not held]
    if not val_docs and cfg.train.eval_every:
        raise ConfigError(f"data.max_docs={d.max_docs} leaves no validation document (data.val_fraction="
                          f"{d.val_fraction}). Raise data.max_docs or data.val_fraction, or set train.eval_every=0.")
    tok_dir = as_path(d.tokenizer_dir) if d.tokenizer_dir else as_path(workdir) / "tokenizer"
    tokenizer = _builtin_tokenizer(tok_dir, train_docs, cfg.model.vocab_size)
    check_vocab(tokenizer, cfg.model.vocab_size, tok_dir)
    eos = eos_id(tokenizer)

    def pack(texts, keep_partial):
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        return packing.pack_documents((np.array([*x, eos], np.int32) for x in ids), d.seq_len, keep_partial)

    train_rows, val_rows = pack(train_docs, False), pack(val_docs, True)
    train = PackedRowsIterator(train_rows, d.batch_size, d.seed, data_index, data_count)
    return DataBundle(train, _eval_batches_fn(val_rows, d.batch_size, data_index, data_count), tokenizer)


def cv_settings(cfg) -> tuple[int, int]:
    """(data.cv_folds, data.cv_fold), checked; (0, 0) without cross-validation."""
    from lmtrain.data.shards import check_cv

    folds, fold = int(cfg.data.get("cv_folds", 0)), int(cfg.data.get("cv_fold", 0))
    check_cv(folds, fold)
    return folds, fold


def check_vocab(tokenizer, model_vocab: int, tok_dir) -> None:
    if len(tokenizer) > model_vocab:
        raise ConfigError(
            f"tokenizer {tok_dir} has {len(tokenizer)} tokens but model.vocab_size={model_vocab}. "
            f"Set model.vocab_size to at least {len(tokenizer)}."
        )


def _shards_data(cfg, workdir: os.PathLike, data_index: int, data_count: int) -> DataBundle:
    from lmtrain.data import shards

    d = cfg.data
    if not d.shards_dir or not d.tokenizer_dir:
        raise ConfigError("data.source='shards' needs data.shards_dir and data.tokenizer_dir.")
    for key, path, tool in (("data.tokenizer_dir", d.tokenizer_dir, "tools/train_tokenizer.py"),
                            ("data.shards_dir", d.shards_dir, "tools/shard_data.py")):
        if not as_path(path).exists():
            raise ConfigError(f"{key}={path} does not exist. Create it with {tool} (see the README quickstart), "
                              "or train on the in-memory corpus with --config.data.source=builtin.")
    shards.check_compatibility(d.shards_dir, d.tokenizer_dir, cfg.model.vocab_size)
    manifest = shards.load_manifest(d.shards_dir)
    example_format = shards.example_format(manifest)
    check_task(cfg, example_format, d.shards_dir)
    if d.verify_shards:
        shards.verify_shards(d.shards_dir, data_index, data_count)
    tokenizer = load_tokenizer(d.tokenizer_dir)
    folds, fold = cv_settings(cfg)
    train = shards.ShardedTrainIterator(d.shards_dir, d.seq_len, d.batch_size, d.seed, data_index, data_count,
                                        cv_folds=folds, cv_fold=fold, length_buckets=d.get("length_buckets", 0))

    def eval_batches(max_batches: int = 0, split: str = "validation"):
        return shards.shard_eval_batches(d.shards_dir, d.seq_len, d.batch_size, data_index, data_count, max_batches,
                                         split, cv_folds=folds, cv_fold=fold,
                                         length_buckets=d.get("length_buckets", 0))

    return DataBundle(train, eval_batches, tokenizer, example_format, manifest.get("labels"),
                      shards.manifest_splits(manifest))


def check_task(cfg, example_format: str, shards_dir) -> None:
    """The shards must hold the examples the configured task trains on (when the config names a task)."""
    task = cfg.get("task", {}).get("name") if hasattr(cfg, "get") else None
    if task is None or FORMAT_TASKS[example_format] == task or SHARED_FORMATS.get(task) == example_format:
        return
    needs = {"lm": "text", "sft": "sft or chat", "classify": "classify", "mlm": "text",
             "token_classify": "ner"}.get(task, "?")
    hint = " (classification data needs text and label fields)" if task == "classify" else ""
    where = f"data.shards_dir={shards_dir} holds {example_format} shards" if shards_dir else (
        "data.source=builtin is plain text (use data.source=shards with tools/shard_data.py --builtin-task for the demos)")
    raise ConfigError(f"task.name={task} needs shards made with tools/shard_data.py --format {needs}{hint}, but "
                      f"{where}. Re-shard the data, or set task.name={FORMAT_TASKS[example_format]}.")


def check_labels(run_labels: list, data_labels: list | None, shards_dir) -> None:
    """Evaluation data must use the run's classes in the run's order (a label the training never saw is an error)."""
    if data_labels is None:
        raise ConfigError(f"data.shards_dir={shards_dir} holds no labels: classification needs shards made with "
                          "tools/shard_data.py --format classify.")
    unknown = [v for v in data_labels if str(v) not in {str(r) for r in run_labels}]
    if unknown:
        raise ConfigError(f"the labels {unknown} of {shards_dir} were never seen in training (the run's classes: "
                          f"{run_labels}). Re-shard the evaluation data with --labels-from <the training shards>.")
    if [str(v) for v in data_labels] != [str(v) for v in run_labels]:
        raise ConfigError(f"the class order of {shards_dir} ({data_labels}) differs from the run's ({run_labels}); "
                          "re-shard it with --labels-from <the training shards>, so class ids agree.")


SOURCES = {"builtin": _builtin_data, "shards": _shards_data}


def make_data(cfg, workdir: str | os.PathLike, data_index: int = 0, data_count: int = 1,
              formats: tuple[str, ...] | None = None) -> DataBundle:
    """The data of `cfg.data.source` for data slice `data_index` of `data_count` of the global batch; with
    `formats`, shards (or the builtin text) of another example format are refused."""
    if cfg.data.source not in SOURCES:
        raise ConfigError(f"data.source='{cfg.data.source}' is unknown. Choose one of: {', '.join(SOURCES)}.")
    if formats is not None:  # interface stub until the format registry lands: the task's formats decide
        _check_formats(cfg, formats)
        cfg = _without_task(cfg)
    return SOURCES[cfg.data.source](cfg, as_path(workdir), data_index, data_count)


def _check_formats(cfg, formats) -> None:
    from lmtrain.data import shards  # as in _shards_data: Grain loads only for a shard source

    d = cfg.data
    found = "text"
    if d.source == "shards" and d.shards_dir and as_path(d.shards_dir).exists():
        found = shards.example_format(shards.load_manifest(d.shards_dir))
    if found not in formats:
        if cfg.task.name in {*FORMAT_TASKS.values(), *SHARED_FORMATS}:
            check_task(cfg, found, d.shards_dir if d.source == "shards" else "")  # the built-in tasks' own words
        where = f"data.shards_dir={d.shards_dir} holds {found} shards" if d.source == "shards" else (
            "data.source=builtin is plain text")
        raise ConfigError(f"task.name={cfg.task.name} reads the formats {', '.join(formats)}, but {where}. Make "
                          f"shards of one of them with tools/shard_data.py --format.")


def _without_task(cfg):
    """The config with no task name, so check_task (below the format check) checks nothing more."""
    view = cfg.copy_and_resolve_references()
    with view.unlocked():
        del view["task"]
    return view
