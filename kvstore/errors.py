"""Errors of the KV store domain. Services map each to one gRPC status code."""


class KVStoreError(Exception):
    """Base class; the message says what was wrong and what to do."""


class InvalidEntry(KVStoreError):
    """Bad shape, dtype, length, value (NaN/Inf) or malformed key: INVALID_ARGUMENT."""


class EntryTooLarge(KVStoreError):
    """Over the size limit or larger than every tier: RESOURCE_EXHAUSTED."""


class OverQuota(KVStoreError):
    """A tenant's entry does not fit its quota in any tier: RESOURCE_EXHAUSTED."""


class CorruptEntry(KVStoreError):
    """A checksum, MAC, sequence or framing check failed: DATA_LOSS on read, INVALID_ARGUMENT on write."""


class EntryNotFound(KVStoreError):
    """A miss: NOT_FOUND."""


class TierUnavailable(KVStoreError):
    """A tier (e.g. Redis) failed; the store keeps serving from the others."""
