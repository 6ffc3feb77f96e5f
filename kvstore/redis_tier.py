"""The Redis tier: entries as many small Redis strings, published atomically.

Layout (every key under ``prefix``, default ``dkv:``)::

    {prefix}d:{key}:{version}:{i}   frame i of the entry, raw bytes (<= 4 MiB each)
    {prefix}m:{key}                 manifest, JSON {"v": version, "sizes": [bytes of each frame],
                                    "mac": keyed MAC of the frames (with a cluster secret)}
    {prefix}index                   hash: str(key) -> total bytes of the entry
    {prefix}versions                hash: str(key) -> "version:frames" (finds the data keys of an
                                    entry whose manifest Redis evicted)
    {prefix}used                    counter: total bytes of all entries (sum of the index)

Why it looks like this:

* Frames, not one value per entry: an entry can be hundreds of MB; Redis strings are capped at
  512 MB and one huge value blocks the single-threaded server while it is written, read or
  freed. 4 MiB values keep every command short.
* A random ``version`` per write: data keys of a new write never collide with those of the
  entry being replaced or of a concurrent writer of the same key.
* Staging with a TTL, then one atomic publish step (a Lua script: atomic like MULTI/EXEC) that
  checks every staged key is still there, PERSISTs them, frees the version it replaces and
  writes the manifest, index, versions and counter: a reader finds an entry only through its
  manifest, so it never sees a half-written one, and the data keys of a writer that died mid-way
  expire on their own. ``used`` always equals the sum of the index, even with concurrent writers.
* Redis may lose keys behind our back (``maxmemory`` eviction under ``allkeys-lru``, a flush):
  any data key, a manifest, even the index or the counter. ``get`` checks that every frame is
  there; a missing frame or manifest is a miss, and the entry's accounting and data keys go at
  once. ``audit`` (the store runs it every ``audit_interval_s``) repairs the rest: index entries
  whose manifest is gone, manifests missing from an evicted index, persisted data keys of no
  published version, and ``used`` recomputed from the index.
* With a cluster secret (``mac``), every entry's manifest carries a keyed MAC of its frames
  (``kvstore.mac``) and ``get`` checks it: an entry someone else wrote into Redis, with checksums
  that pass, fails ``CorruptEntry`` (the store deletes it: a miss, never served).

No pickle: values are the codec's frames as they are; the manifest is JSON. Every Redis or
socket failure raises ``TierUnavailable``, quickly (no client-side retry loop, bounded socket
timeouts, no cleanup round trip on a connection that just timed out), so the store keeps serving
from its other tiers; the client reconnects on the next call once Redis is back.
"""

from __future__ import annotations

import functools
import json
import secrets
from collections.abc import Iterable

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from dkv.kvstore.codec import FRAME_LIMIT
from dkv.kvstore.entry import EntryKey
from dkv.kvstore.errors import CorruptEntry, InvalidEntry, TierUnavailable
from dkv.kvstore.mac import EntryMac
from dkv.kvstore.redis_url import redact_url
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
# KEYS: manifest, index, used, versions, new data keys...; ARGV: manifest json, index field, total
# bytes, data key prefix of this entry key, new version. Returns the number of staged keys that were
# gone (0 = published).
_PUBLISH_LUA = """
local missing = 0
for i = 5, #KEYS do
    if redis.call('EXISTS', KEYS[i]) == 0 then missing = missing + 1 end
end
if missing > 0 then
    for i = 5, #KEYS do redis.call('DEL', KEYS[i]) end
    return missing
end
for i = 5, #KEYS do redis.call('PERSIST', KEYS[i]) end
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
redis.call('HSET', KEYS[4], ARGV[2], ARGV[5] .. ':' .. (#KEYS - 4))
redis.call('INCRBY', KEYS[3], tonumber(ARGV[3]) - old_size)
return 0
"""

# KEYS: manifest, index, used, versions; ARGV: index field, data key prefix, condition: '' = remove
# whatever is there, 'absent' = only if the manifest is gone (a reader found no manifest), else only
# if the manifest names that version. Without a manifest, the data keys are found through the
# versions hash. Returns 1 if something was removed.
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
if ARGV[3] == 'absent' then
    if raw then return 0 end
elseif ARGV[3] ~= '' and (m == nil or m.v ~= ARGV[3]) then
    return 0
end
local size = redis.call('HGET', KEYS[2], ARGV[1])
local ver = redis.call('HGET', KEYS[4], ARGV[1])
if not raw and not size and not ver then return 0 end
redis.call('DEL', KEYS[1])
if m then
    for i = 0, #m.sizes - 1 do redis.call('DEL', ARGV[2] .. m.v .. ':' .. i) end
end
if ver then
    local v, n = string.match(ver, '^(%w+):(%d+)$')
    if v and (m == nil or v ~= m.v) then
        for i = 0, tonumber(n) - 1 do redis.call('DEL', ARGV[2] .. v .. ':' .. i) end
    end
    redis.call('HDEL', KEYS[4], ARGV[1])
