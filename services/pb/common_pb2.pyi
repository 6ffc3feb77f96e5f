from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Recipe(_message.Message):
    __slots__ = ("method", "ratio", "budget", "quant", "chunk_size", "params", "chunked")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    METHOD_FIELD_NUMBER: _ClassVar[int]
    RATIO_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    QUANT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    CHUNKED_FIELD_NUMBER: _ClassVar[int]
    method: str
    ratio: float
    budget: int
    quant: str
    chunk_size: int
    params: _containers.ScalarMap[str, float]
    chunked: bool
    def __init__(self, method: _Optional[str] = ..., ratio: _Optional[float] = ..., budget: _Optional[int] = ..., quant: _Optional[str] = ..., chunk_size: _Optional[int] = ..., params: _Optional[_Mapping[str, float]] = ..., chunked: _Optional[bool] = ...) -> None: ...
