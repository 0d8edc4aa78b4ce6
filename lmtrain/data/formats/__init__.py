"""The data-format registry: `ExampleFormat`, `register_format`, `get_format` and `FORMATS` (name -> format).

The built-in formats (text, sft, chat, classify, ner, pref; manifests on disk name them) register themselves here,
one module each. A new format is one module that subclasses ExampleFormat and calls register_format; outside
lmtrain, name that module in LMTRAIN_PLUGINS (lmtrain.plugins) and every command, tools/shard_data.py
included, knows it.
"""

# The built-ins register themselves on import, in this order (the shard tool lists them so).
from lmtrain.data.formats.base import FORMATS, ExampleFormat, get_format, register_format  # noqa: I001
from lmtrain.data.formats import text, sft, chat, classify, ner  # noqa: F401
from lmtrain.data.formats import pref  # noqa: F401

__all__ = ["FORMATS", "ExampleFormat", "get_format", "register_format"]
