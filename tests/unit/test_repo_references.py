"""The tracked files speak of the project alone: no absolute machine paths, and every documentation
reference resolves (``docs/<name>.md`` exists; ``<name>.md §N`` names a numbered heading of that file)."""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

from mtlora.utils.paths import REPO_ROOT

# an absolute path into a machine's own folders, e.g. "/" + "work/...": the prefixes are joined at run time
# so that this file does not match itself
_ROOTS = ("work", "root", "home", "farm")
MACHINE_PATH = re.compile(r"(^|[^A-Za-z0-9_.~])/(" + "|".join(_ROOTS) + r")/")
DOC_PATH = re.compile(r"docs/[A-Za-z0-9_./-]+\.md")
# "<name>.md" followed (same line, before ")" or ";") by one or more "§N" / "§N.M"
SECTION_REF = re.compile(r"\b([A-Za-z0-9_-]+)\.md\b([^);\n]*)")
SECTION_NUM = re.compile(r"§(\d+(?:\.\d+)*)")
HEADING_NUM = re.compile(r"^#{1,6}\s+§?(\d+(?:\.\d+)*)\.?\s", re.MULTILINE)


@cache
def tracked_text_files() -> tuple[tuple[str, str], ...]:
    """``(path, text)`` of every tracked file that decodes as UTF-8 (binary files are left out)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:  # not a git checkout (e.g. an sdist)
        pytest.skip(f"needs a git checkout of the repository: {e}")
    files = []
    for rel in out.decode().split("\0"):
        p = REPO_ROOT / rel
        if not rel or not p.is_file():
            continue
        try:
            files.append((rel, p.read_text(encoding="utf-8")))
        except UnicodeDecodeError:
            continue
    return tuple(files)


def _hits(pattern: re.Pattern, group: int = 0) -> dict[str, list[str]]:
    """``match -> ["path:line", ...]`` over the tracked text files."""
    found: dict[str, list[str]] = {}
    for rel, text in tracked_text_files():
        for n, line in enumerate(text.splitlines(), 1):
            for m in pattern.finditer(line):
                found.setdefault(m.group(group), []).append(f"{rel}:{n}")
    return found


def numbered_sections(doc: Path) -> set[str]:
    """The section numbers of ``doc``'s headings (``## 4. Title``, ``### 12.5 Title`` or ``## §4 Title``)."""
    return set(HEADING_NUM.findall(doc.read_text(encoding="utf-8")))


def test_no_absolute_machine_paths():
    bad = [f"{where}: {path!r}" for path, wheres in _hits(MACHINE_PATH).items() for where in wheres]
    assert not bad, (
        "absolute machine paths in tracked files (find data through conf/paths / $MTLORA_DATA_DIR, "
        "or mtlora.utils.paths.default_data_dir): " + "; ".join(bad)
    )


def test_every_referenced_doc_exists():
    missing = {p: w for p, w in _hits(DOC_PATH).items() if not (REPO_ROOT / p).is_file()}
    assert not missing, "references to missing docs: " + "; ".join(
        f"{p} ({', '.join(w)})" for p, w in missing.items()
    )


def test_every_section_reference_names_an_existing_section():
    bad = []
    for rel, text in tracked_text_files():
        for n, line in enumerate(text.splitlines(), 1):
            for m in SECTION_REF.finditer(line):
                nums = SECTION_NUM.findall(m.group(2))
                if not nums:
                    continue
                doc = REPO_ROOT / "docs" / f"{m.group(1)}.md"
                if not doc.is_file():
                    bad.append(f"{rel}:{n}: docs/{doc.name} does not exist")
                    continue
                have = numbered_sections(doc)
                bad += [f"{rel}:{n}: {doc.name} has no section §{s}" for s in nums if s not in have]
    assert not bad, "; ".join(bad)


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The patterns match a machine path, a doc path and a section reference (and not their look-alikes)."""
    root = "/" + _ROOTS[0] + "/"
    assert MACHINE_PATH.search(f"x = '{root}data'") and MACHINE_PATH.search(f"{root}x")
    assert not MACHINE_PATH.search(f"~{root}x") and not MACHINE_PATH.search(f"a{root}x")
    other = "docs/" + "sub/x.md"  # joined at run time: a missing doc of this very file would fail the check
    assert DOC_PATH.findall(f"see docs/methods.md §4 and {other}") == ["docs/methods.md", other]
    m = SECTION_REF.search("# (``docs/methods.md`` §5, §11, §12.5). more §9")
    assert m.group(1) == "methods" and SECTION_NUM.findall(m.group(2)) == ["5", "11", "12.5"]
    doc = tmp_path / "d.md"
    doc.write_text(
        "# Title\n## 4. Four\n### 4.1 Sub\n## §12 Twelve\ntext ## 7. not a heading\n", encoding="utf-8"
    )
    assert numbered_sections(doc) == {"4", "4.1", "12"}
