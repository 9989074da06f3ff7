"""The repository stands on its own: no file points outside it, the README's Quickstart is the
two make commands, and the README's results table stays short. These read the source tree, so
they skip when the tests run from an installed copy without it."""
import os
import re
import shutil
import subprocess
from typing import List

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")

# A citation of a design file outside the repository: its name as a word (not part of an
# identifier such as a Makefile's TORCH_SPEC), or a relative path up into a shared folder.
# The words are split so that this file does not match its own patterns.
OUTSIDE_REFERENCE = re.compile(r"(?<![\w])" + "SP" + r"EC(?![\w])|\.\./" + "sha" + "red")
TEXT_SUFFIXES = (".py", ".md", ".txt", ".toml", ".cfg", ".cpp", ".h", ".cu", ".cuh", ".sh",
                 ".json", ".yml", ".yaml", ".cmake", ".in")
TEXT_NAMES = ("Makefile", "CMakeLists.txt", "LICENSE", ".gitignore")
ISO_DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")  # a dated report name too: link the index


def _in_checkout() -> bool:
    return os.path.exists(README) and os.path.isdir(os.path.join(ROOT, "coupled_mamba_ext"))


pytestmark = pytest.mark.skipif(not _in_checkout(),
                                reason="runs against the source tree; none next to the tests")


def tracked_text_files() -> List[str]:
    """Repository-relative paths of the text files under version control (`git ls-files`),
    or, without git or outside a checkout, of the text files found by walking the tree."""
    if shutil.which("git") and os.path.exists(os.path.join(ROOT, ".git")):
        done = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                              timeout=60)
        if done.returncode == 0:
            paths = [p for p in done.stdout.decode().split("\0") if p]
            return [p for p in paths if _is_text(p)]
    skip = {".git", ".venv", ".venv-cpu", "build", "dist", "build-cmake", "runs",
            "__pycache__", ".pytest_cache"}
    found = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if d not in skip and not d.endswith(".egg-info")]
        for name in files:
            path = os.path.relpath(os.path.join(folder, name), ROOT)
            if _is_text(path):
                found.append(path)
    return sorted(found)


def _is_text(path: str) -> bool:
    name = os.path.basename(path)
    return name in TEXT_NAMES or name.endswith(TEXT_SUFFIXES)


def _lines(path: str):
    with open(os.path.join(ROOT, path), encoding="utf-8", errors="replace") as f:
        yield from enumerate(f, start=1)


def test_no_file_refers_outside_the_repository():
    """Every decision is stated in the project's own docs (docs/contract.md): no file cites a
    design file that users of the repository do not have."""
    files = tracked_text_files()
    assert "README.md" in files and "docs/contract.md" in files, files[:20]
    hits = [f"{path}:{number}: {line.strip()[:120]}"
            for path in files for number, line in _lines(path)
            if OUTSIDE_REFERENCE.search(line)]
    assert not hits, "references outside the repository:\n" + "\n".join(hits)


def _section(text: str, title: str) -> str:
    match = re.search(r"^## " + re.escape(title) + r"\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def test_readme_quickstart_is_the_two_make_commands():
    with open(README, encoding="utf-8") as f:
        quickstart = _section(f.read(), "Quickstart")
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", quickstart, re.M | re.S)
    assert len(blocks) == 1, f"expected one code block in the Quickstart, got {len(blocks)}"
    commands = [line.split("#")[0].strip() for line in blocks[0].splitlines()]
    assert [c for c in commands if c] == ["make demo", "make test"], blocks[0]


def test_readme_results_table_is_short_and_undated():
    """At most 6 rows of at most 200 characters a cell; dates belong in reports/."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    rows = [line for line in _section(text, "Results").splitlines()
            if line.startswith("|") and not re.match(r"^\|\s*-", line)]
    body = rows[1:]  # the header row first
    assert 1 <= len(body) <= 6, f"expected 1 to 6 result rows, got {len(body)}"
    for row in body:
        for cell in row.strip().strip("|").split(" | "):
            assert len(cell.strip()) <= 200, f"cell of {len(cell.strip())} characters: {cell}"
    dated = [f"README.md:{n}: {line.strip()[:80]}" for n, line in _lines("README.md")
             if ISO_DATE.search(line)]
    assert not dated, "dates in the README:\n" + "\n".join(dated)


def test_docs_carry_no_dates_except_the_benchmark_tables():
    """docs/ describes the code as it is; only docs/benchmarks.md dates its measurements."""
    dated = [f"{path}:{n}: {line.strip()[:80]}"
             for path in tracked_text_files()
             if path.startswith("docs/") and path.endswith(".md") and path != "docs/benchmarks.md"
             for n, line in _lines(path) if ISO_DATE.search(line)]
    assert not dated, "dates in docs/ (a measurement run is a report in reports/):\n" + "\n".join(dated)
