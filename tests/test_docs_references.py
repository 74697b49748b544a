"""Every document the repository cites exists in it (docs/method.md, "Reference").

Scans the repository's *.py, *.md, *.yaml and *.sh files and its Makefile for
(a) names of design notes that are not part of the repository,
(b) relative markdown links and ``docs/<name>.md`` mentions whose file does not exist,
(c) ``docs/<name>.md, "Heading"`` citations and ``<name>.md#anchor`` links whose heading does not exist.
Each failure lists ``file:line``.
"""

from __future__ import annotations

import os
import re
import subprocess
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh"}
SKIP_DIRS = {".git", ".venv", "build", "dist", "runs", "__pycache__", ".pytest_cache"}
#: Internal design notes that never were part of the public repository (split so this file passes).
ABSENT_NOTES = re.compile("|".join(re.escape(a + b) for a, b in (("SOVE", "_SPEC"), ("DESIGN", ".md"), ("STYLE", ".md"))))
MD_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
DOC_MENTION = re.compile(r"(?<![\w/.-])docs/([\w.-]+\.md)")
CITATION = re.compile(r'(?<![\w/.-])docs/([\w.-]+\.md),\s*("[^"]+"(?:\s*,\s*"[^"]+")*)')


def repo_files(root: Path) -> list[Path]:
    """Tracked and untracked-but-not-ignored files of interest (a walk when git is unavailable)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, text=True, check=True).stdout.splitlines()
        paths = [root / p for p in out]
    except (OSError, subprocess.CalledProcessError):
        paths = [Path(d) / f for d, dirs, files in os.walk(root) for f in files
                 if not dirs.__setitem__(slice(None), [x for x in dirs if x not in SKIP_DIRS])]
    return sorted(p for p in paths if p.is_file() and not p.is_symlink()
                  and (p.suffix in SUFFIXES or p.name == "Makefile"))


def slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces -> hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@lru_cache(maxsize=None)
def headings(path: Path) -> tuple[str, ...]:
    """Heading texts of a markdown file, outside fenced code blocks."""
    found, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            found.append(line.lstrip("#").strip())
    return tuple(found)


def anchors(path: Path) -> set[str]:
    """GitHub anchors of a markdown file (repeated headings get -1, -2, ...)."""
    seen: dict[str, int] = {}
    for h in headings(path):
        s = slug(h)
        seen[s if s not in seen else f"{s}-{seen[s]}"] = 0
        seen[s] = seen.get(s, 0) + 1
    return set(seen)


def check_link(root: Path, path: Path, target: str) -> str | None:
    """Why a relative markdown link is broken, or None."""
    if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
        return None
    file_part, _, anchor = target.partition("#")
    dest = (path.parent / file_part).resolve() if file_part else path
    if not dest.exists():
        return f"link to missing file {target}"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        return f"link to missing heading {target}"
    return None


def problems(root: Path, files: list[Path]) -> dict[str, list[str]]:
    """``file:line: message`` lists for the three kinds of broken reference."""
    out: dict[str, list[str]] = {"notes": [], "files": [], "headings": []}
    for path in files:
        rel = path.relative_to(root)
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            where = f"{rel}:{n}"
            out["notes"] += [f"{where}: names {m.group(0)}, which is not in the repository"
                             for m in ABSENT_NOTES.finditer(line)]
            for m in DOC_MENTION.finditer(line):
                before = line[: m.start()]
                if before.endswith("](") or before.rstrip().endswith("--out"):  # a link (checked below) / an output
                    continue
                if not (root / "docs" / m.group(1)).is_file():
                    out["files"].append(f"{where}: names docs/{m.group(1)}, which does not exist")
            if path.suffix == ".md":
                for m in MD_LINK.finditer(line):
                    why = check_link(root, path, m.group(1))
                    if why:
                        out["files" if "file" in why else "headings"].append(f"{where}: {why}")
            for m in CITATION.finditer(line):
                doc = root / "docs" / m.group(1)
                for cited in re.findall(r'"([^"]+)"', m.group(2)):
                    if doc.is_file() and not any(h.startswith(cited) for h in headings(doc)):
                        out["headings"].append(f'{where}: docs/{m.group(1)} has no heading "{cited}"')
    return out


@lru_cache(maxsize=None)
def repo_problems() -> dict[str, list[str]]:
    return problems(ROOT, repo_files(ROOT))


def test_no_reference_to_design_notes_outside_the_repository():
    found = repo_problems()["notes"]
    assert not found, "\n".join(found)


def test_every_linked_or_named_document_exists():
    found = repo_problems()["files"]
    assert not found, "\n".join(found)


def test_every_cited_heading_exists():
    found = repo_problems()["headings"]
    assert not found, "\n".join(found)


def test_slug_matches_github_anchors():
    assert slug("CLS loss (Eq. 2)") == "cls-loss-eq-2"
    assert slug("Deviations from the authors' code") == "deviations-from-the-authors-code"
    assert slug("30-minute recipe on a 2-core CPU (`configs/fashion_mnist_30min.yaml`)") == \
        "30-minute-recipe-on-a-2-core-cpu-configsfashion_mnist_30minyaml"


def test_scanner_reports_each_kind_with_file_and_line(tmp_path):
    d, note = "docs" + "/", "SOVE" + "_SPEC"  # split so that this file passes its own scan
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "method.md").write_text("# Method\n\n## Soft labels\n\n```\n# not a heading\n```\n")
    (tmp_path / "a.py").write_text(f'"""ok ({d}method.md, "Soft labels")."""\n# see {note} §4\n'
                                   f'# {d}method.md, "Hard labels"; {d}gone.md\n# python x.py --out {d}new.md\n')
    (tmp_path / "README.md").write_text(f"[m]({d}method.md#soft-labels) [x]({d}x.md)\n[h]({d}method.md#not-a-heading)\n")
    found = problems(tmp_path, sorted([tmp_path / "a.py", tmp_path / "README.md", tmp_path / "docs" / "method.md"]))
    assert found == {
        "notes": [f"a.py:2: names {note}, which is not in the repository"],
        "files": [f"README.md:1: link to missing file {d}x.md", f"a.py:3: names {d}gone.md, which does not exist"],
        "headings": [f"README.md:2: link to missing heading {d}method.md#not-a-heading",
                     f'a.py:3: {d}method.md has no heading "Hard labels"'],
    }


TEST_CITATION = re.compile(r"tests/(test_\w+\.py)::(test_\w+)")


def test_every_cited_test_exists():
    """docs/*.md (docs/reliability.md above all) name the tests that check each promise: every
    ``tests/test_x.py::test_name`` they cite is a test function of that file."""
    missing = []
    for doc in sorted((ROOT / "docs").glob("*.md")):
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            for file, name in TEST_CITATION.findall(line):
                source = ROOT / "tests" / file
                if not source.is_file() or not re.search(rf"^def {name}\(", source.read_text(), re.M):
                    missing.append(f"{doc.relative_to(ROOT)}:{number}: tests/{file}::{name}")
    assert not missing, "cited tests that do not exist:\n" + "\n".join(missing)
    assert "tests/test_resume.py::test_interrupted_and_resumed_run_equals_straight_run" in (
        ROOT / "docs" / "reliability.md").read_text()
