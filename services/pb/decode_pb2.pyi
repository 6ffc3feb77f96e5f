from dkv.services.pb import common_pb2 as _common_pb2
from dkv.services.pb import prefill_pb2 as _prefill_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DecodeRequest(_message.Message):
    __slots__ = ("keys", "context_text", "context_ids", "recipe", "query_text", "query_ids", "selection", "budget", "budget_fraction", "selection_cache", "paged", "max_new_tokens", "temperature", "top_p", "seed", "tenant", "ignore_eos")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TEXT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_IDS_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    QUERY_TEXT_FIELD_NUMBER: _ClassVar[int]
    QUERY_IDS_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SELECTION_CACHE_FIELD_NUMBER: _ClassVar[int]
    PAGED_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    context_text: str
    context_ids: _prefill_pb2.TokenIds
    recipe: _common_pb2.Recipe
    query_text: str
    query_ids: _prefill_pb2.TokenIds
    selection: str
    budget: int
    budget_fraction: float
    selection_cache: float
    paged: bool
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    tenant: str
    ignore_eos: bool
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., context_text: _Optional[str] = ..., context_ids: _Optional[_Union[_prefill_pb2.TokenIds, _Mapping]] = ..., recipe: _Optional[_Union[_common_pb2.Recipe, _Mapping]] = ..., query_text: _Optional[str] = ..., query_ids: _Optional[_Union[_prefill_pb2.TokenIds, _Mapping]] = ..., selection: _Optional[str] = ..., budget: _Optional[int] = ..., budget_fraction: _Optional[float] = ..., selection_cache: _Optional[float] = ..., paged: _Optional[bool] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., tenant: _Optional[str] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class GeneratedToken(_message.Message):
    __slots__ = ("id", "text")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    id: int
    text: str
    def __init__(self, id: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class DecodeStats(_message.Message):
    __slots__ = ("new_tokens", "mean_selected_per_step", "cached_slots", "selected_per_step", "bytes_fetched_by_tier", "fetch_ms", "query_ms", "ms_per_token", "prefilled", "context_tokens")
    class BytesFetchedByTierEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEAN_SELECTED_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    CACHED_SLOTS_FIELD_NUMBER: _ClassVar[int]
    SELECTED_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    BYTES_FETCHED_BY_TIER_FIELD_NUMBER: _ClassVar[int]
    FETCH_MS_FIELD_NUMBER: _ClassVar[int]
    QUERY_MS_FIELD_NUMBER: _ClassVar[int]
    MS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PREFILLED_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    new_tokens: int
    mean_selected_per_step: float
    cached_slots: int
    selected_per_step: _containers.RepeatedScalarFieldContainer[float]
    bytes_fetched_by_tier: _containers.ScalarMap[str, int]
    fetch_ms: float
    query_ms: float
    ms_per_token: float
    prefilled: bool
    context_tokens: int
    def __init__(self, new_tokens: _Optional[int] = ..., mean_selected_per_step: _Optional[float] = ..., cached_slots: _Optional[int] = ..., selected_per_step: _Optional[_Iterable[float]] = ..., bytes_fetched_by_tier: _Optional[_Mapping[str, int]] = ..., fetch_ms: _Optional[float] = ..., query_ms: _Optional[float] = ..., ms_per_token: _Optional[float] = ..., prefilled: _Optional[bool] = ..., context_tokens: _Optional[int] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("token", "stats")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    token: GeneratedToken
    stats: DecodeStats
    def __init__(self, token: _Optional[_Union[GeneratedToken, _Mapping]] = ..., stats: _Optional[_Union[DecodeStats, _Mapping]] = ...) -> None: ...
