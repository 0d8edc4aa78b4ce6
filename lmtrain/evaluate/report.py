"""The output of `lmtrain eval`: a JSON file and a self-contained HTML report (metrics, plots, samples next to
their references), optionally with a baseline model side by side (for example the model before fine-tuning).

The HTML has no external CSS, JS or images: plots are PNGs drawn with matplotlib's Agg canvas and embedded as
base64, so the file can be mailed or attached to an issue as it is.
"""

from __future__ import annotations

import dataclasses
import datetime
import html
import json
import math
import os

from lmtrain.evaluate.metrics import METRICS, EvalError, higher_is_better
from lmtrain.paths import as_path, is_remote
from lmtrain.plots import confusion_matrix_png, png_data_uri
from lmtrain.storage.atomic import atomic_write_text
from lmtrain.tasks.scores import normalize_whitespace

REPORT_VERSION = 1
# Keys of `metrics` that are not one number; the report draws them as tables or plots instead.
_STRUCTURED = ("per_class", "confusion_matrix", "labels")
_COUNTS = ("tokens", "bytes", "examples")
# Numbers that describe the data, not the model: shown beside the metrics, never compared as one.
_REFERENCE_POINTS = ("majority_class_accuracy",)
_ABOUT = {
    "loss": "mean loss per scored token (nats)",
    "precision_macro": "precision, mean over classes",
    "recall_macro": "recall, mean over classes",
    "f1_macro": "F1, mean over classes",
    "tokens": "tokens scored",
    "bytes": "UTF-8 bytes scored",
    "examples": "examples in the eval set",
}


def _about(key: str) -> str:
    """A short description with the metric's direction, so 0-100 BLEU next to 0-1 ROUGE-L reads right."""
    text = _ABOUT.get(key) or (METRICS[key].description if key in METRICS else "")
    direction = higher_is_better(key)
    arrow = "" if key in _COUNTS or direction is None else (" (higher is better)" if direction else " (lower is better)")
    return text + arrow


@dataclasses.dataclass
class EvalResult:
    """What one model scored on one eval set.

    `samples` holds dicts with `prompt`, `reference` and `generation` (generative tasks) or `text`, `label` and
    `prediction` (classify). `metrics` is what `metrics.compute_metrics` returned.
    """

    model: str
    task: str
    metrics: dict
    samples: list[dict] = dataclasses.field(default_factory=list)
    checkpoint: str = ""  # e.g. "best (step 400)"
    data: str = ""  # the eval set, as the user named it
    metrics_jsonl: str = ""  # the model's training log, for the loss curve; empty when it has none
    extra: dict = dataclasses.field(default_factory=dict)  # anything else to keep in the JSON (generation settings, timing)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EvalResult:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


