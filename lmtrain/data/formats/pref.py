"""pref: preference pairs (prompt, chosen, rejected), TRL's preference layout, for dpo, orpo and reward.

A record's `chosen` and `rejected` are plain text (a completion of the text `prompt`) or lists of chat messages
(rendered with the tokenizer's chat template after the prompt's messages, masked as --format chat masks
assistant turns, by rendering prefixes). A stored example is one pair: the chosen sequence (prompt, chosen,
EOS) followed by the rejected one, each token's loss mask (1 on the completion), and the chosen sequence's
length. The pair never splits: a batch row holds one pair, chosen as segment 1 and rejected as segment 2,
each with positions from 0, so attention never crosses from one completion to the other.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np

from lmtrain.data.examples import ChatEncoder, ExampleError, load_chat_template
from lmtrain.data.formats.base import ExampleFormat, register_format


@dataclasses.dataclass
class PairExample:
    tokens: np.ndarray  # int64 [n]: the chosen sequence, then the rejected one
    mask: np.ndarray  # uint8 [n]: 1 on each completion's tokens (its targets)
    chosen_len: int  # tokens of the chosen sequence


def _completion(record: dict, name: str, option: str, where: str):
    value = record.get(name)
    if value is None:
        keys = ", ".join(list(record)[:10])
        raise ExampleError(f"{where}: no field '{name}' (fields: {keys}). Set {option}.")
    if isinstance(value, str):
        if not value.strip():
            raise ExampleError(f"{where}: field '{name}' is empty; a preference pair needs both completions.")
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in value):
        if not any(m["role"] == "assistant" and m["content"].strip() for m in value):
            raise ExampleError(f"{where}: field '{name}' has no non-empty assistant turn; a preference pair needs "
                               "both completions.")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ExampleError(f"{where}: field '{name}' must be text or a non-empty list of {{\"role\": str, \"content\": "
                       "str}} messages.")


def _prompt(record: dict, name: str, where: str):
    value = record.get(name, "")  # absent: TRL's implicit prompt (the conversations carry it)
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                       and isinstance(m.get("content"), str) for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ExampleError(f"{where}: field '{name}' must be text or a list of {{\"role\": str, \"content\": str}} "
                       "messages.")


class PrefEncoder:
    """prompt/chosen/rejected records -> PairExample. The pair's two sequences together hold at most
    max_tokens (--seq-len) tokens. A prompt of max_tokens tokens or more is an error; a pair too long for
    max_tokens is dropped ('drop') or loses prompt tokens from the left of both copies ('truncate', while one
    prompt token is left to predict the first completion token from)."""

    def __init__(self, tokenizer, args):
        self.tokenizer, self.eos_id, self.max_tokens, self.too_long = (tokenizer.backend, tokenizer.eos_id,
                                                                       args.seq_len, args.too_long)
        self.hf, self.chat_template = tokenizer.hf, args.chat_template
        self.fields = (args.prompt_field, args.chosen_field, args.rejected_field)
        self._chat: ChatEncoder | None = None
        self.counts: Counter = Counter()

    def _read(self, record: dict, where: str):
        prompt_field, chosen_field, rejected_field = self.fields
        chosen = _completion(record, chosen_field, "--chosen-field", where)
        rejected = _completion(record, rejected_field, "--rejected-field", where)
        if chosen == rejected:
            raise ExampleError(f"{where}: '{chosen_field}' and '{rejected_field}' are the same, so the pair prefers "
                               "nothing; drop the record or fix one of them.")
        return _prompt(record, prompt_field, where), chosen, rejected

    def validate(self, record: dict, where: str) -> None:
        self._read(record, where)

    def encode(self, record: dict, where: str) -> PairExample | None:
        prompt, chosen, rejected = self._read(record, where)
        chat = any(isinstance(v, list) for v in (prompt, chosen, rejected))
        encode = self._chat_sequence if chat else self._text_sequence
        (c_tokens, c_mask), (r_tokens, r_mask) = encode(prompt, chosen, where), encode(prompt, rejected, where)
        n_prompt = min(int(np.argmax(c_mask)), int(np.argmax(r_mask)))  # the tokens before the first target
        if n_prompt >= self.max_tokens:
            raise ExampleError(f"{where}: the prompt is {n_prompt} tokens, longer than the sequence (--seq-len "
                               f"{self.max_tokens}); shorten it or raise --seq-len.")
        excess = len(c_tokens) + len(r_tokens) - self.max_tokens
        if excess > 0:
            cut = -(-excess // 2)  # from each copy of the prompt, so both completions keep the same context
            if self.too_long == "drop" or cut > n_prompt - 1:
                self.counts["dropped_too_long"] += 1
                return None
            c_tokens, c_mask, r_tokens, r_mask = c_tokens[cut:], c_mask[cut:], r_tokens[cut:], r_mask[cut:]
            self.counts["truncated"] += 1
        return PairExample(np.concatenate([c_tokens, r_tokens]), np.concatenate([c_mask, r_mask]), len(c_tokens))

    def _text_sequence(self, prompt: str, completion: str, where: str):
        prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=True).ids
        completion_ids = [*self.tokenizer.encode(completion, add_special_tokens=False).ids, self.eos_id]
        if not prompt_ids:
            raise ExampleError(f"{where}: the prompt is empty, so no token predicts the completion's first one; "
                               "give a prompt.")
        tokens = np.asarray([*prompt_ids, *completion_ids], np.int64)
        return tokens, np.concatenate([np.zeros(len(prompt_ids), np.uint8), np.ones(len(completion_ids), np.uint8)])

    def _chat_sequence(self, prompt, completion, where: str):
        """The conversation prompt + completion rendered with the chat template; the mask covers the assistant
        turns of the completion only (an assistant turn inside the prompt is context)."""
        if self._chat is None:
            template = load_chat_template(self.chat_template) if self.chat_template else None
            self._chat = ChatEncoder(self.hf, self.max_tokens, chat_template=template)
        as_messages = (lambda v, role: [{"role": role, "content": v}] if isinstance(v, str) else v)
        head = as_messages(prompt, "user") if prompt else []
        messages = [*head, *as_messages(completion, "assistant")]
        text, spans = self._chat.assistant_spans(messages, where)
        spans = spans[sum(m["role"] == "assistant" for m in head):]
        enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        tokens = np.asarray(enc["input_ids"], np.int64)
        offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
        mask = np.zeros(len(tokens), np.uint8)
        for lo, hi in spans:
            mask |= ((offsets[:, 0] < hi) & (offsets[:, 1] > lo)).astype(np.uint8)
        if not mask.any() or mask[0]:
            raise ExampleError(f"{where}: the completion has no token to train on after the prompt (an empty "
                               "assistant text, or no prompt before it).")
        return tokens, mask


def pair_batch(examples: list[dict], row_len: int, batch_rows: int, pad_id: int = 0) -> dict:
    """One pair per row: the chosen sequence (segment 1) then the rejected one (segment 2), right-padded.

    inputs, targets (each token's next token in its own sequence), loss_mask (1 where that target is a
    completion token), segment_ids, positions: [B, L]; weights [B]: 1 for a pair, 0 for a padding row.
    """
    shape = (batch_rows, row_len)
    inputs, targets = np.full(shape, pad_id, np.int32), np.zeros(shape, np.int32)
    loss_mask = np.zeros(shape, np.float32)
    segment_ids, positions = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    weights = np.zeros(batch_rows, np.float32)
    for r, ex in enumerate(examples):
        tokens, mask, n_c = np.asarray(ex["tokens"]), np.asarray(ex["weights"]), int(ex["chosen_len"])
        n = len(tokens)
        if n > row_len:
            raise ValueError(f"a preference pair of {n} tokens does not fit in a row of {row_len}.")
        inputs[r, :n], weights[r] = tokens, 1.0
        for segment, (lo, hi) in enumerate(((0, n_c), (n_c, n)), start=1):
            segment_ids[r, lo:hi], positions[r, lo:hi] = segment, np.arange(hi - lo)
            targets[r, lo:hi - 1], loss_mask[r, lo:hi - 1] = tokens[lo + 1:hi], mask[lo + 1:hi]
    return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask, "segment_ids": segment_ids,
            "positions": positions, "weights": weights}


class PrefFormat(ExampleFormat):
    name = "pref"
    packing = "row"  # one pair per row (pair_batch); data.length_buckets trims the padding
    example_fields = (("chosen_len", "<i4"),)
    token_fields = (("weights", "u1"),)  # the loss mask: 1 on each completion's tokens
    key_field = "prompt_field"  # one prompt never lands in two splits
    records = "prompt, chosen and rejected fields"

    def make_encoder(self, tokenizer, args):
        return PrefEncoder(tokenizer, args)

    def arrays(self, example, label_ids) -> dict:
        return {"tokens": example.tokens, "weights": example.mask, "chosen_len": example.chosen_len}

    def target_tokens(self, arrays) -> int:
        return int(np.asarray(arrays["weights"]).sum())  # a sequence's first token is a prompt token, never a target

    def batch(self, examples, row_len, batch_rows, pad_id) -> dict:
        return pair_batch(examples, row_len, batch_rows, pad_id)


PREF = register_format(PrefFormat())
