"""Train a tokenizer (byte-level BPE, Unigram or WordPiece) on a corpus and save it as a Hugging Face directory.

    python tools/train_tokenizer.py --input 'data/*.jsonl' --algorithm bpe --vocab-size 32000 --output tok/
    python tools/train_tokenizer.py --hf-dataset wikitext --hf-config wikitext-103-raw-v1 --max-chars 2e9 ...
    python tools/train_tokenizer.py --builtin --vocab-size 4096 --output workdir/tokenizer   # no download
    python tools/train_tokenizer.py --builtin --bert --vocab-size 4096 --output workdir/bert_tokenizer  # encoders

The output loads with transformers.AutoTokenizer.from_pretrained(output). A small share of the
documents (chosen by a hash of their text, so the same ones every run) is held out of training
and used to report the compression ratio in bytes per token.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import xxhash

from lmtrain.data.tokenizer import ALGORITHMS, build_tokenizer, save_tokenizer_dir
from lmtrain.paths import as_path, is_remote
from lmtrain.prep.text_sources import (
    SourceError,
    add_corpus_args,
    check_spec,
    corpus_from_args,
    expand_files,
    iter_documents,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_corpus_args(p)
    p.add_argument("--output", required=True, help="directory to write (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--algorithm", default="bpe", choices=ALGORITHMS, help="bpe is byte-level (never unknown)")
    p.add_argument("--vocab-size", type=int, default=32000, help="target vocabulary size, special tokens included")
    p.add_argument("--min-frequency", type=int, default=2, help="BPE/WordPiece: least count of a merge")
    p.add_argument("--bos-token", default="<s>", help="'' for none")
    p.add_argument("--eos-token", default="</s>", help="appended after every document by shard_data.py")
    p.add_argument("--pad-token", default="<pad>", help="'' for none")
    p.add_argument("--unk-token", default="<unk>", help="'' for none (not allowed for unigram/wordpiece)")
    p.add_argument("--special-tokens", nargs="*", default=[], help="more special tokens, kept whole")
    p.add_argument("--mask-token", default="", help="the masked-LM task's mask token, e.g. [MASK]; '' for none")
    p.add_argument("--cls-token", default="", help="with --sep-token: every encoding becomes CLS text SEP (encoders)")
    p.add_argument("--sep-token", default="", help="separator token, e.g. [SEP]; see --cls-token")
    p.add_argument("--bert", action="store_true", help="a BERT tokenizer: WordPiece, lowercased, with [PAD] [UNK] [CLS] "
                   "[SEP] [MASK], [CLS] text [SEP] around every encoding and [SEP] ending every document (no BOS)")
    p.add_argument("--nfkc", action="store_true", help="NFKC-normalize text inside the tokenizer")
    p.add_argument("--lowercase", action="store_true", help="lowercase text inside the tokenizer")
    p.add_argument("--max-chars", type=float, default=0, help="stop after this many training characters (0: all)")
    p.add_argument("--holdout-fraction", type=float, default=0.01, help="share of documents held out for the summary")
    p.add_argument("--holdout-max-docs", type=int, default=2000, help="cap on held-out documents kept in memory")
    args = p.parse_args(argv)
    if args.bert:
        given = [f"--{k.replace('_', '-')}" for k, v in BERT_TOKENS.items() if getattr(args, k) != p.get_default(k)]
        if given or args.algorithm not in ("bpe", "wordpiece"):
            p.error(f"--bert sets the special tokens and the algorithm itself; drop {', '.join(given) or '--algorithm'}.")
        for key, value in BERT_TOKENS.items():
            setattr(args, key, value)
        args.algorithm, args.lowercase = "wordpiece", True
    if bool(args.cls_token) != bool(args.sep_token):
        p.error("--cls-token and --sep-token go together (CLS text SEP).")
    return args


# What --bert sets: bert-base-uncased's special tokens.
BERT_TOKENS = {"unk_token": "[UNK]", "pad_token": "[PAD]", "bos_token": "", "eos_token": "[SEP]", "cls_token": "[CLS]",
               "sep_token": "[SEP]", "mask_token": "[MASK]"}


def is_held_out(text: str, fraction: float) -> bool:
    """Deterministic by content, so the held-out sample is the same on every run and machine."""
    return xxhash.xxh64_intdigest(text.encode("utf-8"), seed=1) < fraction * 2**64


def train_tokenizer(args: argparse.Namespace) -> dict:
    """Train, save atomically, and return the summary."""
    spec = corpus_from_args(args)
    check_spec(spec)
    output = as_path(args.output)
    fingerprint = run_fingerprint(args, spec)
    if output.exists() and not args.overwrite:
        kept = _finished_summary(output, fingerprint)
        if kept is not None:  # a re-run (e.g. of the quickstart) reuses the tokenizer instead of failing
            return {**kept, "kept": True}
        raise SourceError(f"output {output} exists (not a tokenizer of these inputs and options); pass --overwrite "
                          "to replace it.")
    if args.algorithm in ("unigram", "wordpiece") and not args.unk_token:
        raise SourceError(f"--algorithm {args.algorithm} needs an --unk-token.")
    if not args.eos_token:
        raise SourceError("--eos-token is required: shard_data.py ends every document with it.")
    named = {"bos_token": args.bos_token, "eos_token": args.eos_token, "pad_token": args.pad_token,
             "unk_token": args.unk_token, "cls_token": args.cls_token, "sep_token": args.sep_token,
             "mask_token": args.mask_token}
    # BERT's ids start [PAD]=0, [UNK], [CLS], [SEP], [MASK]; other tokenizers keep the order above
    first = [named[k] for k in ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")] if args.bert else []
    special = list(dict.fromkeys([t for t in [*first, *named.values()] if t] + list(args.special_tokens)))
    if args.vocab_size <= len(special):
        raise SourceError(f"--vocab-size {args.vocab_size} leaves no room beside {len(special)} special tokens.")

    stats = {"documents": 0, "chars": 0, "held_out_documents": 0}
    held_out: list[str] = []

    def training_text() -> Iterator[list[str]]:
        batch: list[str] = []
        for doc in iter_documents(spec):
            if args.holdout_fraction and is_held_out(doc, args.holdout_fraction):
                stats["held_out_documents"] += 1
                if len(held_out) < args.holdout_max_docs:
                    held_out.append(doc)
                continue
            stats["documents"] += 1
            stats["chars"] += len(doc)
            batch.append(doc)
            if len(batch) == 1000:
                yield batch
                batch = []
            if args.max_chars and stats["chars"] >= args.max_chars:
                break
        if batch:
            yield batch

    tok, trainer = build_tokenizer(args.algorithm, args.vocab_size, special, args.unk_token, args.nfkc,
                                   args.lowercase, args.min_frequency)
    start = time.time()
    tok.train_from_iterator(training_text(), trainer=trainer)
    if args.cls_token:
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(
            single=f"{args.cls_token} $A {args.sep_token}", pair=f"{args.cls_token} $A {args.sep_token} $B:1 {args.sep_token}:1",
            special_tokens=[(t, tok.token_to_id(t)) for t in dict.fromkeys((args.cls_token, args.sep_token))])
    if not stats["documents"]:
        raise SourceError("the corpus is empty: no training documents were read.")
    sample, sample_name = (held_out, "held-out") if held_out else (None, "")
    summary = {
        "algorithm": args.algorithm,
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "requested_vocab_size": args.vocab_size,
        "special_tokens": special,
        "normalization": {"nfkc": args.nfkc, "lowercase": args.lowercase},
        "corpus": spec.describe(),
        "training_documents": stats["documents"],
        "training_chars": stats["chars"],
        "held_out_documents": stats["held_out_documents"],
        "train_seconds": round(time.time() - start, 2),
        "fingerprint": fingerprint,
    }
    if sample:
        encoded = tok.encode_batch(sample, add_special_tokens=False)
        n_tokens = sum(len(e.ids) for e in encoded)
        n_bytes = sum(len(t.encode("utf-8")) for t in sample)
        summary["compression_bytes_per_token"] = round(n_bytes / max(1, n_tokens), 4)
        summary["compression_sample"] = f"{len(sample)} {sample_name} documents, {n_bytes} bytes"
    else:
        summary["compression_bytes_per_token"] = None
        summary["compression_sample"] = "none held out (corpus too small for --holdout-fraction)"
    _save(tok, named, list(args.special_tokens), summary, output)
    return summary


def run_fingerprint(args: argparse.Namespace, spec) -> dict:
    """Everything that decides the tokenizer: the options and the inputs (a local file by size and mtime)."""
    options = {k: v for k, v in sorted(vars(args).items()) if k not in ("output", "overwrite")}
    fingerprint = {"options": options, "corpus": spec.describe()}
    if spec.files:
        fingerprint["file_stats"] = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in expand_files(spec.files)]
    return json.loads(json.dumps(fingerprint))  # as it reads back from training_summary.json (tuples are lists)


def _finished_summary(output, fingerprint: dict) -> dict | None:
    """The summary of a finished tokenizer in `output` trained on the same inputs with the same options."""
    try:
        summary = json.loads((output / "training_summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("fingerprint") != fingerprint:
        return None
    return summary if (output / "tokenizer.json").exists() else None


def _save(tok, named: dict, extra: list[str], summary: dict, output) -> None:
    """Write next to the output and rename (gs://: upload, tokenizer.json last), so a failed run never
    leaves a half tokenizer in place."""
    from transformers import PreTrainedTokenizerFast

    kwargs = {k: v for k, v in named.items() if v}
    extra = [t for t in extra if t not in kwargs.values()]
    if extra:
        kwargs["extra_special_tokens"] = extra
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)

    def save(directory: str) -> None:
        fast.save_pretrained(directory)
        (Path(directory) / "training_summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")

    if is_remote(output) and output.exists():  # --overwrite: no file of the old tokenizer may stay beside the new
        output.rmtree()
    save_tokenizer_dir(save, output)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = train_tokenizer(args)
    except SourceError as e:
        print(f"train_tokenizer: error: {e}", file=sys.stderr)
        return 2
    ratio = summary["compression_bytes_per_token"]
    vocab, asked = summary["vocab_size"], summary["requested_vocab_size"]
    if summary.get("kept"):
        print(f"train_tokenizer: {args.output} already holds a tokenizer trained on these inputs with these options; "
              f"kept it (pass --overwrite to train again). vocab size: {vocab}. Train with "
              f"--config.model.vocab_size={vocab}.")
        return 0
    print(f"tokenizer: {args.algorithm}, vocab {vocab}, trained on {summary['training_documents']} "
          f"documents ({summary['training_chars']} chars) in {summary['train_seconds']}s -> {args.output}")
    print(f"compression: {ratio} bytes/token on {summary['compression_sample']}" if ratio else
          f"compression: {summary['compression_sample']}")
    if vocab < asked:
        print(f"train_tokenizer: warning: the corpus yields only {vocab} tokens of the {asked} asked for (too little "
              "text for a larger vocabulary); the model's vocabulary must match the tokenizer's, not --vocab-size.",
              file=sys.stderr)
    print(f"vocab size: {vocab}. Train with --config.model.vocab_size={vocab} (or any larger value; a multiple "
          f"of 128, e.g. {-(-vocab // 128) * 128}, is faster on accelerators).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
