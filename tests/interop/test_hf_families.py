"""The layout of lmtrain.interop: one module per Hugging Face family, registered in one place, and no import
circle between the conversion modules."""

import ast
import pathlib

from lmtrain.interop import families
from lmtrain.param_rules import FAMILY_NAMES

ROOT = pathlib.Path(__file__).resolve().parents[2]
INTEROP = ROOT / "lmtrain" / "interop"


def test_every_family_module_is_registered():
    """Adding a family is its module plus one registry line: a module left out of the registry fails here."""
    modules = {p.stem for p in (INTEROP / "families").glob("*.py")} - {"__init__", "base"}
    registered = {m.__name__.rsplit(".", 1)[1] for m in families._MODULES}
    assert registered == modules
    for module in families._MODULES:
        for family in module.FAMILIES:
            assert families.FAMILIES[family.name] is family


def test_peft_module_names_agree_with_the_lora_target_aliases():
    """model.lora accepts some families' PEFT module names in model.lora_targets (a family without aliases there
    takes q, k, v, ...); the core cannot import the families, so what its table says must be what they say."""
    for name, table in FAMILY_NAMES.items():
        assert dict(families.FAMILIES[name].lora_modules) == dict(table), name


def _imports(path: pathlib.Path) -> list[tuple[int, str, list[str]]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lmtrain.interop"):
            out.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.startswith("lmtrain.interop")]
    return out


def _module(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_interop_modules_form_no_import_circle_and_share_no_private_names():
    paths = sorted(INTEROP.rglob("*.py"))
    known = {_module(p) for p in paths}
    graph, private = {}, []
    for path in paths:
        deps = set()
        for line, module, names in _imports(path):
            deps.update(m for m in [module, *(f"{module}.{n}" for n in names)] if m in known)
            private += [f"{path.relative_to(ROOT)}:{line} imports {module}.{n}" for n in names if n.startswith("_")]
        graph[_module(path)] = deps - {_module(path)}
    assert private == []

    def cycle_from(start, node, seen):
        for dep in graph[node]:
            if dep == start:
                return [*seen, dep]
            if dep not in seen:
                found = cycle_from(start, dep, [*seen, dep])
                if found:
                    return found
        return None

    # A package imports its submodules by design (families/__init__ lists them); an edge back into it is a circle.
    cycles = [" -> ".join([m, *c]) for m in graph if (c := cycle_from(m, m, []))]
    assert cycles == []
