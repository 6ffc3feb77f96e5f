"""dkv: a disaggregated, compressed KV-cache store for LLM inference.

The repository root is this package: ``pyproject.toml`` maps ``dkv`` to ``.`` (setuptools
``package-dir``), so each top-level folder is a subpackage: ``dkv.kvstore`` (entries, codec,
tiers, store), ``dkv.kernels`` (Triton kernels and their torch references), ``dkv.workers``
(model, compression, prefill and decode), ``dkv.services`` (gRPC servers, clients, CLI),
``dkv.bench`` and ``dkv.loadtest``.

The folders have no ``__init__.py`` on purpose: they are namespace portions of ``dkv``, so
Python started in the repository root never takes ``kernels/`` for Hugging Face's ``kernels``
package (or ``services/``, ``workers/`` ... for anything else installed under those names).
"""
