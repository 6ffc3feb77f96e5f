"""proto/generate.py: the committed services/pb code is what proto/ generates, and --check notices drift."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from pathlib import Path

import pytest

# build tooling, not part of the dkv package: loaded from its file
_SPEC = importlib.util.spec_from_file_location("proto_generate", Path(__file__).parents[2] / "proto" / "generate.py")
protogen = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(protogen)


def _digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def committed():
    """Hashes of the real proto/ and services/pb, checked unchanged after the test."""
    before = (_digest(protogen.PROTO_DIR / "dkv" / "v1"), _digest(protogen.OUT_DIR))
    yield before
    assert (_digest(protogen.PROTO_DIR / "dkv" / "v1"), _digest(protogen.OUT_DIR)) == before


@pytest.fixture
def proto_copy(tmp_path, monkeypatch):
    copy = tmp_path / "proto"
    shutil.copytree(protogen.PROTO_DIR, copy)
    monkeypatch.setattr(protogen, "PROTO_DIR", copy)
    return copy


def test_committed_code_is_fresh(committed, capsys):
    assert protogen.main(["--check"]) == 0
    assert "stale" not in capsys.readouterr().err


def test_generate_matches_committed_files(committed):
    files = protogen.generate()
    assert {
        "__init__.py",
        "common_pb2.py",
        "common_pb2.pyi",
        "store_pb2.py",
        "store_pb2.pyi",
        "store_pb2_grpc.py",
        "common_pb2_grpc.py",
    } <= set(files)
    for name, text in files.items():
        assert (protogen.OUT_DIR / name).read_text() == text, name
    # imports point at services.pb, never at the proto package path
    assert "from dkv.v1 import" not in files["store_pb2.py"] + files["store_pb2_grpc.py"]
    assert "from dkv.services.pb import common_pb2 as" in files["store_pb2.py"]


def test_check_fails_when_a_proto_changes(committed, proto_copy, capsys):
    common = proto_copy / "dkv" / "v1" / "common.proto"
    text = common.read_text()
    common.write_text(text + "\nmessage ExtraForTest {\n  string extra_field = 1;\n}\n")
    files = protogen.generate()
    assert "extra_field" in files["common_pb2.pyi"]
    assert files["common_pb2.py"] != (protogen.OUT_DIR / "common_pb2.py").read_text()
    assert protogen.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "services/pb is stale" in err and "common_pb2.py" in err and "make proto" in err


def test_check_fails_on_a_new_service_method(committed, proto_copy):
    store = proto_copy / "dkv" / "v1" / "store.proto"
    text = store.read_text()
    anchor = "rpc Stats(StatsRequest) returns (StatsResponse);"
    assert anchor in text
    store.write_text(text.replace(anchor, anchor + "\n  rpc Ping(StatsRequest) returns (StatsResponse);"))
    assert protogen.main(["--check"]) == 1


def test_check_passes_on_an_unchanged_copy(committed, proto_copy):
    assert protogen.main(["--check"]) == 0


def test_check_fails_on_missing_or_extra_generated_file(committed, tmp_path, monkeypatch, capsys):
    out = tmp_path / "pb"
    shutil.copytree(protogen.OUT_DIR, out, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(protogen, "OUT_DIR", out)
    assert protogen.main(["--check"]) == 0
    (out / "old_pb2.py").write_text("# left over\n")
    assert protogen.main(["--check"]) == 1
    assert "old_pb2.py" in capsys.readouterr().err
    (out / "old_pb2.py").unlink()
    (out / "store_pb2_grpc.py").unlink()
    assert protogen.main(["--check"]) == 1
    assert "store_pb2_grpc.py" in capsys.readouterr().err


def test_generate_writes_into_out_dir(committed, tmp_path, monkeypatch):
    out = tmp_path / "services" / "pb"
    out.mkdir(parents=True)
    (out / "stale_pb2.py").write_text("# stale\n")
    monkeypatch.setattr(protogen, "ROOT", tmp_path)
    monkeypatch.setattr(protogen, "OUT_DIR", out)
    assert protogen.main([]) == 0
    assert not (out / "stale_pb2.py").exists()
    assert _digest(out) == {k: v for k, v in _digest(protogen.PROTO_DIR.parent / "services" / "pb").items()}
    assert protogen.main(["--check"]) == 0
