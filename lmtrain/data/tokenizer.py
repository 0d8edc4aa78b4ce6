"""Byte-level BPE tokenizer for the built-in corpus, trained once per WORKDIR and saved as a Hugging Face directory."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

EOS = "<|endoftext|>"


def train_bpe_tokenizer(docs: Sequence[str], vocab_size: int, out_dir: str | pathlib.Path):
    """Train a byte-level BPE on `docs` and save it so that AutoTokenizer.from_pretrained(out_dir) loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
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
