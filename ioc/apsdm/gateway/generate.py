"""``python -m apsdm.gateway.generate``: write ``db/`` and ``opi/`` from the PV schema.

``--check`` writes nothing and lists the files that differ (the test suite runs it), so
the files site tools and operators use cannot drift from what the IOC serves.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from apsdm.gateway import adl, bob, db_template, screens


def opi_files(layout: screens.Layout = screens.DEFAULT_LAYOUT) -> dict[str, str]:
    """The opi/ files by path relative to the repository root: a .bob and an .adl per screen."""
    out = {}
    for screen in screens.build(layout):
        out[f"opi/{screens.FILE_PREFIX}{screen.name}.bob"] = bob.to_bob(screen)
        out[f"opi/{screens.FILE_PREFIX}{screen.name}.adl"] = adl.to_adl(screen)
    return out


def artifacts() -> dict[str, str]:
    """Every generated file by path relative to the repository root."""
    return {**db_template.files(), **opi_files()}


def differences(root: Path, files: dict[str, str] | None = None) -> list[str]:
    """Paths under root whose content differs from ``files`` (by default: what the
    generators produce now)."""
    files = artifacts() if files is None else files
    return [path for path, text in files.items()
            if not (root / path).is_file() or (root / path).read_text() != text]


def write(root: Path) -> list[str]:
    """Write the generated files that changed; return their paths."""
    files = artifacts()  # rendered once, for the comparison and the writing
    changed = differences(root, files)
    for path in changed:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(files[path])
    return changed


def main(argv: list[str] | None = None) -> int:
    """Command line: rewrite db/ and opi/ under --root, or with --check report drift."""
    parser = argparse.ArgumentParser(prog="python -m apsdm.gateway.generate", description=__doc__)
    parser.add_argument("--root", type=Path, default=Path.cwd(),
                        help="repository root holding db/ and opi/ (default: current directory)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 and list the files that differ")
    args = parser.parse_args(argv)
    if args.check:
        stale = differences(args.root)
        for path in stale:
            print(f"differs from the schema: {path}")
        return 1 if stale else 0
    for path in write(args.root):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
