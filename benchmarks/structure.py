"""Lines per module and the longest function in each, for the library at a git revision.

Run ``python benchmarks/structure.py`` for the working tree, or ``--rev REV`` for a commit
(read with ``git show``); ``--compare REV`` prints both side by side. Counts are physical
lines; a function's length runs from its ``def`` (decorators excluded) to its last line, less
its docstring.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _sources(rev: str | None) -> dict[str, str]:
    """Map each ``pyroflows/**.py`` path to its text, in the working tree or at ``rev``."""
    if rev is None:
        return {
            str(p.relative_to(ROOT)): p.read_text()
            for p in sorted((ROOT / "pyroflows").rglob("*.py"))
        }
    names = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", rev, "pyroflows"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return {
        name: subprocess.run(
            ["git", "show", f"{rev}:{name}"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        for name in names
        if name.endswith(".py")
    }


def _functions(text: str) -> list[tuple[str, int, int]]:
    """``(name, first line, length without docstring)`` of every function in ``text``."""
    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                length -= first.end_lineno - first.lineno + 1
            found.append((node.name, node.lineno, length))
    return found


def _longest(text: str) -> tuple[str, int]:
    """Name and length of the longest function or method in ``text``."""
    return max(((n, k) for n, _, k in _functions(text)), key=lambda f: f[1], default=("-", 0))


def measure(rev: str | None) -> dict[str, tuple[int, str, int]]:
    """``{path: (lines, longest function, its length)}`` for every module."""
    return {path: (len(text.splitlines()), *_longest(text)) for path, text in _sources(rev).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", help="git revision (default: the working tree)")
    parser.add_argument("--compare", metavar="REV", help="also show this revision, as 'before'")
    parser.add_argument("--over", type=int, default=60, help="list functions longer than this")
    args = parser.parse_args()
    after = measure(args.rev)
    before = measure(args.compare) if args.compare else {}
    print("| module | lines before | lines after | longest before | longest after |")
    print("|---|---:|---:|---|---|")
    for path in sorted(set(after) | set(before)):
        b, a = before.get(path), after.get(path)
        print(
            f"| {path} | {b[0] if b else '-'} | {a[0] if a else '-'} | "
            f"{f'{b[1]} ({b[2]})' if b else '-'} | {f'{a[1]} ({a[2]})' if a else '-'} |"
        )
    total_b = sum(v[0] for v in before.values())
    print(f"| total | {total_b or '-'} | {sum(v[0] for v in after.values())} | | |")
    sources = _sources(args.rev)
    print(f"\nFunctions over {args.over} lines:")
    for path, text in sorted(sources.items()):
        for name, line, length in _functions(text):
            if length > args.over:
                print(f"  {path}:{line} {name} ({length} lines)")


if __name__ == "__main__":
    main()
