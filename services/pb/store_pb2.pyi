from dkv.services.pb import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class LayerSummary(_message.Message):
    __slots__ = ("layer", "head_counts", "page_min", "page_max", "seq_len", "num_layers", "num_kv_heads", "head_dim", "page_size", "checksum")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HEAD_COUNTS_FIELD_NUMBER: _ClassVar[int]
    PAGE_MIN_FIELD_NUMBER: _ClassVar[int]
    PAGE_MAX_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    layer: int
    head_counts: Tensor
    page_min: Tensor
    page_max: Tensor
    seq_len: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    checksum: int
    def __init__(self, layer: _Optional[int] = ..., head_counts: _Optional[_Union[Tensor, _Mapping]] = ..., page_min: _Optional[_Union[Tensor, _Mapping]] = ..., page_max: _Optional[_Union[Tensor, _Mapping]] = ..., seq_len: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., page_size: _Optional[int] = ..., checksum: _Optional[int] = ...) -> None: ...

class SelectRequest(_message.Message):
    __slots__ = ("key", "layer", "pages")
    KEY_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    key: str
    layer: int
    pages: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, key: _Optional[str] = ..., layer: _Optional[int] = ..., pages: _Optional[_Iterable[int]] = ...) -> None: ...

class LayerPages(_message.Message):
    __slots__ = ("layer", "pages", "tensors", "tier", "checksum")
    class TensorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    LAYER_FIELD_NUMBER: _ClassVar[int]
    PAGES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    layer: int
    pages: _containers.RepeatedScalarFieldContainer[int]
    tensors: _containers.MessageMap[str, Tensor]
    tier: str
    checksum: int
    def __init__(self, layer: _Optional[int] = ..., pages: _Optional[_Iterable[int]] = ..., tensors: _Optional[_Mapping[str, Tensor]] = ..., tier: _Optional[str] = ..., checksum: _Optional[int] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("key", "stored_bytes", "tier", "replaced")
    KEY_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    key: str
    stored_bytes: int
    tier: str
    replaced: bool
    def __init__(self, key: _Optional[str] = ..., stored_bytes: _Optional[int] = ..., tier: _Optional[str] = ..., replaced: _Optional[bool] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: str
    def __init__(self, key: _Optional[str] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("tenant", "model_fingerprint", "recipe", "token_ids")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    model_fingerprint: str
    recipe: _common_pb2.Recipe
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, tenant: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., recipe: _Optional[_Union[_common_pb2.Recipe, _Mapping]] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("hit", "keys", "cached_tokens", "tiers", "stored_bytes", "importance", "kept_tokens_per_layer")
    HIT_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    IMPORTANCE_FIELD_NUMBER: _ClassVar[int]
    KEPT_TOKENS_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    hit: bool
    keys: _containers.RepeatedScalarFieldContainer[str]
    cached_tokens: int
    tiers: _containers.RepeatedScalarFieldContainer[str]
    stored_bytes: _containers.RepeatedScalarFieldContainer[int]
    importance: _containers.RepeatedScalarFieldContainer[float]
    kept_tokens_per_layer: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, hit: _Optional[bool] = ..., keys: _Optional[_Iterable[str]] = ..., cached_tokens: _Optional[int] = ..., tiers: _Optional[_Iterable[str]] = ..., stored_bytes: _Optional[_Iterable[int]] = ..., importance: _Optional[_Iterable[float]] = ..., kept_tokens_per_layer: _Optional[_Iterable[int]] = ...) -> None: ...

class ProbeRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, keys: _Optional[_Iterable[str]] = ...) -> None: ...

class ProbedEntry(_message.Message):
    __slots__ = ("key", "present", "start", "tier", "stored_bytes", "importance", "kept_tokens_per_layer")
    KEY_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    IMPORTANCE_FIELD_NUMBER: _ClassVar[int]
    KEPT_TOKENS_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    key: str
    present: bool
    start: int
    tier: str
    stored_bytes: int
    importance: float
    kept_tokens_per_layer: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, key: _Optional[str] = ..., present: _Optional[bool] = ..., start: _Optional[int] = ..., tier: _Optional[str] = ..., stored_bytes: _Optional[int] = ..., importance: _Optional[float] = ..., kept_tokens_per_layer: _Optional[_Iterable[int]] = ...) -> None: ...

class ProbeResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[ProbedEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[ProbedEntry, _Mapping]]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: str
    def __init__(self, key: _Optional[str] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("name", "entries", "used_bytes", "capacity_bytes", "healthy", "hits", "errors", "quota_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    QUOTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    entries: int
    used_bytes: int
    capacity_bytes: int
    healthy: bool
    hits: int
    errors: int
    quota_bytes: int
    def __init__(self, name: _Optional[str] = ..., entries: _Optional[int] = ..., used_bytes: _Optional[int] = ..., capacity_bytes: _Optional[int] = ..., healthy: _Optional[bool] = ..., hits: _Optional[int] = ..., errors: _Optional[int] = ..., quota_bytes: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("tiers", "entries", "hits", "misses", "evictions", "demotions", "promotions", "checksum_failures", "puts", "rejected_puts", "over_quota", "lost", "tenant", "tenants")
    TIERS_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    DEMOTIONS_FIELD_NUMBER: _ClassVar[int]
    PROMOTIONS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FAILURES_FIELD_NUMBER: _ClassVar[int]
    PUTS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_PUTS_FIELD_NUMBER: _ClassVar[int]
    OVER_QUOTA_FIELD_NUMBER: _ClassVar[int]
    LOST_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    tiers: _containers.RepeatedCompositeFieldContainer[TierStats]
    entries: int
    hits: int
    misses: int
    evictions: int
    demotions: int
    promotions: int
    checksum_failures: int
    puts: int
    rejected_puts: int
    over_quota: int
    lost: int
    tenant: str
    tenants: _containers.RepeatedCompositeFieldContainer[StatsResponse]
    def __init__(self, tiers: _Optional[_Iterable[_Union[TierStats, _Mapping]]] = ..., entries: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., evictions: _Optional[int] = ..., demotions: _Optional[int] = ..., promotions: _Optional[int] = ..., checksum_failures: _Optional[int] = ..., puts: _Optional[int] = ..., rejected_puts: _Optional[int] = ..., over_quota: _Optional[int] = ..., lost: _Optional[int] = ..., tenant: _Optional[str] = ..., tenants: _Optional[_Iterable[_Union[StatsResponse, _Mapping]]] = ...) -> None: ...
