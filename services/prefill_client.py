"""Python client of the Prefill service (used by the decode worker to recompute a missing entry)."""

from __future__ import annotations

from dkv.kvstore import codec
from dkv.kvstore.entry import CompressedKV, Recipe
from dkv.services.pb import prefill_pb2, prefill_pb2_grpc
from dkv.services.transport import Security, call_metadata, open_channel
from dkv.services.wire import parse_frame_message, recipe_to_proto


class PrefillClient:
    def __init__(self, address: str, timeout_s: float = 600.0, security: Security | None = None):
        self.address, self.timeout_s, self.security = address, timeout_s, security
        self.channel = open_channel(address, security, balanced=True)
        self.stub = prefill_pb2_grpc.PrefillStub(self.channel)
        self._entries = self.channel.unary_stream(
            "/dkv.v1.Prefill/Entries",
            request_serializer=prefill_pb2.PrefillRequest.SerializeToString,
            response_deserializer=parse_frame_message,
        )

    def prefill(self, token_ids: list[int], recipe: Recipe, tenant: str = "default") -> prefill_pb2.PrefillResponse:
        request = prefill_pb2.PrefillRequest(recipe=recipe_to_proto(recipe), tenant=tenant)
        request.token_ids.ids.extend(token_ids)
        return self.stub.Prefill(request, timeout=self.timeout_s, metadata=call_metadata(self.security))

    def keys(self, token_ids: list[int], recipe: Recipe, tenant: str = "default") -> list[str]:
        """The entry keys of the context, prefilled if needed."""
        return list(self.prefill(token_ids, recipe, tenant).keys)

    def entries(self, token_ids: list[int], recipe: Recipe, tenant: str = "default") -> list[CompressedKV]:
        """The entries of the context themselves, prefilled if needed (for when the store cannot
        give them); each checked as a store Get's are."""
        request = prefill_pb2.PrefillRequest(recipe=recipe_to_proto(recipe), tenant=tenant)
        request.token_ids.ids.extend(token_ids)
        frames = self._entries(request, timeout=self.timeout_s, metadata=call_metadata(self.security))
        return [codec.decode(group) for group in codec.entries_of(frames)]

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> PrefillClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
