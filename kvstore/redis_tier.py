"""The Redis tier: entries as many small Redis strings, published atomically, on a standalone Redis
or a Redis Cluster, shared by every store that writes there.

Layout. An entry's keys live under ``namespace`` (default ``dkv:``), the same for every store of a
cluster, so any store reads what another wrote or demoted (the shared last tier); each store's own
bookkeeping lives under its ``prefix`` (one per store)::

    {namespace}m:{<key>}                 manifest, JSON {"v": version, "sizes": [bytes of each frame],
                                         "mac": keyed MAC of the frames (with a cluster secret)}
    {namespace}d:{<key>}:{version}:{i}   frame i of the entry, raw bytes (<= 4 MiB each)
    {<prefix>}index                      hash: str(key) -> total bytes, of the entries this store counts
    {<prefix>}versions                   hash: str(key) -> "version:frames" (the version it counted; finds
                                         the data keys of an entry whose manifest Redis evicted)
    {<prefix>}used                       counter: the sum of the index

The braces are Redis Cluster hash tags: every key of one entry hashes to one slot (the entry's
key), and so do the three keys of a store's bookkeeping (its prefix). A Lua script touches only
keys of one slot, so each step below is atomic on a standalone Redis and on a cluster alike, and
entries spread over the cluster's masters while each store's bookkeeping sits on one of them.

Why it looks like this:

* Frames, not one value per entry: an entry can be hundreds of MB; Redis strings are capped at
  512 MB and one huge value blocks the single-threaded server while it is written, read or
  freed. 4 MiB values keep every command short.
* A random ``version`` per write: data keys of a new write never collide with those of the
  entry being replaced or of a concurrent writer of the same key.
* A write stages its data keys with a TTL, publishes them in one atomic step in the entry's slot
  (a script checks the manifest is still the one the writer read, that every staged key is still
  there, PERSISTs them, frees the version it replaces and writes the manifest), then counts the
  entry in one atomic step in its store's slot (index, versions and counter together, so ``used``
  always equals the sum of the index). A reader finds an entry only through its manifest, so it
  never sees a half-written one; data keys of a writer that died mid-way expire on their own.
  Every script is idempotent, so a redirected or retried call does no harm. Within one process,
  the steps that touch one key run one at a time.
* Shared entries, per-store accounting. A store counts the entries it wrote and those it
  ``adopt``-ed (read from the shared tier when it had no index entry for them: a lost shard's
  entries, found by the shard that now owns their keys). Its removals and cleanups take out only
  the version it counted, so they never delete another store's newer write of the same key. An
  entry two stores count is counted twice (a conservative error, until one of them removes it).
* Redis may lose keys behind our back (``maxmemory`` eviction under ``allkeys-lru``, a flush, a
  failover that lost the last writes): any data key, a manifest, even a store's bookkeeping.
  ``get`` checks that every frame is there; a missing frame or manifest is a miss, and the
  entry's accounting and data keys go at once. ``audit`` (the store runs it every
  ``audit_interval_s``) repairs the rest from the manifests of the entries the store counts,
  without scanning the keyspace: counted entries whose manifest is gone, a counted size or version
  another write replaced, a lost index or versions hash, and ``used`` recomputed; the store then
  ``adopt``-s again the entries its own index names that the bookkeeping lost. Entries no store
  counts or indexes any more are counted again when a store next reads them; until then they are
  Redis's own least recently used keys, which ``allkeys-lru`` evicts first.
* With a cluster secret (``mac``), every entry's manifest carries a keyed MAC of its frames
  (``kvstore.mac``) and ``get`` checks it: an entry someone else wrote into Redis, with checksums
  that pass, fails ``CorruptEntry`` (the store deletes it: a miss, never served). Every store of a
  cluster needs the same secret.

Redis Cluster (``cluster=True``, redis-py's ``RedisCluster``): the client learns the slot map from
any node of ``url``, follows MOVED and ASK redirections, and after a failover (a replica promoted)
finds the new master on its next call; the calls that fail meanwhile raise ``TierUnavailable``
with ``partial`` set (one node failed), so the store keeps using the tier for the other slots, and
reads of the failed ones are misses until the failover is over. Run the cluster with
``cluster-require-full-coverage no``, so a failed master stops only its own slots.

No pickle: values are the codec's frames as they are; the manifest is JSON. Every Redis or
socket failure raises ``TierUnavailable``, quickly (no client-side retry loop, bounded socket
timeouts, no cleanup round trip on a connection that just timed out), so the store keeps serving
from its other tiers; the client reconnects on the next call once Redis is back.
"""

