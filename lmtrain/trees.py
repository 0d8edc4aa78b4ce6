"""Nested dicts (parameter trees, configs) to flat {path: leaf} maps and back. Paths are strings joined by `sep`
('blocks/attn/wq', 'optimizer.lr') or key tuples (('blocks', 'attn', 'wq'))."""

from __future__ import annotations

from collections.abc import Mapping


def flat_paths(tree: Mapping, sep: str = "/", prefix: str = "") -> dict[str, object]:
    """{'blocks/attn/wq': leaf, ...} for a nested dict; an empty dict leaves no path."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out.update(flat_paths(value, sep, path + sep) if isinstance(value, Mapping) else {path: value})
    return out


def nest_paths(flat: Mapping[str, object], sep: str = "/") -> dict:
    """The inverse of flat_paths."""
    return nest_keys({tuple(path.split(sep)): value for path, value in flat.items()})


def flat_keys(tree: Mapping, prefix: tuple = ()) -> dict[tuple, object]:
    """{('blocks', 'attn', 'wq'): leaf, ...} for a nested dict."""
    out: dict[tuple, object] = {}
    for key, value in tree.items():
        out.update(flat_keys(value, prefix + (key,)) if isinstance(value, Mapping) else {prefix + (key,): value})
    return out


def nest_keys(flat: Mapping[tuple, object]) -> dict:
    """The inverse of flat_keys."""
    tree: dict = {}
    for keys, value in flat.items():
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return tree
