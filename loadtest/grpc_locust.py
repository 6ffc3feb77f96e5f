"""gRPC calls reported to locust: a client interceptor, and a way to put it on any client's channel.

``LocustInterceptor`` fires locust's ``request`` event once per call, for all four kinds of RPC:

- unary and client-streaming calls (Lookup, Stats, Put): when the response (or the error) is in;
- server-streaming calls (Get, Generate): when the stream is fully consumed, with the bytes of
  every message received as ``response_length``. A stream dropped before its end is not reported
  (locust stopping a user mid-call is not a result).

``name`` is the method (``Put``, ``Generate``). A ``classify`` function may turn an outcome into
another name and decide whether an error is expected: a Get answered NOT_FOUND is a cache miss
(``Get (miss)``, a success), not a failure. See ``store_outcome``.

The dkv clients (``StoreClient``, ``DkvClient``) make their channels themselves, so
``intercepted(interceptor)`` wraps every channel that ``grpc.insecure_channel`` or
``grpc.secure_channel`` creates while it is active: construct the client inside it. The client's
own code (and any interceptor it adds, e.g. for a token) is unchanged.

Under locust, call ``grpc.experimental.gevent.init_gevent()`` before any channel exists (the
locustfile does), or every call blocks the whole process instead of its own greenlet.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

# classify(method, response or None, error or None) -> (name, exception to report or None)
Classifier = Callable[[str, Any, "grpc.RpcError | None"], tuple[str, "BaseException | None"]]


def message_bytes(message: Any) -> int:
    """Wire size of a received message: protobuf messages, or raw frames (bytes / memoryview)."""
    if message is None:
        return 0
    if isinstance(message, (bytes, bytearray)):
        return len(message)
    if isinstance(message, memoryview):
        return message.nbytes
    size = getattr(message, "ByteSize", None)
    return int(size()) if size else 0


def default_classify(method: str, response: Any, error: grpc.RpcError | None) -> tuple[str, BaseException | None]:
    return method, error


def store_outcome(method: str, response: Any, error: grpc.RpcError | None) -> tuple[str, BaseException | None]:
    """The KV store's expected misses: NOT_FOUND from Get/Summaries/Select, ``hit=False`` from Lookup.

    DATA_LOSS stays a failure: the store found a corrupted entry, which a load test must flag.
    """
    if error is not None:
        code = error.code() if hasattr(error, "code") else None
        if method in ("Get", "Summaries", "Select") and code == grpc.StatusCode.NOT_FOUND:
            return f"{method} (miss)", None
        return method, error
    if method == "Lookup" and response is not None and not getattr(response, "hit", True):
        return "Lookup (miss)", None
    return method, None


def _method_name(details: grpc.ClientCallDetails) -> str:
    method = details.method
    if isinstance(method, bytes):
        method = method.decode()
    return method.rsplit("/", 1)[-1]


class _WatchedStream:
    """A server-streaming call that reports itself when its iteration ends (or fails).

    Iterates like the call and forwards everything else (``trailing_metadata``, ``code``,
    ``cancel``...) to it, so a client that reads trailing metadata after the stream still works.
    """

    def __init__(self, call, report: Callable[[Any, grpc.RpcError | None, int], None]):
        self._call, self._report = call, report
        self._bytes, self._last, self._done = 0, None, False

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        try:
            message = next(self._call)
        except StopIteration:
            self._finish(None)
            raise
        except grpc.RpcError as e:
            self._finish(e)
            raise
        self._bytes += message_bytes(message)
        self._last = message
        return message

    def _finish(self, error: grpc.RpcError | None) -> None:
        if not self._done:
            self._done = True
            self._report(self._last, error, self._bytes)

    def __getattr__(self, name: str):
        return getattr(self._call, name)


class LocustInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Reports every call through ``fire`` (locust's ``environment.events.request.fire``)."""

    def __init__(self, fire: Callable[..., None], classify: Classifier = default_classify, request_type: str = "grpc"):
        self.fire, self.classify, self.request_type = fire, classify, request_type

    def _reporter(self, method: str, started: float) -> Callable[[Any, grpc.RpcError | None, int], None]:
        def report(response: Any, error: grpc.RpcError | None, nbytes: int) -> None:
            elapsed_ms = (time.perf_counter() - started) * 1e3
            name, exception = self.classify(method, response, error)
            if isinstance(exception, grpc.RpcError):
                exception = CallFailed.of(exception)
            self.fire(
                request_type=self.request_type,
                name=name,
                response_time=elapsed_ms,
                response_length=nbytes,
                exception=exception,
                context={},
            )

        return report

    def _unary_response(self, continuation, details, request):
        method, started = _method_name(details), time.perf_counter()
        report = self._reporter(method, started)
        try:
            outcome = continuation(details, request)
        except grpc.RpcError as e:  # raised before a call object existed
            report(None, e, 0)
            raise

        def done(future) -> None:
            error = future.exception()
            if error is not None and not isinstance(error, grpc.RpcError):
                error = _as_rpc_error(error)
            response = None if error is not None else future.result()
            report(response, error, message_bytes(response))

        outcome.add_done_callback(done)
        return outcome

    def _stream_response(self, continuation, details, request):
        method, started = _method_name(details), time.perf_counter()
        report = self._reporter(method, started)
        try:
            call = continuation(details, request)
        except grpc.RpcError as e:
            report(None, e, 0)
            raise
        return _WatchedStream(call, report)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return self._unary_response(continuation, client_call_details, request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return self._unary_response(continuation, client_call_details, request_iterator)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return self._stream_response(continuation, client_call_details, request)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return self._stream_response(continuation, client_call_details, request_iterator)


class CallFailed(Exception):
    """A failed call as locust shows it: ``NOT_FOUND: <details>`` (not the call object's long repr,
    whose debug string differs on every call and would split locust's failure table)."""

    def __init__(self, code: grpc.StatusCode | None, details: str):
        super().__init__(f"{code.name if code else 'UNKNOWN'}: {details}")
        self.code, self.details = code, details

    @classmethod
    def of(cls, error: grpc.RpcError) -> CallFailed:
        code = error.code() if callable(getattr(error, "code", None)) else None
        details = error.details() if callable(getattr(error, "details", None)) else str(error)
        return cls(code, details or "")


class _LocalError(grpc.RpcError):
    """A client-side exception (e.g. a serializer's) reported as a failed call."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error

    def code(self):
        return grpc.StatusCode.UNKNOWN

    def details(self):
        return f"{type(self.error).__name__}: {self.error}"


def _as_rpc_error(error: BaseException) -> grpc.RpcError:
    return error if isinstance(error, grpc.RpcError) else _LocalError(error)


@contextlib.contextmanager
def intercepted(interceptor: grpc.UnaryUnaryClientInterceptor) -> Iterator[None]:
    """While active, every channel made by ``grpc.insecure_channel``/``secure_channel`` is intercepted."""
    insecure, secure = grpc.insecure_channel, grpc.secure_channel

    def insecure_channel(*args, **kwargs):
        return grpc.intercept_channel(insecure(*args, **kwargs), interceptor)

    def secure_channel(*args, **kwargs):
        return grpc.intercept_channel(secure(*args, **kwargs), interceptor)

    grpc.insecure_channel, grpc.secure_channel = insecure_channel, secure_channel
    try:
        yield
    finally:
        grpc.insecure_channel, grpc.secure_channel = insecure, secure
