"""Task metrics against hand-computed values (and scikit-learn where it is installed), and the registry's errors."""

import math

import numpy as np
import pytest
import sklearn.metrics

from lmtrain.evaluate import metrics as M
from lmtrain.tasks import scores as S


def test_perplexity_and_bits_per_byte_by_hand():
    # 3 tokens of 2 nats each: perplexity e^2; 6 nats over 4 bytes is 6 / (4 ln 2) bits per byte.
    assert M.perplexity(6.0, 3) == pytest.approx(math.e**2)
    assert M.bits_per_byte(6.0, 4) == pytest.approx(6.0 / (4 * math.log(2)))
    # A uniform model over 256 byte values costs exactly 8 bits per byte.
    assert M.bits_per_byte(100 * math.log(256), 100) == pytest.approx(8.0)
    out = M.compute_metrics("lm", nats_sum=6.0, tokens=3, n_bytes=4)
    assert out == pytest.approx({"loss": 2.0, "tokens": 3, "perplexity": math.e**2,
                                 "bits_per_byte": 6.0 / (4 * math.log(2)), "bytes": 4})


def test_perplexity_of_a_diverged_model_is_finite():
    assert math.isfinite(M.perplexity(1e6, 1))


# labels/preds over classes a, b, c (c is never predicted, so its precision divides by zero):
#   true a: predicted a, a, b    -> tp_a=2
#   true b: predicted b, a       -> tp_b=1
#   true c: predicted b          -> tp_c=0
LABELS = [0, 0, 0, 1, 1, 2]
PREDS = [0, 0, 1, 1, 0, 1]
NAMES = ["a", "b", "c"]


