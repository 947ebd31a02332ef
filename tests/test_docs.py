"""The documentation stays short, linked and true: README length, the docs pages, every link and
section reference resolving, the README's code map pointing at real functions, the quick-start
commands, and no internal tracker numbers in the repository."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = ("METHOD", "DISTRIBUTED", "OPERATIONS", "DATA", "EVALUATION", "INTERFACES", "BENCHMARKS", "STEP",
         "ADAPTERS", "GPU_STEP")
MAX_README_LINES = 250


def tracked_files() -> list[Path]:
    """Every file git tracks (CI runs on a git clone: no git, or no checkout, is a failure here)."""
    assert shutil.which("git"), "git is not installed: the documentation checks need the tracked file list"
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False)
    assert out.returncode == 0, f"`git ls-files` failed in {ROOT}: {out.stderr.decode(errors='replace')}"
    files = [ROOT / p for p in out.stdout.decode().split("\0") if p]
    assert files, f"`git ls-files` listed no file in {ROOT}"
    return [f for f in files if f.is_file()]


def text_of(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def markdown_files() -> list[Path]:
    return [f for f in tracked_files() if f.suffix == ".md"]


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}): move detail into docs/"


@pytest.mark.parametrize("page", PAGES)
def test_docs_page_exists_and_is_linked_from_readme(page):
    path = ROOT / "docs" / f"{page}.md"
    assert path.is_file(), f"{path} is missing"
    assert path.read_text().startswith("# "), f"{path} should open with a title"
    assert f"](docs/{page}.md)" in README.read_text(), f"README.md does not link docs/{page}.md"


def test_relative_links_resolve():
    """Every relative link of every tracked Markdown file points at a file that exists."""
    bad = []
    for md in markdown_files():
        for target in re.findall(r"\]\(([^)\s]+)\)", md.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (md.parent / target.split("#")[0]).exists():
                bad.append(f"{md.relative_to(ROOT)} -> {target}")
    assert not bad, "links to missing files:\n" + "\n".join(bad)


def _labels(page: Path) -> list[str]:
    """Headings and bold run-in labels (`**Sparse heads.**`) a reference may name."""
    text = page.read_text()
    heads = [h.strip() for h in re.findall(r"^#+ (.+)$", text, flags=re.M)]
    bold = [b.strip().rstrip(".:") for b in re.findall(r"\*\*([^*\n]+)\*\*", text)]
    return heads + bold


def test_section_references_resolve():
    """`docs/PAGE.md, "Section"` (or `README, "Section"`) anywhere in the repository names a page
    that exists and a heading (or bold label) of it that starts with that text."""
    ref = re.compile(r"(docs/([A-Z_]+)\.md)\s*,\s+\"([^\"\n]+)\"")
    mention = re.compile(r"\bdocs/([A-Z_]+)\.md")
    readme_ref = re.compile(r"\bREADME(?:\.md)?,\s+\"([^\"\n]+)\"")
    bad = []
    labels: dict[str, list[str]] = {"README": _labels(README)}
    for f in tracked_files():
        text = text_of(f) if f != Path(__file__).resolve() else None
        if text is None:
            continue
        where = f.relative_to(ROOT)
        for name in set(mention.findall(text)):
            if not (ROOT / "docs" / f"{name}.md").is_file():
                bad.append(f"{where}: docs/{name}.md does not exist")
        for _, name, section in ref.findall(text):
            page = ROOT / "docs" / f"{name}.md"
            if not page.is_file():
                continue
            if name not in labels:
                labels[name] = _labels(page)
            if not any(label.startswith(section) for label in labels[name]):
                bad.append(f'{where}: docs/{name}.md has no section "{section}"')
        for section in readme_ref.findall(text):
            if not any(label.startswith(section) for label in labels["README"]):
                bad.append(f'{where}: README.md has no section "{section}"')
    assert not bad, "references that do not resolve:\n" + "\n".join(sorted(set(bad)))


def test_code_map_anchors_exist():
    """Every `path.py:name` / `path.py:Class.method` in the README names a file that defines it."""
    anchors = re.findall(r"`([\w/]+\.py):([\w.]+)`", README.read_text())
    assert len(anchors) >= 10, "the README's code map is missing"
    bad = []
    for path, name in anchors:
        file = ROOT / path
        if not file.is_file():
            bad.append(f"{path}: no such file")
            continue
        src = file.read_text()
        for part in name.split("."):
            if not re.search(rf"^\s*(?:async\s+)?(?:def|class)\s+{re.escape(part)}\b", src, flags=re.M):
                bad.append(f"{path}:{name}: no def/class {part}")
    assert not bad, "code map anchors that do not exist:\n" + "\n".join(bad)


def test_quick_start_commands_in_readme():
    """The two commands a new user runs on a fresh machine, the second exactly what CI runs."""
    text = README.read_text()
    assert "bash launch/setup.sh && .venv/bin/blindseg demo" in text
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))]
    assert "bash launch/setup.sh && .venv/bin/python -m pytest -q tests" in ci, ci
    missing = [line for line in ci if line not in text]
    assert not missing, f"commands of .ci/run the README does not state: {missing}"


def test_no_internal_issue_numbers():
    pattern = re.compile(r"issue\s+#?[0-9]+", re.I)
    bad = []
    for f in tracked_files():
        text = text_of(f)
        if text is None:
            continue
        for i, line in enumerate(text.splitlines(), 1):
            if pattern.search(line):
                bad.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not bad, "internal issue numbers in tracked files:\n" + "\n".join(bad)
