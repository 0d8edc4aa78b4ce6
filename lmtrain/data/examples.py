"""Turn task records into token examples: prompt/completion and chat (tokens plus a loss mask), and text/label.

An example is what one training sequence holds. For supervised fine-tuning the mask marks the tokens
the loss falls on (as targets): the completion, or every assistant turn, plus the token that ends
it. Chat conversations are rendered with the tokenizer's own chat template (transformers, sandboxed
Jinja, no remote code); the assistant spans are found by rendering prefixes of the conversation, so
stock templates without `{% generation %}` markers (Llama 3, Qwen2, Mistral, ChatML) get a correct
mask instead of an all-zero or all-one one.

Every problem with a record raises ExampleError naming where it is (file and line).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable

import jinja2
import numpy as np

from lmtrain.data.chat_render import ChatTemplateRenderer, TemplateLimitError
from lmtrain.paths import as_path

TOO_LONG_POLICIES = ("truncate", "drop")
MISSING_LABELS = ("", "nan")  # a label cell that means "none": empty, or NaN as pandas writes a missing value


class SourceError(ValueError):
    """The input cannot be read as asked; the message names the file (and line) at fault. The shard tool's
    readers (lmtrain.prep.text_sources) raise it too."""


class ExampleError(SourceError):
    """A task record that cannot become an example; the message names the file and line."""


class ChatTemplateText(str):
    """A chat template's text, knowing the file it was read from (for error messages)."""

    source = ""


@dataclasses.dataclass
class Example:
    tokens: np.ndarray  # int64 [n]
    mask: np.ndarray | None = None  # uint8 [n]: 1 where the token is a training target (sft, chat)
    label: object = None  # classify: the label as given (str or int)


def _field(record: dict, name: str, where: str, option: str):
    if name not in record or record[name] is None:
        keys = ", ".join(list(record)[:10])
        raise ExampleError(f"{where}: no field '{name}' (fields: {keys}). Set {option}.")
    return record[name]


def _text(record: dict, name: str, where: str, option: str, empty_ok: bool = False) -> str:
    value = _field(record, name, where, option)
    if not isinstance(value, str):
        raise ExampleError(f"{where}: field '{name}' is {type(value).__name__}, not text.")
    if not empty_ok and not value.strip():
        raise ExampleError(f"{where}: field '{name}' is empty; an example needs text there to train on.")
    return value


class SftEncoder:
    """prompt/completion records -> tokens [prompt, completion, EOS] with the mask on completion and EOS.

    The prompt is encoded with the tokenizer's own special tokens (e.g. a BOS), the completion without,
    so the boundary is exact. Examples longer than max_tokens: 'truncate' drops prompt tokens from the
    left (and drops the example if the completion alone is too long), 'drop' drops it; both are counted.
    """

    def __init__(self, tokenizer, eos_id: int, max_tokens: int, too_long: str = "truncate",
                 train_on_prompt: bool = False, prompt_field: str = "prompt", completion_field: str = "completion"):
        self.tokenizer, self.eos_id, self.max_tokens, self.too_long = tokenizer, eos_id, max_tokens, too_long
        self.train_on_prompt = train_on_prompt
        self.prompt_field, self.completion_field = prompt_field, completion_field
        self.counts: Counter = Counter()

    def validate(self, record: dict, where: str) -> None:
        """The checks that need no tokenizing: run over the whole input before anything is written."""
        _text(record, self.prompt_field, where, "--prompt-field", empty_ok=True)
        _text(record, self.completion_field, where, "--completion-field")

    def encode(self, record: dict, where: str) -> Example | None:
        prompt = _text(record, self.prompt_field, where, "--prompt-field", empty_ok=True)
        completion = _text(record, self.completion_field, where, "--completion-field")
        prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=True).ids
        completion_ids = [*self.tokenizer.encode(completion, add_special_tokens=False).ids, self.eos_id]
        return self._fit(prompt_ids, completion_ids, where)

    def _fit(self, prompt_ids: list[int], completion_ids: list[int], where: str) -> Example | None:
        excess = len(prompt_ids) + len(completion_ids) - self.max_tokens
        if excess > 0:
            if self.too_long == "drop" or excess > len(prompt_ids):
                self.counts["dropped_too_long"] += 1
                return None
            prompt_ids = prompt_ids[excess:]  # the start of a long prompt matters least to the answer
            self.counts["truncated"] += 1
        tokens = np.asarray([*prompt_ids, *completion_ids], np.int64)
        mask = np.concatenate([np.full(len(prompt_ids), int(self.train_on_prompt), np.uint8),
                               np.ones(len(completion_ids), np.uint8)])
        return Example(tokens, mask)