end
if size then
    redis.call('HDEL', KEYS[2], ARGV[1])
    redis.call('DECRBY', KEYS[3], tonumber(size))
end
return 1
"""

# KEYS: manifest, index, versions; ARGV: index field. An entry whose manifest is there but whose
# index entry is not (Redis evicted the index): index it again. Returns 1 if it did.
_REINDEX_LUA = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local ok, m = pcall(cjson.decode, raw)
if not ok or type(m) ~= 'table' or type(m.v) ~= 'string' or type(m.sizes) ~= 'table' then return 0 end
local total = 0
for _, size in ipairs(m.sizes) do total = total + size end
redis.call('HSET', KEYS[2], ARGV[1], total)
redis.call('HSET', KEYS[3], ARGV[1], m.v .. ':' .. #m.sizes)
return 1
"""

# KEYS: data keys; ARGV: prefix. Deletes each data key that is persisted (a staged one has a TTL and
# expires on its own) but is not a frame of the version its entry's manifest publishes: left behind
# when Redis evicted the manifest and the versions entry. Returns how many it deleted.
_COLLECT_LUA = """
local deleted = 0
local data = ARGV[1] .. 'd:'
for i = 1, #KEYS do
    if redis.call('TTL', KEYS[i]) == -1 then
        local key, v = string.match(string.sub(KEYS[i], #data + 1), '^([^:]+):(%w+):%d+$')
        local published = false
        if key then
            local raw = redis.call('GET', ARGV[1] .. 'm:' .. key)
            if raw then
                local ok, m = pcall(cjson.decode, raw)
                published = ok and type(m) == 'table' and m.v == v
            end
        end
        if not published then
            redis.call('DEL', KEYS[i])
            deleted = deleted + 1
        end
    end
end
return deleted
"""

# KEYS: index, used. Sets used to the sum of the index (no key for 0, as on a fresh Redis); returns it.
_RECOUNT_LUA = """
local total = 0
for _, size in ipairs(redis.call('HVALS', KEYS[1])) do total = total + (tonumber(size) or 0) end
if total == 0 then redis.call('DEL', KEYS[2]) else redis.call('SET', KEYS[2], total) end
return total
"""

