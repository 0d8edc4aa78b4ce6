"""`lmtrain eval`: score a model on an eval set with its task's metrics; write eval.json and a self-contained HTML
report, optionally next to a baseline model evaluated on the same examples.

    lmtrain eval workdir/tiny_sft --data workdir/sft_shards --split test --baseline workdir/tiny
    lmtrain eval workdir/tiny_classify --data workdir/classify_shards --baseline workdir/tiny_classify --baseline-which start
    lmtrain eval hf/gpt2 --data 'notes/*.txt'                      # perplexity and bits per byte of raw text

The task comes from the data: text (shards of --format text, or raw .txt/.jsonl/.parquet/.csv files) gives
perplexity and bits per byte; sft/chat shards (or --format sft records) give perplexity on the completions and,
from batched greedy KV-cache generation, BLEU, chrF, ROUGE-L and exact match; classify shards (or --format
classify records) give accuracy, macro and per-class precision/recall/F1 and the confusion matrix. A WORKDIR
whose task has no scorer of its own (a plugin task, mlm, token_classify) is scored by its task: its eval step
summed over a split of the shard directory --data, and its metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import numpy as np

from lmtrain.evaluate import examples as examples_lib
from lmtrain.evaluate import scoring, task_eval
from lmtrain.evaluate.metrics import METRICS, EvalError, check_metrics, compute_metrics
from lmtrain.evaluate.model import load_eval_model
from lmtrain.evaluate.report import EvalResult, read_json, write_reports
from lmtrain.paths import as_path, is_remote
from lmtrain.tasks import eval_head, generation_eval


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lmtrain eval", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="an lmtrain WORKDIR or a Hugging Face model directory (local or gs://)")
    p.add_argument("--data", required=True, help="a shard directory (tools/shard_data.py), or raw files / a glob")
    p.add_argument("--split", default=None, choices=("validation", "test"),
                   help="shards: the split to score (default: test when the shards have one, else validation)")
    p.add_argument("--which", default="latest", help="WORKDIR checkpoint: latest, best, a step number, or start "
                   "(the parameters training began with: train.init_from and a fresh head)")
    p.add_argument("--metrics", default=None, help="comma-separated metric names (default: all of the task's)")
    p.add_argument("--baseline", default=None, help="a second model (WORKDIR or HF directory) scored on the same "
                   "examples, or an earlier eval.json; shown side by side")
    p.add_argument("--baseline-which", default="latest", help="the baseline WORKDIR's checkpoint (as --which)")
    p.add_argument("--out", default=None, help="output directory (default: WORKDIR/eval/SPLIT-CHECKPOINT, or "
                   "eval/NAME for a Hugging Face directory); an earlier eval.json there is kept as eval.N.json")
    p.add_argument("--max-examples", type=int, default=0, help="score the first N examples (0: all)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation: tokens per example at most")
    p.add_argument("--batch-size", type=int, default=16, help="examples per batch")
    p.add_argument("--format", default="text", choices=examples_lib.RAW_FORMATS,
                   help="raw files: text documents, sft prompt/completion records or classify text/label records")
    p.add_argument("--text-field", default="text")
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--completion-field", default="completion")
    p.add_argument("--label-field", default="label")
    p.add_argument("--mesh", default=None, help="data,fsdp,tensor sizes to place the model on (default: the "
                   "WORKDIR's training mesh when it fits the devices here, else one device)")
    return p.parse_args(argv)


def _which(value: str) -> str | int:
    return int(value) if str(value).isdigit() else value


def _mesh(value: str | None) -> tuple[int, int, int] | None:
    if value is None:
        return None
    try:
        sizes = tuple(int(x) for x in value.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or min(sizes) < 1:
        raise EvalError(f"--mesh {value}: give three positive sizes, data,fsdp,tensor (e.g. 1,1,1 for one device).")
    return sizes


def metric_names(kind: str, value: str | None) -> tuple[str, ...]:
    names = None if value is None else [n.strip() for n in value.split(",") if n.strip()]
    return check_metrics(kind, names)


# ----------------------------------------------------------------------------- one model


def scoring_row_len(enc: examples_lib.Encoded, kind: str, max_seq_len: int) -> int:
    """Tokens per scoring row: what the longest example needs, bucketed (scoring.bucket_length), not the model's
    whole window. Encoding at the full window first means a document cut into windows still has a piece of the
    full length, so the cut (and so every score) is what the full window gives."""
    if kind == "classify":
        return scoring.bucket_length(max((len(x) for x in enc.inputs), default=1), max_seq_len)
    longest = max((len(tokens) for tokens, _ in enc.pieces), default=2)
    return scoring.bucket_length(longest - 1, max_seq_len) + 1  # model positions, plus the last target


def evaluate_model(model, eval_set, names: tuple[str, ...], args: argparse.Namespace, log=print) -> EvalResult:
    """Score one loaded model (lmtrain.evaluate.model.EvalModel) on the eval set."""
    kind = eval_set.kind
    if model.head != eval_head(kind):
        if kind == "classify":
            raise EvalError(f"{model.path} has no classification head, and {eval_set.describe()} is classification "
                            "data. To score the classifier as fine-tuning began (its base with a fresh head), use the "
                            "classify WORKDIR with --which start (or --baseline-which start).")
        raise EvalError(f"{model.path} is a classifier ({model.head} head), and {eval_set.describe()} is {kind} data; "
                        "score it on classification data.")
    cfg = model.model_def.cfg
    rows = generation_eval.round_up(max(args.batch_size, 1), model.batch_multiple)
    full_len = cfg.max_seq_len if kind == "classify" else cfg.max_seq_len + 1
    enc = examples_lib.encode(eval_set, model.tokenizer, model.tokenizer_dir, cfg.vocab_size, full_len, model.labels)
    row_len = scoring_row_len(enc, kind, cfg.max_seq_len)
    loss_names = [n for n in names if METRICS[n].inputs == "loss"]
    text_names = [n for n in names if METRICS[n].inputs == "text"]
    samples, extra = [dict(r) for r in enc.records], {"examples": len(enc.records), "row_len": row_len}
    with model.context():
        kw = {}
        if loss_names:
            if not enc.pieces:
                raise EvalError(f"{', '.join(loss_names)} need the examples' completions, and {eval_set.describe()} "
                                "has none; ask only for metrics that need none.")
            t0 = time.perf_counter()
            nats, tokens = scoring.loss_sums(model.model_def, model.params, enc.pieces, row_len, rows)
            kw.update(nats_sum=nats, tokens=tokens, n_bytes=enc.n_bytes)
            extra["loss_seconds"] = round(time.perf_counter() - t0, 2)
        if kind == "classify":
            pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
            probs = scoring.class_probabilities(model.model_def, model.params, enc.inputs, row_len, rows,
                                                int(pad or 0))
            preds = np.argmax(probs, axis=-1).astype(int).tolist()
            kw.update(labels=enc.class_ids, preds=preds, label_names=model.labels)
            for s, p, row in zip(samples, preds, probs):
                s["prediction"] = model.labels[p]
                s["probabilities"] = top_probabilities(row, model.labels)
        if text_names:
            eos = model.tokenizer.eos_token_id
            pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else (eos or 0)
            generator = generation_eval.make_generator(model.model_def, enc.prompts, args.max_new_tokens, rows, eos, pad)
            generations = generation_eval.decode_generations(model.tokenizer, generator(model.params, enc.prompts))
            for s, g in zip(samples, generations):
                s["generation"] = g
            kw.update(generations=generations, references=enc.references)
            stats = generator.stats
            extra["generation"] = {"greedy": True, "kv_cache": True, "batch_size": rows, "prompt_width": generator.width,
                                   "max_new_tokens": generator.max_new_tokens, "new_tokens": stats.new_tokens,
                                   "seconds": round(stats.seconds, 3), "compile_seconds": round(stats.compile_seconds, 2),
                                   "tokens_per_second": round(stats.tokens_per_second, 1)}
    metrics = compute_metrics(kind, names, **kw)
    majority = examples_lib.majority_class(eval_set)
    if majority and "accuracy" in metrics:  # a reference point, not a score of the model: kept out of metrics
        extra["train_majority_baseline"] = majority
    return EvalResult(model=model.path, task=kind, metrics=metrics, samples=samples, checkpoint=model.checkpoint,
                      data=eval_set.describe(), metrics_jsonl=model.metrics_jsonl, extra=extra)


def top_probabilities(probs, labels: list[str], top: int = 5) -> dict[str, float]:
    """The `top` most likely classes and their probabilities, most likely first (rounded for the JSON file)."""
    order = np.argsort(-np.asarray(probs), kind="stable")[:top]
    return {str(labels[c]): round(float(probs[c]), 4) for c in order}


def _load_and_evaluate(path: str, which, eval_set, names, args, mesh_shape, role: str) -> EvalResult:
    t0 = time.perf_counter()
    model = load_eval_model(path, which, mesh_shape)
    print(f"lmtrain eval: {role} {path}, {model.checkpoint}; scoring {len(eval_set)} examples of "
          f"{eval_set.describe()} ({', '.join(names)})", flush=True)
    result = evaluate_model(model, eval_set, names, args)
    result.extra["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def _baseline_json(args, task: str) -> EvalResult | None:
    """An earlier eval.json named by --baseline, of the same task (None when --baseline names a model)."""
    path = as_path(args.baseline)
    if not (path.suffix == ".json" and path.is_file()):
        return None
    baseline, _ = read_json(path)
    if baseline.task != task:
        raise EvalError(f"--baseline {args.baseline} holds a '{baseline.task}' evaluation; this one is '{task}'.")
    return baseline


def _baseline(args, eval_set, names, mesh_shape) -> EvalResult | None:
    if not args.baseline:
        return None
    baseline = _baseline_json(args, eval_set.kind)
    if baseline is not None:
        return baseline
    return _load_and_evaluate(args.baseline, _which(args.baseline_which), eval_set, names, args, mesh_shape,
                              "baseline")


# ----------------------------------------------------------------------------- output


def default_out(model_path: str, result: EvalResult, split: str) -> str:
    root = as_path(model_path)
    tag = result.checkpoint.split(" (")[0].split(":")[0].replace(" ", "")
    if (root / "config.json").exists() and not _is_hf(root):
        return str(root / "eval" / "-".join(x for x in (split or "data", tag) if x))
    return str(as_path("eval") / "-".join(x for x in (root.name, split) if x))


def _is_hf(root) -> bool:
    raw = json.loads((root / "config.json").read_text())
    return "architectures" in raw or "model_type" in raw


def keep_earlier(out_dir) -> str | None:
    """An earlier eval.json / report.html in out_dir move to eval.N.json / report.N.html (nothing is overwritten)."""
    out = as_path(out_dir)
    if not (out / "eval.json").exists():
        return None
    n = 1
    while (out / f"eval.{n}.json").exists():
        n += 1
    (out / "eval.json").rename(out / f"eval.{n}.json")
    if (out / "report.html").exists():
        (out / "report.html").rename(out / f"report.{n}.html")
    return str(out / f"eval.{n}.json")


def majority_baseline_line(result: EvalResult) -> str | None:
    """The train-majority baseline in words: the accuracy here of always answering the training split's most
    frequent class, the rule a model that learned nothing but the class frequencies would follow (the figure
    tools/shard_data.py prints for the split; not the eval set's own most frequent share)."""
    majority = result.extra.get("train_majority_baseline")
    if not majority:
        return None
    return (f"train-majority baseline (not a model): always answering '{majority['label']}', the training split's "
            f"most frequent class, scores accuracy {majority['accuracy']:.4g} on these examples")


def print_summary(result: EvalResult, baseline: EvalResult | None) -> None:
    keys = [k for k, v in result.metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)]
    width = max(len(k) for k in keys) if keys else 10
    if baseline:
        print(f"{'metric':<{width}}  {'baseline':>12}  {'model':>12}")
    for k in keys:
        a = result.metrics[k]
        b = baseline.metrics.get(k) if baseline else None
        fa = f"{a:.4g}" if isinstance(a, float) else str(a)
        if baseline:
            fb = "-" if b is None else (f"{b:.4g}" if isinstance(b, float) else str(b))
            print(f"{k:<{width}}  {fb:>12}  {fa:>12}")
        else:
            print(f"{k:<{width}}  {fa}")
    line = majority_baseline_line(result)
    if line:
        print(line)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.max_examples < 0 or args.batch_size < 1 or args.max_new_tokens < 1:
            raise EvalError("--max-examples must be >= 0, --batch-size and --max-new-tokens >= 1.")
        mesh_shape = _mesh(args.mesh)
        if task_eval.generic_task_config(args.model) is not None:
            result, baseline, split = _task_evaluation(args, mesh_shape)
        else:
            result, baseline, split = _scorer_evaluation(args, mesh_shape)
        if jax.process_index() != 0:  # every process of a multi-host job scores; the first one writes
            return 0
        out = args.out or default_out(args.model, result, split)
        kept = keep_earlier(out)
        json_path, html_path = write_reports(out, result, baseline)
    except (EvalError, ValueError, OSError) as e:  # ConfigError, SourceError, GenerationError are ValueErrors
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"lmtrain eval: error: {message}", file=sys.stderr)
        return 2
    print_summary(result, baseline)
    if kept:
        print(f"lmtrain eval: the earlier result is kept as {kept}")
    print(f"lmtrain eval: wrote {json_path} and {html_path}")
    return 0