def load_chat_template(path: str) -> str:
    try:
        text = as_path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ExampleError(f"--chat-template {path} cannot be read ({e}).") from None
    if not text.strip():  # not a reason to fall back to the tokenizer's template: the user asked for this one
        raise ExampleError(f"--chat-template {path} is empty; give a Jinja chat template (as in tokenizer_config.json)"
                           ", or leave the option out to use the tokenizer's own.")
    template = ChatTemplateText(text)
    template.source = f"--chat-template {path}"
    return template


class ChatEncoder:
    """`messages` records -> the conversation rendered with the tokenizer's chat template, masked on
    every assistant turn (its content and the template's end-of-turn text, e.g. <|im_end|>, <|eot_id|>, </s>).

    Too long: 'truncate' drops tokens from the start of the conversation while an assistant token
    remains, 'drop' drops the example.
    """

    def __init__(self, hf_tokenizer, max_tokens: int, too_long: str = "truncate", train_on_prompt: bool = False,
                 messages_field: str = "messages", chat_template: str | None = None):
        self.tokenizer, self.max_tokens, self.too_long = hf_tokenizer, max_tokens, too_long
        self.train_on_prompt, self.messages_field = train_on_prompt, messages_field
        self.chat_template = chat_template or getattr(hf_tokenizer, "chat_template", None)
        if not self.chat_template:
            raise ExampleError(f"tokenizer {getattr(hf_tokenizer, 'name_or_path', '')} has no chat template; give one "
                               "with --chat-template FILE (a Jinja template as in tokenizer_config.json).")
        self.template_name = (getattr(self.chat_template, "source", "") or
                              f"of tokenizer {getattr(hf_tokenizer, 'name_or_path', '')}")
        try:  # rendered as apply_chat_template does, bounded in time and size (lmtrain.data.chat_render)
            self._render = ChatTemplateRenderer(self.chat_template, self.template_name,
                                                hf_tokenizer.special_tokens_map)
        except jinja2.TemplateSyntaxError as e:
            raise ExampleError(f"the chat template {self.template_name} is not valid Jinja (line {e.lineno}: "
                               f"{e.message}).") from None
        self.counts: Counter = Counter()

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self._render(messages, add_generation_prompt)

    def messages(self, record: dict, where: str) -> list[dict]:
        messages = _field(record, self.messages_field, where, "--messages-field")
        if not isinstance(messages, list) or not messages:
            raise ExampleError(f"{where}: field '{self.messages_field}' must be a non-empty list of "
                               "{\"role\": ..., \"content\": ...} turns.")
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ExampleError(f"{where}: turn {k} of '{self.messages_field}' is not a "
                                   "{\"role\": str, \"content\": str} object.")
        if not any(m["role"] == "assistant" for m in messages):
            raise ExampleError(f"{where}: the conversation has no assistant turn, so nothing would be trained on.")
        for k, m in enumerate(messages):
            if m["role"] == "assistant" and not m["content"].strip():
                raise ExampleError(f"{where}: assistant turn {k} is empty; every assistant turn needs text to train on.")
        return [{"role": m["role"], "content": m["content"]} for m in messages]

    def assistant_spans(self, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of its assistant turns."""
        try:
            full = self.render(messages, add_generation_prompt=False)
        except TemplateLimitError:
            raise
        except Exception as e:  # noqa: BLE001 - a template raises what it likes (raise_exception)
            raise ExampleError(f"{where}: the chat template cannot render this conversation ({e}).") from None
        spans, cursor = [], 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            span = self._span_by_prefixes(messages, i, full) or self._span_by_search(full, m["content"], cursor)
            if span is None or span[0] < cursor:
                raise ExampleError(f"{where}: cannot find assistant turn {i} in the rendered conversation; the chat "
                                   "template changes the content. Use a template that keeps it, or --format sft.")
            if m["content"].strip() not in full[span[0] : span[1]]:  # only the end-of-turn text would be trained
                raise ExampleError(f"{where}: the chat template drops the content of assistant turn {i}, so only its "
                                   "end-of-turn text would be trained on. Use a template that renders each "
                                   "message's content.")
            spans.append(span)
            cursor = span[1]
        return full, spans

    def _span_by_prefixes(self, messages: list[dict], i: int, full: str) -> tuple[int, int] | None:
        """Turn i spans from the end of the render of turns < i with the generation prompt to the end
        of the render of turns <= i (trailing whitespace excluded), when both are prefixes of the whole."""
        try:
            through = self.render(messages[: i + 1], add_generation_prompt=False)
            before = (self.render(messages[:i], add_generation_prompt=True) if i
                      else self._first_turn_header(through, messages[0]["content"]))
        except TemplateLimitError:
            raise
        except Exception:  # noqa: BLE001 - e.g. a template that insists on a final user turn
            return None
        end = len(through.rstrip())
        if not (full.startswith(through) and through.startswith(before)) or end <= len(before):
            return None
        return len(before), end

    def _first_turn_header(self, through: str, content: str) -> str:
        """What a conversation that opens with an assistant turn renders before its content: up to the end of
        the template's assistant header (its generation prompt), which is not trained on, as transformers'
        {% generation %} masks leave it out. Nothing if the header is not found before the content."""
        header = self._generation_prompt()
        start = through.find(content.strip())
        at = through.rfind(header, 0, start) if header and start >= 0 else -1
        return through[: at + len(header)] if at >= 0 else ""

    def _generation_prompt(self) -> str:
        """The text add_generation_prompt appends (e.g. '<|im_start|>assistant\\n'), from a one-turn probe."""
        if not hasattr(self, "_header"):
            probe = [{"role": "user", "content": "Q7"}]
            try:
                plain = self.render(probe, add_generation_prompt=False)
                prompted = self.render(probe, add_generation_prompt=True)
                self._header = prompted[len(plain) :] if prompted.startswith(plain) else ""
            except TemplateLimitError:
                raise
            except Exception:  # noqa: BLE001
                self._header = ""
        return self._header

    def _span_by_search(self, full: str, content: str, cursor: int) -> tuple[int, int] | None:
        """For templates whose prefixes are not prefixes of the whole (e.g. a system prompt moved into
        the last user turn): find the content, and take the end-of-turn text a one-turn probe shows."""
        content = content.strip()
        start = full.find(content, cursor) if content else -1
        if start < 0:
            return None
        end = start + len(content)
        marker = self._end_of_turn()
        if marker and full.startswith(marker, end):
            end += len(marker)
        return start, end

    def _end_of_turn(self) -> str:
        if not hasattr(self, "_marker"):
            probe = [{"role": "user", "content": "Q7"}, {"role": "assistant", "content": "A7"}]
            try:
                text = self.render(probe, add_generation_prompt=False)
                self._marker = text[text.rindex("A7") + 2 :].rstrip()
            except TemplateLimitError:
                raise
            except Exception:  # noqa: BLE001
                self._marker = ""
        return self._marker

    def validate(self, record: dict, where: str) -> None:
        self.messages(record, where)

    def encode(self, record: dict, where: str) -> Example | None:
        messages = self.messages(record, where)
        try:
            text, spans = self.assistant_spans(messages, where)
        except TemplateLimitError as e:
            raise ExampleError(f"{where}: {e}") from None
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        tokens = np.asarray(enc["input_ids"], np.int64)
        offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
        mask = np.zeros(len(tokens), np.uint8)
        for lo, hi in spans:
            mask |= ((offsets[:, 0] < hi) & (offsets[:, 1] > lo)).astype(np.uint8)
        if not mask.any():
            raise ExampleError(f"{where}: no token of the assistant turns is left to train on (the assistant text is "
                               "empty, or the tokenizer merges it away).")
        if self.train_on_prompt:
            mask[:] = 1
        excess = len(tokens) - self.max_tokens
        if excess > 0:
            if self.too_long == "drop" or not mask[excess + 1 :].any():
                self.counts["dropped_too_long"] += 1
                return None
            tokens, mask = tokens[excess:], mask[excess:]
            self.counts["truncated"] += 1
        return Example(tokens, mask)


class ClassifyEncoder:
    """text/label records -> the text's tokens (as transformers' tokenizer call encodes it, special tokens
    included: [CLS] text [SEP] for BERT) and the label. Too long: 'truncate' cuts the text's end so that
    the example with its special tokens is max_tokens long, keeping the closing [SEP] (as transformers'
    truncation=True, max_length=max_tokens does); 'drop' drops it."""

    def __init__(self, tokenizer, max_tokens: int, too_long: str = "truncate", text_field: str = "text",
                 label_field: str = "label"):
        self.tokenizer, self.max_tokens, self.too_long = tokenizer, max_tokens, too_long
        self.text_field, self.label_field = text_field, label_field
        self.counts: Counter = Counter()

    def label(self, record: dict, where: str):
        if self.label_field not in record or record[self.label_field] is None:
            keys = ", ".join(list(record)[:10])
            raise ExampleError(f"{where}: no label: field '{self.label_field}' is missing (fields: {keys}). "
                               "Classification data needs a label for every example; set --label-field.")
        value = record[self.label_field]
        if isinstance(value, str) and value.strip().lower() in MISSING_LABELS:
            raise ExampleError(f"{where}: no label: field '{self.label_field}' is {value!r}, a missing value (pandas "
                               "writes one as NaN). Classification data needs a label for every example; fill it in "
                               "or drop the row.")
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ExampleError(f"{where}: label {value!r} is not a string or an integer.")
        return value

    def validate(self, record: dict, where: str):
        """Check the record; return its label."""
        _text(record, self.text_field, where, "--text-field")
        return self.label(record, where)

    def encode(self, record: dict, where: str) -> Example | None:
        text = _text(record, self.text_field, where, "--text-field")
        label = self.label(record, where)
        content = self.tokenizer.encode(text, add_special_tokens=False)
        room = self.max_tokens - self.tokenizer.num_special_tokens_to_add(False)
        if len(content.ids) > room:
            if self.too_long == "drop":
                self.counts["dropped_too_long"] += 1
                return None
            content.truncate(max(room, 0))
            self.counts["truncated"] += 1
        tokens = np.asarray(self.tokenizer.post_process(content).ids, np.int64)  # adds the special tokens
        return Example(tokens, label=label)


class TokenClassifyEncoder:
    """Named-entity records, words and one tag per word (CoNLL style: {"tokens": ["EU", "rejects", ...],
    "tags": ["B-ORG", "O", ...]}) -> the words' tokens, with the tokenizer's special tokens (e.g. [CLS] ...
    [SEP]), and a tag per token: each word's first piece carries the word's tag; its other pieces and the
    special tokens carry none (None: not trained or scored), as transformers' token-classification examples
    do. Too long: 'truncate' keeps the first max_tokens (and the closing special token), 'drop' drops it."""

    per_token = True  # validate() returns a record's tags, not one label

    def __init__(self, tokenizer, max_tokens: int, too_long: str = "truncate", tokens_field: str = "tokens",
                 tags_field: str = "tags"):
        self.tokenizer, self.max_tokens, self.too_long = tokenizer, max_tokens, too_long
        self.tokens_field, self.tags_field = tokens_field, tags_field
        self.counts: Counter = Counter()

    def words_and_tags(self, record: dict, where: str) -> tuple[list[str], list]:
        words = _field(record, self.tokens_field, where, "--tokens-field")
        tags = _field(record, self.tags_field, where, "--tags-field")
        if not isinstance(words, list) or not words or not all(isinstance(w, str) for w in words):
            raise ExampleError(f"{where}: field '{self.tokens_field}' must be a non-empty list of words (strings).")
        if not isinstance(tags, list) or len(tags) != len(words):
            n = len(tags) if isinstance(tags, list) else type(tags).__name__
            raise ExampleError(f"{where}: field '{self.tags_field}' must list one tag per word: {len(words)} words, "
                               f"{n} tags.")
        for tag in tags:
            if isinstance(tag, bool) or not isinstance(tag, int | str) or (isinstance(tag, str) and not tag):
                raise ExampleError(f"{where}: tag {tag!r} is not a string or an integer.")
        return words, tags

    def validate(self, record: dict, where: str) -> list:
        """Check the record; return its distinct tags."""
        return list(dict.fromkeys(self.words_and_tags(record, where)[1]))

    def encode(self, record: dict, where: str) -> Example | None:
        words, tags = self.words_and_tags(record, where)
        enc = self.tokenizer.encode(words, is_pretokenized=True, add_special_tokens=True)
        token_tags, previous = [], None
        for word in enc.word_ids:
            token_tags.append(tags[word] if word is not None and word != previous else None)
            previous = word
        tokens = list(enc.ids)
        if len(tokens) > self.max_tokens:
            if self.too_long == "drop":
                self.counts["dropped_too_long"] += 1
                return None
            closing = enc.word_ids[-1] is None  # keep the closing special token ([SEP])
            cut = self.max_tokens - int(closing)
            tokens = tokens[:cut] + tokens[-1:] * int(closing)
            token_tags = token_tags[:cut] + [None] * int(closing)
            self.counts["truncated"] += 1
        return Example(np.asarray(tokens, np.int64), label=token_tags)


def ordered_labels(labels: set, where_first: Callable[[object], str]) -> list:
    """The label set in a fixed order: integers ascending, or strings sorted; a mix is an error."""
    kinds = {type(v) for v in labels}
    if len(kinds) > 1:
        number = next(v for v in labels if isinstance(v, int))
        text = next(v for v in labels if isinstance(v, str))
        raise ExampleError(f"labels mix integers ({number!r} at {where_first(number)}) and strings ({text!r} at "
                           f"{where_first(text)}); use one kind.")
    return sorted(labels)