SCAN_BATCH = 1000  # keys per SCAN step and per script call of an audit: each Redis command stays short


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
    ``mac`` (the cluster secret's ``EntryMac``) signs every entry written and checks every one read.
    """

    remote = True

    def __init__(
        self,
        name: str,
        capacity_bytes: int,
        url: str,
        prefix: str = "dkv:",
        staging_ttl_s: float = 60.0,
        socket_timeout_s: float = 2.0,
        mac: EntryMac | None = None,
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
        self.mac = mac
        self._index_key = f"{prefix}index"
        self._versions_key = f"{prefix}versions"
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
            raise ValueError(f"tier {name}: bad redis url {redact_url(url)!r}: {e}") from e
        # EVALSHA, loading the script again after a Redis restart emptied its script cache.
        self._publish_script = self._client.register_script(_PUBLISH_LUA)
        self._remove_script = self._client.register_script(_REMOVE_LUA)
        self._reindex_script = self._client.register_script(_REINDEX_LUA)
        self._collect_script = self._client.register_script(_COLLECT_LUA)
        self._recount_script = self._client.register_script(_RECOUNT_LUA)

    # -- key layout -------------------------------------------------------------------------

    def _manifest_key(self, key: EntryKey | str) -> str:
        return f"{self.prefix}m:{key}"

    def _data_prefix(self, key: EntryKey | str) -> str:
        return f"{self.prefix}d:{key}:"

    def _data_keys(self, key: EntryKey, version: str, n: int) -> list[str]:
        base = self._data_prefix(key)
        return [f"{base}{version}:{i}" for i in range(n)]

    def _unavailable(self, what: str, e: BaseException) -> TierUnavailable:
        return TierUnavailable(
            f"redis tier {self.name} at {redact_url(self.url)}: {what} failed: {type(e).__name__}: {e} "
            f"(is redis-server running and reachable, and does it have memory left?)"
        )

    @staticmethod
    def _parse_manifest(raw: bytes | None) -> tuple[str, list[int], str] | None:
        """(version, frame sizes, MAC or "") of a manifest; None when absent or malformed."""
        if raw is None:
            return None
        try:
            m = json.loads(raw)
            version, sizes, mac = m["v"], m["sizes"], m.get("mac", "")
            if not isinstance(version, str) or not isinstance(mac, str) or not all(
                    isinstance(s, int) and s >= 0 for s in sizes):
                return None
            return version, list(sizes), mac
        except (ValueError, TypeError, KeyError, AttributeError):
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
            self._publish(key, version, sizes, data_keys, self.mac.tag(views) if self.mac else "")
        except (redis.exceptions.TimeoutError, redis.exceptions.ConnectionError, OSError):
            raise  # the connection is gone: a cleanup would wait out another timeout; the staging TTL frees them
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

    def _publish(self, key: EntryKey, version: str, sizes: list[int], data_keys: list[str], mac: str) -> None:
        """Make the staged entry visible atomically, replacing (and freeing) any previous version."""
        fields = {"v": version, "sizes": sizes, **({"mac": mac} if mac else {})}
        manifest = json.dumps(fields, separators=(",", ":"))
        missing = self._publish_script(
            keys=[self._manifest_key(key), self._index_key, self._used_key, self._versions_key, *data_keys],
            args=[manifest, str(key), sum(sizes), self._data_prefix(key), version],
        )
        if missing:
            raise TierUnavailable(
                f"redis tier {self.name} at {redact_url(self.url)}: put of {key} failed: {missing} of "
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

    def _remove(self, key: EntryKey | str, condition: str = "") -> bool:
        """Delete manifest, data keys, index and versions entries atomically. ``condition``: ""
        always; "absent" only if the manifest is gone; a version only if the manifest still names
        it (so a cleanup never removes a newer write)."""
        removed = self._remove_script(
            keys=[self._manifest_key(key), self._index_key, self._used_key, self._versions_key],
            args=[str(key), self._data_prefix(key), condition],
        )
        return bool(removed)

    # -- reads ------------------------------------------------------------------------------

    @_redis_call("get")
    def get(self, key: EntryKey) -> list[bytes] | None:
        """The frames of ``key``, or None; raises ``CorruptEntry`` when they fail their MAC."""
        for _ in range(2):
            manifest = self._parse_manifest(self._client.get(self._manifest_key(key)))
            if manifest is None:
                # evicted (or never written): what the index, counter and versions still say of it goes too
                self._cleanup_quietly(key, "absent")
                return None
            version, sizes, mac = manifest
            frames = self._client.mget(self._data_keys(key, version, len(sizes))) if sizes else []
            if all(f is not None and len(f) == s for f, s in zip(frames, sizes)):
                self._check_mac(key, frames, mac)
                return frames
            # A frame is gone (maxmemory eviction, a flush) or this version was just replaced:
            # clean up only if the broken version is still the published one, then look again.
            self._cleanup_quietly(key, version)
        return None

    def _check_mac(self, key: EntryKey, frames: list[bytes], mac: str) -> None:
        if self.mac is not None and not (mac and self.mac.verify(frames, mac)):
            raise CorruptEntry(f"redis tier {self.name}: entry {key} {'fails its' if mac else 'has no'} MAC: it was "
                               "not written by a store with this cluster secret (forged, or written before the "
                               "secret was set)")

    def _cleanup_quietly(self, key: EntryKey, condition: str) -> None:
        try:
            self._remove(key, condition)
        except (redis.exceptions.RedisError, OSError, TierUnavailable):
            pass

    @_redis_call("header_frame")
    def header_frame(self, key: EntryKey) -> bytes | None:
        manifest = self._parse_manifest(self._client.get(self._manifest_key(key)))
        if manifest is None or not manifest[1]:
            return None
        version, sizes, _ = manifest
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

    @_redis_call("audit")
    def audit(self) -> dict[EntryKey, int]:
        """Repair what eviction or a crash left inconsistent (see the module docstring) and return
        the bytes of every entry held. Runs in steps of ``SCAN_BATCH`` keys, each atomic."""
        # index and versions entries whose manifest is gone: their data keys and accounting go
        fields = set(self._client.hkeys(self._index_key)) | set(self._client.hkeys(self._versions_key))
        batch = sorted(fields)
        for start in range(0, len(batch), SCAN_BATCH):
            names = [f.decode(errors="replace") for f in batch[start:start + SCAN_BATCH]]
            with self._client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.exists(self._manifest_key(name))
                present = pipe.execute()
            for name, there in zip(names, present):
                if not there:
                    self._remove(name, "absent")
        # manifests the index lost (Redis evicted the index itself): indexed again
        manifests = self._manifest_key("")
        for raw in self._client.scan_iter(match=f"{manifests}*", count=SCAN_BATCH):
            name = raw.decode(errors="replace")[len(manifests):]
            self._reindex_script(keys=[raw, self._index_key, self._versions_key], args=[name])
        # persisted data keys of no published version
        data = []
        for raw in self._client.scan_iter(match=f"{self.prefix}d:*", count=SCAN_BATCH):
            data.append(raw)
            if len(data) == SCAN_BATCH:
                self._collect_script(keys=data, args=[self.prefix])
                data = []
        if data:
            self._collect_script(keys=data, args=[self.prefix])
        self._recount_script(keys=[self._index_key, self._used_key])
        held = {}
        for raw, size in self._client.hgetall(self._index_key).items():
            try:
                held[EntryKey.parse(raw.decode())] = int(size)
            except (InvalidEntry, UnicodeDecodeError, ValueError):
                continue  # not ours (or damaged): left alone, as keys() does
        return held

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
        return f"RedisTier({self.name!r}, {redact_url(self.url)}, prefix={self.prefix!r})"


__all__ = ["RedisTier", "MAX_VALUE_BYTES"]
