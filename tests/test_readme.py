"""The README against the tree: its Layout section lists every file, and every message
of its Errors table is one the code still writes."""

from __future__ import annotations

import fnmatch
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What a checkout holds beside the tracked files (caches, builds, bench output): what
# .gitignore ignores, for a tree that is not a git checkout (an unpacked sdist).
IGNORED = {"__pycache__", ".git", ".pytest_cache", ".benchmarks", ".hypothesis", ".ruff_cache",
           "build", "dist", "bench.json", "bench.png", "bench.md", ".venv"}  # fmt: skip


def _layout() -> list[str]:
    """The first word of each line of the Layout section's code block."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Layout\n") :]
    block = re.search(r"```\n(.*?)```", section, re.S)[1]
    return [line.split()[0] for line in block.splitlines() if line.strip()]


def _tree() -> list[str]:
    """Every file of the tree but what git ignores: tracked ones and new ones alike."""
    if (ROOT / ".git").exists():
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.splitlines()  # fmt: skip
        return [file for file in listed if (ROOT / file).is_file()]  # not deleted ones
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


def _error_messages() -> list[str]:
    """The example messages of the README's Errors table (each in backticks)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Errors\n") :]
    rows = [line for line in section.splitlines() if line.startswith("| ")][2:]
    messages = []
    for row in rows:
        cells = row.split(" | ")
        messages += re.findall(r"`([^`]{20,})`", cells[-1])
    return messages


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z_][A-Za-z_']+", text)


def test_every_message_of_the_errors_table_is_one_the_code_writes():
    """Judged by word triples, since values stand between the fixed words: a message
    the code still writes shares at least two triples with fastbp's sources (the
    real ones share 2 to 16); a stale or invented one shares none or one."""
    sources = " ".join(_words("".join(p.read_text() for p in (ROOT / "fastbp").rglob("*.py"))))
    messages = _error_messages()
    assert len(messages) >= 20, messages
    stale = []
    for message in messages:
        words = _words(message)
        triples = [" ".join(words[i : i + 3]) for i in range(len(words) - 2)]
        if len(triples) >= 3 and sum(t in sources for t in triples) < 2:
            stale.append(message)
    assert not stale, f"in README's Errors table, written nowhere in fastbp/: {stale}"
