"""Tokenizers: build BPE, Unigram or WordPiece ones (tools/train_tokenizer.py and the built-in source
share `build_tokenizer`), save them as Hugging Face directories, and load them offline."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Sequence

import jinja2

from lmtrain.data.packing import DataError
from lmtrain.paths import as_path, copy_tree, is_remote, local_dir
from lmtrain.storage.publish import Publisher

EOS = "<|endoftext|>"
ALGORITHMS = ("bpe", "unigram", "wordpiece")
# The turn markers of chat templates: ChatML/Qwen2 <|im_start|>, Llama 3 <|eot_id|>, Mistral [INST], Gemma
# <start_of_turn>. A model learns a marker best as one token of its own.
CHAT_MARKER = re.compile(r"<\|[^<>|\s]+\|>|\[/?[A-Z][A-Z_]*\]|<(?:start|end)_of_turn>")


def build_tokenizer(algorithm: str, vocab_size: int, special_tokens: list[str], unk_token: str, nfkc: bool,
                    lowercase: bool, min_frequency: int):
    """An untrained tokenizers.Tokenizer and its trainer for the chosen algorithm."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if algorithm == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, min_frequency=min_frequency,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    elif algorithm == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=special_tokens, unk_token=unk_token,
                                          show_progress=False)
    elif algorithm == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=unk_token))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                            min_frequency=min_frequency, show_progress=False)
    else:
        raise ValueError(f"unknown algorithm '{algorithm}'; choose one of {', '.join(ALGORITHMS)}.")
    steps = ([normalizers.NFKC()] if nfkc else []) + ([normalizers.Lowercase()] if lowercase else [])
    if steps:
        tok.normalizer = normalizers.Sequence(steps)
    return tok, trainer


def train_bpe_tokenizer(docs: Sequence[str], vocab_size: int, out_dir: str | os.PathLike):
    """Train a byte-level BPE on `docs` and save it so that AutoTokenizer.from_pretrained(out_dir) loads it."""
    from transformers import PreTrainedTokenizerFast

    tok, trainer = build_tokenizer("bpe", vocab_size, [EOS], "", nfkc=False, lowercase=False, min_frequency=0)
    tok.train_from_iterator(docs, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=None, pad_token=EOS)
    save_tokenizer_dir(fast.save_pretrained, out_dir)
    return load_tokenizer(out_dir)


# A tokenizer directory is published whole (written beside it, then renamed in); tokenizer.json marks it complete.
_PUBLISHER = Publisher(markers=("tokenizer.json",), name="tokenizer", tool="lmtrain")


def save_tokenizer_dir(save: Callable[[str], object], out_dir: str | os.PathLike) -> None:
    """Publish a tokenizer directory whole: `save(local_dir)` writes it next to the target and it is renamed
    into place; for gs:// it is written locally and uploaded with tokenizer.json last (what readers test)."""
    out = as_path(out_dir)
    if is_remote(out):
        with tempfile.TemporaryDirectory(prefix="lmtrain-tokenizer-") as tmp:
            save(tmp)
            copy_tree(tmp, out, last=("tokenizer.json",))
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with _PUBLISHER.staged(out, _PUBLISHER.staging_dir(out)) as staging:  # never picked up half-written
        save(str(staging))


# Any of these makes a directory a Hugging Face tokenizer (transformers converts the older formats).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def load_tokenizer(path: str | os.PathLike):
    """Load a Hugging Face tokenizer directory (local or gs://) as transformers does, offline and safely.

    The one loader of lmtrain and its tools: no network access to the Hub, no code from the directory
    (trust_remote_code=False: a directory that needs its own tokenization_*.py is a one-line error),
    and padding and truncation OFF on the fast tokenizer's backend. A tokenizer.json may carry the
    settings its model was served with (all-MiniLM-L6-v2: pad to 128, truncate at 128), which the
    backend would otherwise apply to every encoding: lmtrain pads and truncates itself, and counts it.
    A gs:// directory is copied to a temporary local one first: transformers reads local files only.
    """
    from transformers import AutoTokenizer

    path = as_path(path)
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise DataError(f"tokenizer directory {path} has no tokenizer.json; point data.tokenizer_dir at one "
                        "(made by tools/train_tokenizer.py, or a Hugging Face model's).")
    with local_dir(path) as local:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(local), local_files_only=True, trust_remote_code=False)
        except ValueError as e:
            if "trust_remote_code" not in str(e):
                raise
            raise DataError(f"tokenizer directory {path} needs its own Python code to load (an auto_map in its "
                            "tokenizer_config.json or config.json); lmtrain never runs code from a model directory. "
                            "Use a tokenizer that transformers loads by itself (a tokenizer.json).") from None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.no_padding()
        backend.no_truncation()
    return tokenizer


def eos_id(tokenizer, token: str = "") -> int:
    """The id that ends every document: `token` when given, else the EOS, else the separator.

    Chosen by role, not by name: BERT has no EOS and ends a sequence with [SEP] (RoBERTa: </s>), as
    transformers' own encodings do.
    """
    name = getattr(tokenizer, "name_or_path", "")
    if token:
        token_id = tokenizer.get_vocab().get(token)
        if token_id is None:
            raise DataError(f"--eos-token {token!r} is not a token of tokenizer {name}; give one of its tokens "
                            "(e.g. its EOS or separator).")
        return int(token_id)
    for role in ("eos_token_id", "sep_token_id"):
        if getattr(tokenizer, role, None) is not None:
            return int(getattr(tokenizer, role))
    raise DataError(f"tokenizer {name} has no EOS or separator token to end documents with; pass --eos-token "
                    "TOKEN, or add an EOS when training it.")


def chat_template_markers(template: str) -> list[str]:
    """The literal turn markers in a chat template's source (its string constants and text), in order."""
    try:
        literals = [value for _, kind, value in jinja2.Environment().lex(template) if kind in ("string", "data")]
    except jinja2.TemplateSyntaxError:  # rendering reports the template's error; the markers are still in it
        literals = [template]
    return list(dict.fromkeys(m for text in literals for m in CHAT_MARKER.findall(text)))


def split_markers(tokenizer, markers: Sequence[str]) -> list[str]:
    """The markers `tokenizer` does not encode as a single token."""
    return [m for m in markers if len(tokenizer.backend_tokenizer.encode(m, add_special_tokens=False).ids) != 1]


def add_special_tokens(tokenizer, tokens: Sequence[str]) -> list[str]:
    """Add the `tokens` not in the vocabulary as special tokens (never split, new ids after the last one);
    return them. Tokens already in the vocabulary keep their ids."""
    vocab = tokenizer.get_vocab()
    new = [t for t in dict.fromkeys(tokens) if t not in vocab]
    if new:
        tokenizer.add_special_tokens({"extra_special_tokens": new}, replace_extra_special_tokens=False)
    return new
