"""The eval report: self-contained HTML with escaped samples, plots, a baseline side by side, and the JSON file."""

import base64
import html.parser
import json
import math

import pytest

from lmtrain.evaluate.metrics import EvalError, compute_metrics
from lmtrain.evaluate.report import (
    EvalResult,
    read_json,
    render_html,
    sentence_chrf,
    shown_sample_indices,
    to_json,
    write_reports,
)

NASTY = 'x </td></tr><script>alert("hi")</script> & <b>bold</b>\n  indented'


class _Cells(html.parser.HTMLParser):
    """Collects the text of every <td> of the samples table, and every tag and attribute seen."""

    def __init__(self):
        super().__init__()
        self.tags, self.srcs, self.rows = [], [], []
        self._in_samples = self._in_td = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.srcs.append(attrs.get("src", ""))
        if tag == "table" and attrs.get("class") == "samples":
            self._in_samples = True
        if self._in_samples and tag == "tr":
            self.rows.append([])
        if self._in_samples and tag == "td":
            self._in_td = True
            self.rows[-1].append("")

    def handle_endtag(self, tag):
        if tag == "td":
            self._in_td = False
        if tag == "table":
            self._in_samples = False

    def handle_data(self, data):
        if self._in_td and self.rows:
            self.rows[-1][-1] += data


def _parse(text: str) -> _Cells:
    p = _Cells()
    p.feed(text)
    return p


def _sft_result(generations, model="runs/after", metrics_jsonl=""):
    prompts = ["def add(a, b):", "def <lambda>(x):", "def f():"]
    refs = ["Return a + b.", "Identity & more.", NASTY]
    metrics = compute_metrics("sft", nats_sum=3.0, tokens=3, generations=generations, references=refs)
    samples = [{"prompt": p, "reference": r, "generation": g} for p, r, g in zip(prompts, refs, generations)]
    return EvalResult(model, "sft", metrics, samples, checkpoint="best (step 40)", data="test.jsonl",
                      metrics_jsonl=metrics_jsonl)


def _classify_result(preds, model="runs/cls"):
    labels, names = [0, 1, 2, 2], ["json", "os.path", "re"]
    metrics = compute_metrics("classify", labels=labels, preds=preds, label_names=names)
    samples = [{"text": f"doc {i}", "label": names[a], "prediction": names[b]} for i, (a, b) in enumerate(zip(labels, preds))]
    return EvalResult(model, "classify", metrics, samples)


