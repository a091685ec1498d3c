"""The layers of the architecture, enforced: the import-linter contract (pyproject.toml), no private name imported
from another module, and tool packages that ``import headwise`` never loads."""

import ast
import subprocess
import sys
from pathlib import Path

import headwise

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "headwise"


def test_import_linter_contract_is_kept():
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_no_private_name_is_imported_from_another_module():
    offences = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("headwise"):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private:
                    offences.append(f"{path.relative_to(ROOT)}: from {node.module} import {', '.join(private)}")
    assert offences == []


def test_import_headwise_does_not_load_the_tools():
    code = "import sys, headwise; print(' '.join(sorted(m for m in sys.modules if m.startswith('headwise'))))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    modules = set(loaded.stdout.split())
    for tool in headwise.TOOLS:
        assert not any(m == f"headwise.{tool}" or m.startswith(f"headwise.{tool}.") for m in modules), tool
    assert "headwise.variants.mha" in modules and "headwise.ops.linear" in modules  # the library itself is loaded


def test_lazy_names_import_on_first_use():
    for name, module in headwise._LAZY.items():
        assert getattr(headwise, name).__name__ == module
