"""The house stays in order: the import-linter contracts of pyproject.toml hold (layers, stages
independent, no pipeline tool in the bottom layers), and the import graph of `vmddpm` has no cycle and no
upward import (every import counted, also those inside functions; tools/import_graph.py measures it)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT

BIN = Path(sys.executable).parent


def _graph_tool():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "tools" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_import_linter_contracts_are_kept() -> None:
    proc = subprocess.run(
        [str(BIN / "lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_import_graph_has_no_cycle_and_no_upward_import() -> None:
    picture = _graph_tool().measure(ROOT, base=False)
    assert picture["cycles"] == []
    assert picture["upward"] == []
    assert picture["lateral_between_stages"] == []
