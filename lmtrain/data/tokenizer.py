"""Tokenizers: build BPE, Unigram or WordPiece ones (tools/train_tokenizer.py and the built-in source
share `build_tokenizer`), save them as Hugging Face directories, and load them offline."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

EOS = "<|endoftext|>"
ALGORITHMS = ("bpe", "unigram", "wordpiece")


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


def train_bpe_tokenizer(docs: Sequence[str], vocab_size: int, out_dir: str | pathlib.Path):
    """Train a byte-level BPE on `docs` and save it so that AutoTokenizer.from_pretrained(out_dir) loads it."""
    from transformers import PreTrainedTokenizerFast

    tok, trainer = build_tokenizer("bpe", vocab_size, [EOS], "", nfkc=False, lowercase=False, min_frequency=0)
    tok.train_from_iterator(docs, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=None, pad_token=EOS)
    out_dir = pathlib.Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    fast.save_pretrained(str(tmp))
    tmp.rename(out_dir)  # a half-written tokenizer directory is never picked up
    return load_tokenizer(out_dir)


def load_tokenizer(path: str | pathlib.Path):
    """Load a Hugging Face tokenizer directory (tokenizer.json and friends) without any network access."""
    from transformers import AutoTokenizer

    path = pathlib.Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"tokenizer directory {path} has no tokenizer.json; point data.tokenizer_dir at one.")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path} has no EOS token; add one when training it.")
    return int(tokenizer.eos_token_id)
