"""Token shards on disk: the manifest, its start-up checks, and the training and eval loaders.

A shard directory (written by lmtrain.data.shard_writer, through tools/shard_data.py) holds ArrayRecord
files of tokenized examples, one record per example in the byte layout of the manifest's example format
(lmtrain.data.formats; a text document is its tokens, EOS included, as little-endian uint16 or uint32),
and a manifest.json written last. The training loader is a Grain pipeline:

    ArrayRecordDataSource -> global shuffle, reseeded every epoch -> repeat -> this host's stride
    -> pack into rows of seq_len + 1 (lmtrain.data.packing.RowPacker) -> batch -> thread prefetch

Its state is the position of the next row to emit: (index of the document in this host's
stream, token offset inside it). Packing is a pure function of the document stream, so
restoring that position reproduces the following batches exactly, whatever was in the buffers.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import weakref
from collections.abc import Iterator
from pathlib import Path

import grain
import numpy as np
import xxhash
from array_record.python.array_record_module import ArrayRecordReader
from etils import epath
from tokenizers import Tokenizer

from lmtrain.config import ConfigError
from lmtrain.data.formats import FORMATS, ExampleFormat, get_format
from lmtrain.data.packing import DataError, ExamplePacker, RowPacker, check_data_slice, pad_row, rows_dict_to_batch
from lmtrain.data.shard_files import (  # noqa: F401 - the reader's names for what the writer shares
    FORMAT,
    MANIFEST,
    OPTIONAL_SPLITS,
    SHARDS_TOKENIZER,
    SPLITS,
    ShardError,
    sha256_file,
    token_dtype,
)
from lmtrain.paths import as_path


def tokenizer_fingerprint(tokenizer_dir: str | os.PathLike) -> str:
    """sha256 of the tokenizer's tokenizer.json, re-serialized canonically (formatting does not count)."""
    path = as_path(tokenizer_dir) / "tokenizer.json"
    if not path.exists():
        raise ConfigError(f"tokenizer directory {tokenizer_dir} has no tokenizer.json.")
    canonical = json.dumps(json.loads(path.read_text(encoding="utf-8")), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def tokenizer_vocab_size(tokenizer_dir: str | os.PathLike) -> int:
    """Number of token ids the tokenizer can emit, added special tokens included."""
    text = (as_path(tokenizer_dir) / "tokenizer.json").read_text(encoding="utf-8")
    return Tokenizer.from_str(text).get_vocab_size(with_added_tokens=True)


def decode_record(example_format: str, dtype: np.dtype, record: bytes) -> tuple[np.ndarray, np.ndarray | None, int]:
    """(tokens, the per-token field or None, the per-example field or -1) of one record: the stored example as
    lmtrain eval reads it (sft/chat: the loss mask; ner: the token class ids; classify: the class id)."""
    fmt = get_format(example_format)
    arrays = fmt.decode(record, dtype)
    per_token = next((arrays[key] for key, _ in fmt.token_fields), None)
    per_example = next((arrays[key] for key, _ in fmt.example_fields), -1)
    return arrays["tokens"], per_token, per_example


# ---------------------------------------------------------------------------------------------
# Manifest and start-up checks
# ---------------------------------------------------------------------------------------------


def load_manifest(shards_dir: str | os.PathLike) -> dict:
    path = as_path(shards_dir) / MANIFEST
    if not path.parent.exists():
        raise ShardError(f"shard directory {shards_dir} does not exist; check the path (config data.shards_dir or "
                         "--data), or write it with tools/shard_data.py.")
    if not path.exists():
        hint = " (tools/shard_data.py was interrupted; re-run it to finish)" if path.parent.is_dir() else ""
        raise ShardError(f"shard directory {shards_dir} has no {MANIFEST}{hint}.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path} is not valid JSON ({e}). Re-run tools/shard_data.py into a new --output.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ShardError(f"{path}: format '{found}' is not '{FORMAT}'; point data.shards_dir at a directory "
                         "written by tools/shard_data.py.")
    _check_manifest_keys(path, manifest)
    return manifest


# What every reader relies on: key path -> type. A shard entry's keys are checked for each shard.
_MANIFEST_KEYS = {"token_dtype": str, "eos_id": int, "vocab_size": int, "tokenizer": dict,
                  "tokenizer.fingerprint": str, "splits": dict}
_SPLIT_KEYS = {"documents": int, "tokens": int, "shards": list}
_SHARD_KEYS = {"file": str, "documents": int, "tokens": int, "bytes": int, "sha256": str}


def _check_manifest_keys(path: Path, manifest: dict) -> None:
    """Raise ShardError naming the first missing or mistyped key, so a damaged manifest never becomes a KeyError."""

    def need(obj, key: str, kind: type, where: str):
        value = obj.get(key) if isinstance(obj, dict) else None
        if value is None or not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            problem = "is missing" if value is None else f"is a {type(value).__name__}, not a {kind.__name__}"
            raise ShardError(f"{path}: key '{where}' {problem}; the manifest is damaged or was not written by "
                             "tools/shard_data.py. Re-run tools/shard_data.py into a new --output.")
        return value

    for key, kind in _MANIFEST_KEYS.items():
        node = manifest
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        need(node, leaf, kind, key)
    if manifest["token_dtype"] not in ("uint16", "uint32"):
        raise ShardError(f"{path}: key 'token_dtype' is '{manifest['token_dtype']}', not uint16 or uint32.")
    name = manifest.get("example_format", "text")
    if name not in FORMATS:
        raise ShardError(f"{path}: key 'example_format' is '{name}', not one of {', '.join(FORMATS)}. If a plugin "
                         "defines it, name the plugin's module in LMTRAIN_PLUGINS.")
    if not FORMATS[name].from_corpus:
        need(manifest, "seq_len", int, "seq_len")
    if FORMATS[name].label_vocab:
        need(manifest, "labels", list, "labels")
    for split in SPLITS + tuple(s for s in OPTIONAL_SPLITS if s in manifest["splits"]):
        info = need(manifest["splits"], split, dict, f"splits.{split}")
        for key, kind in _SPLIT_KEYS.items():
            need(info, key, kind, f"splits.{split}.{key}")
        for i, entry in enumerate(info["shards"]):
            for key, kind in _SHARD_KEYS.items():
                need(entry, key, kind, f"splits.{split}.shards[{i}].{key}")
            if Path(entry["file"]).name != entry["file"] or entry["file"].startswith("."):
                raise ShardError(f"{path}: key 'splits.{split}.shards[{i}].file' is '{entry['file']}', not a file "
                                 "name inside the shard directory.")


def manifest_splits(manifest: dict) -> tuple[str, ...]:
    """The splits a manifest holds: train, validation, and test when it was made."""
    return SPLITS + tuple(s for s in OPTIONAL_SPLITS if s in manifest["splits"])


def example_format(manifest: dict) -> str:
    return manifest.get("example_format", "text")


def manifest_format(manifest: dict) -> ExampleFormat:
    """The format of a checked manifest's examples (load_manifest has checked it is registered)."""
    return get_format(example_format(manifest))


def shard_paths(shards_dir: str | os.PathLike, split: str, manifest: dict | None = None) -> list[epath.Path]:
    """The split's shard files; gs:// ones are read in place (ArrayRecord has its own GCS reader)."""
    manifest = manifest or load_manifest(shards_dir)
    return [as_path(shards_dir) / s["file"] for s in manifest["splits"][split]["shards"]]


def verify_shards(shards_dir: str | os.PathLike, data_index: int = 0, data_count: int = 1) -> None:
    """Check every shard's size and sha256 against the manifest; raise ShardError naming the bad shard.

    With data_count > 1 each data slice checks a disjoint 1/data_count of the shards, so a pod
    verifies the whole directory in the time one host takes for its share.
    """
    manifest = load_manifest(shards_dir)
    entries = [s for split in manifest_splits(manifest) for s in manifest["splits"][split]["shards"]]
    for entry in entries[data_index::data_count]:
        path = as_path(shards_dir) / entry["file"]
        if not path.exists():
            raise ShardError(f"shard {path} is listed in the manifest but missing.")
        size = path.stat().length
        if size != entry["bytes"]:
            raise ShardError(f"shard {path} is {size} bytes, the manifest says {entry['bytes']} (truncated?).")
        if sha256_file(path) != entry["sha256"]:
            raise ShardError(f"shard {path}: sha256 does not match the manifest; the file is corrupt.")


def training_tokenizer_dir(shards_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike) -> str:
    """The tokenizer to train on these shards with: the one shard_data --add-special-tokens extended and saved
    beside them, when data.tokenizer_dir is the tokenizer it extended (or unset); else data.tokenizer_dir."""
    path = as_path(shards_dir) / MANIFEST
    if not path.exists():
        return str(tokenizer_dir)  # the start-up checks say what is missing
    extends = load_manifest(shards_dir)["tokenizer"].get("extends")
    if not isinstance(extends, dict):
        return str(tokenizer_dir)
    if tokenizer_dir and (not (as_path(tokenizer_dir) / "tokenizer.json").exists()
                          or tokenizer_fingerprint(tokenizer_dir) != extends.get("fingerprint")):
        return str(tokenizer_dir)  # another tokenizer: check_compatibility names the mismatch
    return str(as_path(shards_dir) / SHARDS_TOKENIZER)


def check_compatibility(shards_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike, model_vocab_size: int) -> None:
    """Fail at start-up when the shards were made with another tokenizer or the model's vocab is too small."""
    manifest = load_manifest(shards_dir)
    fingerprint = tokenizer_fingerprint(tokenizer_dir)
    made_with = manifest["tokenizer"]
    if made_with["fingerprint"] != fingerprint:
        raise ConfigError(
            f"the shards in {shards_dir} were tokenized with another tokenizer (made with {made_with['dir']}, "
            f"fingerprint {made_with['fingerprint'][:12]}) than {tokenizer_dir} (fingerprint {fingerprint[:12]}). "
            "Re-run tools/shard_data.py with this tokenizer, or point data.tokenizer_dir at the one used."
        )
    vocab = tokenizer_vocab_size(tokenizer_dir)
    if vocab > model_vocab_size:
        raise ConfigError(
            f"the tokenizer in {tokenizer_dir} (used for the shards in {shards_dir}) has {vocab} tokens, more than "
            f"the model's model.vocab_size={model_vocab_size}. Set model.vocab_size >= {vocab}."
        )


# ---------------------------------------------------------------------------------------------
# Training loader
# ---------------------------------------------------------------------------------------------


class _ShardDocuments:
    """A split's documents over all its shards, as one random-access source whose read errors name the shard.

    Without data.verify_shards a damaged shard is found only when it is read: the ArrayRecord
    error says nothing about which file, so it is caught here and re-raised naming the shard.
    """

    def __init__(self, shards_dir, split: str, manifest: dict):
        self.entries = manifest["splits"][split]["shards"]
        self.paths = shard_paths(shards_dir, split, manifest)
        for path in self.paths:
            if not path.exists():
                raise ShardError(f"shard {path} is listed in the manifest but missing.")
        try:
            self._source = grain.sources.ArrayRecordDataSource([str(p) for p in self.paths])
        except Exception as e:  # noqa: BLE001 - array_record raises a bare RuntimeError for a damaged file
            self._name_bad_shard(e)
            raise ShardError(f"shards of {shards_dir} ({split}) cannot be opened: {e!r}.") from None
        self._ends = np.cumsum([entry["documents"] for entry in self.entries]).tolist()
        if len(self._source) != (self._ends[-1] if self._ends else 0):
            self._name_bad_shard(None)

    def _name_bad_shard(self, error: Exception | None) -> None:
        """Open the shards one by one; raise ShardError for the first that cannot be read or has the wrong count."""
        for path, entry in zip(self.paths, self.entries, strict=True):
            try:
                reader = ArrayRecordReader(str(path))
                count = reader.num_records()
                reader.close()
            except Exception as e:  # noqa: BLE001
                raise ShardError(f"shard {path} cannot be read ({str(e) or type(e).__name__}); it is truncated or "
                                 "corrupt. Re-run tools/shard_data.py (it rewrites bad shards), and set "
                                 "data.verify_shards=True to check every shard at start-up.") from None
            if count != entry["documents"]:
                raise ShardError(f"shard {path} holds {count} documents, the manifest says {entry['documents']}; "
                                 "re-run tools/shard_data.py.")

    def __len__(self) -> int:
        return len(self._source)

    def _failed(self, index: int, error: Exception) -> ShardError:
        k = bisect.bisect_right(self._ends, index)
        first = self._ends[k - 1] if k else 0
        return ShardError(f"shard {self.paths[k]}: document {index - first} cannot be read "
                          f"({str(error) or type(error).__name__}); the file is damaged. Re-run tools/shard_data.py, "
                          "and set data.verify_shards=True to check every shard at start-up.")

    def __getitem__(self, index: int) -> bytes:
        try:
            return self._source[index]
        except Exception as e:  # noqa: BLE001
            raise self._failed(index, e) from None

    def __getitems__(self, indices: list[int]) -> list[bytes]:
        try:
            return self._source.__getitems__(indices)
        except Exception:  # noqa: BLE001 - find the document at fault
            return [self[i] for i in indices]


def _document_source(shards_dir, split: str, manifest: dict) -> _ShardDocuments:
    return _ShardDocuments(shards_dir, split, manifest)


# ---------------------------------------------------------------------------------------------
# Cross-validation: the training split cut into folds by a hash of each example
# ---------------------------------------------------------------------------------------------

CV_HASH_SEED = 0xC5F01D  # fixed: an example's fold must be the same in every run of every trial


def cv_fold_of(example: bytes, folds: int) -> int:
    """The fold of a training example: a hash of its stored bytes (tokens, loss mask, label), so it is the same
    whatever the shard layout, the order or the host, and duplicate examples always share a fold (no leak
    between the folds that train and the one that validates)."""
    return xxhash.xxh64_intdigest(example, seed=CV_HASH_SEED) % folds


def check_cv(folds: int, fold: int) -> None:
    if folds == 1 or folds < 0:
        raise ConfigError(f"data.cv_folds={folds}: use 0 (no cross-validation) or k >= 2 folds.")
    if folds and not 0 <= fold < folds:
        raise ConfigError(f"data.cv_fold={fold} is not one of the {folds} folds (0 to {folds - 1}).")


class FoldSubset:
    """The training documents of some folds, as a random-access source: `held_out` gives fold `fold` (the
    cross-validation set), otherwise every other fold (what trains). Each document's fold is computed once,
    reading the split in chunks, at start-up."""

    def __init__(self, source, folds: int, fold: int, held_out: bool, chunk: int = 256):
        check_cv(folds, fold)
        self._source = source
        indices = []
        for start in range(0, len(source), chunk):
            ids = list(range(start, min(start + chunk, len(source))))
            for i, record in zip(ids, source.__getitems__(ids)):
                if (cv_fold_of(record, folds) == fold) == held_out:
                    indices.append(i)
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> bytes:
        return self._source[self.indices[index]]

    def __getitems__(self, indices: list[int]) -> list[bytes]:
        return self._source.__getitems__([self.indices[i] for i in indices])


# Length bucketing (data.length_buckets) for the one-example-per-row formats: a batch's rows are only as long
# as the bucket that holds its longest example, and examples are grouped by length inside a window of this
# many global batches, so the rows of a batch are alike in length and little of them is padding.
BUCKET_WINDOW_BATCHES = 32


def bucket_step(seq_len: int, length_buckets: int) -> int:
    """The spacing of the bucket lengths: seq_len / length_buckets, rounded up to a multiple of 8."""
    return -(-max(1, -(-seq_len // length_buckets)) // 8) * 8


def bucket_length(longest: int, seq_len: int, length_buckets: int) -> int:
    """The row length of a batch whose longest example has `longest` tokens: the smallest bucket that holds
    it, one of at most `length_buckets` lengths (multiples of bucket_step, and seq_len itself); seq_len
    when bucketing is off (0). Each length is one compiled train step, so the programs stay bounded."""
    if not length_buckets:
        return seq_len
    step = bucket_step(seq_len, length_buckets)
    return min(seq_len, max(step, -(-longest // step) * step))


def window_batches(lengths: list[int], global_batch: int, seed: int, window: int) -> list[np.ndarray]:
    """Example indices (into the window) of each global batch of a window, in training order: sorted by
    length (ties by position, so it is deterministic), cut into batches, the batches shuffled by (seed,
    window) so that short and long batches mix instead of running from short to long."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    batches = [order[i * global_batch:(i + 1) * global_batch] for i in range(len(order) // global_batch)]
    shuffle = np.random.default_rng([seed, window]).permutation(len(batches))
    return [np.sort(batches[i]) for i in shuffle]


def row_length(fmt: ExampleFormat, seq_len: int) -> int:
    """A batch row's tokens: seq_len + 1 for the packed formats (inputs and targets are shifted), else seq_len."""
    return seq_len if fmt.packing == "row" else seq_len + 1


def new_packer(fmt: ExampleFormat, row_len: int) -> RowPacker | ExamplePacker:
    """Documents split over rows ("stream"), or whole examples with their weights ("whole")."""
    return RowPacker(row_len, np.int32) if fmt.packing == "stream" else ExamplePacker(row_len)


def pack(packer: RowPacker | ExamplePacker, example: dict) -> list[dict]:
    """The rows one decoded example completes."""
    if isinstance(packer, RowPacker):
        return packer.add(example["tokens"])
    return packer.add(example["tokens"], example["weights"])


class _PackedBatchIterator(grain.DatasetIterator):
    """Packs a host's endless document stream into batches; its state is the next row's start.

    `docs[k]` is the k-th document (raw bytes) of this host's stream. Rows are produced lazily, so
    a document split over two rows, or over two batches, is resumed mid-document. By the format's
    packing: "stream" documents (text) are packed and split over rows (RowPacker); "whole" examples
    (sft, chat) are packed whole (ExamplePacker, the state's offset is then always 0); "row" examples
    (classify, ner) are one per row.
    """

    def __init__(self, docs: grain.MapDataset, dtype: np.dtype, rows_per_batch: int, row_len: int, identity: dict,
                 example_format: ExampleFormat, pad_id: int = 0):
        super().__init__()
        self._docs, self._dtype = docs, dtype
        self._rows_per_batch, self._row_len = rows_per_batch, row_len
        self._identity = identity  # what a state must match to be restored here
        self._format, self._pad_id = example_format, pad_id
        self._reset(0, 0)

    def _reset(self, doc: int, offset: int) -> None:
        self._row_doc, self._row_offset = doc, offset  # where the next row to emit starts
        self._read_doc = doc  # next document to feed the packer
        self._skip = offset  # still to drop from the next document fed
        self._packer = new_packer(self._format, self._row_len)
        self._filled = 0
        self._rows: list[tuple[dict, int, int]] = []  # (row, start doc and offset of the row after it)

    def _feed_one_document(self) -> None:
        example = self._format.decode(self._docs[self._read_doc], self._dtype)
        k = self._read_doc
        self._read_doc += 1
        if self._format.packing == "row":
            self._rows.append((example, k + 1, 0))
            return
        if self._format.packing == "whole":
            rows = pack(self._packer, example)
            # a row closed before this example is followed by a row that starts with it
            for i, row in enumerate(rows):
                filled_own = i == len(rows) - 1 and self._packer._filled == 0
                self._rows.append((row, k + 1 if filled_own else k, 0))
            return
        # Positions restart in every row, so the rest of a resumed document packs exactly as it did
        # on the first pass, where it also began a row.
        tokens = example["tokens"]
        skip, self._skip = self._skip, 0
        consumed = skip + (self._row_len - self._filled)
        for row in self._packer.add(tokens[skip:]):
            if consumed >= len(tokens):
                nxt = (k + 1, 0)
            else:
                nxt = (k, consumed)
            self._rows.append((row, *nxt))
            consumed += self._row_len
        self._filled = (self._filled + len(tokens) - skip) % self._row_len

    def _next_row(self) -> dict:
        while not self._rows:
            self._feed_one_document()
        row, self._row_doc, self._row_offset = self._rows.pop(0)
        return row

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [self._next_row() for _ in range(self._rows_per_batch)]
        if self._format.packing == "row":
            return self._format.batch(rows, self._row_len, self._rows_per_batch, self._pad_id)
        return rows_dict_to_batch(rows)

    def get_state(self) -> dict:
        return {"doc": int(self._row_doc), "offset": int(self._row_offset), **self._identity}

    def set_state(self, state: dict) -> None:
        state = check_identity(state, self._identity)
        self._reset(int(state["doc"]), int(state["offset"]))


def check_identity(state: dict, identity: dict) -> dict:
    """The saved loader state (old key names renamed), when it was saved by a loader of this identity."""
    state = {_RENAMED_STATE_KEYS.get(k, k): v for k, v in state.items()}
    for key, value in identity.items():
        if state.get(key) != value:
            raise DataError(f"the checkpoint's data loader state was saved with {key}={state.get(key)!r}, this "
                            f"run has {value!r}: the data order would differ, so it cannot resume exactly. Resume "
                            "with the same data, data.seed, data.seq_len, data.length_buckets and batch layout, "
                            "or use a new WORKDIR.")
    return state


class _BucketedBatchIterator(grain.DatasetIterator):
    """Length-bucketed batches of a one-example-per-row format (classify, ner); the state is (window, batch).

    `docs[k]` is the k-th example of the global stream (every data slice reads all of it): window w is
    examples [w * W * B, (w + 1) * W * B) for W = BUCKET_WINDOW_BATCHES and the global batch B, grouped
    into batches by window_batches; each data slice takes its rows of every global batch. A window is a
    pure function of the stream, so (window, batch) restores the following batches exactly, and the
    global batches do not depend on how many slices share them (sharded equals unsharded).
    """

    def __init__(self, docs: grain.MapDataset, dtype: np.dtype, global_batch: int, data_index: int,
                 data_count: int, seq_len: int, length_buckets: int, seed: int, identity: dict,
                 example_format: ExampleFormat, pad_id: int = 0):
        super().__init__()
        self._docs, self._dtype, self._format, self._pad_id = docs, dtype, example_format, pad_id
        self._global_batch, self._seq_len, self._buckets, self._seed = global_batch, seq_len, length_buckets, seed
        local = global_batch // data_count
        self._lo, self._hi = data_index * local, (data_index + 1) * local
        self._identity = identity
        self._window, self._batch, self._cached = 0, 0, None

    def _examples(self, window: int) -> tuple[list, list[np.ndarray]]:
        if self._cached is None or self._cached[0] != window:
            size = BUCKET_WINDOW_BATCHES * self._global_batch
            examples = [self._format.decode(self._docs[k], self._dtype) for k in range(window * size, (window + 1) * size)]
            lengths = [min(len(example["tokens"]), self._seq_len) for example in examples]
            self._cached = (window, examples, window_batches(lengths, self._global_batch, self._seed, window))
        return self._cached[1], self._cached[2]

    def __next__(self) -> dict[str, np.ndarray]:
        examples, batches = self._examples(self._window)
        chosen = [examples[i] for i in batches[self._batch]]
        row_len = bucket_length(max(len(example["tokens"]) for example in chosen), self._seq_len, self._buckets)
        self._window, self._batch = divmod(self._window * BUCKET_WINDOW_BATCHES + self._batch + 1,
                                           BUCKET_WINDOW_BATCHES)
        return self._format.batch(chosen[self._lo:self._hi], row_len, self._hi - self._lo, self._pad_id)

    def get_state(self) -> dict:
        doc = (self._window * BUCKET_WINDOW_BATCHES + self._batch) * self._global_batch
        return {"doc": int(doc), "window": self._window, "batch": self._batch, **self._identity}

    def set_state(self, state: dict) -> None:
        state = check_identity(state, self._identity)
        self._window, self._batch = int(state["window"]), int(state["batch"])


# States written before the data split was named after the batch sharding rather than processes.
_RENAMED_STATE_KEYS = {"process_index": "data_index", "process_count": "data_count"}


class _PackedBatchDataset(grain.IterDataset):
    def __init__(self, docs: grain.MapDataset, iterator=None, **kwargs):
        super().__init__()
        self._docs, self._kwargs = docs, kwargs
        self._iterator = iterator or _PackedBatchIterator

    def __iter__(self) -> grain.DatasetIterator:
        return self._iterator(self._docs, **self._kwargs)


class ShardedTrainIterator:
    """This host's training batches from a shard directory, endless, exactly resumable.

    Documents are shuffled globally (all shards, reseeded each epoch) and strided over the data
    slices, so the slices read disjoint documents that together are the whole split. `data_index`
    of `data_count` is this host's slice of the global batch as the batch sharding lays it out:
    hosts that hold the same rows (a tensor axis across hosts) pass the same data_index and read
    identical batches. Each batch is [global_batch_size // data_count, seq_len] arrays keyed as
    rows_to_batch (text, sft, chat) or packing.classify_batch (classify).
    """

    def __init__(self, shards_dir, seq_len: int, global_batch_size: int, seed: int, data_index: int = 0,
                 data_count: int = 1, prefetch: int = 4, cv_folds: int = 0, cv_fold: int = 0,
                 length_buckets: int = 0):
        check_data_slice(global_batch_size, data_index, data_count)
        manifest = load_manifest(shards_dir)
        check_seq_len(shards_dir, manifest, seq_len)
        self.example_format = example_format(manifest)
        fmt = manifest_format(manifest)
        self.num_documents = manifest["splits"]["train"]["documents"]
        if not self.num_documents:
            raise ShardError(f"shard directory {shards_dir} has no training documents.")
        self._data_index, self._data_count = data_index, data_count
        source = _document_source(shards_dir, "train", manifest)
        if cv_folds:  # train on every fold but the held-out one
            source = FoldSubset(source, cv_folds, cv_fold, held_out=False)
            self.num_documents = len(source)
            if not self.num_documents:
                raise ShardError(f"data.cv_folds={cv_folds}: every training document of {shards_dir} is in fold "
                                 f"{cv_fold}, so none is left to train on; use fewer folds or more data.")
        check_length_buckets(length_buckets)
        # Bucketed batches are cut from the global stream (every slice reads it all, see _BucketedBatchIterator).
        self._bucketed = bool(length_buckets) and fmt.packing == "row"
        docs = (grain.MapDataset.source(source)
                .shuffle(seed=seed % 2**32)  # per-epoch reseeding happens inside: seed + epoch
                .repeat())
        if not self._bucketed:
            docs = docs.slice(slice(data_index, None, data_count))
        identity = {"seed": seed, "seq_len": seq_len, "data_index": data_index, "data_count": data_count,
                    "num_documents": self.num_documents}
        if cv_folds:  # only then: states saved without cross-validation keep resuming
            identity.update(cv_folds=cv_folds, cv_fold=cv_fold)
        common = {"dtype": np.dtype(manifest["token_dtype"]).newbyteorder("<"), "identity": identity,
                  "example_format": fmt, "pad_id": int(manifest.get("pad_id", 0))}
        if self._bucketed:
            identity["length_buckets"] = length_buckets  # only then: unbucketed states keep resuming
            dataset = _PackedBatchDataset(docs, _BucketedBatchIterator, global_batch=global_batch_size,
                                          data_index=data_index, data_count=data_count, seq_len=seq_len,
                                          length_buckets=length_buckets, seed=seed, **common)
        else:
            dataset = _PackedBatchDataset(docs, rows_per_batch=global_batch_size // data_count,
                                          row_len=row_length(fmt, seq_len),
                                          **common)
        if prefetch:
            dataset = grain.experimental.ThreadPrefetchIterDataset(dataset, prefetch_buffer_size=prefetch)
        # Only the holder references the grain iterator: closing it at exit (or on close()) drops it
        # while the interpreter is intact, before grain's own __del__ would run during teardown.
        self._holder = [iter(dataset)]
        self._finalizer = weakref.finalize(self, _close_held, self._holder)

    @property
    def _iterator(self):
        if not self._holder:
            raise RuntimeError("the iterator is closed.")
        return self._holder[0]

    def close(self) -> None:
        self._finalizer()

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> dict:
        return dict(self._iterator.get_state())

    def set_state(self, state: dict) -> None:
        self._iterator.set_state(dict(state))

    @property
    def epoch(self) -> int:
        """Completed passes over the training split, counted at the next unread row."""
        doc = self.get_state()["doc"]
        if self._bucketed:  # a position in the global stream
            return doc // self.num_documents
        return (self._data_index + doc * self._data_count) // self.num_documents


def check_length_buckets(length_buckets) -> None:
    if isinstance(length_buckets, bool) or not isinstance(length_buckets, int) or length_buckets < 0:
        raise ConfigError(f"data.length_buckets={length_buckets!r}: use a whole number of row lengths (16, say), "
                          "or 0 to pad every classify/ner row to data.seq_len.")


def _close_held(holder: list) -> None:
    if holder:
        holder.pop().close()


def check_seq_len(shards_dir, manifest: dict, seq_len: int) -> None:
    """Task shards were cut for a sequence length (--seq-len): a shorter data.seq_len cannot hold their examples."""
    made_for = manifest.get("seq_len")
    if not manifest_format(manifest).from_corpus and seq_len < made_for:
        raise DataError(f"the {example_format(manifest)} shards in {shards_dir} were made for sequences of {made_for} "
                        f"tokens (tools/shard_data.py --seq-len {made_for}), longer than data.seq_len={seq_len}. Set "
                        f"data.seq_len >= {made_for}, or re-shard with --seq-len {seq_len}.")


def split_source(shards_dir, split: str, manifest: dict | None = None, cv_folds: int = 0, cv_fold: int = 0):
    """The records of a split as a random-access source. With cross-validation (cv_folds = k >= 2) the
    validation split is fold `cv_fold` of the training split, and the shards' own validation split is unused."""
    manifest = manifest or load_manifest(shards_dir)
    if split not in manifest["splits"]:
        raise DataError(f"shard directory {shards_dir} has no '{split}' split (it has "
                        f"{', '.join(manifest_splits(manifest))}); re-shard with --test-fraction for a test split.")
    if cv_folds and split == "validation":
        return FoldSubset(_document_source(shards_dir, "train", manifest), cv_folds, cv_fold, held_out=True)
    return _document_source(shards_dir, split, manifest) if manifest["splits"][split]["shards"] else []



def read_examples(shards_dir, split: str, max_examples: int = 0, manifest: dict | None = None, cv_folds: int = 0,
                  cv_fold: int = 0) -> list[tuple[np.ndarray, np.ndarray | None, int]]:
    """The first `max_examples` (0: all) examples of a split, in file order, decoded as (tokens, loss mask or None,
    label id); with cross-validation the validation split is the held-out fold, as in split_source."""
    manifest = manifest or load_manifest(shards_dir)
    fmt = example_format(manifest)
    dtype = np.dtype(manifest["token_dtype"]).newbyteorder("<")
    source = split_source(shards_dir, split, manifest, cv_folds, cv_fold)
    n = len(source) if not max_examples else min(max_examples, len(source))
    return [decode_record(fmt, dtype, r) for r in (source.__getitems__(list(range(n))) if n else [])]

def shard_eval_batches(shards_dir, seq_len: int, global_batch_size: int, data_index: int = 0,
                       data_count: int = 1, max_batches: int = 0, split: str = "validation",
                       cv_folds: int = 0, cv_fold: int = 0, length_buckets: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Deterministic evaluation batches: the split in file order, packed, cut into global batches.

    Every host packs the same stream and takes its data slice of each global batch, so all hosts
    yield the same number of batches. The last batch is filled with padding rows (loss_mask 0, or
    weight 0 for classification). Examples are packed as in training (whole, for sft/chat). With
    cv_folds = k >= 2 the validation split is the held-out fold `cv_fold` of the training split.
    """
    check_data_slice(global_batch_size, data_index, data_count)
    manifest = load_manifest(shards_dir)
    check_seq_len(shards_dir, manifest, seq_len)
    fmt = manifest_format(manifest)
    dtype = np.dtype(manifest["token_dtype"]).newbyteorder("<")
    source = split_source(shards_dir, split, manifest, cv_folds, cv_fold)
    per_host = global_batch_size // data_count
    lo, hi = data_index * per_host, (data_index + 1) * per_host
    row_len = row_length(fmt, seq_len)
    packer = new_packer(fmt, row_len)
    pending: list = []
    emitted = 0

    def batch_of(rows):
        if fmt.packing == "row":  # rows as long as the bucket of the global batch's longest example
            length = bucket_length(max(len(example["tokens"]) for example in rows), seq_len, length_buckets)
            return fmt.batch(rows[lo:hi], length, per_host, int(manifest.get("pad_id", 0)))
        while len(rows) < global_batch_size:
            row = pad_row(row_len)
            rows.append(row if fmt.packing == "whole" else {k: v for k, v in row.items() if k != "weights"})
        return rows_dict_to_batch(rows[lo:hi])

    def add(record: bytes) -> list:
        example = fmt.decode(record, dtype)
        return [example] if fmt.packing == "row" else pack(packer, example)

    for start in range(0, len(source), 256):
        for record in source.__getitems__(list(range(start, min(start + 256, len(source))))):
            pending.extend(add(record))
            while len(pending) >= global_batch_size:
                yield batch_of(pending[:global_batch_size])
                pending = pending[global_batch_size:]
                emitted += 1
                if max_batches and emitted >= max_batches:
                    return
    if fmt.packing != "row":
        pending.extend(packer.finish())
    if pending:
        yield batch_of(pending)
