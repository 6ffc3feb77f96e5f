from dkv.services.pb import common_pb2 as _common_pb2
from dkv.services.pb import decode_pb2 as _decode_pb2
from dkv.services.pb import prefill_pb2 as _prefill_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("context_text", "context_ids", "query_text", "query_ids", "chat_template", "recipe", "selection", "budget", "budget_fraction", "max_new_tokens", "temperature", "top_p", "seed", "stop", "tenant", "ignore_eos")
    CONTEXT_TEXT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_IDS_FIELD_NUMBER: _ClassVar[int]
    QUERY_TEXT_FIELD_NUMBER: _ClassVar[int]
    QUERY_IDS_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FRACTION_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    context_text: str
    context_ids: _prefill_pb2.TokenIds
    query_text: str
    query_ids: _prefill_pb2.TokenIds
    chat_template: bool
    recipe: _common_pb2.Recipe
    selection: str
    budget: int
    budget_fraction: float
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    tenant: str
    ignore_eos: bool
    def __init__(self, context_text: _Optional[str] = ..., context_ids: _Optional[_Union[_prefill_pb2.TokenIds, _Mapping]] = ..., query_text: _Optional[str] = ..., query_ids: _Optional[_Union[_prefill_pb2.TokenIds, _Mapping]] = ..., chat_template: _Optional[bool] = ..., recipe: _Optional[_Union[_common_pb2.Recipe, _Mapping]] = ..., selection: _Optional[str] = ..., budget: _Optional[int] = ..., budget_fraction: _Optional[float] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., tenant: _Optional[str] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class GenerateStats(_message.Message):
    __slots__ = ("cache_hit", "context_tokens", "cached_prefix_tokens", "prefilled_tokens", "entry_bytes", "compression_ratio", "ttft_ms", "tokens_per_second", "new_tokens", "bytes_fetched_by_tier", "prefill_ms", "decode_worker", "finish_reason", "decode", "cache_stored", "not_stored_reason")
    class BytesFetchedByTierEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILLED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ENTRY_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_RATIO_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FETCHED_BY_TIER_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_WORKER_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    CACHE_STORED_FIELD_NUMBER: _ClassVar[int]
    NOT_STORED_REASON_FIELD_NUMBER: _ClassVar[int]
    cache_hit: bool
    context_tokens: int
    cached_prefix_tokens: int
    prefilled_tokens: int
    entry_bytes: int
    compression_ratio: float
    ttft_ms: float
    tokens_per_second: float
    new_tokens: int
    bytes_fetched_by_tier: _containers.ScalarMap[str, int]
    prefill_ms: float
    decode_worker: str
    finish_reason: str
    decode: _decode_pb2.DecodeStats
    cache_stored: bool
    not_stored_reason: str
    def __init__(self, cache_hit: _Optional[bool] = ..., context_tokens: _Optional[int] = ..., cached_prefix_tokens: _Optional[int] = ..., prefilled_tokens: _Optional[int] = ..., entry_bytes: _Optional[int] = ..., compression_ratio: _Optional[float] = ..., ttft_ms: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., new_tokens: _Optional[int] = ..., bytes_fetched_by_tier: _Optional[_Mapping[str, int]] = ..., prefill_ms: _Optional[float] = ..., decode_worker: _Optional[str] = ..., finish_reason: _Optional[str] = ..., decode: _Optional[_Union[_decode_pb2.DecodeStats, _Mapping]] = ..., cache_stored: _Optional[bool] = ..., not_stored_reason: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token", "stats")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    token: _decode_pb2.GeneratedToken
    stats: GenerateStats
    def __init__(self, token: _Optional[_Union[_decode_pb2.GeneratedToken, _Mapping]] = ..., stats: _Optional[_Union[GenerateStats, _Mapping]] = ...) -> None: ...
