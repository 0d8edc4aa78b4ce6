"""--format pref: preference pairs stored whole, one pair per batch row with its two loss masks, chat pairs masked
on the completion only, --too-long, and one-line errors naming the file and line."""

from __future__ import annotations

import numpy as np
import pytest

from lmtrain.data.formats.pref import pair_batch
from lmtrain.data.shards import ShardedTrainIterator, load_manifest
from tests.data.test_data_tasks import SEQ_LEN, TEMPLATES, hf_tok, sentence, shard, tok_dir, write_jsonl  # noqa: F401


def pref_records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"prompt": sentence(rng, 2, 6), "chosen": sentence(rng, 2, 5), "rejected": sentence(rng, 2, 5)}
            for _ in range(n)]


def _batches(out, rows: int, n: int = 1, seq_len: int = SEQ_LEN) -> list[dict]:
    it = ShardedTrainIterator(out, seq_len, rows, seed=0, prefetch=0)
    try:
        return [next(it) for _ in range(n)]
    finally:
        it.close()


def test_a_pair_row_holds_chosen_then_rejected_each_masked_on_its_completion(tok_dir, hf_tok, tmp_path):  # noqa: F811
    records = pref_records(24)
    assert shard(tok_dir, write_jsonl(tmp_path / "p.jsonl", records), tmp_path / "out", "--format", "pref",
                 "--val-fraction", "0") == 0
    assert load_manifest(tmp_path / "out")["example_format"] == "pref"
    (batch,) = _batches(tmp_path / "out", 8)
    eos = hf_tok.convert_tokens_to_ids(hf_tok.eos_token) if hf_tok.eos_token else None
    seen = 0
    for r in range(8):
        seg, inputs = batch["segment_ids"][r], batch["inputs"][r]
        n_c, n = int((seg == 1).sum()), int((seg > 0).sum())
        assert (seg[:n_c] == 1).all() and (seg[n_c:n] == 2).all() and not seg[n:].any()  # chosen first, then rejected
        for lo, hi in ((0, n_c), (n_c, n)):
            np.testing.assert_array_equal(batch["positions"][r, lo:hi], np.arange(hi - lo))
            np.testing.assert_array_equal(batch["targets"][r, lo:hi - 1], inputs[lo + 1:hi])
            assert batch["loss_mask"][r, hi - 1] == 0  # no target across the pair or into padding
        texts = []
        for lo, hi in ((0, n_c), (n_c, n)):
            mask = batch["loss_mask"][r, lo:hi - 1] > 0
            assert mask.any() and not mask[0]  # the completion: a suffix of the sequence, after the prompt
            first = int(np.argmax(mask))
            assert mask[first:].all()
            completion = batch["targets"][r, lo:hi - 1][first:]
            if eos is not None:
                assert completion[-1] == eos
            texts.append((hf_tok.decode(inputs[lo:lo + first + 1]).strip(), hf_tok.decode(completion[:-1]).strip()))
        (prompt_c, chosen), (prompt_r, rejected) = texts
        assert prompt_c == prompt_r  # both completions of the same prompt
        assert any(prompt_c == x["prompt"] and chosen == x["chosen"] and rejected == x["rejected"] for x in records)
        seen += 1
    assert seen == 8 and batch["weights"].tolist() == [1.0] * 8


def test_pair_batch_pads_rows_past_the_pairs_with_zero_weight():
    ex = {"tokens": np.array([5, 6, 7, 5, 8]), "weights": np.array([0, 1, 1, 0, 1], np.uint8), "chosen_len": 3}
    b = pair_batch([ex], 6, 2, pad_id=9)
    assert b["weights"].tolist() == [1.0, 0.0] and not b["loss_mask"][1].any() and (b["inputs"][1] == 9).all()
    assert b["segment_ids"][0].tolist() == [1, 1, 1, 2, 2, 0] and b["positions"][0].tolist() == [0, 1, 2, 0, 1, 0]
    assert b["targets"][0].tolist() == [6, 7, 0, 8, 0, 0] and b["loss_mask"][0].tolist() == [1, 1, 0, 1, 0, 0]


