"""ExampleFormat: everything lmtrain knows about one kind of stored example, declared in one place.

A format says
- what a record of the raw data holds, and how one becomes an example (`make_encoder`, used by the shard
  tool; `key_field` names the record field whose value decides the example's split);
- the arrays a stored example holds (`arrays`) and their byte layout in a shard record: the fields stored
  once per example (`example_fields`) come before the tokens, the fields stored per token (`token_fields`)
  after them, all little-endian; the tokens are the manifest's token_dtype (`encode` / `decode`);
- how examples become a batch (`packing`): "stream" packs documents into rows and splits them over rows
  (lmtrain.data.packing.RowPacker), "whole" packs whole examples with a per-token `weights` field
  (ExamplePacker), "row" puts one example in each row, padded to a length bucket, through `batch`;
- whether the manifest carries a label vocabulary (`label_vocab`): one class per example or per token.

The shard writer and the loaders only call these, so a new format is one module (see lmtrain.data.formats).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

PACKINGS = ("stream", "whole", "row")
LABEL_VOCABS = ("", "example", "token")


def _le(dtype) -> np.dtype:
    return np.dtype(dtype).newbyteorder("<")


class ExampleFormat:
    """One example format; subclass it, set the class attributes, and register an instance."""

    name: str = ""
    packing: str = "row"  # one of PACKINGS
    example_fields: tuple[tuple[str, str], ...] = ()  # (key, numpy dtype): stored once, before the tokens
    token_fields: tuple[tuple[str, str], ...] = ()  # (key, numpy dtype): one value per token, after the tokens
    label_vocab: str = ""  # "example" or "token": the manifest's `labels` lists the classes the ids index
    from_corpus: bool = False  # documents of the text pipeline (cleaning, dedup); else records cut to --seq-len
    key_field: str = ""  # the shard tool's option (argparse dest) naming the record field that decides the split
    records: str = ""  # what a record holds, for messages: "prompt and completion fields"

    # ----------------------------------------------------------------------------------- records -> arrays

    def make_encoder(self, tokenizer, args):
        """The record encoder of the shard tool: `validate(record, where)` (the record's label(s), or None),
        `encode(record, where)` (an example, or None when it is dropped) and `counts` (a Counter of
        "truncated" and "dropped_too_long"). `tokenizer` is the tool's ShardTokenizer, `args` its options."""
        raise NotImplementedError(f"format {self.name} is not made from records")

    def arrays(self, example, label_ids: Mapping[str, int]) -> dict:
        """What the shard stores of an encoder's example; class labels become ids through `label_ids`."""
        return {"tokens": example.tokens}

    def target_tokens(self, arrays: Mapping) -> int | None:
        """The tokens of a stored example that are trained on, counted in the manifest; None: not counted."""
        return None

    def class_ids(self, arrays: Mapping) -> np.ndarray:
        """The class ids a stored example holds, counted per class in the manifest (label_vocab formats)."""
        return np.zeros(0, np.int64)

    # ----------------------------------------------------------------------------------- arrays <-> bytes

    def encode(self, arrays: Mapping, token_dtype) -> bytes:
        """One shard record: the example fields, the tokens, then the token fields."""
        parts = [np.asarray(arrays[key]).astype(_le(dtype)).tobytes() for key, dtype in self.example_fields]
        parts.append(np.asarray(arrays["tokens"]).astype(_le(token_dtype), copy=False).tobytes())
        parts += [np.asarray(arrays[key]).astype(_le(dtype)).tobytes() for key, dtype in self.token_fields]
        return b"".join(parts)

    def decode(self, record: bytes, token_dtype) -> dict:
        """The arrays of one shard record: "tokens", the token fields (arrays) and the example fields (scalars)."""
        out, offset = {}, 0
        for key, dtype in self.example_fields:
            out[key] = np.frombuffer(record, _le(dtype), 1, offset)[0].item()
            offset += _le(dtype).itemsize
        token_dtype = _le(token_dtype)
        per_token = token_dtype.itemsize + sum(_le(dtype).itemsize for _, dtype in self.token_fields)
        n = (len(record) - offset) // per_token
        out["tokens"] = np.frombuffer(record, token_dtype, n, offset)
        offset += n * token_dtype.itemsize
        for key, dtype in self.token_fields:
            out[key] = np.frombuffer(record, _le(dtype), n, offset)
            offset += n * _le(dtype).itemsize
        return out

    # ----------------------------------------------------------------------------------- examples -> batch

    def batch(self, examples: list[dict], row_len: int, batch_rows: int, pad_id: int) -> dict:
        """A "row" format's batch: one decoded example per row, right-padded to row_len; rows past the
        examples are padding that nothing trains on."""
        raise NotImplementedError(f"format {self.name} packs its examples ({self.packing})")

    def __repr__(self) -> str:
        return f"<ExampleFormat {self.name}>"


FORMATS: dict[str, ExampleFormat] = {}


def register_format(name_or_format, example_format=None) -> ExampleFormat:
    """Register a format under its name: `register_format(MyFormat())`, or `register_format("name", MyFormat())`
    (a class is instantiated). A plugin module calls it when imported (lmtrain.plugins)."""
    fmt = example_format if example_format is not None else name_or_format
    fmt = fmt() if isinstance(fmt, type) else fmt
    name = name_or_format if isinstance(name_or_format, str) else fmt.name
    if not isinstance(fmt, ExampleFormat) or not name:
        raise TypeError(f"register_format needs a named ExampleFormat, got {fmt!r}.")
    if fmt.packing not in PACKINGS or fmt.label_vocab not in LABEL_VOCABS:
        raise ValueError(f"format {name}: packing must be one of {PACKINGS} and label_vocab one of {LABEL_VOCABS}.")
    if fmt.packing == "whole" and "weights" not in dict(fmt.token_fields):
        raise ValueError(f"format {name}: packing 'whole' needs a per-token 'weights' field (the loss mask).")
    fmt.name = name
    FORMATS[name] = fmt
    return fmt


def get_format(name: str) -> ExampleFormat:
    """The registered format `name`; KeyError naming the registered ones otherwise."""
    if name not in FORMATS:
        raise KeyError(f"example format '{name}' is not registered (known: {', '.join(FORMATS)}); a plugin's format "
                       "needs its module named in LMTRAIN_PLUGINS.")
    return FORMATS[name]
