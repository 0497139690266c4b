"""The package stays sans-IO, and PROTOCOL.md stays in step with the code."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

import protocols
from protocols import (
    CLIENT_MESSAGE_TYPES,
    CLOSE_CODES,
    SERVER_MESSAGE_TYPES,
    Codec,
    Limits,
    ProtocolError,
    decode_client_frame,
    decode_server_frame,
    to_wire,
)

PACKAGE = Path(next(iter(protocols.__path__)))
DOC = (PACKAGE / "PROTOCOL.md").read_text()

# What protocols/ may import: the standard library's pure parts, the data
# libraries, and itself.  No trio, no sockets, no clock, no randomness.
ALLOWED = {
    "__future__",
    "attrs",
    "cattrs",
    "cbor2",
    "collections",
    "enum",
    "io",
    "math",
    "orjson",
    "types",
    "typing",
}
FORBIDDEN_CALLS = re.compile(
    r"\b(time\.(time|monotonic|perf_counter)|random\.|datetime\.now|uuid\.uuid)"
)
IO_MODULES = {
    "trio",
    "trio_websocket",
    "hypercorn",
    "quart",
    "quart_trio",
    "wsproto",
    "sqlalchemy",
    "asyncio",
    "socket",
    "ssl",
    "selectors",
}


def _imports(path: Path) -> set[str]:
    """Top-level modules imported by ``path``; ``agor_actors`` imports are
    named down to the module, so that only the allowed one passes."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                names.add(alias.name if top == "agor_actors" else top)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            top = node.module.split(".")[0]
            if top == "agor_actors":
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
            else:
                names.add(top)
    return names


def test_sources_import_no_io_library() -> None:
    sources = sorted(PACKAGE.glob("*.py"))
    assert len(sources) >= 8
    for path in sources:
        imported = _imports(path)
        assert "trio" not in imported, path
        assert imported <= ALLOWED, (path.name, imported - ALLOWED)
        assert not FORBIDDEN_CALLS.search(path.read_text()), path.name


def test_importing_the_package_loads_no_io_library() -> None:
    code = (
        "import sys; import protocols; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(IO_MODULES)!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_the_scan_would_notice(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import trio.lowlevel\nfrom socket import socket\nfrom agor_actors import world\n"
    )
    assert _imports(bad) == {"trio", "socket", "agor_actors.world"}


def test_doc_mentions_every_message_type_and_error_code() -> None:
    for kind in {*CLIENT_MESSAGE_TYPES, *SERVER_MESSAGE_TYPES}:
        assert f'"type":"{kind}"' in DOC.replace('": "', '":"'), kind
    for code, close in CLOSE_CODES.items():
        row = next(
            (line for line in DOC.splitlines() if line.startswith(f"| `{code.value}` |")), None
        )
        assert row is not None, f"no table row for {code.value}"
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[1] == (str(int(close)) if close is not None else "stays open"), row


def test_doc_lists_every_limit_with_its_default() -> None:
    for name, value in Limits().to_wire().items():
        shown = str(value) if isinstance(value, int) else f"{value:g}"
        assert re.search(rf"`{name}` \| {shown} \|", DOC), name


def test_doc_examples_are_canonical_messages() -> None:
    """Every line of a ``json`` block that holds a frame decodes, in one
    direction or the other, and re-encodes to the same map."""
    examples = re.findall(r"```json\n(.*?)```", DOC, re.S)
    lines = [line.strip() for text in examples for line in text.splitlines()]
    frames = [line for line in lines if line.startswith(("{", "["))]
    assert len(frames) >= len(CLIENT_MESSAGE_TYPES) + len(SERVER_MESSAGE_TYPES)
    for line in frames:
        expected = orjson.loads(line)
        round_trips = []
        for decode in (decode_client_frame, decode_server_frame):
            try:
                messages: list[Any] = list(decode(Codec.JSON, line))
            except ProtocolError:
                continue
            wire = [to_wire(m) for m in messages]
            round_trips.append(expected in (wire, wire[0]))
        assert any(round_trips), line
