"""sft: prompt/completion records; the tokens and a loss mask (1 on the completion and its EOS), packed whole."""

from __future__ import annotations

import numpy as np

from lmtrain.data.examples import SftEncoder
from lmtrain.data.formats.base import ExampleFormat, register_format


class SftFormat(ExampleFormat):
    name = "sft"
    packing = "whole"
    token_fields = (("weights", "u1"),)  # the loss mask: 1 where the token is a training target
    key_field = "prompt_field"  # one prompt never lands in two splits
    records = "prompt and completion fields"

    def make_encoder(self, tokenizer, args):
        return SftEncoder(tokenizer.backend, tokenizer.eos_id, args.seq_len + 1, args.too_long, args.train_on_prompt,
                          args.prompt_field, args.completion_field)

    def arrays(self, example, label_ids) -> dict:
        return {"tokens": example.tokens, "weights": example.mask}

    def target_tokens(self, arrays) -> int:
        return int(np.asarray(arrays["weights"])[1:].sum())  # the first token is never a target


SFT = register_format(SftFormat())
