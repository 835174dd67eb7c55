"""No import climbs a layer: data flows config -> data stream -> model -> engine -> loop -> checkpoints, and a
lower room never imports a higher one (``docs/layout.md``). Every import of every module is read from its source,
function-level imports included, so a lazy import cannot hide a climb."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module belongs to the longest prefix it starts with; bare ``swinv2`` is the model library
# itself (windows, attention, model, layouts, flops, files).
LAYERS = ["swinv2", "swinv2.data", "swinv2.train", "swinv2.finetune", "swinv2.export", "swinv2.plan",
          "swinv2.commands", "simmim", "simmim.commands"]


def layer_of(module: str) -> int:
    matches = [i for i, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + ".")]
    return max(matches, key=lambda i: len(LAYERS[i]))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module)`` for every import of ours in ``path``."""
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py")


def imports_in(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from swinv2 import data`` imports the module swinv2.data
            found += [(node.lineno, f"{target}.{alias.name}" if _is_module(f"{target}.{alias.name}") else target)
                      for alias in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] in ("swinv2", "simmim")]


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def test_layer_order_is_known_for_every_module():
    sources = sorted([*ROOT.glob("swinv2/**/*.py"), *ROOT.glob("simmim/**/*.py")])
    assert len(sources) > 40
    assert {LAYERS[layer_of(module_name(p))] for p in sources} >= {"swinv2", "swinv2.data", "swinv2.train",
                                                                   "swinv2.finetune", "swinv2.plan", "simmim"}


def test_no_import_climbs_a_layer():
    climbs = []
    for path in sorted([*ROOT.glob("swinv2/**/*.py"), *ROOT.glob("simmim/**/*.py")]):
        own = layer_of(module_name(path))
        for line, target in imports_of(path):
            if layer_of(target) > own:
                climbs.append(f"{path.relative_to(ROOT)}:{line} imports {target} ({LAYERS[layer_of(target)]} is above "
                              f"{LAYERS[own]})")
    assert not climbs, "\n".join(climbs)


def test_the_walk_sees_a_climb():
    """The check itself: a lazy upward import inside a function is found, relative or absolute."""
    source = "def f():\n    from ..train.loop import LoopEnd\n    import simmim.model\n    from swinv2 import plan\n"
    found = imports_in(source, "swinv2.data.shards", is_package=False)
    assert found == [(2, "swinv2.train.loop"), (3, "simmim.model"), (4, "swinv2.plan")]
    assert all(layer_of(target) > layer_of("swinv2.data.shards") for _, target in found)
