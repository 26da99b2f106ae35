"""`SaliencyClient` (blocking) and `AsyncSaliencyClient` (asyncio).

Both build every request and parse every response with `_codec` and share `_Connection`; they
differ only in their `_call` (a plain call vs an awaited one) and in closing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message

from saliency.v1 import saliency_service_pb2 as pb
from saliency.v1 import saliency_service_pb2_grpc as pb_grpc

from . import _codec
from ._codec import Attributions, Images, Regions, SaliencyMaps, TargetLike, Tokens
from ._errors import UnavailableError, map_rpc_errors
from ._types import Explanation, MethodCatalog, ModelInfo, Progress, ScoreResult, Verbalization

_MiB = 1024 * 1024
# Batches of camera-sized images and their float32 maps outgrow gRPC's 4 MiB receive default.
_DEFAULT_OPTIONS: dict[str, Any] = {
    "grpc.max_send_message_length": 64 * _MiB,
    "grpc.max_receive_message_length": 64 * _MiB,
}

_Rpc = Literal["Explain", "Score", "ScoreStream", "Verbalize", "ListModels", "GetModel", "ListMethods"]
_Response = TypeVar("_Response", bound=Message)
_Result = TypeVar("_Result")


class _Connection:
    """What both clients hold: the channel, the stub and the per-call settings."""

    def __init__(
        self,
        api: Any,  # the `grpc` or `grpc.aio` module: both have insecure_channel/secure_channel
        target: str,
        timeout: float | None,
        credentials: grpc.ChannelCredentials | None,
        metadata: Sequence[tuple[str, str]],
        options: Sequence[tuple[str, Any]],
    ) -> None:
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be positive or None, got {timeout}")
        merged = list({**_DEFAULT_OPTIONS, **dict(options)}.items())
        if credentials is None:
            self.channel = api.insecure_channel(target, options=merged)
        else:
            self.channel = api.secure_channel(target, credentials, options=merged)
        self.stub = pb_grpc.SaliencyServiceStub(self.channel)
        self.timeout = timeout
        self.metadata = tuple(metadata) or None

    def invoke(self, rpc: _Rpc, request: Message) -> Any:
        """Start `rpc`: the response (sync stub) or an awaitable of it (async stub)."""
        return getattr(self.stub, rpc)(request, timeout=self.timeout, metadata=self.metadata)


def _with_token(metadata: Sequence[tuple[str, str]], token: str | None) -> list[tuple[str, str]]:
    if token is None:
        return list(metadata)
    if not token or any(c.isspace() for c in token):
        raise ValueError("token must be a non-empty string without whitespace")
    return [*metadata, ("authorization", f"Bearer {token}")]


class SaliencyClient:
    """A blocking client of the saliency service.

    Use it as a context manager, or call `close()`. Every method raises a `SaliencyError` subclass
    on a failed call, and TypeError/ValueError for an input it cannot send (before any RPC).
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        options: Sequence[tuple[str, Any]] = (),
        token: str | None = None,
    ) -> None:
        """Open a channel to `target` ("host:port"); `timeout` in seconds applies to each call.

        `credentials`: TLS (`grpc.ssl_channel_credentials(...)`, with a client key and certificate for mutual
        TLS). `token`: sent as `authorization: Bearer <token>` on every call.
        """
        self._connection = _Connection(grpc, target, timeout, credentials, _with_token(metadata, token), options)

    def _call(self, rpc: _Rpc, request: Message, parse: Callable[[_Response], _Result]) -> _Result:
        with map_rpc_errors():
            response = self._connection.invoke(rpc, request)
        return parse(response)

    def explain(
        self,
        model: str,
        images: Images,
        method: str = "grad_cam",
        target: TargetLike = None,
        params: Mapping[str, Any] | None = None,
        *,
        layer: str | None = None,
        layers: Sequence[str] | None = None,
        foil: TargetLike = None,
        baselines: Images | None = None,
        seed: int = 0,
    ) -> list[Explanation]:
        """One saliency map per image, explaining `target` (default: the predicted class).

        `foil`: a contrast class (explain target rather than foil). `layers`: several layers at once; each
        explanation then has `layer_maps`. `baselines`: reference images for methods that take them.
        """
        request = _codec.explain_request(model, images, method, target, params, layer, seed)
        _codec.add_method_options(request, foil, layers, baselines)
        return self._call("Explain", request, _codec.explanations)

    def score(
        self,
        model: str,
        images: Images,
        method: str = "grad_cam",
        metric: str = "deletion",
        target: TargetLike = None,
        params: Mapping[str, Any] | None = None,
        *,
        method_params: Mapping[str, Any] | None = None,
        saliency: SaliencyMaps | None = None,
        layer: str | None = None,
        layers: Sequence[str] | None = None,
        foil: TargetLike = None,
        baselines: Images | None = None,
        masks: SaliencyMaps | None = None,
        seed: int = 0,
        progress: Callable[[Progress], None] | None = None,
    ) -> list[ScoreResult]:
        """Score `method`'s maps (or the caller's `saliency` maps) by `metric`; `params` are the metric's.

        `masks`: ground-truth masks (nonzero on the object), one per image, for the localisation metrics.
        `progress`: called with each `Progress` the server streams while it works (ScoreStream).
        """
        request = _codec.score_request(model, images, method, metric, target, params, method_params, saliency, layer, seed)
        _codec.add_method_options(request, foil, layers, baselines)
        request.masks.extend(_codec.mask_messages(masks))
        if progress is None:
            return self._call("Score", request, _codec.score_results)
        with map_rpc_errors():
            for event in self._connection.invoke("ScoreStream", request):
                if event.HasField("progress"):
                    progress(_codec.progress(event.progress))
                else:
                    return _codec.score_results(event.response)
        raise UnavailableError(grpc.StatusCode.UNAVAILABLE, "", "the server ended the Score stream without a response")

    def verbalize(
        self,
        model: str | None = None,
        images: Images | None = None,
        method: str = "grad_cam",
        target: TargetLike = None,
        params: Mapping[str, Any] | None = None,
        *,
        template: str | None = None,
        method_params: Mapping[str, Any] | None = None,
        saliency: SaliencyMaps | None = None,
        layer: str | None = None,
        layers: Sequence[str] | None = None,
        foil: TargetLike = None,
        baselines: Images | None = None,
        seed: int = 0,
        tokens: Tokens | None = None,
        attributions: Attributions | None = None,
        labels: TargetLike | Sequence[int | str] = None,
        regions: Regions | None = None,
        detail: str | None = None,
        style: str | None = None,
        custom_templates: Mapping[str, str] | None = None,
    ) -> list[Verbalization]:
        """Say what each map (or token text) shows; `params` are the template's.

        Three inputs: a model's explanation (`model`, `images`, `method`); maps alone (`saliency=[m]`);
        or token attributions alone (`tokens=[...]`, `attributions=[...]`, one text or lists of several).
        `template`: the form (default: grid_regions for maps, token_summary for tokens). `labels`: the true
        class (one, or one per image) for the correctness line. `foil`: a contrast class, and the text says
        why the target rather than the foil. `regions`: name -> mask for named_regions (one dict, or one per
        image). `detail`: short, standard or detailed. `style`: a style id (plain, terse, ...).
        `custom_templates`: key -> text with {placeholders}, replacing the style's texts.
        """
        request = _codec.verbalize_request(
            model,
            images,
            method,
            target,
            params,
            template,
            method_params,
            saliency,
            layer,
            seed,
            tokens=tokens,
            attributions=attributions,
            labels=labels,
            regions=regions,
            detail=detail,
            style=style,
            custom_templates=custom_templates,
        )
        _codec.add_method_options(request, foil, layers, baselines)
        return self._call("Verbalize", request, _codec.verbalizations)

    def list_models(self) -> list[ModelInfo]:
        """Every model in the server's repository, ready or not."""
        return self._call("ListModels", pb.ListModelsRequest(), _codec.models)

    def get_model(self, name: str) -> ModelInfo:
        """One model: inputs, labels, layers, ready state and reason."""
        return self._call("GetModel", pb.GetModelRequest(name=name), _codec.model)

    def list_methods(self) -> MethodCatalog:
        """Every saliency method, Score metric and verbalization template, with its parameters."""
        return self._call("ListMethods", pb.ListMethodsRequest(), _codec.method_catalog)

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._connection.channel.close()

    def __enter__(self) -> SaliencyClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class AsyncSaliencyClient:
    """An asyncio client of the saliency service, over `grpc.aio`; same methods as `SaliencyClient`.

    Create it inside a running event loop; use it as an async context manager, or await `close()`.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        options: Sequence[tuple[str, Any]] = (),
        token: str | None = None,
    ) -> None:
        """Open a channel to `target` ("host:port"); `timeout` in seconds applies to each call."""
        self._connection = _Connection(grpc.aio, target, timeout, credentials, _with_token(metadata, token), options)

    async def _call(self, rpc: _Rpc, request: Message, parse: Callable[[_Response], _Result]) -> _Result:
        with map_rpc_errors():
            response = await self._connection.invoke(rpc, request)
        return parse(response)

    async def explain(
        self,
        model: str,
        images: Images,
        method: str = "grad_cam",
        target: TargetLike = None,
        params: Mapping[str, Any] | None = None,
        *,
        layer: str | None = None,
        layers: Sequence[str] | None = None,
        foil: TargetLike = None,
        baselines: Images | None = None,
        seed: int = 0,
    ) -> list[Explanation]:
        """One saliency map per image, explaining `target` (default: the predicted class).

        `foil`: a contrast class (explain target rather than foil). `layers`: several layers at once; each
        explanation then has `layer_maps`. `baselines`: reference images for methods that take them.
        """
        request = _codec.explain_request(model, images, method, target, params, layer, seed)
        _codec.add_method_options(request, foil, layers, baselines)
        return await self._call("Explain", request, _codec.explanations)

    async def score(
        self,
        model: str,
        images: Images,
        method: str = "grad_cam",
        metric: str = "deletion",
        target: TargetLike = None,
        params: Mapping[str, Any] | None = None,
        *,
        method_params: Mapping[str, Any] | None = None,
        saliency: SaliencyMaps | None = None,
        layer: str | None = None,
        layers: Sequence[str] | None = None,
        foil: TargetLike = None,
        baselines: Images | None = None,
        masks: SaliencyMaps | None = None,
        seed: int = 0,
        progress: Callable[[Progress], None] | None = None,
    ) -> list[ScoreResult]:
        """Score `method`'s maps (or the caller's `saliency` maps) by `metric`; `params` are the metric's.

        `masks`: ground-truth masks (nonzero on the object), one per image, for the localisation metrics.
        `progress`: called with each `Progress` the server streams while it works (ScoreStream).
        """
        request = _codec.score_request(model, images, method, metric, target, params, method_params, saliency, layer, seed)
        _codec.add_method_options(request, foil, layers, baselines)
        request.masks.extend(_codec.mask_messages(masks))
        if progress is None:
            return await self._call("Score", request, _codec.score_results)
        with map_rpc_errors():
            async for event in self._connection.invoke("ScoreStream", request):
                if event.HasField("progress"):
                    progress(_codec.progress(event.progress))
                else:
                    return _codec.score_results(event.response)
        raise UnavailableError(grpc.StatusCode.UNAVAILABLE, "", "the server ended the Score stream without a response")

    async def verbalize(
        self,
        model: str | None = None,
        images: Images | None = None,
        method: str = "grad_cam",
        target: TargetLike = None,
        params: Mapping[str, Any] | None = None,
        *,
        template: str | None = None,
        method_params: Mapping[str, Any] | None = None,
        saliency: SaliencyMaps | None = None,
        layer: str | None = None,
        layers: Sequence[str] | None = None,
        foil: TargetLike = None,
        baselines: Images | None = None,
        seed: int = 0,
        tokens: Tokens | None = None,
        attributions: Attributions | None = None,
        labels: TargetLike | Sequence[int | str] = None,
        regions: Regions | None = None,
        detail: str | None = None,
        style: str | None = None,
        custom_templates: Mapping[str, str] | None = None,
    ) -> list[Verbalization]:
        """Say what each map (or token text) shows; `params` are the template's.

        Three inputs: a model's explanation (`model`, `images`, `method`); maps alone (`saliency=[m]`);
        or token attributions alone (`tokens=[...]`, `attributions=[...]`, one text or lists of several).
        `template`: the form (default: grid_regions for maps, token_summary for tokens). `labels`: the true
        class (one, or one per image) for the correctness line. `foil`: a contrast class, and the text says
        why the target rather than the foil. `regions`: name -> mask for named_regions (one dict, or one per
        image). `detail`: short, standard or detailed. `style`: a style id (plain, terse, ...).
        `custom_templates`: key -> text with {placeholders}, replacing the style's texts.
        """
        request = _codec.verbalize_request(
            model,
            images,
            method,
            target,
            params,
            template,
            method_params,
            saliency,
            layer,
            seed,
            tokens=tokens,
            attributions=attributions,
            labels=labels,
            regions=regions,
            detail=detail,
            style=style,
            custom_templates=custom_templates,
        )
        _codec.add_method_options(request, foil, layers, baselines)
        return await self._call("Verbalize", request, _codec.verbalizations)

    async def list_models(self) -> list[ModelInfo]:
        """Every model in the server's repository, ready or not."""
        return await self._call("ListModels", pb.ListModelsRequest(), _codec.models)

    async def get_model(self, name: str) -> ModelInfo:
        """One model: inputs, labels, layers, ready state and reason."""
        return await self._call("GetModel", pb.GetModelRequest(name=name), _codec.model)

    async def list_methods(self) -> MethodCatalog:
        """Every saliency method, Score metric and verbalization template, with its parameters."""
        return await self._call("ListMethods", pb.ListMethodsRequest(), _codec.method_catalog)

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self._connection.channel.close()

    async def __aenter__(self) -> AsyncSaliencyClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
