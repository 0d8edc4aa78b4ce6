"""Task data (issue 8's data side): sft, chat and classify shards from tools/shard_data.py and their loaders.

Chat masks on stock templates (fixtures in tests/fixtures/chat_templates, nothing downloaded) and
against transformers' return_assistant_tokens_mask; sft masks, whole-example packing equal to the
examples unpacked, exact resume and data slices; classify labels, batches and padding; the
too-long policy; and clear errors naming the file and line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmtrain.config import ConfigError
from lmtrain.data.examples import ChatEncoder, ExampleError
from lmtrain.data.packing import ExamplePacker, check_batch, rows_dict_to_batch
from lmtrain.data.shards import ShardedTrainIterator, decode_record, load_manifest, shard_eval_batches
from lmtrain.evaluate import examples as eval_examples
from lmtrain.prep.shard_data import split_of_example
from tools import shard_data, train_tokenizer

TEMPLATES = Path(__file__).resolve().parents[1] / "fixtures" / "chat_templates"
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "[INST]", "[/INST]"]
WORDS = "the of and to in is for on with as by at from train model token data alpha beta gamma delta user".split()
SEQ_LEN = 48


def sentence(rng, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi))))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("task_tok")
    rng = np.random.default_rng(0)
    corpus = root / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": sentence(rng, 20, 40)}) + "\n" for _ in range(200)), encoding="utf-8")
    assert train_tokenizer.main(["--input", str(corpus), "--vocab-size", "400", "--output", str(root / "tok"),
                                 "--special-tokens", *SPECIALS]) == 0
    return root / "tok"


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    from lmtrain.data.tokenizer import load_tokenizer

    return load_tokenizer(tok_dir)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def shard(tok_dir: Path, inputs: Path, out: Path, *extra: str) -> int:
    return shard_data.main(["--input", str(inputs), "--tokenizer", str(tok_dir), "--output", str(out), "--quiet",
                            "--seq-len", str(SEQ_LEN), "--shard-mb", "0.002", *extra])


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is alpha?"},
                {"role": "assistant", "content": "The first letter."}, {"role": "user", "content": "And beta?"},
                {"role": "assistant", "content": "The second one."}]
END_OF_TURN = {"chatml": "<|im_end|>", "chatml_generation": "<|im_end|>", "qwen2": "<|im_end|>", "llama3": "<|eot_id|>",
               "llama3_generation": "<|eot_id|>", "mistral_v01": "</s>", "mistral_v03": "</s>"}


def masked_runs(tokenizer, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
    runs, current = [], []
    for token, m in zip(tokens.tolist(), mask.tolist(), strict=True):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return [tokenizer.decode(r).strip() for r in runs + ([current] if current else [])]


@pytest.mark.parametrize("template", sorted(END_OF_TURN))
def test_chat_mask_covers_each_assistant_turn_and_its_end_of_turn_token(hf_tok, template):
    # stock templates without generation markers: the mask must be neither all-zero nor all-one
    messages = CONVERSATION[1:] if template == "mistral_v01" else CONVERSATION  # v0.1 has no system role
    encoder = ChatEncoder(hf_tok, 1000, chat_template=(TEMPLATES / f"{template}.jinja").read_text())
    example = encoder.encode({"messages": messages}, "chat.jsonl:1")
    end = END_OF_TURN[template]
    assert masked_runs(hf_tok, example.tokens, example.mask) == [f"The first letter.{end}", f"The second one.{end}"]
    rendered = encoder.render(messages, add_generation_prompt=False)
    assert example.tokens.tolist() == hf_tok(rendered, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("template", ["chatml_generation", "llama3_generation"])
def test_chat_mask_equals_transformers_assistant_tokens_mask(hf_tok, template):
    text = (TEMPLATES / f"{template}.jinja").read_text()
    encoder = ChatEncoder(hf_tok, 1000, chat_template=text)
    conversations = [CONVERSATION, CONVERSATION[1:3],
                     [{"role": "user", "content": " spaced  "}, {"role": "assistant", "content": "  alpha beta  "},
                      {"role": "user", "content": "x"}, {"role": "assistant", "content": "gamma\n\ndelta"}],
                     # the assistant speaks first: its header is not a target either
                     [{"role": "assistant", "content": "Hello there."}, *CONVERSATION[1:3]]]
    for messages in conversations:
        reference = hf_tok.apply_chat_template(messages, chat_template=text, tokenize=True, return_dict=True,
                                               return_assistant_tokens_mask=True)
        example = encoder.encode({"messages": messages}, "chat.jsonl:1")
        assert example.tokens.tolist() == list(reference["input_ids"])
        assert example.mask.tolist() == list(reference["assistant_masks"]), messages


def sft_records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"prompt": f"q{i} {sentence(rng, 2, 12)}\n", "completion": sentence(rng, 1, 8)} for i in range(n)]


def segments(batch: dict) -> list[dict]:
    """Every example of a packed batch, as the arrays of its segment."""
    out = []
    for r in range(len(batch["inputs"])):
        seg = batch["segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            sel = seg == s
            out.append({k: batch[k][r][sel] for k in ("inputs", "targets", "positions", "loss_mask")})
    return out


def unpacked(tokens: np.ndarray, mask: np.ndarray, row_len: int) -> dict:
    """The example alone in a row, as rows_to_batch gives it, cut to its own tokens."""
    packer = ExamplePacker(row_len)
    rows = packer.add(tokens, mask) + packer.finish()
    batch = rows_dict_to_batch(rows[:1])
    n = len(tokens) - 1  # predictions inside the example: its last token is a target only
    return {k: batch[k][0][:n] for k in ("inputs", "targets", "positions", "loss_mask")}


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_sft_shards_train_on_completion_and_eos_and_packed_equals_unpacked(tok_dir, hf_tok, tmp_path, train_on_prompt):
    records = sft_records(60)
    out = tmp_path / "sft"
    extra = ("--format", "sft", "--val-fraction", "0.2") + (("--train-on-prompt",) if train_on_prompt else ())
    assert shard(tok_dir, write_jsonl(tmp_path / "d.jsonl", records), out, *extra) == 0
    manifest = load_manifest(out)
    assert manifest["example_format"] == "sft" and manifest["seq_len"] == SEQ_LEN
    eos = manifest["eos_id"]
    from array_record.python.array_record_module import ArrayRecordReader

    stored = []
    for entry in manifest["splits"]["train"]["shards"]:
        reader = ArrayRecordReader(str(out / entry["file"]))
        stored += [decode_record("sft", manifest["token_dtype"], r)[:2] for r in reader.read_all()]
        reader.close()
    by_prompt = {}
    for tokens, mask in stored:
        assert tokens[-1] == eos and mask[-1] == 1
        first = int(np.argmax(mask)) if not train_on_prompt else None
        if not train_on_prompt:  # the mask is the completion and its EOS, nothing of the prompt
            prompt = hf_tok.decode(tokens[:first].tolist())
            assert mask[first:].all() and not mask[:first].any()
            record = next(r for r in records if r["prompt"] == prompt)
            assert hf_tok.decode(tokens[first:-1].tolist()) == record["completion"]
        else:
            assert mask.all()
        by_prompt[tuple(tokens.tolist())] = (tokens, mask)

    it = ShardedTrainIterator(out, SEQ_LEN, 4, seed=0, prefetch=0)
    seen = []
    while len(seen) < len(stored):
        batch = next(it)
        check_batch(batch, 400, SEQ_LEN, "sft")
        for part in segments(batch):
            # a segment that ends inside the row holds the whole example as inputs; one that ends
            # the row holds all but its last token, which is only a target
            tokens = part["inputs"] if tuple(part["inputs"].tolist()) in by_prompt else np.concatenate(
                [part["inputs"], part["targets"][-1:]])
            example = by_prompt.get(tuple(tokens.tolist()))
            assert example is not None, "a packed segment is not a whole example"
            alone = unpacked(*example, SEQ_LEN + 1)
            n = len(tokens) - 1
            for key in alone:  # inputs, targets, positions and loss mask as the example alone has them
                np.testing.assert_array_equal(part[key][:n], alone[key], err_msg=key)
            assert not part["loss_mask"][n:].any()  # nothing is learned across the boundary to the next example
            seen.append(tuple(tokens.tolist()))
    assert sorted(seen[: len(stored)]) == sorted(by_prompt)  # an epoch holds every example once
    it.close()


def test_sft_resume_is_exact_and_data_slices_are_disjoint_and_complete(tok_dir, tmp_path):
    out = tmp_path / "sft"
    assert shard(tok_dir, write_jsonl(tmp_path / "d.jsonl", sft_records(80, seed=1)), out, "--format", "sft") == 0
    it = ShardedTrainIterator(out, SEQ_LEN, 4, seed=3, prefetch=2)
    states, batches = [], []
    for _ in range(30):
        states.append(json.loads(json.dumps(it.get_state())))
        batches.append(next(it))
    it.close()
    for start in (0, 7, 29):
        resumed = ShardedTrainIterator(out, SEQ_LEN, 4, seed=3, prefetch=0)
        resumed.set_state(states[start])
        for k in range(start, 30):
            got = next(resumed)
            for key in got:
                np.testing.assert_array_equal(got[key], batches[k][key], err_msg=f"resume at {start}, batch {k}")
        resumed.close()
    n = load_manifest(out)["splits"]["train"]["documents"]
    together = []
    for index in range(2):
        a = ShardedTrainIterator(out, SEQ_LEN, 4, seed=3, data_index=index, data_count=2, prefetch=0)
        b = ShardedTrainIterator(out, SEQ_LEN, 4, seed=3, data_index=index, data_count=2, prefetch=0)
        share = len(range(index, n, 2))  # this slice's examples of the first epoch
        seen = []
        while a.get_state()["doc"] < share:
            batch, twin = next(a), next(b)
            for key in batch:  # the same slice reads identical batches
                np.testing.assert_array_equal(batch[key], twin[key])
            seen += [tuple(p["inputs"][:-1].tolist()) for p in segments(batch)]  # (the prompts are unique)
        together += seen[:share]
        a.close()
        b.close()
    assert len(together) == n and len(set(together)) == n  # disjoint slices that together are the split


def test_too_long_examples_follow_the_policy_and_are_counted(tok_dir, hf_tok, tmp_path):
    rng = np.random.default_rng(5)
    long_prompt = {"prompt": "start " + sentence(rng, 60, 61) + " end\n", "completion": "alpha beta"}
    long_answer = {"prompt": "q\n", "completion": sentence(rng, 70, 71)}
    data = write_jsonl(tmp_path / "d.jsonl", [*sft_records(20), long_prompt, long_answer])
    assert shard(tok_dir, data, tmp_path / "t", "--format", "sft", "--val-fraction", "0") == 0
    examples = load_manifest(tmp_path / "t")["examples"]
    assert (examples["truncated"], examples["dropped_too_long"], examples["kept"]) == (1, 1, 21)
    it = ShardedTrainIterator(tmp_path / "t", SEQ_LEN, 2, seed=0, prefetch=0)
    texts = [hf_tok.decode(p["inputs"].tolist()) for _ in range(12) for p in segments(next(it))]
    it.close()
    cut = next(t for t in texts if t.rstrip().endswith("alpha beta") and len(t) > 100)
    assert "start" not in cut and " end\n" in cut  # the prompt was cut from the left
    assert shard(tok_dir, data, tmp_path / "d", "--format", "sft", "--val-fraction", "0", "--too-long", "drop") == 0
    examples = load_manifest(tmp_path / "d")["examples"]
    assert (examples["truncated"], examples["dropped_too_long"], examples["kept"]) == (0, 2, 20)


def test_chat_shards_through_the_tool(tok_dir, hf_tok, tmp_path):
    convs = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"answer {i}"}]}
             for i in range(20)]
    out = tmp_path / "chat"
    assert shard(tok_dir, write_jsonl(tmp_path / "c.jsonl", convs), out, "--format", "chat", "--chat-template",
                 str(TEMPLATES / "qwen2.jinja"), "--val-fraction", "0") == 0
    it = ShardedTrainIterator(out, SEQ_LEN, 2, seed=0, prefetch=0)
    targets = {hf_tok.decode(p["targets"][p["loss_mask"] > 0].tolist()) for _ in range(10) for p in segments(next(it))}
    it.close()
    assert targets == {f"answer {i}<|im_end|>" for i in range(20)}


def classify_records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    labels = ["positive", "negative", "neutral"]
    return [{"text": f"r{i} " + sentence(rng, 3, 30), "label": labels[i % 3]} for i in range(n)]


def test_classify_shards_labels_batches_and_padding(tok_dir, tmp_path, capsys):
    out = tmp_path / "cls"
    records = classify_records(90)
    assert shard(tok_dir, write_jsonl(tmp_path / "d.jsonl", records), out, "--format", "classify",
                 "--val-fraction", "0.2", "--test-fraction", "0.2") == 0
    assert "labels (3, in class-id order): negative, neutral, positive" in capsys.readouterr().out
    manifest = load_manifest(out)
    assert manifest["labels"] == ["negative", "neutral", "positive"]
    assert sum(sum(s["label_counts"]) for s in manifest["splits"].values()) == 90
    label_of = {r["text"]: manifest["labels"].index(r["label"]) for r in records}
    from lmtrain.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    it = ShardedTrainIterator(out, SEQ_LEN, 4, seed=0, prefetch=0)
    for _ in range(5):
        batch = next(it)
        assert batch["inputs"].shape == (4, SEQ_LEN) and batch["labels"].shape == (4,)
        assert (batch["weights"] == 1).all()
        for r in range(4):
            real = batch["segment_ids"][r] > 0
            assert real[: real.sum()].all()  # right padding
            np.testing.assert_array_equal(batch["positions"][r][real], np.arange(real.sum()))
            assert label_of[tok.decode(batch["inputs"][r][real].tolist())] == batch["labels"][r]
    it.close()
    for split in ("validation", "test"):
        batches = list(shard_eval_batches(out, SEQ_LEN, 4, split=split))
        n = manifest["splits"][split]["documents"]
        assert sum(b["weights"].sum() for b in batches) == n and len(batches) == -(-n // 4)
        if n % 4:
            assert (batches[-1]["weights"][n % 4 :] == 0).all() and (batches[-1]["segment_ids"][n % 4 :] == 0).all()
    halves = [list(shard_eval_batches(out, SEQ_LEN, 4, data_index=i, data_count=2, split="test")) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([halves[0][0]["labels"], halves[1][0]["labels"]]),
                                  next(iter(shard_eval_batches(out, SEQ_LEN, 4, split="test")))["labels"])

    # evaluation data made apart from the training data takes the training classes and their order
    extra = write_jsonl(tmp_path / "e.jsonl", [{"text": "alpha beta", "label": "neutral"}])
    assert shard(tok_dir, extra, tmp_path / "e", "--format", "classify", "--val-fraction", "0.99",
                 "--labels-from", str(out)) == 2  # (everything in validation: no training example)
    assert "no training examples" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()  # found in the first pass, before anything is written
    assert shard(tok_dir, write_jsonl(tmp_path / "e.jsonl", classify_records(12, seed=2)), tmp_path / "e",
                 "--format", "classify", "--labels-from", str(out)) == 0
    assert load_manifest(tmp_path / "e")["labels"] == manifest["labels"]


def test_integer_labels_sort_as_numbers_and_class_ids_follow_that_order(tok_dir, tmp_path, capsys):
    """JSON integer labels 2, 10, 1: the classes are [1, 2, 10] (as strings they would sort 1, 10, 2), the manifest
    keeps them integers, and each example's class id is its label's position in that list."""
    from lmtrain.data.shards import split_source

    values = [2, 10, 1]
    records = [{"text": f"r{i} " + " ".join(WORDS[i % 7 : i % 7 + 3]), "label": values[i % 3]} for i in range(12)]
    assert shard(tok_dir, write_jsonl(tmp_path / "d.jsonl", records), tmp_path / "ints", "--format", "classify",
                 "--val-fraction", "0") == 0
    assert "labels (3, in class-id order): 1, 2, 10" in capsys.readouterr().out
    manifest = load_manifest(tmp_path / "ints")
    assert manifest["labels"] == [1, 2, 10] and all(type(v) is int for v in manifest["labels"])
    assert manifest["splits"]["train"]["label_counts"] == [4, 4, 4]
    from lmtrain.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    source = split_source(tmp_path / "ints", "train")
    want = {r["text"]: [1, 2, 10].index(r["label"]) for r in records}
    got = {}
    for i in range(len(source)):
        tokens, _, label_id = decode_record("classify", np.dtype(manifest["token_dtype"]), source[i])
        got[tok.decode(tokens.tolist())] = label_id
    assert got == want


@pytest.mark.parametrize("case", ["missing_field", "empty_completion", "no_assistant", "empty_assistant",
                                  "unseen_label", "no_label", "label_not_in_list"])
def test_bad_task_data_is_a_clear_error_naming_file_and_line(tok_dir, tmp_path, capsys, case):
    bad = tmp_path / "bad.jsonl"
    fmt, extra = "sft", ()
    good_sft = sft_records(3)
    if case == "missing_field":
        records, message = [*good_sft, {"prompt": "q"}], f"{bad}:4: no field 'completion'"
    elif case == "empty_completion":
        records, message = [*good_sft, {"prompt": "q", "completion": "  "}], f"{bad}:4: field 'completion' is empty"
    elif case in ("no_assistant", "empty_assistant"):
        fmt, extra = "chat", ("--chat-template", str(TEMPLATES / "chatml.jinja"))
        turns = [{"role": "user", "content": "hi"}] + ([{"role": "assistant", "content": ""}]
                                                       if case == "empty_assistant" else [])
        records = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
                   {"messages": turns}]
        message = f"{bad}:2: " + ("the conversation has no assistant turn" if case == "no_assistant"
                                   else "assistant turn 1 is empty")
    else:
        fmt = "classify"
        records = classify_records(30)
        if case == "unseen_label":
            # a label that only a validation example has (the split is a hash of the text)
            text = next(f"probe {k}" for k in range(1000)
                        if split_of_example(json.dumps(f"probe {k}"), 0.3, 0) == "validation")
            records.append({"text": text, "label": "sarcastic"})
            extra = ("--val-fraction", "0.3")
            message = f"{bad}:31: label 'sarcastic' (validation split) never occurs in the training split"
        elif case == "no_label":
            records.append({"text": "alpha", "category": "x"})
            message = f"{bad}:31: no label: field 'label' is missing"
        else:
            extra = ("--labels", "negative,positive")
            message = f"{bad}:3: label 'neutral' is not one of --labels (negative, positive)"
    write_jsonl(bad, records)
    assert shard(tok_dir, bad, tmp_path / "out", "--format", fmt, *extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_the_task_must_match_the_shards(tok_dir, tmp_path):
    from lmtrain.data.pipeline import check_formats, check_labels
    from tests.helpers import small_config

    check_formats(small_config(**{"task.name": "classify"}), ("classify",), "classify", "d")
    check_formats(small_config(**{"task.name": "classify"}), None, "text", "d")  # None: the caller checks nothing
    with pytest.raises(ConfigError, match="task.name=classify needs shards made with tools/shard_data.py --format "
                                          "classify \\(its records need text and label fields\\), but "
                                          "data.shards_dir=d holds text shards"):
        check_formats(small_config(**{"task.name": "classify"}), ("classify",), "text", "d")
    with pytest.raises(ConfigError, match="task.name=sft needs .* --format sft or chat, but data.shards_dir=d holds "
                                          "classify shards"):
        check_formats(small_config(**{"task.name": "sft"}), ("sft", "chat"), "classify", "d")
    with pytest.raises(ConfigError, match="task.name=sft needs .*data.source=builtin is plain text"):
        check_formats(small_config(**{"task.name": "sft"}), ("sft", "chat"), "text", "")
    check_labels(["a", "b"], ["a", "b"], "d")
    with pytest.raises(ConfigError, match=r"the labels \['c'\] of d were never seen in training"):
        check_labels(["a", "b"], ["a", "c"], "d")
    with pytest.raises(ConfigError, match="holds no labels"):
        check_labels(["a", "b"], None, "d")
    with pytest.raises(ExampleError, match="mix integers"):
        from lmtrain.data.examples import ordered_labels

        ordered_labels({1, "a"}, lambda v: "f:1")


@pytest.mark.slow
def test_builtin_task_demos_have_three_splits_and_balanced_classes(builtin_shards, tmp_path, capsys):
    tok, _ = builtin_shards
    for task in ("sft", "classify", "pref"):
        out = tmp_path / task
        assert shard_data.main(["--builtin-task", task, "--tokenizer", tok, "--output", str(out), "--seq-len", "128",
                                "--quiet"]) == 0
        manifest = load_manifest(out)
        assert set(manifest["splits"]) == {"train", "validation", "test"}
        assert all(s["documents"] > 100 for s in manifest["splits"].values())
    labels = load_manifest(tmp_path / "classify")["labels"]
    assert labels == ["concurrency", "devtools", "files", "formats", "math", "network"]
    counts = np.sum([s["label_counts"] for s in load_manifest(tmp_path / "classify")["splits"].values()], axis=0)
    assert (counts == counts[0]).all()  # balanced: the majority-class baseline is 1/6 over all splits
    assert "train-majority accuracy" in capsys.readouterr().out


def test_parquet_records_and_classify_resume(tok_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = sft_records(40, seed=4)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    assert shard(tok_dir, tmp_path / "d.parquet", tmp_path / "pq", "--format", "sft") == 0
    assert shard(tok_dir, write_jsonl(tmp_path / "d.jsonl", records), tmp_path / "js", "--format", "sft") == 0
    splits = [{s: (i["documents"], i["tokens"], i["target_tokens"]) for s, i in load_manifest(tmp_path / d)["splits"].items()}
              for d in ("pq", "js")]
    assert splits[0] == splits[1]

    out = tmp_path / "cls"
    assert shard(tok_dir, write_jsonl(tmp_path / "c.jsonl", classify_records(50, seed=3)), out, "--format",
                 "classify") == 0
    it = ShardedTrainIterator(out, SEQ_LEN, 4, seed=2, prefetch=2)
    states, batches = [], []
    for _ in range(20):  # past an epoch of 45 training examples
        states.append(json.loads(json.dumps(it.get_state())))
        batches.append(next(it))
    it.close()
    resumed = ShardedTrainIterator(out, SEQ_LEN, 4, seed=2, prefetch=0)
    resumed.set_state(states[9])
    for k in range(9, 20):
        got = next(resumed)
        for key in got:
            np.testing.assert_array_equal(got[key], batches[k][key], err_msg=f"batch {k}")
    resumed.close()


@pytest.mark.parametrize("fmt", ["sft", "classify"])
@pytest.mark.parametrize("case", ["lone_surrogate", "deep_nesting"])
def test_json_that_is_no_text_is_a_one_line_error_naming_file_and_line(tok_dir, tmp_path, capsys, fmt, case):
    """json accepts a lone surrogate escape and (up to a RecursionError) any nesting; neither is data."""
    records = sft_records(3) if fmt == "sft" else classify_records(30)
    bad = write_jsonl(tmp_path / "bad.jsonl", records)
    field = "completion" if fmt == "sft" else "text"
    with bad.open("a", encoding="utf-8") as f:
        if case == "lone_surrogate":
            f.write(json.dumps({"prompt": "q", "label": "positive", field: "broken "}).replace(
                "broken ", "broken \\ud800 here") + "\n")
            message = f"{bad}:{len(records) + 1}: the JSON holds a lone surrogate escape (\\ud800)"
        else:
            f.write("[" * 100_000 + "]" * 100_000 + "\n")
            message = f"{bad}:{len(records) + 1}: JSON nested too deeply"
    assert shard(tok_dir, bad, tmp_path / "out", "--format", fmt) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("missing", ["NaN", "nan", ""])
def test_a_csv_label_of_nan_is_a_missing_label_not_a_class(tok_dir, tmp_path, capsys, missing):
    """pandas writes a missing label as NaN: it is refused like an empty label, never a class called 'NaN'."""
    rows = [(r["text"], r["label"]) for r in classify_records(30)]
    rows[4] = (rows[4][0], missing)
    bad = tmp_path / "d.csv"
    bad.write_text("text,label\n" + "".join(f"{text},{label}\n" for text, label in rows), encoding="utf-8")
    assert shard(tok_dir, bad, tmp_path / "out", "--format", "classify") == 2
    err = capsys.readouterr().err
    assert f"{bad}:6: no label: field 'label' is {missing!r}, a missing value" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_an_empty_chat_template_file_is_refused_not_replaced_by_the_tokenizers(tok_dir, tmp_path, capsys):
    template = tmp_path / "empty.jinja"
    template.write_text("\n  \n", encoding="utf-8")
    convs = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a b"}]}]
    assert shard(tok_dir, write_jsonl(tmp_path / "c.jsonl", convs), tmp_path / "out", "--format", "chat",
                 "--chat-template", str(template)) == 2
    err = capsys.readouterr().err
    assert f"--chat-template {template} is empty" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_chat_template_that_drops_the_content_is_refused(hf_tok):
    """Only the end-of-turn text would be trained on: refused, as an empty completion is."""
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% else %}"
                "{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    encoder = ChatEncoder(hf_tok, 1000, chat_template=template)
    with pytest.raises(ExampleError, match="c.jsonl:3: the chat template drops the content of assistant turn 1"):
        encoder.encode({"messages": CONVERSATION[1:3]}, "c.jsonl:3")


@pytest.mark.parametrize("template", sorted(END_OF_TURN))
def test_the_bounded_render_equals_transformers_apply_chat_template(hf_tok, template):
    text = (TEMPLATES / f"{template}.jinja").read_text()
    encoder = ChatEncoder(hf_tok, 1000, chat_template=text)
    messages = CONVERSATION[1:] if template == "mistral_v01" else CONVERSATION
    for prefix in (messages, messages[:2], messages[1:3]):
        for prompt in (False, True):
            try:
                want = hf_tok.apply_chat_template(prefix, chat_template=text, tokenize=False,
                                                  add_generation_prompt=prompt)
            except Exception as e:  # noqa: BLE001 - e.g. roles that must alternate: the same error
                with pytest.raises(type(e), match=str(e)[:40]):
                    encoder.render(prefix, add_generation_prompt=prompt)
                continue
            assert encoder.render(prefix, add_generation_prompt=prompt) == want


CHATML_TURNS = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEMPLATE_BOMBS = {  # each would run for hours or allocate gigabytes unbounded
    "nested_loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "took over"),
    "repeat": ("{{ 'A' * 4000000000 }}", "makes a text or list of 4,000,000,000 items"),
    "doubling": ("{% set ns = namespace(s='AAAA') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
                 "makes a text or list of"),
    "center": ("{{ 'x'|center(4000000000) }}", "makes a text or list of 4,000,000,000 items"),
    "join": ("{{ range(100000)|join('A' * 100000) }}", "makes a text or list of"),
    "format": ("{{ '%4000000000d'|format(1) }}", "makes a text or list of"),
    "method": ("{{ 'x'.ljust(4000000000) }}", "makes a text or list of 4,000,000,000 items"),
    "output": ("{% for i in range(100000) %}{% for j in range(100) %}{{ 'AAAA' }}{% endfor %}{% endfor %}",
               "makes a text or list of"),
}


@pytest.mark.parametrize("bomb", sorted(TEMPLATE_BOMBS))
def test_a_chat_template_is_bounded_in_time_and_size(hf_tok, tmp_path, monkeypatch, bomb):
    from lmtrain.data import chat_render
    from lmtrain.data.examples import load_chat_template

    monkeypatch.setattr(chat_render, "RENDER_SECONDS", 1.0)
    code, message = TEMPLATE_BOMBS[bomb]
    path = tmp_path / "bomb.jinja"
    path.write_text(code + CHATML_TURNS, encoding="utf-8")
    encoder = ChatEncoder(hf_tok, 1000, chat_template=load_chat_template(str(path)))
    with pytest.raises(ExampleError) as error:
        encoder.encode({"messages": CONVERSATION[1:3]}, "c.jsonl:1")
    assert str(error.value).startswith(f"c.jsonl:1: the chat template --chat-template {path} ")
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("flag", ["--test-fraction", "--val-fraction"])
def test_a_labelled_file_becomes_a_whole_evaluation_split(tok_dir, tmp_path, capsys, flag):
    """--test-fraction 1 (or --val-fraction 1) with --labels-from: every example in that split, the training
    shards' classes in their order, no split arithmetic and no training examples needed."""
    train_out = tmp_path / "train"
    assert shard(tok_dir, write_jsonl(tmp_path / "t.jsonl", classify_records(60)), train_out, "--format",
                 "classify") == 0
    records = classify_records(25, seed=3)[:-1] + [{"text": "only positive here", "label": "positive"}]
    data = write_jsonl(tmp_path / "eval.jsonl", records)
    out = tmp_path / "eval"
    assert shard(tok_dir, data, out, "--format", "classify", flag, "1") == 2  # the classes must come from training
    assert f"an evaluation-only set ({flag} 1)" in capsys.readouterr().err and not out.exists()
    assert shard(tok_dir, data, out, "--format", "classify", flag, "1", "--labels-from", str(train_out)) == 0
    manifest = load_manifest(out)
    split = "test" if flag == "--test-fraction" else "validation"
    assert manifest["labels"] == load_manifest(train_out)["labels"]
    assert {s: info["documents"] for s, info in manifest["splits"].items()} == {
        "train": 0, "validation": 25 if split == "validation" else 0, **({"test": 25} if split == "test" else {})}
    batches = list(shard_eval_batches(out, SEQ_LEN, 5, split=split))
    labels = [manifest["labels"][i] for b in batches for i, w in zip(b["labels"], b["weights"], strict=True) if w]
    assert sorted(labels) == sorted(r["label"] for r in records)
    # no training examples, so no training split's most frequent class: neither tool names one (eval named class 0)
    assert "train-majority" not in capsys.readouterr().out
    assert eval_examples.majority_class(eval_examples.read_eval_set(str(out), split)) is None


