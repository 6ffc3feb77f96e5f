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
    """A tier (e.g. Redis) failed; the store keeps serving from the others.

    ``partial``: the failure concerns some of the tier's keys only (one node of a Redis Cluster, until
    a replica takes its slots over), so the store keeps using the tier for the rest."""

    def __init__(self, message: str, partial: bool = False):
        super().__init__(message)
        self.partial = partial