def _task_evaluation(args, mesh_shape) -> tuple[EvalResult, EvalResult | None, str]:
    """A WORKDIR of a task with no scorer of its own, scored by its task (lmtrain.evaluate.task_eval)."""
    if not examples_lib.is_shard_dir(args.data):
        raise EvalError(f"--data {args.data}: {args.model} is scored by its task's own eval step, which reads a "
                        "shard directory (tools/shard_data.py output); give one.")
    names = None if args.metrics is None else tuple(n.strip() for n in args.metrics.split(",") if n.strip())

    def score(path, which):
        return task_eval.evaluate_workdir(path, which, args.data, args.split, names, args.batch_size,
                                          args.max_examples, mesh_shape)

    result = score(args.model, _which(args.which))
    baseline = None
    if args.baseline:
        baseline = _baseline_json(args, result.task) or score(args.baseline, _which(args.baseline_which))
    return result, baseline, result.extra["split"]


def _scorer_evaluation(args, mesh_shape) -> tuple[EvalResult, EvalResult | None, str]:
    """The scorer of the data's kind (lm, sft, classify) on a WORKDIR or a Hugging Face directory."""
    fields = {"text": args.text_field, "prompt": args.prompt_field, "completion": args.completion_field,
              "label": args.label_field}
    if is_remote(args.data) and not examples_lib.is_shard_dir(args.data):
        raise EvalError(f"--data {args.data}: raw files are read locally; shard directories may be on gs://.")
    eval_set = examples_lib.read_eval_set(args.data, args.split, args.max_examples, args.format, fields)
    names = metric_names(eval_set.kind, args.metrics)
    if not eval_set.has_references:
        raise EvalError(f"the metrics {', '.join(names)} need references, and {eval_set.describe()} has none (no "
                        f"'{args.completion_field}' field); give each example its completion, or set "
                        "--completion-field.")
    result = _load_and_evaluate(args.model, _which(args.which), eval_set, names, args, mesh_shape, "model")
    baseline = _baseline(args, eval_set, names, mesh_shape)
    return result, baseline, eval_set.split


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["evaluate_model", "main"]
