"""The Redis tier: entries as many small Redis strings, published atomically.

Layout (every key under ``prefix``, default ``dkv:``)::

    {prefix}d:{key}:{version}:{i}   frame i of the entry, raw bytes (<= 4 MiB each)
    {prefix}m:{key}                 manifest, JSON {"v": version, "sizes": [bytes of each frame]}
    {prefix}index                   hash: str(key) -> total bytes of the entry
    {prefix}used                    counter: total bytes of all entries (sum of the index)

Why it looks like this:

* Frames, not one value per entry: an entry can be hundreds of MB; Redis strings are capped at
  512 MB and one huge value blocks the single-threaded server while it is written, read or
  freed. 4 MiB values keep every command short.
* A random ``version`` per write: data keys of a new write never collide with those of the
  entry being replaced or of a concurrent writer of the same key.
* Staging with a TTL, then one atomic publish step (a Lua script: atomic like MULTI/EXEC) that
  checks every staged key is still there, PERSISTs them, frees the version it replaces and
  writes the manifest, index and counter: a reader finds an entry only through its manifest, so
  it never sees a half-written one, and the data keys of a writer that died mid-way expire on
  their own. ``used`` always equals the sum of the index, even with concurrent writers.
* Redis may lose data keys behind our back (``maxmemory`` eviction, a restart). ``get`` checks
  that every frame is there; if one is missing the entry is a miss and is cleaned up.

No pickle: values are the codec's frames as they are; the manifest is JSON. Every Redis or
socket failure raises ``TierUnavailable``, quickly (no client-side retry loop, bounded socket
timeouts), so the store keeps serving from its other tiers; the client reconnects on the next
call once Redis is back.
"""

from __future__ import annotations

import functools
import json
import secrets
import urllib.parse
from collections.abc import Iterable

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from dkv.kvstore.codec import FRAME_LIMIT
from dkv.kvstore.entry import EntryKey
from dkv.kvstore.errors import InvalidEntry, TierUnavailable
from dkv.kvstore.tier import Frames, StorageTier

# Values of at most codec.MAX_FRAME_BYTES stay in jemalloc's 4 MiB size class (see kvstore.codec).
MAX_VALUE_BYTES = FRAME_LIMIT

# Publish and remove run as Lua scripts: atomic like MULTI/EXEC, but they can read the old
# manifest and act on it in the same step (a MULTI/EXEC needs WATCH and retries for that, which
# starve when many writers publish the same popular prefix at once), and they take one round
# trip. Both work on a standalone Redis; the data keys they derive are not declared in KEYS, so
# they are not for Redis Cluster. Over maxmemory, Redis refuses a (no-shebang) script's write
# only while the script has written nothing yet, so an OOM never stops one half-way.
#
# KEYS: manifest, index, used, new data keys...; ARGV: manifest json, index field, total bytes,
# data key prefix of this entry key, new version. Returns the number of staged keys that were
# gone (0 = published).
_PUBLISH_LUA = """
local missing = 0
for i = 4, #KEYS do
    if redis.call('EXISTS', KEYS[i]) == 0 then missing = missing + 1 end
end
if missing > 0 then
    for i = 4, #KEYS do redis.call('DEL', KEYS[i]) end
    return missing
end
for i = 4, #KEYS do redis.call('PERSIST', KEYS[i]) end
local old = redis.call('GET', KEYS[1])
if old then
    local ok, m = pcall(cjson.decode, old)
    if ok and type(m) == 'table' and type(m.v) == 'string' and m.v ~= ARGV[5]
            and type(m.sizes) == 'table' then
        for i = 0, #m.sizes - 1 do redis.call('DEL', ARGV[4] .. m.v .. ':' .. i) end
    end
end
local old_size = tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or 0) or 0
redis.call('SET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('INCRBY', KEYS[3], tonumber(ARGV[3]) - old_size)
return 0
"""

# KEYS: manifest, index, used; ARGV: index field, data key prefix, only this version ('' = any).
# Returns 1 if something was removed.
_REMOVE_LUA = """
local raw = redis.call('GET', KEYS[1])
local m = nil
if raw then
    local ok, decoded = pcall(cjson.decode, raw)
    if ok and type(decoded) == 'table' and type(decoded.v) == 'string'
            and type(decoded.sizes) == 'table' then
        m = decoded
    end
end
if ARGV[3] ~= '' and (m == nil or m.v ~= ARGV[3]) then return 0 end
local size = redis.call('HGET', KEYS[2], ARGV[1])
if not raw and not size then return 0 end
redis.call('DEL', KEYS[1])
if m then
    for i = 0, #m.sizes - 1 do redis.call('DEL', ARGV[2] .. m.v .. ':' .. i) end
end
if size then
    redis.call('HDEL', KEYS[2], ARGV[1])
    redis.call('DECRBY', KEYS[3], tonumber(size))
end
return 1
"""


