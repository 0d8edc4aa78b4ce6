"""Read raw text documents from files, Hugging Face datasets, TFDS or the built-in corpus.

Both data tools (tools/train_tokenizer.py and tools/shard_data.py) read their input through
`iter_documents`, so one set of flags and one set of error messages covers both. Every source is
streamed: a corpus is never held in memory. Malformed input stops the run with an error that
names the file and line, because silently skipping it would change the corpus without notice.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import io
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from lmtrain.data.builtin_corpus import builtin_documents
from lmtrain.data.examples import SourceError
from lmtrain.paths import as_path, is_remote

FILE_FORMATS = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet",
                ".csv": "csv"}
TXT_UNITS = ("paragraph", "line", "file")
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # \ud800-\udfff: half of a UTF-16 pair, or a lone one


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """Where the documents come from; exactly one of files, hf_dataset, tfds_name, builtin is set."""

    files: tuple[str, ...] = ()  # paths or glob patterns of .txt/.jsonl/.parquet/.csv files
    text_field: str = "text"  # field holding the text in jsonl/parquet/csv rows and dataset records
    txt_unit: str = "paragraph"  # .txt documents: 'paragraph' (blank-line separated), 'line' or 'file'
    hf_dataset: str = ""  # Hugging Face dataset name or local dataset directory (streamed)
    hf_config: str = ""  # its configuration name, if any
    hf_split: str = "train"
    tfds_name: str = ""  # TFDS dataset name, e.g. 'wiki40b/en' (prepared as array_record)
    tfds_split: str = "train"
    tfds_data_dir: str = ""  # TFDS data directory; empty for the TFDS default
    builtin: bool = False  # text that ships with Python (lmtrain.data.builtin_corpus), no download
    max_docs: int = 0  # stop after this many documents, 0 for all

    def describe(self) -> dict:
        """The fields that identify the corpus, for manifests and tokenizer metadata."""
        if self.files:
            return {"files": list(self.files), "text_field": self.text_field, "txt_unit": self.txt_unit,
                    "max_docs": self.max_docs}
        if self.hf_dataset:
            return {"hf_dataset": self.hf_dataset, "hf_config": self.hf_config, "hf_split": self.hf_split,
                    "text_field": self.text_field, "max_docs": self.max_docs}
        if self.tfds_name:
            return {"tfds": self.tfds_name, "tfds_split": self.tfds_split, "tfds_data_dir": self.tfds_data_dir,
                    "text_field": self.text_field, "max_docs": self.max_docs}
        return {"builtin": True, "max_docs": self.max_docs}


def add_corpus_args(parser: argparse.ArgumentParser) -> None:
    """Add the input flags shared by the data tools."""
    g = parser.add_argument_group("input corpus (choose one source)")
    g.add_argument("--input", nargs="+", default=[], metavar="PATH_OR_GLOB",
                   help=".txt, .jsonl, .parquet or .csv files or glob patterns of them (local or gs://)")
    g.add_argument("--text-field", default="text", help="field holding the text (jsonl/parquet/csv/datasets)")
    g.add_argument("--txt-unit", default="paragraph", choices=TXT_UNITS,
                   help="what one document is in a .txt file (default: blank-line separated paragraph)")
    g.add_argument("--hf-dataset", default="", help="Hugging Face dataset name or local directory, streamed")
    g.add_argument("--hf-config", default="", help="Hugging Face dataset configuration")
    g.add_argument("--hf-split", default="train", help="Hugging Face dataset split")
    g.add_argument("--tfds", default="", help="TFDS dataset name (needs array_record files, no tensorflow)")
    g.add_argument("--tfds-split", default="train")
    g.add_argument("--tfds-data-dir", default="", help="TFDS data directory")
    g.add_argument("--builtin", action="store_true", help="the corpus that ships with Python (no download)")
    g.add_argument("--max-docs", type=int, default=0, help="read at most this many documents (0: all)")


def corpus_from_args(args: argparse.Namespace) -> CorpusSpec:
    """Build a CorpusSpec from parsed flags; raise SourceError unless exactly one source is given."""
    chosen = [name for name, on in (("--input", args.input), ("--hf-dataset", args.hf_dataset),
                                    ("--tfds", args.tfds), ("--builtin", args.builtin)) if on]
    if len(chosen) != 1:
        raise SourceError(f"give exactly one input source (--input, --hf-dataset, --tfds or --builtin); got "
                          f"{', '.join(chosen) if chosen else 'none'}.")
    return CorpusSpec(files=tuple(args.input), text_field=args.text_field, txt_unit=args.txt_unit,
                      hf_dataset=args.hf_dataset, hf_config=args.hf_config, hf_split=args.hf_split,
                      tfds_name=args.tfds, tfds_split=args.tfds_split, tfds_data_dir=args.tfds_data_dir,
                      builtin=args.builtin, max_docs=args.max_docs)


def expand_files(patterns: tuple[str, ...] | list[str]) -> list[Path]:
    """Resolve paths and globs to a sorted, de-duplicated file list; every pattern must match a readable file."""
    files: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = _remote_matches(pattern) if is_remote(pattern) else sorted(
                Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise SourceError(f"input pattern '{pattern}' matches no file.")
        else:
            path = as_path(pattern) if is_remote(pattern) else Path(pattern)
            if not path.exists():
                raise SourceError(f"input file {path} does not exist.")
            if path.is_dir():
                raise SourceError(f"input {path} is a directory; give files or a glob such as '{path}/*.jsonl'.")
            matches = [path]
        for path in matches:
            if path.suffix.lower() not in FILE_FORMATS:
                raise SourceError(f"input file {path}: unsupported extension '{path.suffix}'. "
                                  f"Use one of {', '.join(sorted(FILE_FORMATS))}.")
            if not is_remote(path) and not os.access(path, os.R_OK):
                raise SourceError(f"input file {path} is not readable.")
            if path not in files:
                files.append(path)
    return files


def _remote_matches(pattern: str) -> list:
    """The files a gs:// glob matches, sorted: the pattern's parts from the first one with a wildcard on are
    matched under the prefix before it."""
    parts = pattern.split("/")
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    base, rest = "/".join(parts[:first]), "/".join(parts[first:])
    return sorted((p for p in as_path(base).glob(rest) if p.is_file()), key=str)


def file_stats(files: list) -> list[list]:
    """[path, size, modification time] of each input file: a changed file must not be mixed with shards of the
    old one (a gs:// object's time is in seconds)."""
    stats = []
    for path in files:
        if is_remote(path):
            st = as_path(path).stat()
            stats.append([str(path), st.length, st.mtime])
        else:
            stats.append([str(path), path.stat().st_size, path.stat().st_mtime_ns])
    return stats


def check_spec(spec: CorpusSpec) -> None:
    """Fail fast on inputs that cannot be read at all, before any output is written."""
    if spec.files:
        expand_files(spec.files)
    if spec.txt_unit not in TXT_UNITS:
        raise SourceError(f"txt_unit='{spec.txt_unit}' is unknown; choose one of {', '.join(TXT_UNITS)}.")


def iter_documents(spec: CorpusSpec) -> Iterator[str]:
    """Yield the corpus's documents, in a fixed order, as str."""
    if spec.files:
        docs = _iter_files(expand_files(spec.files), spec.text_field, spec.txt_unit)
    elif spec.hf_dataset:
        docs = _iter_hf_dataset(spec)
    elif spec.tfds_name:
        docs = _iter_tfds(spec)
    elif spec.builtin:
        docs = _iter_builtin(spec.max_docs)
    else:
        raise SourceError("no input source given.")
    for count, doc in enumerate(docs, 1):
        yield doc
        if spec.max_docs and count >= spec.max_docs:
            return


def iter_records(spec: CorpusSpec) -> Iterator[tuple[dict, str]]:
    """Yield (record, where) for structured inputs (task data: prompt/completion, messages, text/label).

    `where` names the file and line (or row, or dataset record) for error messages. Records come
    from .jsonl/.json, .parquet and .csv files, or a Hugging Face dataset, in a fixed order.
    """
    if spec.files:
        files = expand_files(spec.files)
        readers = {"jsonl": _iter_jsonl_records, "parquet": _iter_parquet_records, "csv": _iter_csv_records}
        for path in files:
            kind = FILE_FORMATS[path.suffix.lower()]
            if kind not in readers:
                raise SourceError(f"input file {path}: task data needs .jsonl, .parquet or .csv records, not .{kind}.")
        records = (r for path in files for r in readers[FILE_FORMATS[path.suffix.lower()]](path))
    elif spec.hf_dataset:
        records = _iter_hf_records(spec)
    else:
        raise SourceError("task data (--format sft, chat or classify) is read from --input files or --hf-dataset.")
    for count, item in enumerate(records, 1):
        yield item
        if spec.max_docs and count >= spec.max_docs:
            return


def parse_json_line(line: str, where: str):
    """One JSON value of a .jsonl line, or a SourceError naming `where` for what json accepts but
    nothing downstream can use: deep nesting (json recurses) and lone surrogate escapes (not text)."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise SourceError(f"{where}: malformed JSON ({e.msg} at column {e.colno}).") from None
    except RecursionError:
        raise SourceError(f"{where}: JSON nested too deeply to read (over {sys.getrecursionlimit()} levels of "
                          "brackets); fix or drop that line.") from None
    if SURROGATE_ESCAPE.search(line):  # rare: only then is the whole value re-encoded to find a lone one
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            bad = e.object[e.start : e.end].encode("utf-8", "backslashreplace").decode("ascii")
            raise SourceError(f"{where}: the JSON holds a lone surrogate escape ({bad}), half of a UTF-16 pair, "
                              "which is not text; fix or drop that string.") from None
    return value


def _iter_jsonl_records(path: Path) -> Iterator[tuple[dict, str]]:
    with _open_text(path) as f:
        for number, line in _decode_guard(path, f):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            record = parse_json_line(line, where)
            if not isinstance(record, dict):
                raise SourceError(f"{where}: expected a JSON object, got {type(record).__name__}.")
            yield record, where


def _iter_parquet_records(path: Path) -> Iterator[tuple[dict, str]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(_open_bytes(path) if is_remote(path) else path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise SourceError(f"{path}: not a readable parquet file ({e}).") from None
    row = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            yield record, f"{path}: row {row}"


def _iter_csv_records(path: Path) -> Iterator[tuple[dict, str]]:
    csv.field_size_limit(sys.maxsize)
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError as e:
                raise _not_utf8(path, e) from None
            except csv.Error as e:
                raise SourceError(f"{path}:{reader.line_num}: cannot parse CSV ({e}).") from None
            yield {k: v for k, v in row.items() if k is not None}, f"{path}:{reader.line_num}"


def _iter_hf_records(spec: CorpusSpec) -> Iterator[tuple[dict, str]]:
    import datasets

    try:
        ds = datasets.load_dataset(spec.hf_dataset, spec.hf_config or None, split=spec.hf_split, streaming=True)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the message is what matters
        raise SourceError(f"Hugging Face dataset '{spec.hf_dataset}' (config '{spec.hf_config}', split "
                          f"'{spec.hf_split}') cannot be opened: {e}") from None
    for index, record in enumerate(ds):
        yield dict(record), f"dataset {spec.hf_dataset} split {spec.hf_split} record {index}"


def _iter_files(files: list[Path], text_field: str, txt_unit: str) -> Iterator[str]:
    readers = {"txt": lambda p: _iter_txt(p, txt_unit), "jsonl": lambda p: _iter_jsonl(p, text_field),
               "parquet": lambda p: _iter_parquet(p, text_field), "csv": lambda p: _iter_csv(p, text_field)}
    for path in files:
        yield from readers[FILE_FORMATS[path.suffix.lower()]](path)


def _open_text(path: Path):
    if is_remote(path):
        return io.TextIOWrapper(as_path(path).open("rb"), encoding="utf-8", errors="strict", newline="")
    return open(path, encoding="utf-8", errors="strict", newline="")


def _open_bytes(path: Path):
    return as_path(path).open("rb") if is_remote(path) else open(path, "rb")


def _decode_guard(path: Path, lines: Iterator[str]) -> Iterator[tuple[int, str]]:
    """Number lines from 1 and turn a decoding failure into an error naming the file and line."""
    try:
        yield from enumerate(lines, 1)
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None


def _not_utf8(path: Path, error: UnicodeDecodeError) -> SourceError:
    """The error for a file that is not UTF-8, at the line where the bad byte really is.

    The text reader decodes a buffer of several kilobytes ahead of the line it hands out, so
    neither the line being read nor the error's offset tells where the bad byte is: the file is
    scanned again, line by line, on this error path only.
    """
    with _open_bytes(path) as f:
        for number, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return SourceError(f"{path}:{number}: not valid UTF-8 ({e.reason} at byte {e.start + 1} of the "
                                   f"line: {raw[e.start : e.start + 4]!r}). Re-encode the file as UTF-8.")
    return SourceError(f"{path}: not valid UTF-8 ({error.reason}). Re-encode the file as UTF-8.")


def _iter_txt(path: Path, unit: str) -> Iterator[str]:
    with _open_text(path) as f:
        if unit == "file":
            try:
                yield f.read()
            except UnicodeDecodeError as e:
                raise _not_utf8(path, e) from None
            return
        paragraph: list[str] = []
        for _, line in _decode_guard(path, f):
            if unit == "line":
                if line.strip():
                    yield line.rstrip("\r\n")
                continue
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                yield "".join(paragraph).rstrip("\r\n")
                paragraph = []
        if paragraph:
            yield "".join(paragraph).rstrip("\r\n")


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with _open_text(path) as f:
        for number, line in _decode_guard(path, f):
            if not line.strip():
                continue
            record = parse_json_line(line, f"{path}:{number}")
            yield _text_of(record, text_field, f"{path}:{number}")


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(_open_bytes(path) if is_remote(path) else path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise SourceError(f"{path}: not a readable parquet file ({e}).") from None
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise SourceError(f"{path}: no column '{text_field}' (columns: {', '.join(names)}). Set --text-field.")
    row = 0
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            if not isinstance(value, str):
                raise SourceError(f"{path}: row {row}: column '{text_field}' is {type(value).__name__}, not text.")
            yield value


def _iter_csv(path: Path, text_field: str) -> Iterator[str]:
    csv.field_size_limit(sys.maxsize)
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        try:
            header = reader.fieldnames or []
        except UnicodeDecodeError as e:
            raise _not_utf8(path, e) from None
        if text_field not in header:
            raise SourceError(f"{path}: no column '{text_field}' in the header ({', '.join(header)}). "
                              "Set --text-field.")
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError as e:
                raise _not_utf8(path, e) from None
            except csv.Error as e:
                raise SourceError(f"{path}:{reader.line_num}: cannot parse CSV ({e}).") from None
            value = row.get(text_field)
            if value is None:
                raise SourceError(f"{path}:{reader.line_num}: row has no value for column '{text_field}'.")
            yield value


def _text_of(record, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise SourceError(f"{where}: expected a JSON object with a '{text_field}' field, got {type(record).__name__}.")
    if text_field not in record:
        keys = ", ".join(list(record)[:10])
        raise SourceError(f"{where}: no field '{text_field}' (fields: {keys}). Set --text-field.")
    value = record[text_field]
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if not isinstance(value, str):
        raise SourceError(f"{where}: field '{text_field}' is {type(value).__name__}, not text.")
    return value


def _iter_hf_dataset(spec: CorpusSpec) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(spec.hf_dataset, spec.hf_config or None, split=spec.hf_split, streaming=True)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the message is what matters
        raise SourceError(f"Hugging Face dataset '{spec.hf_dataset}' (config '{spec.hf_config}', split "
                          f"'{spec.hf_split}') cannot be opened: {e}") from None
    for index, record in enumerate(ds):
        yield _text_of(record, spec.text_field, f"dataset {spec.hf_dataset} split {spec.hf_split} record {index}")


def _iter_tfds(spec: CorpusSpec, start: int = 0, stop: int | None = None) -> Iterator[str]:
    """Read a prepared TFDS dataset through tfds.data_source (array_record files; tensorflow not needed); records
    start..stop only, when given (a parallel reader's share)."""
    source = _tfds_source(spec)
    for index in range(start, len(source) if stop is None else min(stop, len(source))):
        yield _text_of(source[index], spec.text_field, f"TFDS {spec.tfds_name} split {spec.tfds_split} record {index}")


def tfds_length(spec: CorpusSpec) -> int:
    """The number of records of the TFDS split: random access lets parallel readers each take a range."""
    return len(_tfds_source(spec))


def iter_tfds_range(spec: CorpusSpec, start: int, stop: int) -> Iterator[str]:
    """The documents of records start..stop of a TFDS split, as iter_documents gives them."""
    return _iter_tfds(spec, start, stop)


def _tfds_source(spec: CorpusSpec):
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(spec.tfds_name, data_dir=spec.tfds_data_dir or None)
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"TFDS dataset '{spec.tfds_name}' cannot be found: {e}") from None
    if not builder.is_prepared():
        raise SourceError(f"TFDS dataset '{spec.tfds_name}' is not prepared in {builder.data_dir}. Prepare it first "
                          "(e.g. `tfds build --file_format=array_record`).")
    try:
        return builder.as_data_source(split=spec.tfds_split)
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"TFDS dataset '{spec.tfds_name}' split '{spec.tfds_split}' cannot be read without "
                          f"tensorflow ({e}). Prepare it with file_format=array_record.") from None


def _iter_builtin(max_docs: int) -> Iterator[str]:
    yield from builtin_documents(max_docs=max_docs)
