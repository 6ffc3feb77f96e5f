"""The distribution installs one import package, ``dkv``, and never shadows another package.

The wheel is built from a copy of the working tree (tracked and untracked, not ignored files), its
RECORD read for top-level names, then installed with ``--no-deps`` into a new venv whose only other
packages are this venv's (a ``.pth`` line borrows its site-packages: the dependencies are not
downloaded again), and imported from ``/``: the issue's ``pip install .`` into an empty venv, less
the dependency download that ``make test-latest`` does for real.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _source_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in _source_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (found,) = tmp.glob("dkv-*.whl")
    return found


def test_the_wheel_installs_exactly_one_top_level_name(wheel):
    with zipfile.ZipFile(wheel) as z:
        record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
        paths = [line.split(",")[0] for line in z.read(record).decode().splitlines() if line]
        top_level = z.read(record.replace("RECORD", "top_level.txt")).decode().split()
        entry_points = z.read(record.replace("RECORD", "entry_points.txt")).decode()
    roots = {p.split("/")[0] for p in paths if not p.split("/")[0].endswith((".dist-info", ".data"))}
    assert roots == {"dkv"}
    assert top_level == ["dkv"]
    assert "dkv = dkv.cli:main" in entry_points and "dkv/cli.py" in paths
    # every subpackage travels, and nothing of the repository that is not code
    for sub in ("kvstore", "kernels", "workers", "services", "services/pb", "bench", "loadtest"):
        assert any(p.startswith(f"dkv/{sub}/") and p.endswith(".py") for p in paths), sub
    assert not any(p.startswith(("dkv/tests/", "dkv/helm/", "dkv/docs/")) for p in paths)


def test_the_wheel_asks_only_for_the_client_unless_an_extra_is_named(wheel):
    """pip install dkv: the client; dkv[server] adds torch and the rest (test_client_without_torch.py
    runs the client with those unimportable)."""
    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    core = sorted(re.match(r"[A-Za-z0-9_.-]+", r).group() for r in requires if "extra ==" not in r)
    assert core == ["grpcio", "numpy", "protobuf", "pyyaml"]
    by_extra: dict[str, list[str]] = {}
    for r in requires:
        if "extra ==" in r:
            by_extra.setdefault(re.search(r"extra == \"(\w+)\"", r).group(1), []).append(
                re.match(r"[^<>=!;]+", r).group()
            )
    assert sorted(by_extra) == ["bench", "server", "test"]
    assert {"torch", "transformers", "ray", "redis", "fastapi", "uvicorn"} <= {
        name.strip() for name in by_extra["server"]
    }
    assert "openai" in {name.strip() for name in by_extra["test"]}
    assert "dkv[server]" in by_extra["bench"] and "matplotlib" in by_extra["bench"]


def test_the_installed_wheel_imports_beside_hugging_face_kernels_from_anywhere(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "borrowed-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    probe = (
        "import dkv, dkv.workers.model, dkv.kernels, transformers.integrations.hub_kernels, kernels; "
        "print(dkv.__file__); print(kernels.__file__)"
    )
    out = subprocess.run([str(python), "-c", probe], cwd="/", capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    dkv_file, kernels_file = out.stdout.split()
    assert Path(dkv_file).is_relative_to(site)
    assert Path(kernels_file).is_relative_to(Path(sysconfig.get_paths()["purelib"]) / "kernels")


def test_from_the_repository_root_import_kernels_is_hugging_faces():
    probe = "import kernels; print(kernels.__file__); from kernels import get_kernel"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not Path(out.stdout.split()[0]).is_relative_to(ROOT / "kernels"), out.stdout
    # and the other folders are no packages of their own there either
    for name in ("services", "workers", "kvstore", "bench", "loadtest"):
        out = subprocess.run(
            [sys.executable, "-c", f"import {name}; print({name}.__file__)"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.stdout.strip() in ("", "None") or not Path(out.stdout.strip()).is_relative_to(ROOT / name), (
            name,
            out.stdout,
        )


def test_dkv_runs_as_a_module_and_as_a_command():
    for cmd in ([sys.executable, "-m", "dkv", "--help"], [str(Path(sys.executable).with_name("dkv")), "--help"]):
        out = subprocess.run(cmd, cwd="/", capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "start the whole system" in out.stdout, (cmd, out.stderr[-2000:])
