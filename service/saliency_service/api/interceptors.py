"""One server interceptor at the seam: bearer-token check, admission while draining, request metrics, the message-size
cap, and error mapping."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

import grpc
from grpc.aio import ServerInterceptor

from saliency_service.api.errors import status_code, to_status
from saliency_service.core.errors import (
    Internal,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    SaliencyError,
    Unauthenticated,
    Unavailable,
)
from saliency_service.observability import metrics

log = logging.getLogger(__name__)
SERVICE_PREFIXES = ("/saliency.v1.SaliencyService/", "/inference.GRPCInferenceService/")
UNKNOWN = "unknown"
Context = grpc.aio.ServicerContext[Any, Any]


class AdmissionGate:
    """Admits calls while open and counts those running, so that shutdown can drain before the transport stops.

    Closing the gate first, while the transport still accepts connections, means that every call that
    reaches the server after SIGTERM is answered UNAVAILABLE with a reason, health answers NOT_SERVING,
    and the transport is stopped only once nothing admitted is still running and no call has arrived for
    a short quiet period. Stopping the transport while calls still arrive lets grpc answer those that
    had not reached a handler yet with CANCELLED instead of UNAVAILABLE (grpc/grpc issue 41785), and a
    client treats CANCELLED as its own doing, not as a reason to retry elsewhere.
    """

    def __init__(self) -> None:
        self.open = False
        self.last_arrival = 0.0
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def running(self) -> int:
        return self._running

    def enter(self) -> None:
        """Admit one call, or raise UNAVAILABLE when the server is shutting down."""
        self.last_arrival = time.monotonic()
        if not self.open:
            raise Unavailable(
                "SHUTTING_DOWN", "the server is shutting down and takes no new calls; retry, and the call goes to another replica"
            )
        self._running += 1
        self._idle.clear()

    def leave(self) -> None:
        self._running -= 1
        if self._running == 0:
            self._idle.set()

    async def drained(self, timeout: float, quiet: float = 0.5) -> bool:
        """Wait until no admitted call is running and none has arrived for `quiet` seconds.

        False when `timeout` seconds pass first with admitted calls still running.
        """
        end = time.monotonic() + timeout
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        while (wait := min(self.last_arrival + quiet, end) - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        return True


class SaliencyInterceptor(ServerInterceptor):
    """Wraps every SaliencyService and inference handler (unary and server-streaming); health and reflection pass through."""

    def __init__(
        self,
        max_message_bytes: int,
        known_models: Callable[[], Collection[str]],
        known_methods: Callable[[], Collection[str]],
        tokens: Collection[str] = (),
        gate: AdmissionGate | None = None,
    ) -> None:
        self.max_message_bytes = max_message_bytes
        self.gate = gate
        self._models = known_models
        self._methods = known_methods
        self._tokens = [token.encode() for token in tokens]

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(SERVICE_PREFIXES):
            return handler
        rpc = details.method.rsplit("/", 1)[-1]
        credentials = self._credentials(details)
        deserialize = handler.request_deserializer
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def one(request: Any, context: Context) -> AsyncIterator[Any]:
                yield await unary(request, context)  # type: ignore[arg-type]  # grpc's stubs type handlers as sync

            async def behavior(raw: bytes, context: Context) -> Any:
                responses = [r async for r in self._guarded(rpc, credentials, deserialize, one, raw, context)]
                return responses[0]

            return grpc.unary_unary_rpc_method_handler(behavior, request_deserializer=None, response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            stream = handler.unary_stream

            def many(request: Any, context: Context) -> AsyncIterator[Any]:
                return stream(request, context)  # type: ignore[arg-type, return-value]  # grpc.aio: an async generator

            async def streaming(raw: bytes, context: Context) -> AsyncIterator[Any]:
                # An async generator function itself: grpc.aio tells streaming handlers by that.
                async for response in self._guarded(rpc, credentials, deserialize, many, raw, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(
                streaming, request_deserializer=None, response_serializer=handler.response_serializer
            )
        return handler

    async def _guarded(
        self,
        rpc: str,
        credentials: SaliencyError | None,
        deserialize: Callable[[bytes], Any] | None,
        inner: Callable[[Any, Context], AsyncIterator[Any]],
        raw: bytes,
        context: Context,
    ) -> AsyncIterator[Any]:
        """Parse, check credentials, admission and size, run `inner`, count it, and map errors to statuses."""
        # grpc answers a request it cannot parse with UNKNOWN and no ErrorInfo; parse here instead.
        try:
            request: Any = deserialize(raw) if deserialize is not None else raw
        except Exception:
            await context.abort_with_status(
                to_status(InvalidArgument("MALFORMED_REQUEST", f"the request is not a valid serialized {rpc} request message"))
            )
        # SaliencyService names the model `model`; the Open Inference Protocol `model_name` or `name`.
        model = getattr(request, "model", "") or getattr(request, "model_name", "") or getattr(request, "name", "") or ""
        model = model if model in self._models() else (UNKNOWN if model else "")
        method = getattr(request, "method", "") or getattr(request, "metric", "") or ""
        method = method if method in self._methods() else (UNKNOWN if method else "")
        code = grpc.StatusCode.OK
        failure: SaliencyError | None = None
        start = time.perf_counter()
        metrics.IN_FLIGHT.labels(rpc).inc()
        admitted = False
        try:
            if credentials is not None:
                raise credentials
            if self.gate is not None:
                self.gate.enter()
                admitted = True
            size = request.ByteSize()
            if size > self.max_message_bytes:
                raise ResourceExhausted(
                    "MESSAGE_TOO_LARGE",
                    f"the request is {size} bytes; the server accepts at most {self.max_message_bytes} "
                    "(max_message_bytes): send fewer or smaller images",
                    {"limit": self.max_message_bytes, "size": size},
                )
            async for response in inner(request, context):
                yield response
            return
        except SaliencyError as error:
            failure = error
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except Exception:
            log.exception("unexpected error in %s", rpc)
            failure = Internal("INTERNAL", "the server failed unexpectedly; the error is logged")
        finally:
            # Recorded before the status is sent, so a client that sees the status also sees the count.
            if failure is not None:
                code = status_code(failure)
            metrics.IN_FLIGHT.labels(rpc).dec()
            if admitted:
                self.gate.leave()  # type: ignore[union-attr]
            metrics.REQUESTS.labels(rpc, model, method, code.name).inc()
            metrics.REQUEST_SECONDS.labels(rpc, model, method).observe(time.perf_counter() - start)
        await context.abort_with_status(to_status(failure))

    def _credentials(self, details: grpc.HandlerCallDetails) -> SaliencyError | None:
        """None when the call may proceed; else the error to answer with (checked before anything else runs)."""
        if not self._tokens:
            return None
        header = ""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode(errors="replace")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return Unauthenticated(
                "MISSING_CREDENTIALS", "this server requires `authorization: Bearer <token>` metadata on every call (health excepted)"
            )
        presented = token.strip().encode()
        # Compare against every token in constant time, so timing does not reveal which prefix matched.
        if not any([hmac.compare_digest(presented, known) for known in self._tokens]):
            return PermissionDenied("INVALID_TOKEN", "the bearer token is not one this server accepts")
        return None