from __future__ import annotations

import functools
import json
import secrets
import threading
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from dkv.kvstore.codec import FRAME_LIMIT
from dkv.kvstore.entry import EntryKey
from dkv.kvstore.errors import CorruptEntry, InvalidEntry, TierUnavailable
from dkv.kvstore.mac import EntryMac
from dkv.kvstore.redis_url import redact_url
from dkv.kvstore.tier import Frames, StorageTier

# Values of at most codec.MAX_FRAME_BYTES stay in jemalloc's 4 MiB size class (see kvstore.codec).
MAX_VALUE_BYTES = FRAME_LIMIT

# The scripts are atomic like MULTI/EXEC, but they can check a manifest and act on it in the same step
# (a MULTI/EXEC needs WATCH and retries for that, which starve when many writers publish the same
# popular prefix at once), and they take one round trip. Each declares every key it touches, all of
# one hash slot: the caller reads the manifest first to name the data keys of the version it frees,
# and the script refuses (-1, the caller reads again) when the manifest is no longer the one read.
# Declared keys are what lets Redis Cluster run a script while its slot migrates (it answers ASK or
# TRYAGAIN instead of touching half of an entry's keys on each master). Over maxmemory, Redis refuses
# a (no-shebang) script's write only while the script has written nothing yet, so an OOM never stops
# one half-way.
#
# The manifest the caller read is passed as two arguments: '1' and its bytes, or '0' and '' (none).
_SAME_MANIFEST_LUA = """
local function same_manifest(raw, present, read)
    if present == '1' then return raw == read end
    return not raw
end
"""

# Entry slot. KEYS: manifest, the staged data keys, the data keys of the version it replaces; ARGV:
# manifest json, number of staged keys, the manifest the caller read (2 arguments). Returns -1 if the
# manifest changed since, else the number of staged keys that were gone (0 = published).
_PUBLISH_LUA = (
    _SAME_MANIFEST_LUA
    + """
if not same_manifest(redis.call('GET', KEYS[1]), ARGV[3], ARGV[4]) then return -1 end
local staged = tonumber(ARGV[2])
local missing = 0
for i = 2, 1 + staged do
    if redis.call('EXISTS', KEYS[i]) == 0 then missing = missing + 1 end
end
if missing > 0 then
    for i = 2, 1 + staged do redis.call('DEL', KEYS[i]) end
    return missing
end
for i = 2, 1 + staged do redis.call('PERSIST', KEYS[i]) end
for i = 2 + staged, #KEYS do redis.call('DEL', KEYS[i]) end
redis.call('SET', KEYS[1], ARGV[1])
return 0
"""
)

# Entry slot. KEYS: manifest, data keys to delete; ARGV: the manifest the caller read (2 arguments),
# '1' to delete the manifest too. Returns -1 if the manifest changed since, else 1 if it deleted one.
_DISCARD_LUA = (
    _SAME_MANIFEST_LUA
    + """
local raw = redis.call('GET', KEYS[1])
if not same_manifest(raw, ARGV[1], ARGV[2]) then return -1 end
for i = 2, #KEYS do redis.call('DEL', KEYS[i]) end
if raw and ARGV[3] == '1' then
    redis.call('DEL', KEYS[1])
    return 1
end
return 0
"""
)

# Store slot. KEYS: index, versions, used; ARGV: entry key, total bytes, 'version:frames'. Counts the
# entry (again: a second call changes nothing).
_COUNT_LUA = """
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or 0) or 0
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('INCRBY', KEYS[3], tonumber(ARGV[2]) - old)
return 0
"""

# Store slot. KEYS: index, versions, used; ARGV: entry key, version ('' = whichever is counted).
# Stops counting the entry if it counts that version. Returns 1 if it did.
_UNCOUNT_LUA = """
local size = redis.call('HGET', KEYS[1], ARGV[1])
local ver = redis.call('HGET', KEYS[2], ARGV[1])
if not size and not ver then return 0 end
if ARGV[2] ~= '' and ver and string.match(ver, '^(%w+):') ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if size then redis.call('DECRBY', KEYS[3], tonumber(size) or 0) end
return 1
"""

# Store slot. KEYS: index, used. Sets used to the sum of the index (no key for 0, as on a fresh
# Redis); returns it.
_RECOUNT_LUA = """
local total = 0
for _, size in ipairs(redis.call('HVALS', KEYS[1])) do total = total + (tonumber(size) or 0) end
if total == 0 then redis.call('DEL', KEYS[2]) else redis.call('SET', KEYS[2], total) end
return total
"""

