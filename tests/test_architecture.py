"""The folder listing is the architecture: subpackages by concern, layered, checked on every test run.

The contracts live in pyproject.toml ([tool.importlinter]); docs/internals.md: How it is built.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pipeline"
LAYERS = ("engine", "store", "extraction", "tasks", "commands")  # bottom to top
MAX_MODULE_LINES = 400


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter over the `pipeline` package found at `root`, with the contracts of its pyproject.toml."""
    script = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(script), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_the_import_contracts_are_kept():
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "4 kept, 0 broken" in done.stdout


@pytest.mark.parametrize(
    ("where", "line", "contract"),
    [
        ("engine/wrong.py", "import fsspec", "The engine is pure torch"),
        ("engine/wrong.py", "import ray", "The engine is pure torch"),
        ("store/wrong.py", "from pipeline.extraction import config", "Layers"),
        ("extraction/wrong.py", "from pipeline.tasks.retrieval import index", "Layers"),
        ("tasks/retrieval/wrong.py", "from pipeline.tasks.segmentation import metrics", "Task families are independent"),
        ("tasks/shared/wrong.py", "from pipeline.tasks.probes import heads", "What task families share"),
    ],
)
def test_a_wrong_import_breaks_its_contract(tmp_path, where, line, contract):
    """The contracts are not vacuous: a copy of the package with one wrong import fails them."""
    shutil.copytree(PACKAGE, tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    (tmp_path / "pipeline" / where).write_text(f'"""A deliberately wrong import."""\n\n{line}\n')
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    broken = [text for text in done.stdout.splitlines() if text.endswith("BROKEN")]
    assert len(broken) == 1 and broken[0].startswith(contract), done.stdout[-3000:]
    assert "pipeline." + where.removesuffix(".py").replace("/", ".") in done.stdout


def test_the_top_of_the_package_is_one_folder_per_concern():
    entries = {p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"}
    assert entries == {"__init__.py", *LAYERS}


def test_every_package_says_what_it_holds_and_may_import():
    for init in PACKAGE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, init
        if init.parent != PACKAGE:
            assert "May import:" in doc, init


def test_no_module_is_over_the_size_limit():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long


def test_no_package_reaches_into_another_packages_private_names():
    reaching = []
    for path in PACKAGE.rglob("*.py"):
        home = path.relative_to(PACKAGE).parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
                other = node.module.split(".")[1]
                reaching += [f"{path.name}: {node.module}.{a.name}" for a in node.names if other != home and a.name.startswith("_")]
    assert not reaching