def test_html_is_self_contained_and_samples_are_escaped(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in [{"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.5},
                                                     {"step": 20, "val_loss": 2.7}]) + '\n{"step": 3')  # cut short
    result = _sft_result(["Return a + b.", "nope", NASTY], metrics_jsonl=str(log))
    text = render_html(result)
    for forbidden in ("<script", "<link", "http://", "https://", "src='/", 'src="/'):
        assert forbidden not in text
    parsed = _parse(text)
    assert "script" not in parsed.tags
    # One plot (the loss curve), embedded as a real PNG.
    assert len(parsed.srcs) == 1 and parsed.srcs[0].startswith("data:image/png;base64,")
    assert base64.b64decode(parsed.srcs[0].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # Samples: header row + 3 rows of (index, prompt, reference, generation); the text survives escaping exactly.
    rows = [r for r in parsed.rows if r]
    assert len(rows) == 3
    assert rows[2][1] == "def f():" and rows[2][2] == NASTY and rows[2][3].startswith(NASTY)
    assert rows[1][1] == "def <lambda>(x):"
    # each generation is marked with its chrF against the reference and coloured by it; exact matches say so
    assert rows[0][3].endswith("chrF 100.0 · ✓ exact match")
    assert rows[1][3].endswith(f"chrF {sentence_chrf('nope', ['Identity & more.']):.1f}") and "differs" not in text
    low = sentence_chrf("nope", ["Identity & more."])
    assert low < 20 and f"background:hsl({round(1.2 * low)},70%,90%)" in text  # red end
    assert "background:hsl(120,70%,90%)" in text  # green end


def test_metrics_table_and_classification_plots():
    text = render_html(_classify_result([0, 1, 2, 0]))
    parsed = _parse(text)
    assert "Confusion matrix" in text and len(parsed.srcs) == 1  # no training log given: no loss curve
    assert ">accuracy</td><td class=num>0.7500<" in text
    assert ">f1_macro<" in text and "Per class" in text and ">os.path</td>" in text


def test_baseline_side_by_side():
    before = _sft_result(["wrong", "wrong", "wrong"], model="runs/imported")
    after = _sft_result(["Return a + b.", "Identity & more.", "wrong"], model="runs/finetuned")
    text = render_html(after, before)
    assert "vs imported" in text
    # exact match rose from 0 to 2/3: shown as an improvement.
    assert "<span class='better'>+0.6667</span>" in text
    rows = [r for r in _parse(text).rows if r]
    assert [len(r) for r in rows] == [5, 5, 5]  # index, prompt, reference, baseline, model
    assert rows[0][3].startswith("wrong") and rows[0][4].startswith("Return a + b.")
    # perplexity is the same for both: no colour either way
    assert "<td class=num>0</td>" in text


def test_baseline_on_other_examples_is_an_error():
    after = _sft_result(["a", "b", "c"])
    other = _sft_result(["a", "b", "c"], model="runs/other")
    other.samples[1]["prompt"] = "def g():"
    with pytest.raises(EvalError, match="sample 1's prompt differs"):
        render_html(after, other)
    with pytest.raises(EvalError, match="evaluated as task 'classify'"):
        render_html(after, _classify_result([0, 1, 2, 2]))


def test_json_round_trip_and_atomic_files(tmp_path):
    after, before = _classify_result([0, 1, 2, 0]), _classify_result([0, 0, 0, 0], model="runs/base")
    before.metrics["precision_macro"] = float("nan")  # NaN is not JSON: written as null
    json_path, html_path = write_reports(tmp_path / "out", after, before)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["eval.json", "report.html"]
    doc = json.loads(open(json_path).read())  # strict JSON
    assert doc["report_version"] == 1 and doc["baseline"]["metrics"]["precision_macro"] is None
    result, baseline = read_json(json_path)
    assert result == after and baseline.model == "runs/base"
    assert result.metrics["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    assert "NaN" not in to_json(before)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(EvalError, match="not an lmtrain eval JSON"):
        read_json(tmp_path / "bad.json")


def test_long_sample_lists_are_cut_in_html_but_kept_in_json():
    labels, names = list(range(3)) * 40, ["a", "b", "c"]
    metrics = compute_metrics("classify", labels=labels, preds=labels, label_names=names)
    result = EvalResult("m", "classify", metrics, [{"text": str(i), "label": "a", "prediction": "a"} for i in range(120)])
    text = render_html(result, max_samples=10)
    assert "Showing 10 of 120 samples" in text
    assert len([r for r in _parse(text).rows if r]) == 10
    assert len(json.loads(to_json(result))["result"]["samples"]) == 120
    assert math.isclose(metrics["accuracy"], 1.0)


def test_sentence_chrf_is_sacrebleus():
    import sacrebleu

    assert sentence_chrf("Return a + b.", ["Return a + b."]) == 100.0
    assert sentence_chrf("Return a - b", ["Return a + b."]) == sacrebleu.sentence_chrf("Return a - b",
                                                                                       ["Return a + b."]).score
    assert 0 < sentence_chrf("Return a - b", ["Return a + b."]) < 100


def test_a_model_against_its_own_start_is_named_by_checkpoint_and_its_curve_drawn_once(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}]))
    after = _classify_result([0, 1, 2, 0], model="runs/tiny_classify")
    before = _classify_result([0, 0, 0, 0], model="runs/tiny_classify")
    after.checkpoint, after.metrics_jsonl = "step 800 (latest)", str(log)
    before.checkpoint = "start: the parameters training began with (seed 0 initialisation, then ...)"
    before.metrics_jsonl = str(tmp_path / "." / "metrics.jsonl")  # the same file, named another way
    text = render_html(after, before)
    assert "<h1>lmtrain eval: tiny_classify (step 800) vs tiny_classify (start)</h1>" in text
    assert text.count("Training curve") == 1 and text.count("alt='loss curve'") == 1
    other = tmp_path / "other.jsonl"
    other.write_text(log.read_text())
    before.metrics_jsonl = str(other)  # two runs: two curves
    assert render_html(after, before).count("alt='loss curve'") == 2


def test_the_majority_baseline_is_a_reference_point_not_a_compared_metric():
    after, before = _classify_result([0, 1, 2, 0]), _classify_result([0, 0, 0, 0], model="runs/base")
    for r in (after, before):
        r.extra["train_majority_baseline"] = {"label": "re", "accuracy": 0.5}
    text = render_html(after, before)
    assert "majority_class_accuracy" not in text and "higher is better)</td></tr><tr><td>majority" not in text
    assert ("Train-majority baseline (a reference point, not a model): always answering <code>re</code>, the most "
            "frequent class of the training split, scores accuracy 0.5000 on these examples.") in text
    legacy = _classify_result([0, 1, 2, 0])  # an eval.json of an earlier version kept it among the metrics
    legacy.metrics["majority_class_accuracy"], legacy.extra["majority_class"] = 0.25, "json"
    text = render_html(legacy)
    assert ">majority_class_accuracy<" not in text and "answering <code>json</code>" in text and "0.2500" in text


def test_classify_samples_are_stratified_by_class_and_show_probabilities():
    names = ["a", "b", "c"]
    labels = [0] * 100 + [1] * 10 + [2] * 10  # shard order: nearly all one class first
    metrics = compute_metrics("classify", labels=labels, preds=labels, label_names=names)
    samples = [{"text": f"doc {i}", "label": names[y], "prediction": names[y],
                "probabilities": {names[y]: 0.9, names[(y + 1) % 3]: 0.1}} for i, y in enumerate(labels)]
    result = EvalResult("m", "classify", metrics, samples)
    assert shown_sample_indices(result, 12) == [0, 1, 2, 3, 100, 101, 102, 103, 110, 111, 112, 113]
    assert shown_sample_indices(result, 12) == shown_sample_indices(result, 12)
    assert shown_sample_indices(result, 200) == list(range(120))
    text = render_html(result, max_samples=12)
    rows = [r for r in _parse(text).rows if r]
    assert [r[0] for r in rows] == ["0", "1", "2", "3", "100", "101", "102", "103", "110", "111", "112", "113"]
    assert rows[4][3].endswith("b 0.9000 · c 0.1000") and "stratified by class" in text
