"""tools/benchmark_bert.py on any BERT: a Hugging Face directory or a WORKDIR, real tokens/s for both sides (issue 25)."""

import json
import shutil

import pytest
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from tools import benchmark_bert, shard_data, train_tokenizer

SEQ_LEN = 64


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random 2-layer BERT saved as transformers does, with a WordPiece tokenizer, and classify shards made
    with that tokenizer: (hf_dir, shards)."""
    root = tmp_path_factory.mktemp("bench_bert")
    tok, hf, shards = root / "tokenizer", root / "hf", root / "shards"
    assert train_tokenizer.main(["--builtin", "--bert", "--max-docs", "40", "--vocab-size", "256", "--output",
                                 str(tok)]) == 0
    BertModel(BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=SEQ_LEN)).save_pretrained(str(hf))
    for f in tok.iterdir():
        shutil.copy(f, hf / f.name)
    assert shard_data.main(["--builtin-task", "classify", "--tokenizer", str(tok), "--output", str(shards),
                            "--seq-len", str(SEQ_LEN), "--quiet"]) == 0
    return str(hf), str(shards)


@pytest.mark.heavy  # ~20 s alone on 2 cores (two compiled row lengths, a torch model), more under load
def test_benchmark_bert_reports_real_tokens_per_s_on_a_hugging_face_bert(tiny_bert, tmp_path, capsys):
    hf, shards = tiny_bert
    out = tmp_path / "bench.json"
    assert benchmark_bert.main(["--model", hf, "--shards", shards, "--batches", "2", "--rounds", "2",
                                "--batch-size", "8", "--seq-len", str(SEQ_LEN), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["shape"]["d_model"] == 32 and result["shape"]["n_layers"] == 2  # the model given, not bert_tiny
    for side in ("lmtrain", "torch"):
        r = result[side]
        assert len(r["tokens_per_s_rounds"]) == 2 and r["tokens_per_s"] > 0
        assert r["slots_per_s"] == pytest.approx(r["tokens_per_s"] / (1 - r["padding"]))
    assert max(result["lmtrain_row_lengths"]) <= SEQ_LEN
    assert result["lmtrain"]["padding"] < 0.3  # bucketed rows, not every row padded to --seq-len
    assert "real tokens/s" in capsys.readouterr().out


def test_benchmark_bert_refuses_a_model_that_is_not_bert_in_one_line(tiny_bert, tmp_path, capsys):
    _, shards = tiny_bert
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2)).save_pretrained(str(tmp_path / "gpt2"))
    capsys.readouterr()  # transformers' own saving messages
    for model in (tmp_path / "gpt2", tmp_path / "missing"):
        assert benchmark_bert.main(["--model", str(model), "--shards", shards, "--batches", "1", "--rounds", "1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("benchmark_bert: error: --model") and len(err.strip().splitlines()) == 1
        assert "Traceback" not in err