def _redact(url: str) -> str:
    """``url`` without its password, for error messages and logs."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _redis_call(what: str):
    """Turn any Redis or socket failure of the wrapped method into ``TierUnavailable``."""

    def decorate(method):
        @functools.wraps(method)
        def wrapper(self: "RedisTier", *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except TierUnavailable:
                raise
            except (redis.exceptions.RedisError, OSError) as e:
                raise self._unavailable(what, e) from e

        return wrapper

    return decorate


class RedisTier(StorageTier):
    """Entries in a Redis at ``url``, under ``prefix`` (see the module docstring for the layout).

    ``capacity_bytes`` is what the store may put here (it makes room first); size Redis's
    ``maxmemory`` somewhat above it, since Redis adds per-key overhead. ``staging_ttl_s`` is how
    long the data keys of an unfinished write live; ``socket_timeout_s`` bounds every call.
    """

    def __init__(
        self,
        name: str,
        capacity_bytes: int,
        url: str,
        prefix: str = "dkv:",
        staging_ttl_s: float = 60.0,
        socket_timeout_s: float = 2.0,
    ):
        super().__init__(name, capacity_bytes)
        if staging_ttl_s <= 0:
            raise ValueError(f"tier {name}: staging_ttl_s {staging_ttl_s} must be > 0")
        if socket_timeout_s <= 0:
            raise ValueError(f"tier {name}: socket_timeout_s {socket_timeout_s} must be > 0")
        self.url = url
        self.prefix = prefix
        self.staging_ttl_ms = max(1, int(staging_ttl_s * 1000))
        self.socket_timeout_s = socket_timeout_s
        self._index_key = f"{prefix}index"
        self._used_key = f"{prefix}used"
        try:
            self._client = redis.Redis.from_url(
                url,
                socket_timeout=socket_timeout_s,
                socket_connect_timeout=socket_timeout_s,
                health_check_interval=30,
                socket_read_size=1 << 20,  # replies are MiB-sized frames: ~15% faster reads than 64 KiB
                decode_responses=False,
                # Fail fast, never retry: the store falls back to the other tiers, and a
                # publish retried after a lost reply could apply INCRBY twice.
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError as e:
            raise ValueError(f"tier {name}: bad redis url {_redact(url)!r}: {e}") from e
        # EVALSHA, loading the script again after a Redis restart emptied its script cache.
        self._publish_script = self._client.register_script(_PUBLISH_LUA)
        self._remove_script = self._client.register_script(_REMOVE_LUA)

    # -- key layout -------------------------------------------------------------------------

    def _manifest_key(self, key: EntryKey) -> str:
        return f"{self.prefix}m:{key}"

    def _data_prefix(self, key: EntryKey) -> str:
        return f"{self.prefix}d:{key}:"

    def _data_keys(self, key: EntryKey, version: str, n: int) -> list[str]:
        base = self._data_prefix(key)
        return [f"{base}{version}:{i}" for i in range(n)]

    def _unavailable(self, what: str, e: BaseException) -> TierUnavailable:
        return TierUnavailable(
            f"redis tier {self.name} at {_redact(self.url)}: {what} failed: {type(e).__name__}: {e} "
            f"(is redis-server running and reachable, and does it have memory left?)"
        )

    @staticmethod
    def _parse_manifest(raw: bytes | None) -> tuple[str, list[int]] | None:
        if raw is None:
            return None
        try:
            m = json.loads(raw)
            version, sizes = m["v"], m["sizes"]
            if not isinstance(version, str) or not all(isinstance(s, int) and s >= 0 for s in sizes):
                return None
            return version, list(sizes)
        except (ValueError, TypeError, KeyError):
            return None

    # -- writes -----------------------------------------------------------------------------

    @_redis_call("put")
    def put(self, key: EntryKey, frames: Frames) -> None:
        views = []
        for i, f in enumerate(frames):
            v = memoryview(f)
            if v.ndim != 1 or v.format != "B":
                v = v.cast("B")  # the client sends len(view) bytes: make that the byte count
            if v.nbytes > MAX_VALUE_BYTES:
                raise ValueError(
                    f"tier {self.name}: frame {i} of {key} is {v.nbytes} bytes; Redis values are at most "
                    f"{MAX_VALUE_BYTES} bytes: encode with codec.encode(max_frame_bytes<={MAX_VALUE_BYTES})"
                )
            views.append(v)
        version = secrets.token_hex(8)
        sizes = [v.nbytes for v in views]
        data_keys = self._data_keys(key, version, len(views))
        try:
            self._stage(data_keys, views)
            self._publish(key, version, sizes, data_keys)
        except BaseException:
            self._delete_quietly(data_keys)
            raise

    def _stage(self, data_keys: list[str], views: list[memoryview]) -> None:
        """Write the data keys with a TTL, in one pipelined round trip; nothing is visible yet."""
        if not data_keys:
            return
        with self._client.pipeline(transaction=False) as pipe:
            for dk, v in zip(data_keys, views):
                pipe.set(dk, v, px=self.staging_ttl_ms)
            pipe.execute()

    def _publish(self, key: EntryKey, version: str, sizes: list[int], data_keys: list[str]) -> None:
        """Make the staged entry visible atomically, replacing (and freeing) any previous version."""
        manifest = json.dumps({"v": version, "sizes": sizes}, separators=(",", ":"))
        missing = self._publish_script(
            keys=[self._manifest_key(key), self._index_key, self._used_key, *data_keys],
            args=[manifest, str(key), sum(sizes), self._data_prefix(key), version],
        )
        if missing:
            raise TierUnavailable(
                f"redis tier {self.name} at {_redact(self.url)}: put of {key} failed: {missing} of "
                f"{len(data_keys)} staged frames expired before publish (staging_ttl_s="
                f"{self.staging_ttl_ms / 1000:g}); the write was too slow or Redis evicted them"
            )

    def _delete_quietly(self, keys: list[str]) -> None:
        """Best-effort cleanup after a failed write (the staging TTL covers what this misses)."""
        if not keys:
            return
        try:
            self._client.delete(*keys)
        except (redis.exceptions.RedisError, OSError):
            pass

    @_redis_call("remove")
    def remove(self, key: EntryKey) -> bool:
        return self._remove(key)

    def _remove(self, key: EntryKey, only_version: str | None = None) -> bool:
        """Delete manifest, data keys and index entry atomically; with ``only_version``, only if
        the manifest still names that version (so a cleanup never removes a newer write)."""
        removed = self._remove_script(
            keys=[self._manifest_key(key), self._index_key, self._used_key],
            args=[str(key), self._data_prefix(key), only_version or ""],
        )
        return bool(removed)

    # -- reads ------------------------------------------------------------------------------

    @_redis_call("get")
    def get(self, key: EntryKey) -> list[bytes] | None:
        for _ in range(2):
            manifest = self._parse_manifest(self._client.get(self._manifest_key(key)))
            if manifest is None:
                return None
            version, sizes = manifest
            if not sizes:
                return []
            frames = self._client.mget(self._data_keys(key, version, len(sizes)))
            if all(f is not None and len(f) == s for f, s in zip(frames, sizes)):
                return frames
            # A frame is gone (maxmemory eviction, a flush) or this version was just replaced:
            # clean up only if the broken version is still the published one, then look again.
            self._cleanup_quietly(key, version)
        return None

    def _cleanup_quietly(self, key: EntryKey, version: str) -> None:
        try:
            self._remove(key, only_version=version)
        except (redis.exceptions.RedisError, OSError, TierUnavailable):
            pass

    @_redis_call("header_frame")
    def header_frame(self, key: EntryKey) -> bytes | None:
        manifest = self._parse_manifest(self._client.get(self._manifest_key(key)))
        if manifest is None or not manifest[1]:
            return None
        version, sizes = manifest
        frame = self._client.get(self._data_keys(key, version, 1)[0])
        if frame is None or len(frame) != sizes[0]:
            self._cleanup_quietly(key, version)
            return None
        return frame

    @_redis_call("contains")
    def contains(self, key: EntryKey) -> bool:
        return bool(self._client.exists(self._manifest_key(key)))

    @_redis_call("batch_contains")
    def batch_contains(self, keys: Iterable[EntryKey]) -> int:
        keys = list(keys)
        if not keys:
            return 0
        with self._client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.exists(self._manifest_key(key))
            present = pipe.execute()
        n = 0
        for p in present:
            if not p:
                break
            n += 1
        return n

    @_redis_call("keys")
    def keys(self) -> list[EntryKey]:
        out = []
        for raw in self._client.hkeys(self._index_key):
            try:
                out.append(EntryKey.parse(raw.decode()))
            except (InvalidEntry, UnicodeDecodeError):
                continue  # not ours (or damaged): skip rather than fail the whole listing
        return out

    @_redis_call("used_bytes")
    def used_bytes(self) -> int:
        return int(self._client.get(self._used_key) or 0)

    def close(self) -> None:
        """Close every pooled connection (never raises: Redis may already be gone)."""
        try:
            self._client.close()
            self._client.connection_pool.disconnect()
        except (redis.exceptions.RedisError, OSError):
            pass

    def __repr__(self) -> str:
        return f"RedisTier({self.name!r}, {_redact(self.url)}, prefix={self.prefix!r})"


__all__ = ["RedisTier", "MAX_VALUE_BYTES"]
