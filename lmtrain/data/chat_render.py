"""Render chat templates as transformers' apply_chat_template does, in a sandbox bounded in time and size.

A chat template is code from a model directory or a user's file. Jinja's sandbox stops it from
reaching Python's internals, but not from running forever (nested `range(100000)` loops) or from
allocating gigabytes in one operation (`'A' * 4000000000`). BoundedSandbox renders with the same
environment as transformers (trim_blocks, lstrip_blocks, loop controls, {% generation %}, tojson,
raise_exception, strftime_now, dict, namespace) and adds:

- a time limit per render, checked at every loop iteration, call, filter and operator;
- a size limit, relative to the conversation, on the output and on every string or list an
  operation makes; operations whose result size is known beforehand (`*`, `**`, `%`, `+`, `~`,
  join, replace, indent, center and the like) are refused before they allocate.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

RENDER_SECONDS = 10.0  # a real template renders a conversation in milliseconds
MIN_CHARS = 1 << 20  # size limit of a render and of any value it makes, at least ...
CHARS_PER_INPUT_CHAR = 64  # ... or this many characters per character of the conversation
_ITER = "lmtrain_bounded_iter"  # globals the rewritten template calls
_CONCAT = "lmtrain_bounded_concat"
_NUMBER = re.compile(r"\d+")


class TemplateLimitError(Exception):
    """A render ran past its time or size limit; the message says which."""


class _Generation(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %} as transformers parses it; the body renders as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


class _Bounding(NodeTransformer):
    """Every for loop iterates through _ITER and every `~` concatenation goes through _CONCAT, so
    the limits are checked where a template spends its time and can grow a string without a call."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        node = self.generic_visit(node)
        node.iter = nodes.Call(nodes.Name(_ITER, "load"), [node.iter], [], None, None).set_lineno(node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:
        node = self.generic_visit(node)
        return nodes.Call(nodes.Name(_CONCAT, "load"), [nodes.List(node.nodes)], [], None, None).set_lineno(
            node.lineno)


class _Namespace(jinja2.utils.Namespace):
    """transformers' namespace: no underscore-prefixed attributes."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot store underscore-prefixed attributes on a "
                                                  f"namespace ({name!r}).")


class _Dict:
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


def _size(value) -> int | None:
    return len(value) if isinstance(value, str | list | tuple) else None


def _format_widths(fmt: str) -> int:
    """An upper bound of what widths and precisions in a %- or {}-format string add to its result."""
    return sum(int(n) for n in _NUMBER.findall(fmt)) * max(1, fmt.count("%") + fmt.count("{"))


def _predicted_size(name: str, value, args: tuple, kwargs: dict) -> int:
    """The size of a string operation's result, known before it runs (0: not one of these)."""
    arg = lambda i, key, default: kwargs.get(key, args[i] if len(args) > i else default)  # noqa: E731
    if not isinstance(value, str) and name not in ("join",):
        return 0
    if name in ("center", "ljust", "rjust", "zfill"):
        width = arg(0, "width", 80)
        return width if isinstance(width, int) else 0
    if name == "indent":
        width = arg(0, "width", 4)
        width = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        return len(value) + width * (value.count("\n") + 1)
    if name == "expandtabs":
        tabsize = arg(0, "tabsize", 8)
        return len(value) + (tabsize if isinstance(tabsize, int) else 0) * value.count("\t")
    if name == "replace":
        old, new = arg(0, "old", ""), arg(1, "new", "")
        if isinstance(old, str) and isinstance(new, str):
            return len(value) + (value.count(old) if old else len(value) + 1) * len(new)
    if name == "join":  # the filter: join(value, d=""); the str method: sep.join(iterable)
        seq, sep = (args[0] if args else (), value) if isinstance(value, str) else (value, arg(0, "d", ""))
        if isinstance(seq, list | tuple) and isinstance(sep, str):
            return len(seq) * len(sep) + sum(_size(x) or 0 for x in seq)
    if name == "format":
        return len(value) + _format_widths(value)
    return 0


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """transformers' chat-template environment, with a time and a size limit per render (see the module doc)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, template_name: str):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
        self.template_name = template_name
        self.filters["tojson"] = _tojson
        self.filters = {name: self._bounded_filter(name, f) for name, f in self.filters.items()}
        self.globals.pop("lipsum", None)  # lorem ipsum of any length: no chat template needs it
        self.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(),
                            namespace=_Namespace)
        self.globals[_ITER], self.globals[_CONCAT] = self._bounded_iter, self._bounded_concat
        self._deadline, self._max_chars = float("inf"), MIN_CHARS

    def _parse(self, source, name, filename):
        tree = _Bounding().visit(super()._parse(source, name, filename))
        tree.set_environment(self)
        return tree

    def render(self, template: jinja2.Template, input_chars: int, **context) -> str:
        """The template's output for `context`; TemplateLimitError past RENDER_SECONDS or the size limit."""
        self._deadline = time.monotonic() + RENDER_SECONDS
        self._max_chars = max(MIN_CHARS, CHARS_PER_INPUT_CHAR * input_chars)
        pieces, size = [], 0
        for piece in template.generate(**context):
            size += len(piece)
            self._check(size)
            pieces.append(piece)
        return "".join(pieces)

    def _check(self, size: int | None = None) -> None:
        if size is not None and size > self._max_chars:
            raise TemplateLimitError(f"the chat template {self.template_name} makes a text or list of {size:,} items, "
                                     f"over its limit of {self._max_chars:,} for this conversation "
                                     f"({CHARS_PER_INPUT_CHAR}x its characters, at least {MIN_CHARS:,}); "
                                     "fix the template.")
        if time.monotonic() > self._deadline:
            raise TemplateLimitError(f"the chat template {self.template_name} took over {RENDER_SECONDS:g}s to render "
                                     "one conversation (a template renders one in milliseconds); fix the template.")

    def _check_arguments(self, args: Iterable) -> None:
        """An integer argument over the size limit is a width, a count or a repeat no render needs."""
        for a in args:
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > self._max_chars:
                self._check(abs(a))

    def _bounded_iter(self, iterable) -> Iterator:
        for count, item in enumerate(iterable):
            if count % 256 == 0:
                self._check()
            yield item

    def _bounded_concat(self, parts: list) -> str:
        self._check(sum(len(p) if isinstance(p, str) else 0 for p in parts))
        return "".join(map(str, parts))

    def _bounded_filter(self, name: str, f: Callable) -> Callable:
        @functools.wraps(f)  # keeps jinja's pass_context / pass_eval_context marks
        def bounded(*args, **kwargs):
            self._check()
            self._check_arguments([*args, *kwargs.values()])
            passed = [a for a in args if isinstance(a, jinja2.runtime.Context | jinja2.nodes.EvalContext |
                                                    jinja2.Environment)]
            plain = list(args[len(passed):])
            if plain:
                if name == "join" and not isinstance(plain[0], list | tuple):  # its size must be known before
                    plain[0] = list(self._bounded_iter(plain[0]))
                self._check(_predicted_size(name, plain[0], tuple(plain[1:]), kwargs))
            result = f(*passed, *plain, **kwargs)
            self._check(_size(result))
            return result

        return bounded

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's own signature
        __self._check()
        __self._check_arguments([*args, *kwargs.values()])
        owner, name = getattr(__obj, "__self__", None), getattr(__obj, "__name__", "")
        if isinstance(owner, str):  # a str method: the ones that grow a string are checked before they run
            if name == "join" and args and not isinstance(args[0], list | tuple):
                args = (list(__self._bounded_iter(args[0])), *args[1:])
            __self._check(_predicted_size(name, owner, args, kwargs))
        result = super().call(__context, __obj, *args, **kwargs)
        __self._check(_size(result))
        return result

    def call_binop(self, context, operator, left, right):
        self._check()
        if operator == "*":
            seq, times = (left, right) if isinstance(right, int) else (right, left)
            if _size(seq) is not None and isinstance(times, int):
                self._check(_size(seq) * times)
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            self._check(left.bit_length() * right // 3)  # about its decimal digits
        elif operator == "+" and _size(left) is not None and _size(right) is not None:
            self._check(_size(left) + _size(right))
        elif operator == "%" and isinstance(left, str):
            self._check(len(left) + _format_widths(left))
        result = super().call_binop(context, operator, left, right)
        self._check(_size(result))
        return result


class ChatTemplateRenderer:
    """A compiled chat template and its render with a tokenizer's special tokens, as apply_chat_template."""

    def __init__(self, source: str, template_name: str, special_tokens: dict[str, str]):
        self.environment = BoundedSandbox(template_name)
        self.template = self.environment.from_string(source)
        self.special_tokens = dict(special_tokens)

    def __call__(self, messages: list[dict], add_generation_prompt: bool) -> str:
        input_chars = sum(len(str(v)) for m in messages for v in m.values())
        return self.environment.render(self.template, input_chars, messages=messages, tools=None, documents=None,
                                       add_generation_prompt=add_generation_prompt, **self.special_tokens)
