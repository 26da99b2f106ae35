"""The Open Inference Protocol (KServe v2, Triton's gRPC API) beside SaliencyService, on the same port.

ModelInfer runs a model's ONNX graph on the tensors sent, so a pipeline that already speaks OIP
(tritonclient, KServe clients) gets predictions from the same place as explanations. The model's
inputs and outputs are its ONNX graph's: one FP32 N x C x H x W input, normalised as its config says,
and the logits plus one output per declared layer. Errors are SaliencyErrors, so OIP callers get the
same statuses and ErrorInfo as SaliencyService callers.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import grpc
import numpy as np

from saliency.oip import grpc_predict_v2_pb2 as oip
from saliency.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from saliency_service.api.work import WorkPool
from saliency_service.core.errors import InvalidArgument, NotFound, ResourceExhausted
from saliency_service.core.images import ImageLimits
from saliency_service.core.models.model import LoadedModel
from saliency_service.core.models.repository import ModelRepository, ModelStatus

Context = grpc.aio.ServicerContext[Any, Any]

SERVICE_NAME = "inference.GRPCInferenceService"
SERVER_NAME = "saliency-service"
PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ("classification", "model_repository")
CLASSIFICATION = "classification"


def _server_version() -> str:
    try:
        return metadata.version("saliency-service")
    except metadata.PackageNotFoundError:
        return "0"


@dataclass(frozen=True)
class _Output:
    name: str
    shape: tuple[int, ...]
    """Per item: the shape after the batch dimension."""


def _outputs(model: LoadedModel) -> list[_Output]:
    config = model.config
    outputs = [_Output(config.onnx_logits_output, (config.num_classes,))]
    session = model.onnx.session
    shapes = {o.name: o.shape for o in session.get_outputs()}
    for layer in config.layers:
        # The graph's own output shape: what the tensor really is (token layers stay N x D).
        declared = shapes.get(layer.onnx_output)
        dims = tuple(d if isinstance(d, int) else -1 for d in (declared or [None, *layer.shape])[1:])
        outputs.append(_Output(layer.onnx_output, dims))
    return outputs


def _input_name(model: LoadedModel) -> str:
    return str(model.onnx.input_name)


def _input_shape(model: LoadedModel) -> tuple[int, int, int]:
    spec = model.config.input
    return (spec.channels, spec.height, spec.width)


def _encode_bytes(values: Sequence[bytes]) -> bytes:
    """OIP's BYTES layout: each element as a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(value)) + value for value in values)


