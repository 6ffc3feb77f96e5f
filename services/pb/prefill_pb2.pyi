from dkv.services.pb import common_pb2 as _common_pb2
from dkv.services.pb import store_pb2 as _store_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("text", "token_ids", "recipe", "tenant")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: TokenIds
    recipe: _common_pb2.Recipe
    tenant: str
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., recipe: _Optional[_Union[_common_pb2.Recipe, _Mapping]] = ..., tenant: _Optional[str] = ...) -> None: ...

class PrefillTimings(_message.Message):
    __slots__ = ("lookup_ms", "fetch_ms", "prefill_ms", "compress_ms", "store_ms", "total_ms")
    LOOKUP_MS_FIELD_NUMBER: _ClassVar[int]
    FETCH_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    COMPRESS_MS_FIELD_NUMBER: _ClassVar[int]
    STORE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    lookup_ms: float
    fetch_ms: float
    prefill_ms: float
    compress_ms: float
    store_ms: float
    total_ms: float
    def __init__(self, lookup_ms: _Optional[float] = ..., fetch_ms: _Optional[float] = ..., prefill_ms: _Optional[float] = ..., compress_ms: _Optional[float] = ..., store_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("keys", "model_fingerprint", "context_tokens", "cached_tokens", "prefilled_tokens", "stored_bytes", "full_bytes", "kept_tokens_per_layer", "importance", "timings", "cache_stored", "not_stored_reason")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILLED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    FULL_BYTES_FIELD_NUMBER: _ClassVar[int]
    KEPT_TOKENS_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    IMPORTANCE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    CACHE_STORED_FIELD_NUMBER: _ClassVar[int]
    NOT_STORED_REASON_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    model_fingerprint: str
    context_tokens: int
    cached_tokens: int
    prefilled_tokens: int
    stored_bytes: int
    full_bytes: int
    kept_tokens_per_layer: _containers.RepeatedScalarFieldContainer[int]
    importance: float
    timings: PrefillTimings
    cache_stored: bool
    not_stored_reason: str
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., model_fingerprint: _Optional[str] = ..., context_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., prefilled_tokens: _Optional[int] = ..., stored_bytes: _Optional[int] = ..., full_bytes: _Optional[int] = ..., kept_tokens_per_layer: _Optional[_Iterable[int]] = ..., importance: _Optional[float] = ..., timings: _Optional[_Union[PrefillTimings, _Mapping]] = ..., cache_stored: _Optional[bool] = ..., not_stored_reason: _Optional[str] = ...) -> None: ...
