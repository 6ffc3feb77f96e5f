"""The token and TLS files of the environment, as keyword arguments of the dkv clients.

``DKV_TOKEN`` (bearer token), ``DKV_TLS_CA`` (CA of the servers' certificates) and
``DKV_TLS_CERT``/``DKV_TLS_KEY`` (this client's, for mutual TLS) are all optional; only those set
are passed, so the load test runs the same against clusters with and without authentication.
"""

from __future__ import annotations

import inspect
import os

ENV = {"token": "DKV_TOKEN", "tls_ca": "DKV_TLS_CA", "tls_cert": "DKV_TLS_CERT", "tls_key": "DKV_TLS_KEY"}


def security_from_env() -> dict:
    return {arg: os.environ[env] for arg, env in ENV.items() if os.environ.get(env)}


def client_kwargs(cls) -> dict:
    """Keyword arguments that give ``cls`` (``DkvClient``, ``StoreClient``) the environment's token and TLS.

    As ``token=``/``tls_*=`` when ``cls`` takes them, else as one ``security=`` object
    (``services.transport.Security``); nothing when none is set.
    """
    wanted = security_from_env()
    if not wanted:
        return {}
    params = inspect.signature(cls).parameters
    if all(name in params for name in wanted):
        return wanted
    if "security" in params:
        from dkv.services.transport import Security

        return {"security": Security(**wanted)}
    names = ", ".join(ENV[n] for n in sorted(wanted))
    raise TypeError(f"{cls.__name__} takes no token or TLS files: unset {names}")
