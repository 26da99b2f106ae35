"""The Open Inference Protocol on the same port: metadata, inference, classification and bad input."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from saliency.oip import grpc_predict_v2_pb2 as oip
from saliency.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from saliency_client import SaliencyClient
from saliency_service.core.images import ImageLimits, decode_image, to_model_input
from saliency_service.core.models.config import ModelConfig
from saliency_service.core.types import RawTensor
from saliency_service.shapes.generator import LABELS, Sample

from .conftest import MAX_BATCH_IMAGES

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def stub(address: str) -> Iterator[oip_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(address) as channel:
        yield oip_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def shapes_config(model_repository) -> ModelConfig:  # type: ignore[no-untyped-def]
    return ModelConfig.load(model_repository / "shapes")


def _model_input(config: ModelConfig, images: list[np.ndarray]) -> np.ndarray:
    """The normalised tensor Explain builds from the same images."""
    decoded = [decode_image(RawTensor("uint8", image.shape, image.tobytes()), i, ImageLimits()) for i, image in enumerate(images)]
    return to_model_input(decoded, config.input)


def _infer_request(x: np.ndarray, name: str = "input", **kwargs: object) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="shapes", **kwargs)  # type: ignore[arg-type]
    request.inputs.add(name=name, datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
    return request


def _decode_bytes(raw: bytes) -> list[str]:
    values, offset = [], 0
    while offset < len(raw):
        (size,) = struct.unpack_from("<I", raw, offset)
        values.append(raw[offset + 4 : offset + 4 + size].decode())
        offset += 4 + size
    return values


def test_live_ready_and_server_metadata(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    assert stub.ServerLive(oip.ServerLiveRequest()).live
    assert stub.ServerReady(oip.ServerReadyRequest()).ready
    assert stub.ModelReady(oip.ModelReadyRequest(name="shapes")).ready
    assert not stub.ModelReady(oip.ModelReadyRequest(name="broken")).ready
    metadata = stub.ServerMetadata(oip.ServerMetadataRequest())
    assert metadata.name == "saliency-service" and "classification" in metadata.extensions


def test_model_metadata_describes_the_onnx_graph(stub: oip_grpc.GRPCInferenceServiceStub, shapes_config: ModelConfig) -> None:
    metadata = stub.ModelMetadata(oip.ModelMetadataRequest(name="shapes"))
    assert metadata.platform == "onnxruntime_onnx" and list(metadata.versions) == [shapes_config.version]
    (tensor,) = metadata.inputs
    assert (tensor.datatype, list(tensor.shape)) == ("FP32", [-1, 3, 128, 128])
    outputs = {o.name: list(o.shape) for o in metadata.outputs}
    assert outputs["logits"] == [-1, len(LABELS)]
    for layer in shapes_config.layers:
        assert outputs[layer.onnx_output] == [-1, *layer.shape]


def test_infer_gives_explains_probabilities(
    stub: oip_grpc.GRPCInferenceServiceStub, client: SaliencyClient, samples: list[Sample], shapes_config: ModelConfig
) -> None:
    images = [samples[0].image, samples[1].image]
    x = _model_input(shapes_config, images)
    request = _infer_request(x, id="req-7")
    request.outputs.add(name="logits")
    response = stub.ModelInfer(request)
    assert (response.model_name, response.id) == ("shapes", "req-7")
    (output,) = response.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("logits", "FP32", [2, len(LABELS)])
    logits = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(2, len(LABELS))
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    explanations = client.explain("shapes", images, method="grad_cam")
    for row, explanation in zip(probabilities, explanations, strict=True):
        np.testing.assert_allclose(row, explanation.probabilities, atol=1e-5)
        assert int(row.argmax()) == explanation.predicted


def test_infer_with_typed_contents_and_every_output(stub: oip_grpc.GRPCInferenceServiceStub, shapes_config: ModelConfig) -> None:
    x = np.random.default_rng(0).standard_normal((1, 3, 128, 128)).astype(np.float32)
    request = oip.ModelInferRequest(model_name="shapes")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 3, 128, 128]).contents.fp32_contents.extend(x.ravel().tolist())
    response = stub.ModelInfer(request)
    assert [o.name for o in response.outputs] == ["logits", *(layer.onnx_output for layer in shapes_config.layers)]
    raw = stub.ModelInfer(_infer_request(x))
    for typed, plain in zip(response.raw_output_contents, raw.raw_output_contents, strict=True):
        np.testing.assert_allclose(np.frombuffer(typed, "<f4"), np.frombuffer(plain, "<f4"), atol=1e-6)


def test_classification_returns_top_k_as_value_index_label(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    x = np.random.default_rng(1).standard_normal((2, 3, 128, 128)).astype(np.float32)
    plain = stub.ModelInfer(_infer_request(x))
    logits = np.frombuffer(plain.raw_output_contents[0], "<f4").reshape(2, len(LABELS))
    request = _infer_request(x)
    request.outputs.add(name="logits").parameters["classification"].int64_param = 3
    response = stub.ModelInfer(request)
    (output,) = response.outputs
    assert (output.datatype, list(output.shape)) == ("BYTES", [2, 3])
    entries = _decode_bytes(response.raw_output_contents[0])
    for row in range(2):
        top = np.argsort(-logits[row])[:3]
        for entry, index in zip(entries[3 * row : 3 * row + 3], top, strict=True):
            value, position, label = entry.split(":")
            assert (int(position), label) == (int(index), LABELS[index])
            assert float(value) == pytest.approx(float(logits[row, index]), abs=1e-4)


def test_repository_index_lists_ready_and_unavailable_models(stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    models = {m.name: m for m in stub.RepositoryIndex(oip.RepositoryIndexRequest()).models}
    assert models["shapes"].state == "READY"
    assert models["broken"].state == "UNAVAILABLE" and models["broken"].reason
    ready = {m.name for m in stub.RepositoryIndex(oip.RepositoryIndexRequest(ready=True)).models}
    assert "shapes" in ready and "broken" not in ready


GOOD = np.zeros((1, 3, 128, 128), dtype=np.float32)


def _with(change: Callable[[oip.ModelInferRequest], None]) -> oip.ModelInferRequest:
    request = _infer_request(GOOD)
    change(request)
    return request


BAD: dict[str, tuple[Callable[[oip_grpc.GRPCInferenceServiceStub], object], grpc.StatusCode, str]] = {
    "unknown model": (lambda s: s.ModelMetadata(oip.ModelMetadataRequest(name="resnet")), NOT_FOUND, "MODEL_NOT_FOUND"),
    "unknown version": (lambda s: s.ModelReady(oip.ModelReadyRequest(name="shapes", version="9")), NOT_FOUND, "UNKNOWN_MODEL_VERSION"),
    "model not ready": (
        lambda s: s.ModelMetadata(oip.ModelMetadataRequest(name="broken")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "MODEL_NOT_READY",
    ),
    "no model name": (lambda s: s.ModelInfer(oip.ModelInferRequest()), INVALID, "MODEL_REQUIRED"),
    "wrong datatype": (lambda s: s.ModelInfer(_with(lambda r: setattr(r.inputs[0], "datatype", "FP16"))), INVALID, "WRONG_DATATYPE"),
    "wrong input name": (lambda s: s.ModelInfer(_with(lambda r: setattr(r.inputs[0], "name", "image"))), INVALID, "UNKNOWN_INPUT"),
    "wrong shape": (lambda s: s.ModelInfer(_infer_request(np.zeros((1, 3, 64, 64), np.float32))), INVALID, "WRONG_SHAPE"),
    "no inputs": (lambda s: s.ModelInfer(oip.ModelInferRequest(model_name="shapes")), INVALID, "WRONG_INPUT_COUNT"),
    "short raw bytes": (
        lambda s: s.ModelInfer(_with(lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 12))),
        INVALID,
        "WRONG_BYTE_SIZE",
    ),
    "no data": (lambda s: s.ModelInfer(_with(lambda r: r.ClearField("raw_input_contents"))), INVALID, "WRONG_ELEMENT_COUNT"),
    "nan input": (
        lambda s: s.ModelInfer(_infer_request(np.full((1, 3, 128, 128), np.nan, np.float32))),
        INVALID,
        "VALUE_OUT_OF_RANGE",
    ),
    "unknown output": (lambda s: s.ModelInfer(_with(lambda r: r.outputs.add(name="probs"))), INVALID, "UNKNOWN_OUTPUT"),
    "batch too large": (
        lambda s: s.ModelInfer(_infer_request(np.zeros((MAX_BATCH_IMAGES + 1, 3, 128, 128), np.float32))),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "BATCH_TOO_LARGE",
    ),
}


def _classification(k: object) -> oip.ModelInferRequest:
    request = _infer_request(GOOD)
    parameter = request.outputs.add(name="logits").parameters["classification"]
    if isinstance(k, str):
        parameter.string_param = k
    else:
        parameter.int64_param = int(k)  # type: ignore[call-overload]
    return request


BAD["classification k too large"] = (lambda s: s.ModelInfer(_classification(len(LABELS) + 1)), INVALID, "INVALID_PARAMETER")
BAD["classification k not a number"] = (lambda s: s.ModelInfer(_classification("three")), INVALID, "INVALID_PARAMETER")


@pytest.mark.parametrize("case", list(BAD))
def test_bad_oip_input_gets_a_precise_status(stub: oip_grpc.GRPCInferenceServiceStub, case: str) -> None:
    call, code, reason = BAD[case]
    with pytest.raises(grpc.RpcError) as raised:
        call(stub)
    error = raised.value
    assert error.code() == code, error.details()  # type: ignore[attr-defined]
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.reason == reason
