"""The project's documentation stands alone: every Markdown file that the code, the configs, the
tests and the README cite is a file of this repository, and every section a citation names
(`docs/<page>.md, "<heading>"`) is a heading of that page. Files beside the checkout (the
workspace's shared/ folder, for one) are not in a clone, so a citation of one is refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("src", "conf", "tests", "docs", "README.md")
TEXT_SUFFIXES = {".py", ".yaml", ".yml", ".md", ".txt", ".toml", ".cfg", ".ini", ".sh", ".json"}
# Top-level paths that may lie inside a checkout without being part of it (.gitignore).
NOT_IN_REPO = {"shared", ".venv", "build", "dist", "runs", "outputs", "multirun", "checkpoints"}

# A path ending in .md, not part of a longer path, glob or word (so `*.md` is no reference).
MD_REFERENCE = re.compile(r"(?<![\w/.*-])((?:\.\.?/)*\w[\w./-]*\.md)(?!\w)")
# A citation of a section: docs/<page>.md, "<heading>" (the comma may be left out).
SECTION_CITATION = re.compile(r"\b(docs/[\w./-]+\.md),?\s*\"([^\"\n]+)\"")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")


def scanned_files() -> list[Path]:
    files = []
    for name in SCANNED:
        path = ROOT / name
        candidates = [path] if path.is_file() else sorted(path.rglob("*"))
        for f in candidates:
            parts = f.relative_to(ROOT).parts
            if any(p == "__pycache__" or p.endswith(".egg-info") or p.startswith(".") for p in parts):
                continue
            if f.is_file() and f.suffix in TEXT_SUFFIXES and f.resolve() != Path(__file__).resolve():
                files.append(f)
    return files


def lines_of(files: list[Path]):
    for f in files:
        for number, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            yield f"{f.relative_to(ROOT)}:{number}", line


def in_repository(reference: str, citing: Path) -> bool:
    """The reference names a file of this repository: from the root, from docs/, or from the
    citing file's own folder, and not outside the checkout or in a path the checkout ignores."""
    for base in (ROOT, ROOT / "docs", citing.parent):
        target = (base / reference).resolve()
        if not target.is_file():
            continue
        try:
            parts = target.relative_to(ROOT).parts
        except ValueError:  # outside the checkout (../shared/..., or through a link)
            continue
        if parts[0] not in NOT_IN_REPO:
            return True
    return False


def headings(page: Path) -> set[str]:
    """The page's section names: each heading's text, and for a numbered one ("10. Adam state")
    its number alone, so that a citation may name a numbered finding by its number."""
    found, fenced = set(), False
    for line in page.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = None if fenced else HEADING.match(line)
        if m:
            found.add(m.group(1))
            number = re.match(r"(\d+)\.\s", m.group(1))
            if number:
                found.add(number.group(1))
    return found


def test_every_cited_markdown_file_is_in_the_repository():
    files = scanned_files()
    assert any(f.name == "phi4_14b.yaml" for f in files) and (ROOT / "README.md") in files
    missing = []
    for where, line in lines_of(files):
        citing = ROOT / where.rsplit(":", 1)[0]
        for m in MD_REFERENCE.finditer(line):
            if not in_repository(m.group(1), citing):
                missing.append(f"{where}: {m.group(1)}")
    assert not missing, "Markdown files cited but not in the repository:\n" + "\n".join(missing)


def test_every_cited_section_is_a_heading_of_its_page():
    wrong = []
    for where, line in lines_of(scanned_files()):
        for m in SECTION_CITATION.finditer(line):
            page, heading = ROOT / m.group(1), m.group(2)
            if not page.is_file():
                wrong.append(f"{where}: {m.group(1)} does not exist")
            elif heading not in headings(page):
                wrong.append(f"{where}: {m.group(1)} has no heading {heading!r}")
    assert not wrong, "citations of sections that do not exist:\n" + "\n".join(wrong)


@pytest.mark.parametrize("page", ["docs/model.md", "docs/cpu_backend.md"])
def test_the_pages_the_code_cites_are_cited_by_section(page):
    """docs/model.md and docs/cpu_backend.md exist and the code cites sections of each."""
    assert (ROOT / page).is_file()
    cited = {m.group(2) for _, line in lines_of(scanned_files())
             for m in SECTION_CITATION.finditer(line) if m.group(1) == page}
    assert cited, f"nothing cites a section of {page}"
    assert cited <= headings(ROOT / page)


def test_the_reference_pattern():
    """What counts as a citation of a Markdown file, and what does not."""
    found = lambda text: [m.group(1) for m in MD_REFERENCE.finditer(text)]  # noqa: E731
    assert found('see ../shared/X.md, "A"') == ["../shared/X.md"]
    assert found("(PHI4.md: the split pattern)") == ["PHI4.md"]
    assert found("bench/gpu/README.md and *.md files, foo.mdx") == ["bench/gpu/README.md"]
    assert not in_repository("../shared/PHI4.md", ROOT / "conf" / "model" / "phi4_14b.yaml")
    assert in_repository("architecture.md", ROOT / "src" / "phi4" / "__init__.py")
    m = SECTION_CITATION.search('(docs/model.md, "Pre-training" [R] section 3)')
    assert m and m.groups() == ("docs/model.md", "Pre-training")
    numbered = headings(ROOT / "docs" / "cpu_backend.md")
    assert {"10", "10. Adam state and the reshardable format"} <= numbered and "12" not in numbered
