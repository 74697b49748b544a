"""pyproject.toml declares every third-party package src/ imports, and states ranges for torch."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def imported_modules(folder: Path) -> set[str]:
    """Top-level names of the absolute imports in every .py file under ``folder``."""
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [s for extra in project["optional-dependencies"].values() for s in extra]
    return {normalise(re.split(r"[\s<>=!~;\[]", s, maxsplit=1)[0]) for s in specs}


def test_every_imported_third_party_package_is_declared():
    """Regression: scipy (eval/video.py) and PyYAML (run_lock.py) were imported but not declared."""
    third_party = imported_modules(ROOT / "src" / "sove") - set(sys.stdlib_module_names) - {"sove"}
    dists = packages_distributions()
    missing = {m: dists.get(m, [m]) for m in sorted(third_party)
               if not any(normalise(d) in declared() for d in dists.get(m, [m]))}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_torch_is_a_range_and_the_makefile_installs_the_tested_versions():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch>=2.13,<2.15" in deps and "torchvision>=0.28,<0.30" in deps
    assert "TORCH  := torch==2.14.1 torchvision==0.29.1" in (ROOT / "Makefile").read_text()


def test_citation_cff_prefers_the_paper_and_the_readme_links_it():
    import yaml

    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    paper = cff["preferred-citation"]
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software" and cff["license"] == "Apache-2.0"
    assert paper["title"] == "Self-Organizing Visual Prototypes for Non-Parametric Representation Learning"
    assert [a["family-names"] for a in paper["authors"]] == ["Silva", "Pedrini", "Ramírez Rivera"]
    assert (paper["type"], paper["year"], paper["volume"], paper["url"]) == (
        "conference-paper", 2025, 267, "https://arxiv.org/abs/2505.21533")
    top = (ROOT / "README.md").read_text(encoding="utf-8").split("## ")[0]
    assert "(https://arxiv.org/abs/2505.21533)" in top and "@inproceedings{" in top and "@software{" in top
    assert "make demo" in top and "make test" in top
