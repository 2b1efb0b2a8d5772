"""Imports point downward: duplus -> (training | export | serving) -> (clients | perf).

Every ``import`` and ``from ... import`` in the project's code, at module level or inside a function, is parsed
(not executed) and checked against the table in the README ("Which folder may import which").
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("duplus", "training", "export", "serving", "clients", "perf")
ALLOWED = {
    "duplus": {"duplus"},
    "training": {"duplus", "training"},
    "export": {"duplus", "export"},
    "serving": {"duplus", "serving"},
    "clients": {"duplus", "serving", "clients"},
    "perf": set(PACKAGES),
    "model_repository": {"serving"},
}


def project_imports(path: Path) -> set[tuple[str, int]]:
    """(top-level project package, line) for every import in ``path``."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        out |= {(n.split(".")[0], node.lineno) for n in names if n.split(".")[0] in PACKAGES}
    return out


def sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("folder", list(ALLOWED))
def test_imports_point_downward(folder):
    files = sources(folder)
    assert files, f"no Python files under {folder}/"
    wrong = [f"{p.relative_to(ROOT)}:{line} imports {pkg}" for p in files for pkg, line in project_imports(p)
             if pkg not in ALLOWED[folder]]
    assert not wrong, f"{folder}/ may import only {sorted(ALLOWED[folder])}:\n" + "\n".join(sorted(wrong))


def test_the_checker_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef g():\n    from serving.serve import TritonServer\n    import perf.bench as b\n")
    assert project_imports(f) == {("serving", 4), ("perf", 5)}


def test_every_package_folder_is_in_the_table():
    folders = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert folders <= set(ALLOWED), f"add {sorted(folders - set(ALLOWED))} to the import table"