def test_each_split_prints_the_train_majority_accuracy_that_eval_reports(tok_dir, tmp_path, capsys):
    """Per split, shard_data prints the accuracy of always answering the training split's most frequent class:
    on the test split exactly lmtrain eval's train-majority baseline. (It printed each split's own most frequent
    share, a different and flattering figure; here the test split's most frequent class is not training's.)"""
    val, test = 0.2, 0.3
    rng = np.random.default_rng(5)
    records, seen = [], {"train": 0, "validation": 0, "test": 0}
    for i in range(120):
        text = f"r{i} " + sentence(rng, 3, 12)
        split = split_of_example(json.dumps(text), val, test)
        n = seen[split] = seen[split] + 1
        label = ("often" if n % 3 else "rare") if split == "train" else ("rare" if n % 4 else "often")
        records.append({"text": text, "label": label})
    out = tmp_path / "cls"
    assert shard(tok_dir, write_jsonl(tmp_path / "c.jsonl", records), out, "--format", "classify", "--val-fraction",
                 str(val), "--test-fraction", str(test)) == 0
    lines = {line.split(":")[0]: line for line in capsys.readouterr().out.splitlines()}
    test_counts = load_manifest(out)["splits"]["test"]["label_counts"]  # classes sorted: often, rare
    eval_baseline = eval_examples.majority_class(eval_examples.read_eval_set(str(out), "test"))
    assert eval_baseline["label"] == "often" and max(test_counts) / sum(test_counts) != eval_baseline["accuracy"]
    assert (f"train-majority accuracy {eval_baseline['accuracy']:.3f} ('often', the training split's most frequent "
            "class)") in lines["test"]
    for split in ("train", "validation"):
        counts = load_manifest(out)["splits"][split]["label_counts"]
        assert f"train-majority accuracy {counts[0] / sum(counts):.3f} ('often'" in lines[split]
