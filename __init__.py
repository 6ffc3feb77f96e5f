"""dkv: a disaggregated, compressed KV-cache store for LLM inference.

The repository root is this package: ``pyproject.toml`` maps ``dkv`` to ``.`` (setuptools
``package-dir``), so each top-level folder is a subpackage: ``dkv.kvstore`` (entries, codec,
tiers, store), ``dkv.kernels`` (Triton kernels and their torch references), ``dkv.workers``
(model, compression, prefill and decode), ``dkv.services`` (gRPC servers and clients, the
gateway, ``dkv up``), ``dkv.bench`` and ``dkv.loadtest``, layered in that order (README, Layout).
Beside them: ``dkv.cli`` (the ``dkv`` command, on top of every layer) and ``dkv.testing``
(synthetic entries for tests, benchmarks and load tests).

The folders have no ``__init__.py`` on purpose: they are namespace portions of ``dkv``, so
Python started in the repository root never takes ``kernels/`` for Hugging Face's ``kernels``
package (or ``services/``, ``workers/`` ... for anything else installed under those names).

``from dkv import Client, Recipe`` is the client API (``services.client.DkvClient``,
``kvstore.recipe.Recipe``). Both are imported on first use, so ``import dkv`` (and the ``dkv``
command) stays cheap; neither needs torch.
"""

_LAZY = {"Client": ("dkv.services.client", "DkvClient"), "Recipe": ("dkv.kvstore.recipe", "Recipe")}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'dkv' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)


__all__ = ["Client", "Recipe"]