def _json_safe(value):
    """NaN and inf are not JSON; write them as null so every JSON reader takes the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def to_json(result: EvalResult, baseline: EvalResult | None = None) -> str:
    doc = {"report_version": REPORT_VERSION, "result": result.to_dict(),
           "baseline": baseline.to_dict() if baseline else None}
    return json.dumps(_json_safe(doc), indent=2, ensure_ascii=False)


def read_json(path: str | os.PathLike) -> tuple[EvalResult, EvalResult | None]:
    """Read a file written by `write_reports` (for example to use one run's result as another's baseline)."""
    path = as_path(path)
    try:
        doc = json.loads(path.read_text())
        result = EvalResult.from_dict(doc["result"])
        baseline = EvalResult.from_dict(doc["baseline"]) if doc.get("baseline") else None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise EvalError(f"{path}: not an lmtrain eval JSON file ({e}).") from None
    return result, baseline


def write_reports(out_dir: str | os.PathLike, result: EvalResult, baseline: EvalResult | None = None,
                  max_samples: int = 50) -> tuple[str, str]:
    """Write OUT_DIR/eval.json and OUT_DIR/report.html (each atomically); return their paths."""
    html_text = render_html(result, baseline, max_samples=max_samples)
    out_dir = as_path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / "eval.json", out_dir / "report.html"
    atomic_write_text(json_path, to_json(result, baseline) + "\n")
    atomic_write_text(html_path, html_text)
    return str(json_path), str(html_path)


# ----------------------------------------------------------------------------- plots


def read_metrics_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a training log; a line cut short by a kill is skipped, not an error."""
    records = []
    for line in as_path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def loss_curve_png(metrics_jsonl: str | os.PathLike, title: str) -> str | None:
    """Train and validation loss against step (and other validation metrics in a second panel), as a data URI."""
    from matplotlib.figure import Figure

    records = read_metrics_jsonl(metrics_jsonl)
    series: dict[str, tuple[list, list]] = {}
    for r in records:
        for key, value in r.items():
            if key == "loss" or (key.startswith("val_") and "/" not in key):  # per-class scores would crowd it
                if isinstance(value, int | float) and math.isfinite(value):
                    xs, ys = series.setdefault(key, ([], []))
                    xs.append(r.get("step", len(xs)))
                    ys.append(value)
    losses = {k: v for k, v in series.items() if k in ("loss", "val_loss")}
    others = {k: v for k, v in series.items() if k not in losses and k != "val_perplexity"}
    if not losses:
        return None
    fig = Figure(figsize=(6.4 if not others else 10, 3.4))
    axes = fig.subplots(1, 2 if others else 1, squeeze=False)[0]
    for key, (xs, ys) in losses.items():
        axes[0].plot(xs, ys, label="train loss" if key == "loss" else "validation loss",
                     marker="o" if key == "val_loss" else None, markersize=3)
    axes[0].set(xlabel="step", ylabel="loss (nats/token)", title=f"Loss: {title}")
    axes[0].grid(alpha=0.3)
    axes[0].legend()
    if others:
        for key, (xs, ys) in others.items():
            axes[1].plot(xs, ys, label=key, marker="o", markersize=3)
        axes[1].set(xlabel="step", title="Validation metrics")
        axes[1].grid(alpha=0.3)
        axes[1].legend()
    fig.tight_layout()
    return png_data_uri(fig)


# ----------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1400px;
     padding:0 16px;color:#1f2328;line-height:1.45}
