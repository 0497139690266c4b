"""The packages' layers: dependencies point one way, and every module
imports on its own.

From the bottom up (a module may import its own package and the layers
below it, never a layer above):

0. ``protocols`` (sans-IO), ``supervisors``, ``agor_actors.world`` (the
   seams), ``agor_actors`` itself (a docstring)
1. ``agor_actors.runtime`` (actors, mailboxes, the registry)
2. ``agor_actors.store`` (the database and its writer actor),
   ``agor_actors.outbox`` (a connection's write path)
3. ``agor_actors.domain`` (session, room and presence behaviours),
   ``agor_actors.identity`` (sign-in, access and refresh tokens),
   ``agor_actors.broker`` (fan-out between the daemons of a cluster)
4. ``agor_actors.services`` (every service's rules and permissions)
5. ``agor_actors.daemon`` (the hub: routing, joins, presence, actor wiring)
6. ``agor_actors.server``, ``agor_actors.client``, ``agor_actors.embed``
7. ``agor_actors.cli``, ``sim``

The path of one write reads top to bottom: server (connection) → daemon
(hub: route, check with services) → domain (session actor) → store (writer
actor, commit) → domain (room) → outbox → transport.
"""

from __future__ import annotations

import ast
import importlib
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("agor_actors", "supervisors", "protocols", "sim")

LAYERS: dict[str, int] = {
    "protocols": 0,
    "supervisors": 0,
    "agor_actors.world": 0,
    "agor_actors.marks": 0,
    "agor_actors.runtime": 1,
    "agor_actors.store": 2,
    "agor_actors.outbox": 2,
    "agor_actors.domain": 3,
    "agor_actors.identity": 3,
    "agor_actors.broker": 3,
    "agor_actors.services": 4,
    "agor_actors.daemon": 5,
    "agor_actors.server": 6,
    "agor_actors.client": 6,
    "agor_actors.embed": 6,
    "agor_actors.cli": 7,
    "agor_actors": 0,  # the package's own __init__: a docstring
    "sim": 7,
}


def modules() -> list[str]:
    names = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            if parts[-1] == "__main__":
                continue
            names.append(".".join(parts))
    return names


def layer_of(module: str) -> tuple[str, int]:
    """The unit (the longest prefix in ``LAYERS``) and its layer."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in LAYERS:
            return prefix, LAYERS[prefix]
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def imports_of(module: str) -> set[str]:
    """Every module ``module`` imports (at the top or inside a function),
    ours only, resolved to absolute names."""
    path = ROOT / pathlib.Path(*module.split("."))
    is_package = (path / "__init__.py").exists()
    file = path / "__init__.py" if is_package else path.with_suffix(".py")
    tree = ast.parse(file.read_text(), str(file))
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            for alias in node.names:  # ``from . import x`` may name a module
                found.add(f"{target}.{alias.name}")
    return {name for name in found if name.split(".")[0] in PACKAGES}


def real_modules(names: set[str]) -> set[str]:
    return {
        n
        for n in names
        if (ROOT / pathlib.Path(*n.split("."))).exists()
        or (ROOT / pathlib.Path(*n.split("."))).with_suffix(".py").exists()
    }


def test_every_module_is_in_a_layer() -> None:
    for module in modules():
        layer_of(module)


def test_no_module_imports_a_layer_above_it() -> None:
    upward = []
    for module in modules():
        unit, layer = layer_of(module)
        for imported in sorted(real_modules(imports_of(module))):
            other, other_layer = layer_of(imported)
            if other != unit and other_layer > layer:
                upward.append(f"{module} (layer {layer}) imports {imported} (layer {other_layer})")
    assert upward == []


def test_the_checker_sees_an_upward_import() -> None:
    # the check itself must be able to fail: the daemon imports the domain...
    assert "agor_actors.domain.session" in imports_of("agor_actors.daemon._hub")
    # ...which is below it; the other way round would be reported
    assert layer_of("agor_actors.domain.session")[1] < layer_of("agor_actors.daemon._hub")[1]


@pytest.mark.parametrize("module", modules())
def test_module_imports_on_its_own(module: str) -> None:
    """Imported first, in a process that has none of our modules loaded: a
    circular import that works only in some order fails here."""
    saved = {name: mod for name, mod in sys.modules.items() if name.split(".")[0] in PACKAGES}
    for name in saved:
        del sys.modules[name]
    try:
        importlib.import_module(module)
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] in PACKAGES]:
            del sys.modules[name]
        sys.modules.update(saved)