def classification(logits: np.ndarray, labels: Sequence[str], k: int) -> list[list[bytes]]:
    """Top-k per row as "value:index:label" (Triton's classification extension), highest value first."""
    rows = []
    for row in logits:
        order = np.argsort(-row, kind="stable")[:k]
        rows.append([f"{float(row[i]):.6g}:{int(i)}:{labels[int(i)]}".encode() for i in order])
    return rows


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: ModelRepository, pool: WorkPool, limits: ImageLimits, accepting: Callable[[], bool]) -> None:
        self.repository = repository
        self.pool = pool
        self.limits = limits
        self.accepting = accepting

    # ---- health and metadata ----

    async def ServerLive(self, request: oip.ServerLiveRequest, context: Context) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request: oip.ServerReadyRequest, context: Context) -> oip.ServerReadyResponse:
        ready = self.accepting() and any(status.ready for status in self.repository.statuses())
        return oip.ServerReadyResponse(ready=ready)

    async def ModelReady(self, request: oip.ModelReadyRequest, context: Context) -> oip.ModelReadyResponse:
        status = self._status(request.name, request.version)
        return oip.ModelReadyResponse(ready=status.ready and self.accepting())

    async def ServerMetadata(self, request: oip.ServerMetadataRequest, context: Context) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name=SERVER_NAME, version=_server_version(), extensions=list(EXTENSIONS))

    async def ModelMetadata(self, request: oip.ModelMetadataRequest, context: Context) -> oip.ModelMetadataResponse:
        model = self._model(request.name, request.version)
        tensor = oip.ModelMetadataResponse.TensorMetadata
        return oip.ModelMetadataResponse(
            name=model.name,
            versions=[model.config.version],
            platform=PLATFORM,
            inputs=[tensor(name=_input_name(model), datatype="FP32", shape=[-1, *_input_shape(model)])],
            outputs=[tensor(name=output.name, datatype="FP32", shape=[-1, *output.shape]) for output in _outputs(model)],
        )

    async def RepositoryIndex(self, request: oip.RepositoryIndexRequest, context: Context) -> oip.RepositoryIndexResponse:
        index = oip.RepositoryIndexResponse.ModelIndex
        return oip.RepositoryIndexResponse(
            models=[
                index(
                    name=status.name,
                    version=status.config.version if status.config is not None else "",
                    state="READY" if status.ready else "UNAVAILABLE",
                    reason=status.reason,
                )
                for status in self.repository.statuses()
                if status.ready or not request.ready
            ]
        )

    # ---- inference ----

    async def ModelInfer(self, request: oip.ModelInferRequest, context: Context) -> oip.ModelInferResponse:
        model = self._model(request.model_name, request.model_version)
        x = self._input(model, request)
        wanted = self._requested(model, request)
        names = [name for name, _ in wanted]
        results = await self.pool.run("ModelInfer", lambda: model.run_onnx(x, names), context, len(x))
        response = oip.ModelInferResponse(model_name=model.name, model_version=model.config.version, id=request.id)
        for (name, k), values in zip(wanted, results, strict=True):
            if k:
                rows = classification(values, model.config.labels, k)
                response.outputs.add(name=name, datatype="BYTES", shape=[len(rows), k])
                response.raw_output_contents.append(_encode_bytes([value for row in rows for value in row]))
            else:
                data = np.ascontiguousarray(values, dtype="<f4")
                response.outputs.add(name=name, datatype="FP32", shape=list(data.shape))
                response.raw_output_contents.append(data.tobytes())
        return response

    # ---- validation ----

    def _status(self, name: str, version: str) -> ModelStatus:
        if not name:
            raise InvalidArgument("MODEL_REQUIRED", "name a model; RepositoryIndex lists them")
        status = self.repository.status(name)
        served = status.config.version if status.config is not None else ""
        if version and served and version != served:
            raise NotFound(
                "UNKNOWN_MODEL_VERSION",
                f"model '{name}' has no version '{version}'; the served version is '{served}' (or leave the version empty)",
                {"model": name, "version": version},
            )
        return status

    def _model(self, name: str, version: str) -> LoadedModel:
        self._status(name, version)
        return self.repository.get(name)

    def _input(self, model: LoadedModel, request: oip.ModelInferRequest) -> np.ndarray:
        expected_name = _input_name(model)
        if len(request.inputs) != 1:
            raise InvalidArgument(
                "WRONG_INPUT_COUNT",
                f"model '{model.name}' takes exactly one input, '{expected_name}'; the request has {len(request.inputs)}",
                {"model": model.name},
            )
        tensor = request.inputs[0]
        if tensor.name != expected_name:
            raise InvalidArgument(
                "UNKNOWN_INPUT",
                f"model '{model.name}' has no input '{tensor.name}'; its input is '{expected_name}'",
                {"input": tensor.name},
            )
        if tensor.datatype != "FP32":
            raise InvalidArgument(
                "WRONG_DATATYPE",
                f"input '{tensor.name}' must be FP32 (normalised as ModelMetadata and the model config describe), got '{tensor.datatype}'",
                {"input": tensor.name, "datatype": tensor.datatype},
            )
        expected = _input_shape(model)
        shape = tuple(int(d) for d in tensor.shape)
        if len(shape) != 4 or shape[1:] != expected or shape[0] < 1:
            raise InvalidArgument(
                "WRONG_SHAPE",
                f"input '{tensor.name}' must have shape [N, {', '.join(map(str, expected))}] with N >= 1, got {list(shape)}",
                {"input": tensor.name, "shape": str(list(shape))},
            )
        if shape[0] > self.limits.max_images:
            raise ResourceExhausted(
                "BATCH_TOO_LARGE",
                f"the request has {shape[0]} items; the server accepts at most {self.limits.max_images} per request (max_batch_images)",
                {"limit": self.limits.max_images, "count": shape[0]},
            )
        count = int(np.prod(shape))
        if request.raw_input_contents:
            if len(request.raw_input_contents) != 1:
                raise InvalidArgument(
                    "WRONG_INPUT_COUNT", f"{len(request.raw_input_contents)} raw_input_contents for 1 input; send one entry per input"
                )
            raw = request.raw_input_contents[0]
            if len(raw) != 4 * count:
                raise InvalidArgument(
                    "WRONG_BYTE_SIZE",
                    f"input '{tensor.name}' of shape {list(shape)} needs {4 * count} bytes of FP32, got {len(raw)}",
                    {"input": tensor.name, "expected": 4 * count, "size": len(raw)},
                )
            x = np.frombuffer(raw, dtype="<f4").reshape(shape)
        else:
            values = tensor.contents.fp32_contents
            if len(values) != count:
                raise InvalidArgument(
                    "WRONG_ELEMENT_COUNT",
                    f"input '{tensor.name}' of shape {list(shape)} needs {count} values in contents.fp32_contents "
                    f"(or raw_input_contents), got {len(values)}",
                    {"input": tensor.name, "expected": count, "count": len(values)},
                )
            x = np.asarray(values, dtype=np.float32).reshape(shape)
        if not np.isfinite(x).all():
            raise InvalidArgument("VALUE_OUT_OF_RANGE", f"input '{tensor.name}' holds NaN or infinite values", {"input": tensor.name})
        return np.ascontiguousarray(x, dtype=np.float32)

    def _requested(self, model: LoadedModel, request: oip.ModelInferRequest) -> list[tuple[str, int]]:
        """(output name, classification k or 0) for each requested output; every output when none is named."""
        available = {output.name: output for output in _outputs(model)}
        if not request.outputs:
            return [(name, 0) for name in available]
        wanted: list[tuple[str, int]] = []
        for output in request.outputs:
            if output.name not in available:
                raise InvalidArgument(
                    "UNKNOWN_OUTPUT",
                    f"model '{model.name}' has no output '{output.name}'; its outputs are {', '.join(available)}",
                    {"output": output.name},
                )
            k = 0
            if CLASSIFICATION in output.parameters:
                parameter = output.parameters[CLASSIFICATION]
                kind = parameter.WhichOneof("parameter_choice")
                value = getattr(parameter, kind) if kind in ("int64_param", "uint64_param") else None
                if output.name != model.config.onnx_logits_output:
                    raise InvalidArgument(
                        "CLASSIFICATION_NOT_SUPPORTED",
                        f"classification applies to the class scores '{model.config.onnx_logits_output}', not '{output.name}'",
                        {"output": output.name},
                    )
                if value is None or not 1 <= int(value) <= model.config.num_classes:
                    raise InvalidArgument(
                        "INVALID_PARAMETER",
                        f"classification must be an integer k in 1..{model.config.num_classes} (model '{model.name}' has "
                        f"{model.config.num_classes} classes)",
                        {"parameter": CLASSIFICATION},
                    )
                k = int(value)
            wanted.append((output.name, k))
        return wanted