h1{font-size:1.5em;margin-bottom:4px} h2{font-size:1.2em;margin-top:28px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.meta{color:#57606a;font-size:.92em} .meta code{background:#f6f8fa;padding:1px 4px;border-radius:4px}
table{border-collapse:collapse;margin:8px 0} th,td{border:1px solid #d0d7de;padding:5px 9px;text-align:left;vertical-align:top}
th{background:#f6f8fa} td.num{text-align:right;font-variant-numeric:tabular-nums}
.better{color:#1a7f37;font-weight:600} .worse{color:#cf222e;font-weight:600}
.row{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start} .card h3{font-size:1em;margin:6px 0}
img{max-width:100%;border:1px solid #eaeef2}
table.samples{width:100%;table-layout:fixed} table.samples td{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;
     font-size:.85em} table.samples th.idx, table.samples td.idx{width:3.2em}
.cell{white-space:pre-wrap;word-break:break-word;max-height:14em;overflow:auto}
.ok{background:#dafbe1} .bad{background:#ffebe9} .mark{font-family:sans-serif;font-size:.9em;color:#57606a}
.note{color:#57606a;font-size:.9em}
"""


def _esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.4g}" if abs(value) >= 1000 or (abs(value) < 1e-3 and value != 0) else f"{value:.4f}"
    return _esc(value)


def _scalar_metrics(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items()
            if k not in _STRUCTURED and k not in _REFERENCE_POINTS and isinstance(v, int | float)}


def _majority_baseline(result: EvalResult) -> dict | None:
    """{'label', 'accuracy'} of always answering the training split's most frequent class (eval.json files of
    earlier versions kept its accuracy among the metrics, as majority_class_accuracy)."""
    found = result.extra.get("train_majority_baseline")
    if found:
        return found
    if "majority_class_accuracy" in result.metrics:
        return {"label": result.extra.get("majority_class", "?"), "accuracy": result.metrics["majority_class_accuracy"]}
    return None


def _majority_note(result: EvalResult) -> str:
    majority = _majority_baseline(result)
    if not majority:
        return ""
    return (f"<p class=note>Train-majority baseline (a reference point, not a model): always answering "
            f"<code>{_esc(majority['label'])}</code>, the most frequent class of the training split, scores accuracy "
            f"{_fmt(majority['accuracy'])} on these examples.</p>")


def _metrics_table(result: EvalResult, baseline: EvalResult | None) -> str:
    ours = _scalar_metrics(result.metrics)
    theirs = _scalar_metrics(baseline.metrics) if baseline else {}
    keys = [k for k in ours if k not in _COUNTS] + [k for k in theirs if k not in ours and k not in _COUNTS]
    keys += [k for k in _COUNTS if k in ours or k in theirs]
    if baseline:
        head = (f"<tr><th>metric</th><th>baseline<br><span class=note>{_esc(_short(baseline.model))}</span></th>"
                f"<th>model<br><span class=note>{_esc(_short(result.model))}</span></th><th>change</th>"
                "<th>what it is</th></tr>")
    else:
        head = "<tr><th>metric</th><th>value</th><th>what it is</th></tr>"
    rows = []
    for k in keys:
        a, b = ours.get(k), theirs.get(k)
        if not baseline:
            rows.append(f"<tr><td>{_esc(k)}</td><td class=num>{_fmt(a)}</td><td class=note>{_esc(_about(k))}</td></tr>")
            continue
        change = ""
        if isinstance(a, int | float) and isinstance(b, int | float) and k not in _COUNTS:
            delta = a - b
            direction = higher_is_better(k)
            cls = "" if direction is None or delta == 0 else ("better" if (delta > 0) == direction else "worse")
            change = f"<span class='{cls}'>{delta:+.4g}</span>" if delta else "0"
        rows.append(f"<tr><td>{_esc(k)}</td><td class=num>{_fmt(b)}</td><td class=num>{_fmt(a)}</td>"
                    f"<td class=num>{change}</td><td class=note>{_esc(_about(k))}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _per_class_table(result: EvalResult) -> str:
    per_class = result.metrics.get("per_class")
    if not per_class:
        return ""
    rows = "".join(
        f"<tr><td>{_esc(name)}</td><td class=num>{_fmt(s['precision'])}</td><td class=num>{_fmt(s['recall'])}</td>"
        f"<td class=num>{_fmt(s['f1'])}</td><td class=num>{_fmt(s['support'])}</td></tr>"
        for name, s in per_class.items()
    )
    return ("<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>"
            f"{rows}</table>")


def _label(result: EvalResult) -> str:
    """The model by name and checkpoint, 'tiny_classify (step 800)' or 'tiny_classify (start)': a model compared with
    an earlier checkpoint of itself has the same name."""
    tag = result.checkpoint.split(":")[0].split(" (")[0].strip()
    return f"{_short(result.model)} ({tag})" if tag else _short(result.model)


def _short(model: str) -> str:
    return model.rstrip("/").rsplit("/", 1)[-1] or model


def _is_classify(result: EvalResult) -> bool:
    return result.task == "classify"


def _sample_correct(result: EvalResult, sample: dict) -> bool | None:
    if _is_classify(result):
        return None if sample.get("label") is None else sample.get("prediction") == sample.get("label")
    refs = _references(sample)
    if refs is None:
        return None
    return normalize_whitespace(str(sample.get("generation", ""))) in {normalize_whitespace(r) for r in refs}


def _references(sample: dict) -> list[str] | None:
    ref = sample.get("reference")
    if ref is None:
        return None
    return [ref] if isinstance(ref, str) else [str(r) for r in ref]


def sentence_chrf(generation: str, references: list[str]) -> float:
    """chrF of one generation against its references, 0-100 (sacrebleu's sentence_chrf, as the corpus metric)."""
    import sacrebleu

    return float(sacrebleu.sentence_chrf(generation, references).score)


def _cell(value, correct: bool | None = None) -> str:
    if isinstance(value, list | tuple):
        value = "\n— or —\n".join(str(v) for v in value)
    cls = "" if correct is None else (" class=ok" if correct else " class=bad")
    mark = "" if correct is None else f"<div class=mark>{'✓ matches' if correct else '✗ differs'}</div>"
    return f"<td{cls}><div class=cell>{_esc(value)}</div>{mark}</td>"


def _output_cell(result: EvalResult, sample: dict) -> str:
    """A generation coloured by its chrF against the reference (red 0 to green 100), exact matches marked; a
    prediction marked right or wrong, with the class probabilities."""
    if not sample:
        return _cell(None)
    if _is_classify(result):
        cell = _cell(sample.get("prediction"), _sample_correct(result, sample))
        probs = sample.get("probabilities")
        if probs:
            shown = " · ".join(f"{name} {_fmt(float(p))}" for name, p in probs.items())
            cell = cell[: -len("</td>")] + f"<div class=mark>{_esc(shown)}</div></td>"
        return cell
    generation, refs = sample.get("generation"), _references(sample)
    if refs is None:
        return _cell(generation)
    score = sentence_chrf(str(generation or ""), refs)
    exact = " · ✓ exact match" if _sample_correct(result, sample) else ""
    hue = round(120 * score / 100)
    return (f"<td style='background:hsl({hue},70%,90%)'><div class=cell>{_esc(generation)}</div>"
            f"<div class=mark>chrF {score:.1f}{exact}</div></td>")


def shown_sample_indices(result: EvalResult, max_samples: int) -> list[int]:
    """Which samples the report shows, in their order: the first `max_samples`, or for classification a
    deterministic stratified pick (the first example of each class, then the second of each, ...), so that a
    shard order that starts with one class does not fill the table with it."""
    n = len(result.samples)
    if not _is_classify(result) or n <= max_samples:
        return list(range(min(n, max_samples)))
    by_class: dict[str, list[int]] = {}
    for i, sample in enumerate(result.samples):
        by_class.setdefault(str(sample.get("label")), []).append(i)
    picked: list[int] = []
    for rank in range(max(len(v) for v in by_class.values())):
        for indices in by_class.values():
            if rank < len(indices) and len(picked) < max_samples:
                picked.append(indices[rank])
    return sorted(picked)


def _check_same_examples(result: EvalResult, baseline: EvalResult) -> None:
    if baseline.task != result.task:
        raise EvalError(f"the baseline ({baseline.model}) was evaluated as task '{baseline.task}' and the model "
                        f"({result.model}) as '{result.task}'; compare two models on the same task.")
    key = "text" if _is_classify(result) else "prompt"
    a = [s.get(key) for s in result.samples]
    b = [s.get(key) for s in baseline.samples]
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            raise EvalError(f"the baseline was evaluated on other examples: sample {i}'s {key} differs "
                            f"({_clip(y)!r} vs {_clip(x)!r}). Evaluate both models on the same --data.")


def _clip(text, n: int = 60) -> str:
    text = str(text)
    return text if len(text) <= n else text[: n - 1] + "…"


def _samples_table(result: EvalResult, baseline: EvalResult | None, max_samples: int) -> str:
    shown = shown_sample_indices(result, max_samples)
    if not shown:
        return "<p class=note>No samples were kept.</p>"
    classify = _is_classify(result)
    src, ref, out = ("text", "label", "prediction") if classify else ("prompt", "reference", "generation")
    heads = ["#", src, ref, out if not baseline else f"{out} (model)"]
    if baseline:
        heads.insert(3, f"{out} (baseline)")
    rows = []
    for i in shown:
        s = result.samples[i]
        cells = [f"<td class=idx>{i}</td>", _cell(s.get(src)), _cell(s.get(ref))]
        if baseline:
            cells.append(_output_cell(baseline, baseline.samples[i] if i < len(baseline.samples) else {}))
        cells.append(_output_cell(result, s))
        rows.append(f"<tr>{''.join(cells)}</tr>")
    head = "".join(f"<th class=idx>{h}</th>" if h == "#" else f"<th>{_esc(h)}</th>" for h in heads)
    how = " (stratified by class: the first of each class, then the second, ...)" if classify else ""
    more = (f"<p class=note>Showing {len(shown)} of {len(result.samples)} samples{how}; all are in the JSON "
            "file.</p>" if len(result.samples) > len(shown) else "")
    return f"{more}<table class=samples><tr>{head}</tr>{''.join(rows)}</table>"


def _plots(result: EvalResult, baseline: EvalResult | None) -> str:
    cards = []
    models = [("baseline", baseline), ("model", result)] if baseline else [("model", result)]
    same_log = baseline is not None and bool(result.metrics_jsonl) and _same_file(result.metrics_jsonl,
                                                                                   baseline.metrics_jsonl)
    for role, r in models:
        if same_log and r is baseline:
            continue  # one run's log: its curve is drawn once
        if r.metrics_jsonl and as_path(r.metrics_jsonl).exists():
            uri = loss_curve_png(r.metrics_jsonl, _short(r.model))
            if uri:
                heading = "Training curve" if same_log or not baseline else f"Training curve ({role})"
                cards.append(f"<div class=card><h3>{heading}</h3><img alt='loss curve' src='{uri}'></div>")
    for role, r in models:
        cm, labels = r.metrics.get("confusion_matrix"), r.metrics.get("labels")
        if cm and labels:
            uri = confusion_matrix_png(cm, labels, _short(r.model))
            cards.append(f"<div class=card><h3>Confusion matrix ({role})</h3><img alt='confusion matrix' src='{uri}'>"
                         f"</div>")
    return f"<div class=row>{''.join(cards)}</div>" if cards else ""


def _same_file(a: str, b: str) -> bool:
    if not a or not b:
        return False
    return a == b or (not is_remote(a) and not is_remote(b) and os.path.realpath(a) == os.path.realpath(b))


def _meta(result: EvalResult, role: str) -> str:
    parts = [f"<b>{role}</b> <code>{_esc(result.model)}</code>"]
    if result.checkpoint:
        parts.append(f"checkpoint {_esc(result.checkpoint)}")
    parts.append(f"task <code>{_esc(result.task)}</code>")
    if result.data:
        parts.append(f"data <code>{_esc(result.data)}</code>")
    return "<div class=meta>" + " · ".join(parts) + "</div>"


def render_html(result: EvalResult, baseline: EvalResult | None = None, max_samples: int = 50) -> str:
    """The report as one HTML string with everything embedded."""
    if baseline is not None:
        _check_same_examples(result, baseline)
    title = f"lmtrain eval: {_label(result)}" + (f" vs {_label(baseline)}" if baseline else "")
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{_esc(title)}</title>"
             f"<style>{_CSS}</style></head><body>", f"<h1>{_esc(title)}</h1>", _meta(result, "model")]
    if baseline:
        parts.append(_meta(baseline, "baseline"))
    parts.append(f"<div class=meta>written {_esc(when)}</div>")
    parts += ["<h2>Metrics</h2>", _metrics_table(result, baseline), _majority_note(result)]
    if result.metrics.get("per_class"):
        parts.append("<h2>Per class</h2><div class=row>")
        for role, r in ([("baseline", baseline)] if baseline else []) + [("model", result)]:
            parts.append(f"<div class=card><h3>{role}</h3>{_per_class_table(r)}</div>")
        parts.append("</div>")
    plots = _plots(result, baseline)
    if plots:
        parts += ["<h2>Plots</h2>", plots]
    parts += ["<h2>Samples</h2>", _samples_table(result, baseline, max_samples), "</body></html>"]
    return "\n".join(parts)
