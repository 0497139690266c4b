"""Build ``dist/agor-actors``: the daemon and its tools as one executable
(PyInstaller one-file), runnable with no Python and no virtual environment.

    python release/build_dist.py [--dist-dir dist] [--work-dir build/pyinstaller]

Run it with the interpreter of an environment where the project and
PyInstaller are installed (``pip install -e '.[dist]'``; ``make dist`` does
both).  Every module of the four import packages is collected (some are only
imported inside functions), and SQLAlchemy's SQLite and PostgreSQL dialects
(chosen at run time from the ``--db`` URL); psycopg goes in when it is
installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENTRY = ROOT / "release" / "agor_actors_entry.py"
NAME = "agor-actors"

PACKAGES = ("agor_actors", "protocols", "supervisors", "sim")
"""Our import packages: every submodule goes in."""

EXTRA_SUBMODULES = ("sqlalchemy.dialects.sqlite", "sqlalchemy.dialects.postgresql")
OPTIONAL_PACKAGES = ("psycopg", "coredis")
"""Collected whole when installed (``--db postgresql+psycopg://...``,
``--broker redis://...``)."""
EXCLUDED = ("pytest", "_pytest", "hypothesis", "pygments", "pkg_resources", "setuptools", "tkinter")
"""Test and build tools that some imported package mentions but the
executable never runs (they were ~6 MB of it)."""
OPTIONAL_IMPORTS = ("psycopg_binary",)
"""Imported by psycopg at run time; PyInstaller's hook collects its binaries."""


_MYPYC_HELPER = re.compile(rb"[0-9a-f]{20}__mypyc")


def mypyc_helpers(package: str) -> set[str]:
    """The top-level helper modules a mypyc-compiled package's extensions
    import (coredis's: ``<hash>__mypyc``), which no import statement names,
    so PyInstaller does not find them."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return set()
    found: set[str] = set()
    for location in spec.submodule_search_locations:
        for path in pathlib.Path(location).rglob("*.so"):
            found.update(m.decode() for m in _MYPYC_HELPER.findall(path.read_bytes()))
    return found


def pyinstaller_args(dist_dir: pathlib.Path, work_dir: pathlib.Path) -> list[str]:
    args = [
        str(ENTRY),
        "--onefile",
        "--name",
        NAME,
        "--noconfirm",
        "--clean",
        "--log-level",
        "WARN",
        "--distpath",
        str(dist_dir),
        "--workpath",
        str(work_dir),
        "--specpath",
        str(work_dir),
        "--paths",
        str(ROOT),
    ]
    for package in (*PACKAGES, *EXTRA_SUBMODULES):
        args += ["--collect-submodules", package]
    for package in PACKAGES:
        args += ["--collect-data", package]  # py.typed, PROTOCOL.md
    for package in OPTIONAL_PACKAGES:
        if importlib.util.find_spec(package) is not None:
            args += ["--collect-all", package]
            for helper in sorted(mypyc_helpers(package)):
                args += ["--hidden-import", helper]
    for module in EXCLUDED:
        args += ["--exclude-module", module]
    for module in OPTIONAL_IMPORTS:
        if importlib.util.find_spec(module) is not None:
            args += ["--hidden-import", module]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dist-dir", type=pathlib.Path, default=ROOT / "dist")
    parser.add_argument("--work-dir", type=pathlib.Path, default=ROOT / "build" / "pyinstaller")
    args = parser.parse_args(argv)
    try:
        import PyInstaller.__main__  # type: ignore[import-untyped]
    except ImportError:
        print(
            "build_dist: PyInstaller is not installed here: pip install -e '.[dist]'",
            file=sys.stderr,
        )
        return 2
    PyInstaller.__main__.run(pyinstaller_args(args.dist_dir, args.work_dir))
    print(f"built {args.dist_dir / NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
