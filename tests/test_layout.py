"""The README's Layout section is the tree, file for file."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What a checkout holds beside the tracked files: caches, builds, bench output.
IGNORED = {"__pycache__", ".git", ".pytest_cache", ".benchmarks", ".hypothesis", ".ruff_cache",
           "build", "dist", "bench.json", "bench.png", "bench.md"}  # fmt: skip


def _layout() -> list[str]:
    """The first word of each line of the Layout section's code block."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Layout\n") :]
    block = re.search(r"```\n(.*?)```", section, re.S)[1]
    return [line.split()[0] for line in block.splitlines() if line.strip()]


def _tree() -> list[str]:
    files = []
    for path in ROOT.rglob("*"):
        parts = path.relative_to(ROOT).parts
        if path.is_dir() or IGNORED & set(parts) or any(p.endswith(".egg-info") for p in parts):
            continue
        files.append("/".join(parts))
    return files


def _covered(file: str, entries: list[str]) -> bool:
    return any(
        file.startswith(entry) if entry.endswith("/") else fnmatch.fnmatchcase(file, entry)
        for entry in entries
    )


def test_the_layout_section_lists_every_file_of_the_tree():
    entries, files = _layout(), _tree()
    missing = [file for file in files if not _covered(file, entries)]
    assert not missing, f"in the tree, not in README's Layout: {missing}"
    stale = [entry for entry in entries if not any(_covered(f, [entry]) for f in files)]
    assert not stale, f"in README's Layout, not in the tree: {stale}"