AUDIT_BATCH = 1000  # manifests read per pipelined round trip of an audit or an adoption
KEY_LOCKS = 64  # a process's steps on one key run one at a time: locks striped by key
CHANGED = -1  # what a script returns when the manifest is no longer the one the caller read
ATTEMPTS = 3  # reads of a manifest that another store keeps changing, before a call gives up


def _redis_call(what: str):
    """Turn any Redis, cluster or socket failure of the wrapped method into ``TierUnavailable``."""

    def decorate(method):
        @functools.wraps(method)
        def wrapper(self: RedisTier, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except TierUnavailable:
                raise
            except (redis.exceptions.RedisError, RedisClusterException, OSError) as e:
                raise self._unavailable(what, e) from e

        return wrapper

    return decorate


def _parse_version(text: bytes | None) -> tuple[str, int] | None:
    """(version, frames) of a versions-hash value ``version:frames``; None when absent or malformed."""
    if text is None:
        return None
    version, _, frames = text.decode(errors="replace").partition(":")
    return (version, int(frames)) if version.isalnum() and frames.isdigit() else None


class RedisTier(StorageTier):
    """Entries in the Redis at ``url`` (see the module docstring for the layout).

    ``cluster``: ``url`` is one node of a Redis Cluster. ``namespace`` prefixes every entry's keys and
    is the same for every store of a cluster; ``prefix`` prefixes this store's bookkeeping and is its
    own. ``capacity_bytes`` is what the store may count here (it makes room first); size Redis's
    ``maxmemory`` somewhat above the stores' sum, since Redis adds per-key overhead.
    ``staging_ttl_s`` is how long the data keys of an unfinished write live; ``socket_timeout_s``
    bounds every call. ``mac`` (the cluster secret's ``EntryMac``) signs every entry written and
    checks every one read.
    """

    remote = True
    shared = True

    def __init__(
        self,
        name: str,
        capacity_bytes: int,
        url: str,
        prefix: str = "dkv:",
        namespace: str = "dkv:",
        cluster: bool = False,
        staging_ttl_s: float = 60.0,
        socket_timeout_s: float = 2.0,
        mac: EntryMac | None = None,
    ):
        super().__init__(name, capacity_bytes)
        if staging_ttl_s <= 0:
            raise ValueError(f"tier {name}: staging_ttl_s {staging_ttl_s} must be > 0")
        if socket_timeout_s <= 0:
            raise ValueError(f"tier {name}: socket_timeout_s {socket_timeout_s} must be > 0")
        for what, text in (("prefix", prefix), ("namespace", namespace)):
            if not text or "{" in text or "}" in text:
                raise ValueError(f"tier {name}: {what} {text!r} must be non-empty, without braces (hash tags)")
        try:
            db = parse_url(url).get("db", 0)
        except ValueError as e:
            raise ValueError(f"tier {name}: bad redis url {redact_url(url)!r}: {e}") from e
        if cluster and int(db or 0) != 0:
            raise ValueError(
                f"tier {name}: redis url {redact_url(url)!r} names database {db}; a Redis Cluster has only database 0"
            )
        self.url = url
        self.prefix = prefix
        self.namespace = namespace
        self.cluster = cluster
        self.staging_ttl_ms = max(1, int(staging_ttl_s * 1000))
        self.socket_timeout_s = socket_timeout_s
        self.mac = mac
        self._book = [f"{{{prefix}}}index", f"{{{prefix}}}versions", f"{{{prefix}}}used"]
        self._index_key, self._versions_key, self._used_key = self._book
        self._key_locks = [threading.Lock() for _ in range(KEY_LOCKS)]
        self._connect_lock = threading.Lock()
        self._redis: redis.Redis | redis.RedisCluster | None = None

    # -- connection ---------------------------------------------------------------------------

    @property
    def _client(self) -> Any:
        """The client, made on first use: a ``RedisCluster`` reads the slot map from the cluster as it
        is made, which must not stop a store from starting while the cluster is down. Typed ``Any``:
        redis-py types every reply ``bytes | str`` (``decode_responses`` decides); this client's are bytes."""
        if self._redis is None:
            with self._connect_lock:
                if self._redis is None:
                    options = dict(
                        socket_timeout=self.socket_timeout_s,
                        socket_connect_timeout=self.socket_timeout_s,
                        socket_read_size=1 << 20,  # replies are MiB-sized frames: ~15% faster reads than 64 KiB
                        decode_responses=False,
                        # Fail fast, never retry: the store falls back to the other tiers (and a cluster
                        # client refreshes its slot map on the next call after a failure).
                        retry=Retry(NoBackoff(), 0),
                    )
                    client: redis.Redis | redis.RedisCluster
                    if self.cluster:
                        client = redis.RedisCluster.from_url(self.url, **options)
                    else:
                        client = redis.Redis.from_url(self.url, health_check_interval=30, **options)
                    # EVALSHA, loading the script again after a restart or a failover emptied its cache
                    self._publish_script = client.register_script(_PUBLISH_LUA)
                    self._discard_script = client.register_script(_DISCARD_LUA)
                    self._count_script = client.register_script(_COUNT_LUA)
                    self._uncount_script = client.register_script(_UNCOUNT_LUA)
                    self._recount_script = client.register_script(_RECOUNT_LUA)
                    self._redis = client
        return self._redis

    def _key_lock(self, key: EntryKey | str) -> threading.Lock:
        return self._key_locks[zlib.crc32(str(key).encode()) % KEY_LOCKS]

    # -- key layout -------------------------------------------------------------------------

    def _manifest_key(self, key: EntryKey | str) -> str:
        return f"{self.namespace}m:{{{key}}}"

    def _data_prefix(self, key: EntryKey | str) -> str:
        return f"{self.namespace}d:{{{key}}}:"

    def _data_keys(self, key: EntryKey | str, version: str, n: int) -> list[str]:
        base = self._data_prefix(key)
        return [f"{base}{version}:{i}" for i in range(n)]

    def _unavailable(self, what: str, e: BaseException) -> TierUnavailable:
        kind = "a Redis Cluster node" if self.cluster else "redis-server"
        # a cluster command fails on the node of its slot; the client raises RedisClusterException
        # (not a RedisError) when it reaches no node at all
        return TierUnavailable(
            f"redis tier {self.name} at {redact_url(self.url)}: {what} failed: {type(e).__name__}: {e} "
            f"(is {kind} running and reachable, and does it have memory left?)",
            partial=self.cluster and isinstance(e, redis.exceptions.RedisError),
        )

    @staticmethod
    def _parse_manifest(raw: bytes | None) -> tuple[str, list[int], str] | None:
        """(version, frame sizes, MAC or "") of a manifest; None when absent or malformed."""
        if raw is None:
            return None
        try:
            m = json.loads(raw)
            version, sizes, mac = m["v"], m["sizes"], m.get("mac", "")
            if (
                not isinstance(version, str)
                or not isinstance(mac, str)
                or not all(isinstance(s, int) and s >= 0 for s in sizes)
            ):
                return None
            return version, list(sizes), mac
        except (ValueError, TypeError, KeyError, AttributeError):
            return None

    # -- the atomic steps -------------------------------------------------------------------

    def _read_manifest(self, key: EntryKey | str) -> tuple[list[str], tuple[str, list[int], str] | None]:
        """(the manifest of ``key`` as the scripts take it back: '1' and its bytes, or '0' and ''; the
        manifest parsed, None when absent or malformed)."""
        raw = self._client.get(self._manifest_key(key))
        return (["0", ""] if raw is None else ["1", raw]), self._parse_manifest(raw)

    def _conflict(self, what: str, key: EntryKey | str) -> TierUnavailable:
        return TierUnavailable(
            f"redis tier {self.name}: {what} of {key} gave up: its manifest changed under each of "
            f"{ATTEMPTS} attempts (other stores are writing it); retry",
            partial=True,
        )

    def _discard(self, key: EntryKey | str, counted: tuple[str, int] | None, remove) -> bool:
        """In one atomic step: delete the published entry of ``key`` if ``remove(its version)`` says so (a
        malformed manifest always), and what is left of the ``counted`` version when it is not the one
        published. True if a manifest was deleted."""
        for _ in range(ATTEMPTS):
            read, manifest = self._read_manifest(key)
            version = manifest[0] if manifest else ""
            drop = read[0] == "1" and (manifest is None or remove(version))
            names = self._data_keys(key, version, len(manifest[1])) if drop and manifest else []
            if counted is not None and (drop or counted[0] != version):
                names += [n for n in self._data_keys(key, *counted) if n not in names]
            if not drop and not names:
                return False
            done = self._discard_script(keys=[self._manifest_key(key), *names], args=[*read, "1" if drop else "0"])
            if done != CHANGED:
                return bool(done)
        raise self._conflict("remove", key)

    def _count(self, key: EntryKey | str, sizes: list[int], version: str) -> None:
        self._count_script(keys=self._book, args=[str(key), sum(sizes), f"{version}:{len(sizes)}"])

    def _uncount(self, key: EntryKey | str, version: str = "") -> bool:
        return bool(self._uncount_script(keys=self._book, args=[str(key), version]))

    def _counted_version(self, key: EntryKey | str) -> tuple[str, int] | None:
        return _parse_version(self._client.hget(self._versions_key, str(key)))

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
        mac = self.mac.tag(views) if self.mac else ""
        try:
            self._stage(data_keys, views)
            with self._key_lock(key):
                self._publish(key, version, sizes, data_keys, mac)
                try:
                    self._count(key, sizes, version)
                except (redis.exceptions.TimeoutError, redis.exceptions.ConnectionError, OSError):
                    raise  # published, not counted: readable, and counted by the first store that reads it
                except BaseException:  # refused (an OOM): take the entry back out rather than leave it uncounted
                    self._quietly(self._discard, key, None, lambda published: published == version)
                    raise
        except (redis.exceptions.TimeoutError, redis.exceptions.ConnectionError, OSError):
            raise  # the connection is gone: a cleanup would wait out another timeout; the staging TTL frees them
        except BaseException:
            if data_keys:
                self._quietly(self._client.delete, *data_keys)
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
        for _ in range(ATTEMPTS):
            read, old = self._read_manifest(key)
            replaced = self._data_keys(key, old[0], len(old[1])) if old else []
            missing = self._publish_script(
                keys=[self._manifest_key(key), *data_keys, *replaced], args=[manifest, len(data_keys), *read]
            )
            if missing != CHANGED:
                break
        else:
            raise self._conflict("put", key)
        if missing:
            raise TierUnavailable(
                f"redis tier {self.name} at {redact_url(self.url)}: put of {key} failed: {missing} of "
                f"{len(data_keys)} staged frames expired before publish (staging_ttl_s="
                f"{self.staging_ttl_ms / 1000:g}); the write was too slow or Redis evicted them"
            )

    @staticmethod
    def _quietly(step, *args) -> None:
        """Best-effort cleanup after a failure (the staging TTL and the audit cover what this misses)."""
        try:
            step(*args)
        except (redis.exceptions.RedisError, RedisClusterException, OSError, TierUnavailable):
            pass

    @_redis_call("remove")
    def remove(self, key: EntryKey) -> bool:
        """Remove the entry: the version this store counts (whichever is published when it counts
        none, as for a Delete of an entry another store wrote), and this store's count of it."""
        with self._key_lock(key):
            counted = self._counted_version(key)
            removed = self._discard(key, counted, lambda published: counted is None or published == counted[0])
            return self._uncount(key, counted[0] if counted else "") or removed

    def _forget(self, key: EntryKey | str, broken: str = "") -> None:
        """After a read found ``key``'s version ``broken`` (a frame missing) or no manifest: remove that
        version if it is still the one published (and a malformed manifest), what is left of the version
        this store counts, and its count, unless the version it counts is the one published now (a write
        replaced the version the read had found: the new one is whole). Quiet: the read is a miss
        either way."""
        try:
            with self._key_lock(key):
                counted = self._counted_version(key)
                self._discard(key, counted, lambda published: published == broken)
                if counted is not None:
                    _, manifest = self._read_manifest(key)
                    if manifest is None or manifest[0] != counted[0]:
                        self._uncount(key, counted[0])
        except (redis.exceptions.RedisError, RedisClusterException, OSError, TierUnavailable):
            pass

    # -- reads ------------------------------------------------------------------------------

    @_redis_call("get")
    def get(self, key: EntryKey) -> list[bytes] | None:
        """The frames of ``key``, or None; raises ``CorruptEntry`` when they fail their MAC."""
        for _ in range(2):
            manifest = self._parse_manifest(self._client.get(self._manifest_key(key)))
            if manifest is None:
                self._forget(key)  # evicted (or never written): what this store still counts of it goes too
                return None
            version, sizes, mac = manifest
            frames = self._client.mget(self._data_keys(key, version, len(sizes))) if sizes else []
            if all(f is not None and len(f) == s for f, s in zip(frames, sizes)):
                self._check_mac(key, frames, mac)
                return frames
            # A frame is gone (maxmemory eviction, a flush, a failover) or this version was just replaced:
            # clean up only if the broken version is still the published one, then look again.
            self._forget(key, version)
        return None

    def _check_mac(self, key: EntryKey, frames: list[bytes], mac: str) -> None:
        if self.mac is not None and not (mac and self.mac.verify(frames, mac)):
            raise CorruptEntry(
                f"redis tier {self.name}: entry {key} {'fails its' if mac else 'has no'} MAC: it was "
                "not written by a store with this cluster secret (forged, or written before the "
                "secret was set)"
            )

    @_redis_call("header_frame")
    def header_frame(self, key: EntryKey) -> bytes | None:
        manifest = self._parse_manifest(self._client.get(self._manifest_key(key)))
        if manifest is None or not manifest[1]:
            return None
        version, sizes, _ = manifest
        frame = self._client.get(self._data_keys(key, version, 1)[0])
        if frame is None or len(frame) != sizes[0]:
            self._forget(key, version)
            return None
        return frame

    @_redis_call("adopt")
    def adopt(self, keys: Sequence[EntryKey]) -> dict[EntryKey, bytes]:
        """Count the entries of ``keys`` that are here (another store wrote them) as this store's too,
        and return their header frames: two pipelined reads, then one count per entry found."""
        found = {}
        for start in range(0, len(keys), AUDIT_BATCH):
            batch = keys[start : start + AUDIT_BATCH]
            manifests = [self._parse_manifest(raw) for raw in self._pipelined("get", map(self._manifest_key, batch))]
            present = [(key, m) for key, m in zip(batch, manifests) if m is not None and m[1]]
            heads = self._pipelined("get", (self._data_keys(key, m[0], 1)[0] for key, m in present))
            for (key, (version, sizes, _)), head in zip(present, heads):
                if head is None or len(head) != sizes[0]:
                    self._forget(key, version)
                    continue
                with self._key_lock(key):
                    self._count(key, sizes, version)
                found[key] = head
        return found

    def _pipelined(self, command: str, names: Iterable[str]) -> list:
        """``command`` on each of ``names`` in one pipelined round trip (per node on a cluster)."""
        names = list(names)
        if not names:
            return []
        with self._client.pipeline(transaction=False) as pipe:
            for name in names:
                getattr(pipe, command)(name)
            return pipe.execute()

    @_redis_call("contains")
    def contains(self, key: EntryKey) -> bool:
        return bool(self._client.exists(self._manifest_key(key)))

    @_redis_call("batch_contains")
    def batch_contains(self, keys: Iterable[EntryKey]) -> int:
        n = 0
        for present in self._pipelined("exists", map(self._manifest_key, keys)):
            if not present:
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
        """Repair this store's bookkeeping against the manifests of the entries it counts (see the
        module docstring) and return the bytes of each. Reads only those manifests, in pipelined
        batches of ``AUDIT_BATCH``; each repair is one atomic step."""
        index = self._client.hgetall(self._index_key)
        versions = self._client.hgetall(self._versions_key)
        names = sorted(set(index) | set(versions))
        for start in range(0, len(names), AUDIT_BATCH):
            batch = [n.decode(errors="replace") for n in names[start : start + AUDIT_BATCH]]
            raws = self._pipelined("get", map(self._manifest_key, batch))
            for name, field, raw in zip(batch, names[start : start + AUDIT_BATCH], raws):
                manifest = self._parse_manifest(raw)
                counted = _parse_version(versions.get(field))
                if manifest is None:  # gone (or malformed): what is left of it, and its count
                    self._forget(name)
                    continue
                with self._key_lock(name):
                    if counted != (manifest[0], len(manifest[1])) or index.get(field) != str(sum(manifest[1])).encode():
                        self._count(name, manifest[1], manifest[0])  # replaced by another write, or a hash was lost
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
        client, self._redis = self._redis, None
        if client is None:
            return
        try:
            client.close()
            if isinstance(client, redis.Redis):
                client.connection_pool.disconnect()
        except (redis.exceptions.RedisError, RedisClusterException, OSError):
            pass

    def __repr__(self) -> str:
        return (
            f"RedisTier({self.name!r}, {redact_url(self.url)}, namespace={self.namespace!r}, "
            f"prefix={self.prefix!r}{', cluster' if self.cluster else ''})"
        )


__all__ = ["RedisTier", "MAX_VALUE_BYTES"]
