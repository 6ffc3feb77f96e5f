"""The layers contract of pyproject.toml ([tool.importlinter], run by make lint) catches an upward import.

The contract is copied, with ``dkv`` renamed, onto a scratch package of the same shape (a regular
package whose folders are namespace portions): with every import pointing down it is kept, and
one upward import breaks it. That nothing imports ``dkv.cli`` (a module, so no root package of
the contract) is checked here on the real package.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
LAYERS = ["kvstore", "kernels", "workers", "services", "bench", "loadtest", "tests"]


def _renamed(value, name: str):
    if isinstance(value, str):
        return value.replace("dkv.", f"{name}.")
    if isinstance(value, list):
        return [_renamed(v, name) for v in value]
    if isinstance(value, dict):
        return {k: _renamed(v, name) for k, v in value.items()}
    return value


def _toml(config: dict) -> str:
    """[tool.importlinter] and its contracts as TOML (only strings and lists of strings occur)."""

    def line(key, value):
        text = f'"{value}"' if isinstance(value, str) else "[" + ", ".join(f'"{v}"' for v in value) + "]"
        return f"{key} = {text}"

    out = ["[tool.importlinter]"] + [line(k, v) for k, v in config.items() if k != "contracts"]
    for contract in config["contracts"]:
        out += ["", "[[tool.importlinter.contracts]]"] + [line(k, v) for k, v in contract.items()]
    return "\n".join(out) + "\n"


def _scratch(tmp_path: Path, imports: dict[str, str]) -> subprocess.CompletedProcess:
    """Run lint-imports with the real contract on ``scratchdkv``, whose ``LAYER/mod.py`` hold ``imports``."""
    package = tmp_path / "scratchdkv"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for layer in LAYERS:
        (package / layer).mkdir()
        (package / layer / "mod.py").write_text(imports.get(layer, "") + "\nVALUE = 1\n")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (tmp_path / "contract.toml").write_text(_toml(_renamed(config, "scratchdkv")))
    return subprocess.run(
        [str(LINT_IMPORTS), str(tmp_path / "contract.toml"), "--no-cache"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


DOWNWARD = {
    "kernels": "from scratchdkv.kvstore import mod",
    "workers": "from scratchdkv.kernels import mod",
    "services": "from scratchdkv.workers import mod",
    "bench": "from scratchdkv.services import mod",
    "loadtest": "from scratchdkv.services import mod",
}


def test_imports_that_point_down_keep_the_contract(tmp_path):
    out = _scratch(tmp_path, DOWNWARD)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


@pytest.mark.parametrize(
    ("layer", "upward", "broken"),
    [
        ("kvstore", "from scratchdkv.workers import mod", "kvstore imports no layer above it BROKEN"),
        ("workers", "from scratchdkv.services import mod", "workers import no layer above them BROKEN"),
        ("services", "from scratchdkv.bench import mod", "services import no layer above them BROKEN"),
        ("bench", "from scratchdkv.loadtest import mod", "bench does not import loadtest BROKEN"),
        ("workers", "from scratchdkv.tests import mod", "nothing imports the tests BROKEN"),
    ],
)
def test_an_upward_import_breaks_the_contract(tmp_path, layer, upward, broken):
    out = _scratch(tmp_path, {**DOWNWARD, layer: DOWNWARD.get(layer, "") + "\n" + upward})
    assert out.returncode == 1, out.stdout + out.stderr
    assert broken in out.stdout  # (with the layers it reaches through, others may break too)


def test_nothing_imports_the_command_line():
    graph = grimp.build_graph(*(f"dkv.{layer}" for layer in LAYERS), include_external_packages=True, cache_dir=None)
    assert "dkv.cli" not in graph.modules or not graph.find_modules_that_directly_import("dkv.cli")
