"""Every ```python example of the user documentation runs, and prints what the page shows.

Each example runs in a fresh interpreter (so one example cannot lean on another's
imports or state), with the working directory set to a temporary directory shared by the
examples of one page, in page order (so a page can show a restart: a second example that
reopens the ``data_dir`` of the first). A ```text block right after an example is the
output it must print, line for line. An example must exit 0 and write nothing to stderr
(no warning, no logged handler error).

Pages checked: the ones listed in DOC_PAGES. docs/adapters.md has its own test
(tests/test_adapters.py::test_docs_examples); README.md and the doctest of
docs/wal-format.md are run by tests/test_review_docs.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DOC_PAGES = ("quickstart.md", "architecture.md", "tuning.md", "operations.md", "ring.md",
             "operations-wal.md", "backpressure.md", "mirror.md")
TIMEOUT = 60.0

# A fenced block, possibly indented (inside a list item): indent, language, body.
_FENCE = re.compile(r"^([ \t]*)```(\w*)[^\n]*\n(.*?)^\1```[ \t]*$", re.MULTILINE | re.DOTALL)


def extract_examples(text: str) -> list[tuple[str, str | None, int]]:
    """The page's ```python blocks as (code, expected output or None, line number)."""
    fences = [(m.group(2), textwrap.dedent(m.group(3)), m.start(), m.end())
              for m in _FENCE.finditer(text)]
    examples = []
    for i, (lang, body, start, end) in enumerate(fences):
        if lang != "python":
            continue
        expected = None
        if i + 1 < len(fences):
            nlang, nbody, nstart, _ = fences[i + 1]
            if nlang == "text" and not text[end:nstart].strip():
                expected = nbody
        examples.append((body, expected, text.count("\n", 0, start) + 1))
    return examples


def _cases() -> list[object]:
    cases: list[object] = []
    for page in DOC_PAGES:
        path = DOCS / page
        for n, (code, expected, line) in enumerate(extract_examples(path.read_text())):
            cases.append(pytest.param(page, n, code, expected, id=f"{page}:{line}"))
    return cases


@pytest.fixture(scope="module")
def page_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {page: tmp_path_factory.mktemp(page.replace(".md", "")) for page in DOC_PAGES}


def test_extract_examples_pairs_output_with_its_example() -> None:
    page = (
        "intro\n```python\nprint(1)\n```\n\n```text\n1\n```\n"
        "```sh\nmake\n```\n```python\nx = 2\n```\nprose\n```text\nnot output\n```\n"
        "1. a list item:\n\n    ```python\n    if x:\n        y()\n    ```\n\n"
        "    ```text\n    out\n    ```\n"
    )
    assert extract_examples(page) == [("print(1)\n", "1\n", 2), ("x = 2\n", None, 12),
                                      ("if x:\n    y()\n", "out\n", 21)]


@pytest.mark.parametrize("page", DOC_PAGES)
def test_every_page_has_examples(page: str) -> None:
    examples = extract_examples((DOCS / page).read_text())
    assert examples, f"docs/{page} has no ```python example (or the extraction broke)"
    assert any(expected is not None for _, expected, _ in examples), (
        f"docs/{page}: no example shows its output in a ```text block")


@pytest.mark.parametrize(("page", "index", "code", "expected"), _cases())
def test_docs_example_runs(page: str, index: int, code: str, expected: str | None,
                           page_dirs: dict[str, Path]) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONWARNINGS"] = "error"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=page_dirs[page], env=env, capture_output=True,
        text=True, timeout=TIMEOUT, check=False)
    where = f"docs/{page}, example {index + 1}"
    assert proc.returncode == 0, f"{where} failed:\n{proc.stderr}"
    assert proc.stderr == "", f"{where} wrote to stderr:\n{proc.stderr}"
    if expected is not None:
        got = [line.rstrip() for line in proc.stdout.splitlines()]
        want = [line.rstrip() for line in expected.splitlines()]
        assert got == want, f"{where} printed:\n{proc.stdout}\nthe page shows:\n{expected}"
