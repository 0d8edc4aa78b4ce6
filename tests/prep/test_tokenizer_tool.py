"""tools/train_tokenizer.py and the text sources it reads: every algorithm loads with AutoTokenizer and
round-trips text; files, globs, HF datasets and TFDS all read; bad inputs fail clearly and change nothing."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from lmtrain.prep.text_sources import CorpusSpec, SourceError, iter_documents
from tools import train_tokenizer

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega the of and to in is for on with as by at from train model token data").split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(8, 60)))
        docs.append(f"Document {i}: " + " ".join(words) + ".")
    return docs


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def train(tmp_path: Path, *extra: str, name: str = "tok") -> tuple[int, Path]:
    out = tmp_path / name
    return train_tokenizer.main([*extra, "--output", str(out)]), out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", make_docs(300))


def test_bpe_loads_with_autotokenizer_and_round_trips(corpus, tmp_path):
    from transformers import AutoTokenizer

    rc, out = train(tmp_path, "--input", str(corpus), "--vocab-size", "300", "--special-tokens", "<sep>",
                    "--holdout-fraction", "0.1")
    assert rc == 0
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    text = "Document 7: théta and ΩMEGA\n\n  tabs\there — 123."
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level BPE is lossless, unknown characters included
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert tok.convert_tokens_to_ids("<sep>") not in (None, tok.unk_token_id)
    assert tok("a <sep> b")["input_ids"].count(tok.convert_tokens_to_ids("<sep>")) == 1  # kept whole
    assert len(tok) == 300
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["vocab_size"] == 300
    assert summary["held_out_documents"] > 0
    assert summary["training_documents"] + summary["held_out_documents"] == 300
    assert 1.0 < summary["compression_bytes_per_token"] < 10


@pytest.mark.parametrize("algorithm", ["unigram", "wordpiece"])
def test_unigram_and_wordpiece_load_and_round_trip(corpus, tmp_path, algorithm):
    from transformers import AutoTokenizer

    rc, out = train(tmp_path, "--input", str(corpus), "--algorithm", algorithm, "--vocab-size", "200")
    assert rc == 0
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    text = "the model and the data train"  # words of the corpus, single spaces: both algorithms keep it
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert tok.eos_token == "</s>" and tok.eos_token_id is not None


def test_normalization_nfkc_and_lowercase(corpus, tmp_path):
    from transformers import AutoTokenizer

    rc, out = train(tmp_path, "--input", str(corpus), "--vocab-size", "300", "--nfkc", "--lowercase")
    assert rc == 0
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok("THE MODEL ﬁ")["input_ids"] == tok("the model fi")["input_ids"]  # ﬁ ligature -> fi under NFKC


def test_max_chars_caps_training_text(corpus, tmp_path):
    rc, out = train(tmp_path, "--input", str(corpus), "--vocab-size", "300", "--max-chars", "2000",
                    "--holdout-fraction", "0")
    assert rc == 0
    summary = json.loads((out / "training_summary.json").read_text())
    longest = max(len(d) for d in make_docs(300))
    assert 2000 <= summary["training_chars"] < 2000 + longest
    assert summary["training_documents"] < 300


def test_all_file_formats_and_globs_read_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_docs(12, seed=3)
    write_jsonl(tmp_path / "a.jsonl", docs[:3])
    with open(tmp_path / "b.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows([[i, d + "\nwith, a \"quoted\" second line"] for i, d in enumerate(docs[3:6])])
    pq.write_table(pa.table({"text": docs[6:9]}), tmp_path / "c.parquet")
    (tmp_path / "d.txt").write_text("\n\n".join(docs[9:]) + "\n", encoding="utf-8")
    got = list(iter_documents(CorpusSpec(files=(str(tmp_path / "*"),))))
    expected = docs[:3] + [d + "\nwith, a \"quoted\" second line" for d in docs[3:6]] + docs[6:]
    assert got == expected
    lines = list(iter_documents(CorpusSpec(files=(str(tmp_path / "d.txt"),), txt_unit="line")))
    assert lines == docs[9:]
    assert list(iter_documents(CorpusSpec(files=(str(tmp_path / "*.jsonl"),), max_docs=2))) == docs[:2]


def test_hf_dataset_source_streams_local_data(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data_dir = tmp_path / "hf_data"
    data_dir.mkdir()
    docs = make_docs(40, seed=5)
    write_jsonl(data_dir / "train.jsonl", docs, field="content")
    got = list(iter_documents(CorpusSpec(hf_dataset=str(data_dir), hf_split="train", text_field="content")))
    assert got == docs
    rc, out = train(tmp_path, "--hf-dataset", str(data_dir), "--text-field", "content", "--vocab-size", "280")
    assert rc == 0 and (out / "tokenizer.json").is_file()
    with pytest.raises(SourceError, match="no field 'text'"):
        list(iter_documents(CorpusSpec(hf_dataset=str(data_dir), hf_split="train")))


def test_tfds_source_reads_array_record_without_tensorflow(tmp_path):
    import tensorflow_datasets as tfds

    docs = make_docs(15, seed=6)

    class LmtrainTinyText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, d in enumerate(docs):
                yield i, {"text": d}

    LmtrainTinyText(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
    spec = CorpusSpec(tfds_name="lmtrain_tiny_text", tfds_data_dir=str(tmp_path / "tfds"))
    assert sorted(iter_documents(spec)) == sorted(docs)  # TFDS shuffles at preparation time


def test_missing_input_file_is_a_clear_error(tmp_path, capsys):
    rc, out = train(tmp_path, "--input", str(tmp_path / "nope.jsonl"), "--vocab-size", "300")
    assert rc == 2
    assert f"input file {tmp_path / 'nope.jsonl'} does not exist" in capsys.readouterr().err
    assert not out.exists()
    rc, _ = train(tmp_path, "--input", str(tmp_path / "*.jsonl"))
    assert rc == 2 and "matches no file" in capsys.readouterr().err


def test_bad_jsonl_names_file_and_line_and_keeps_existing_output(corpus, tmp_path, capsys):
    rc, out = train(tmp_path, "--input", str(corpus), "--vocab-size", "300")
    assert rc == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n', encoding="utf-8")
    rc, _ = train(tmp_path, "--input", str(bad), "--overwrite")
    assert rc == 2
    assert f"{bad}:2: no field 'text'" in capsys.readouterr().err
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text('{"text": "fine"}\n\n{"text": "broken\n', encoding="utf-8")
    rc, _ = train(tmp_path, "--input", str(malformed), "--overwrite")
    assert rc == 2
    assert f"{malformed}:3: malformed JSON" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    rc, _ = train(tmp_path, "--input", str(empty), "--overwrite")
    assert rc == 2 and "corpus is empty" in capsys.readouterr().err
    rc, _ = train(tmp_path, "--input", str(corpus))  # no --overwrite
    assert rc == 2 and "exists" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_exactly_one_source_is_required(tmp_path, corpus, capsys):
    rc, _ = train(tmp_path, "--input", str(corpus), "--builtin")
    assert rc == 2 and "exactly one input source" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["jsonl", "txt-line", "txt-paragraph", "txt-file", "csv"])
def test_non_utf8_error_names_the_line_that_holds_the_bad_byte(tmp_path, fmt):
    # The text reader decodes kilobytes ahead of the line it yields: a bad byte on line 400 used to
    # be reported on whatever line the reader had reached (line 1 for a .txt file read whole).
    from lmtrain.prep.text_sources import CorpusSpec, SourceError, iter_documents

    ext, unit = (fmt.split("-") + ["paragraph"])[:2]
    lines = [json.dumps({"text": f"document number {i} is fine"}) if ext == "jsonl" else f"line {i} is fine"
             for i in range(1, 700)]
    if ext == "csv":
        lines = ["text"] + lines[:-1]
    raw = "\n".join(lines).encode("utf-8") + b"\n"
    at = [i for i, byte in enumerate(raw) if byte == ord("\n")][398] + 1  # where the 400th line starts
    path = tmp_path / f"c.{ext}"
    path.write_bytes(raw[: at + 5] + b"\xff\xfe" + raw[at + 5 :])  # the 400th line of the file
    with pytest.raises(SourceError, match=f"{path}:400: not valid UTF-8 .*at byte 6 of the line"):
        list(iter_documents(CorpusSpec(files=(str(path),), txt_unit=unit)))


def test_the_real_vocab_size_and_the_config_flag_are_printed_with_a_warning_when_short(corpus, tmp_path, capsys):
    from transformers import AutoTokenizer

    rc, out = train(tmp_path, "--input", str(corpus), "--vocab-size", "32000")  # far more than this corpus holds
    assert rc == 0
    real = len(AutoTokenizer.from_pretrained(str(out)))
    assert real < 2000
    captured = capsys.readouterr()
    assert f"--config.model.vocab_size={real} " in captured.out
    assert f"warning: the corpus yields only {real} tokens of the 32000 asked for" in captured.err
    summary = json.loads((out / "training_summary.json").read_text())
    assert (summary["vocab_size"], summary["requested_vocab_size"]) == (real, 32000)
    rc, _ = train(tmp_path, "--input", str(corpus), "--vocab-size", "300", name="fits")
    captured = capsys.readouterr()
    assert rc == 0 and "--config.model.vocab_size=300 " in captured.out and "warning" not in captured.err


def test_a_rerun_with_the_same_inputs_and_options_keeps_the_tokenizer(corpus, tmp_path, capsys):
    """Re-running the quickstart must not stop at the tokenizer; other inputs or options still need --overwrite."""
    args = ("--input", str(corpus), "--vocab-size", "300")
    rc, out = train(tmp_path, *args)
    assert rc == 0
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    capsys.readouterr()
    rc, _ = train(tmp_path, *args)
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"{out} already holds a tokenizer trained on these inputs with these options; kept it" in printed
    assert "--config.model.vocab_size=" in printed
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before
    rc, _ = train(tmp_path, *args[:-1], "301")  # other options
    assert rc == 2 and "exists (not a tokenizer of these inputs and options); pass --overwrite" in capsys.readouterr().err
    changed = write_jsonl(tmp_path / "docs.jsonl", make_docs(300, seed=1))
    rc, _ = train(tmp_path, "--input", str(changed), "--vocab-size", "300", name="tok2")
    assert rc == 0
    write_jsonl(changed, make_docs(301, seed=1))  # the same path, other content
    rc, _ = train(tmp_path, "--input", str(changed), "--vocab-size", "300", name="tok2")
    assert rc == 2 and "pass --overwrite" in capsys.readouterr().err
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before