def test_too_long_pairs_lose_prompt_tokens_from_both_copies_or_are_dropped(tok_dir, hf_tok, tmp_path, capsys):  # noqa: F811
    rng = np.random.default_rng(1)
    long_prompt = " ".join(["alpha"] * (SEQ_LEN // 2 - 4))
    records = [*pref_records(8), {"prompt": long_prompt + " " + sentence(rng, 2, 3), "chosen": "beta gamma",
                                  "rejected": "delta user"}]
    path = write_jsonl(tmp_path / "p.jsonl", records)
    assert shard(tok_dir, path, tmp_path / "trunc", "--format", "pref", "--val-fraction", "0") == 0
    counts = load_manifest(tmp_path / "trunc")["examples"]
    assert counts["truncated"] == 1 and counts["kept"] == 9
    assert shard(tok_dir, path, tmp_path / "drop", "--format", "pref", "--val-fraction", "0", "--too-long", "drop") == 0
    counts = load_manifest(tmp_path / "drop")["examples"]
    assert counts["dropped_too_long"] == 1 and counts["kept"] == 8
    (batch,) = _batches(tmp_path / "trunc", 9)
    lengths = [(int((batch["segment_ids"][r] == 1).sum()), int((batch["segment_ids"][r] == 2).sum())) for r in range(9)]
    assert max(c + r for c, r in lengths) <= SEQ_LEN  # the truncated pair still fits whole


def test_chat_pairs_are_rendered_with_the_template_and_masked_on_the_completion_only(tok_dir, hf_tok, tmp_path):  # noqa: F811
    prompt = [{"role": "user", "content": "What is alpha?"}, {"role": "assistant", "content": "A letter."},
              {"role": "user", "content": "And beta?"}]
    records = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": "The second one."}],
                "rejected": [{"role": "assistant", "content": "gamma delta"}]}]
    path = write_jsonl(tmp_path / "c.jsonl", records)
    assert shard(tok_dir, path, tmp_path / "out", "--format", "pref", "--val-fraction", "0",
                 "--chat-template", str(TEMPLATES / "chatml.jinja"), "--seq-len", "96") == 0
    (batch,) = _batches(tmp_path / "out", 1, seq_len=96)
    seg = batch["segment_ids"][0]
    for segment, text in ((1, "The second one."), (2, "gamma delta")):
        in_seg = seg == segment
        trained = batch["targets"][0][in_seg & (batch["loss_mask"][0] > 0)]
        rendered = hf_tok.decode(trained)
        assert rendered.replace(" ", "").startswith(text.replace(" ", "")) and "<|im_end|>" in rendered
        assert "A letter" not in rendered  # the prompt's assistant turn is context, not trained on
        assert "A letter." in hf_tok.decode(batch["inputs"][0][in_seg])  # but it is there as context


@pytest.mark.parametrize("case", ["missing_chosen", "empty_rejected", "same", "long_prompt"])
def test_bad_pairs_are_a_one_line_error_naming_file_and_line(tok_dir, tmp_path, capsys, case):  # noqa: F811
    bad = tmp_path / "bad.jsonl"
    good = pref_records(2)
    record, message = {
        "missing_chosen": ({"prompt": "q", "rejected": "a"}, "no field 'chosen'"),
        "empty_rejected": ({"prompt": "q", "chosen": "a", "rejected": " "}, "field 'rejected' is empty"),
        "same": ({"prompt": "q", "chosen": "alpha", "rejected": "alpha"}, "'chosen' and 'rejected' are the same"),
        "long_prompt": ({"prompt": " ".join(["alpha beta"] * SEQ_LEN), "chosen": "a", "rejected": "b"},
                        f"longer than the sequence (--seq-len {SEQ_LEN})"),
    }[case]
    write_jsonl(bad, [*good, record])
    assert shard(tok_dir, bad, tmp_path / "out", "--format", "pref") == 2
    err = capsys.readouterr().err
    assert f"{bad}:3: " in err and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
