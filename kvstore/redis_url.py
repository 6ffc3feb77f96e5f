"""Redis URLs as they may be shown: in errors, logs and ``dkv config show``, never with a password.

Its own module, free of torch and redis imports, so the settings (and the CLI) can use it.
"""

from __future__ import annotations

import urllib.parse


def redact_url(url: str) -> str:
    """``url`` with its password masked, for error messages, logs and ``dkv config show``."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return "<unparsable url>"
    if parts.password is None:
        return url
    netloc = parts.hostname or ""
    if port is not None:
        netloc = f"{netloc}:{port}"
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
