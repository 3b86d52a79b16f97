"""The import layers declared in setup.cfg hold (import-linter): commands on top and imported by no library module,
then the consumers of the chain, the chain registry, the stages, the building blocks; and no package's modules import
each other in a circle."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("lint-imports is not installed: pip install -e '.[dev]' (import-linter is a test dependency)")
    proc = subprocess.run([exe, "--config", str(ROOT / "setup.cfg"), "--no-cache"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "2 kept, 0 broken" in proc.stdout


def test_no_library_module_imports_a_command_module():
    """A second look without import-linter's layer semantics: no file outside commands/ names fct_lightning.commands."""
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "src" / "fct_lightning").rglob("*.py")
                 if "commands" not in p.parts and "fct_lightning.commands" in p.read_text()]
    assert offenders == []
