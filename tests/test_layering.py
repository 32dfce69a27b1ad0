"""The package's layers import one way: the import-linter contracts in pyproject.toml hold
(`lint-imports`), and breaking one makes this test fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import llmflash

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
PACKAGE = Path(llmflash.__file__).resolve().parent


def lint_imports(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`lint-imports` with this interpreter on the contracts in `cwd`/pyproject.toml; `pythonpath`
    first on the path decides which copy of llmflash it reads."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run(
        [sys.executable, "-c", code, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_contracts_hold():
    r = lint_imports(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_lower_layer_importing_a_higher_one_fails(tmp_path):
    """The model layer importing the API, in a copy of the package: the same contracts refuse it."""
    copy = tmp_path / "src" / "llmflash"
    shutil.copytree(
        PACKAGE,
        copy,
        ignore=lambda d, names: [
            n for n in names if not (n.endswith((".py", ".pyi")) or (Path(d) / n).is_dir()) or n == "__pycache__"
        ],
    )
    config = copy / "models" / "config.py"
    config.write_text(config.read_text() + "\n\ndef _violation():\n    from .. import api  # noqa: F401\n")
    shutil.copy(PYPROJECT, tmp_path / "pyproject.toml")
    r = lint_imports(tmp_path, pythonpath=tmp_path / "src")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "llmflash.models.config -> llmflash.api" in r.stdout, r.stdout