def test_classification_by_hand():
    out = S.classification_metrics(LABELS, PREDS, NAMES)
    assert out["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [0, 1, 0]]
    assert out["accuracy"] == pytest.approx(3 / 6)
    pc = out["per_class"]
    # a: predicted 3 times (2 right), support 3
    assert (pc["a"]["precision"], pc["a"]["recall"], pc["a"]["support"]) == pytest.approx((2 / 3, 2 / 3, 3))
    # b: predicted 3 times (1 right), support 2; F1 = 2*1 / (3 + 2)
    assert (pc["b"]["precision"], pc["b"]["recall"], pc["b"]["f1"]) == pytest.approx((1 / 3, 1 / 2, 2 / 5))
    # c: never predicted -> precision 0 by zero_division, recall 0, F1 0
    assert (pc["c"]["precision"], pc["c"]["recall"], pc["c"]["f1"]) == (0.0, 0.0, 0.0)
    assert out["precision_macro"] == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    assert out["recall_macro"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert out["f1_macro"] == pytest.approx((2 / 3 + 2 / 5 + 0) / 3)


def test_metrics_from_a_summed_confusion_matrix_equal_the_per_example_ones():
    counts = S.confusion_matrix(LABELS, PREDS, 3)
    assert S.classification_metrics_from_counts(counts, NAMES) == S.classification_metrics(LABELS, PREDS, NAMES)
    with pytest.raises(M.EvalError, match=r"a \(3, 3\) confusion matrix does not fit 2 labels"):
        S.classification_metrics_from_counts(counts, ["a", "b"])
    with pytest.raises(M.EvalError, match="eval set is empty"):
        S.classification_metrics_from_counts(np.zeros((3, 3)), NAMES)


def test_class_absent_from_labels_and_predictions():
    # Class 'c' appears nowhere: with zero_division=0 it drags the macro mean down (as scikit-learn's labels=);
    # with NaN it is left out of the macro mean.
    out = S.classification_metrics([0, 1], [0, 1], NAMES)
    assert out["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert out["f1_macro"] == pytest.approx(2 / 3)
    out_nan = S.classification_metrics([0, 1], [0, 1], NAMES, zero_division=float("nan"))
    assert out_nan["f1_macro"] == 1.0
    assert math.isnan(out_nan["per_class"]["c"]["f1"])


def test_classification_matches_sklearn():
    metrics = sklearn.metrics
    rng = np.random.default_rng(0)
    for n_classes in (2, 3, 7):
        labels = rng.integers(0, n_classes, 200)
        preds = np.where(rng.random(200) < 0.6, labels, rng.integers(0, n_classes, 200))
        preds[preds == n_classes - 1] = 0  # one class never predicted: exercises zero division
        names = [f"c{i}" for i in range(n_classes)]
        ours = S.classification_metrics(labels, preds, names)
        ids = list(range(n_classes))
        assert ours["accuracy"] == pytest.approx(metrics.accuracy_score(labels, preds))
        p, r, f, s = metrics.precision_recall_fscore_support(labels, preds, labels=ids, zero_division=0)
        assert [ours["per_class"][n]["precision"] for n in names] == pytest.approx(p)
        assert [ours["per_class"][n]["recall"] for n in names] == pytest.approx(r)
        assert [ours["per_class"][n]["f1"] for n in names] == pytest.approx(f)
        assert [ours["per_class"][n]["support"] for n in names] == list(s)
        assert ours["f1_macro"] == pytest.approx(metrics.f1_score(labels, preds, labels=ids, average="macro",
                                                                  zero_division=0))
        assert ours["confusion_matrix"] == metrics.confusion_matrix(labels, preds, labels=ids).tolist()


def test_classification_bad_input():
    with pytest.raises(M.EvalError, match="empty"):
        S.classification_metrics([], [], NAMES)
    with pytest.raises(M.EvalError, match="3 labels but 2 predictions"):
        S.classification_metrics([0, 1, 2], [0, 1], NAMES)
    with pytest.raises(M.EvalError, match="label id 5 is outside the 3 known classes"):
        S.classification_metrics([0, 5], [0, 1], NAMES)


def test_bleu_by_hand():
    # hyp "the cat sat on the mat" vs ref "the cat sat on a mat" (same length, brevity penalty 1):
    # clipped n-gram precisions 5/6, 3/5, 2/4, 1/3 -> BLEU = 100 * (5/6 * 3/5 * 1/2 * 1/3) ** (1/4).
    expected = 100 * (5 / 6 * 3 / 5 * 1 / 2 * 1 / 3) ** 0.25
    assert S.bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(expected, abs=1e-6)
    # A second reference that matches exactly makes it perfect; one string or a list per example both work.
    assert S.bleu(["the cat sat on the mat"], [["the cat sat on a mat", "the cat sat on the mat"]]) == pytest.approx(100)


def test_chrf():
    assert S.chrf(["the cat sat"], ["the cat sat"]) == pytest.approx(100)
    assert S.chrf(["xyz"], ["abc"]) == 0.0
    close, far = S.chrf(["the cat sat"], ["the cat sits"]), S.chrf(["the dog ran"], ["the cat sits"])
    assert 0 < far < close < 100


def test_rouge_l_by_hand():
    # LCS("the cat sat on the mat", "the cat on mat") = 4 tokens: P = 4/4, R = 4/6, F = 0.8; the second
    # example is identical (F = 1); the mean is 0.9.
    gens = ["the cat on mat", "a b c"]
    refs = ["the cat sat on the mat", "a b c"]
    assert S.rouge_l(gens, refs) == pytest.approx(0.9)
    # With several references an example takes its best.
    assert S.rouge_l(["the cat on mat"], [["zzz", "the cat on mat"]]) == pytest.approx(1.0)


def test_exact_match_normalises_whitespace_only():
    gens = ["Hello  world\n", "hello world", "Hi"]
    refs = ["Hello world", "Hello world", ["Hey", " Hi "]]
    assert S.exact_match(gens, refs) == pytest.approx(2 / 3)  # case still counts


def test_registry_rejects_a_metric_that_does_not_fit_the_task():
    with pytest.raises(M.EvalError, match="metric 'bleu' does not fit task 'classify'.*accuracy"):
        M.compute_metrics("classify", ["bleu"], labels=[0], preds=[0], label_names=["a"])
    with pytest.raises(M.EvalError, match="metric 'accuracy' does not fit task 'lm'"):
        M.check_metrics("lm", ["accuracy"])
    with pytest.raises(M.EvalError, match="unknown metric 'blue'. Did you mean: bleu"):
        M.check_metrics("sft", ["blue"])
    with pytest.raises(M.EvalError, match="unknown task 'translate'"):
        M.check_metrics("translate", None)
    assert M.check_metrics("classify", None) == M.DEFAULT_METRICS["classify"]


def test_bleu_without_references_is_a_clear_error():
    with pytest.raises(M.EvalError, match="bleu needs references"):
        M.compute_metrics("sft", ["bleu"], generations=["a b c"], references=None)
    with pytest.raises(M.EvalError, match="example 1 has no reference text"):
        S.bleu(["a", "b"], ["a", []])
    with pytest.raises(M.EvalError, match="2 generations but 1 references"):
        S.chrf(["a", "b"], ["a"])


def test_empty_eval_set_is_a_clear_error():
    with pytest.raises(M.EvalError, match="eval set is empty"):
        M.compute_metrics("sft", ["bleu"], generations=[], references=[])
    with pytest.raises(M.EvalError, match="eval set is empty"):
        M.compute_metrics("lm", nats_sum=0.0, tokens=0, n_bytes=0)
    with pytest.raises(M.EvalError, match="eval set is empty"):
        M.compute_metrics("classify", labels=[], preds=[], label_names=["a"])


def test_compute_metrics_picks_only_what_was_asked():
    out = M.compute_metrics("classify", ["f1"], labels=LABELS, preds=PREDS, label_names=NAMES)
    assert set(out) == {"f1_macro", "per_class", "labels", "examples"}
    out = M.compute_metrics("sft", ["exact_match", "perplexity"], nats_sum=2.0, tokens=2,
                            generations=["x"], references=["x"])
    assert out["exact_match"] == 1.0 and out["perplexity"] == pytest.approx(math.e)


@pytest.mark.parametrize("name,expected", [("val_loss", False), ("val_perplexity", False), ("accuracy", True),
                                           ("val_f1_macro", True), ("bleu", True), ("throughput", None)])
def test_direction_of_metric_names(name, expected):
    assert M.higher_is_better(name) is expected
