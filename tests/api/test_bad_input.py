"""Bad input gets a precise status with a google.rpc.ErrorInfo, never INTERNAL, and never hurts the server."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from PIL import Image

from saliency.v1 import saliency_service_pb2 as pb
from saliency.v1 import saliency_service_pb2_grpc as pb_grpc
from saliency_client import FailedPreconditionError, InvalidArgumentError, NotFoundError, SaliencyClient

from .conftest import MAX_BATCH_IMAGES, MAX_MESSAGE_BYTES

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture(scope="module")
def stub(address: str) -> Iterator[pb_grpc.SaliencyServiceStub]:
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]) as channel:
        yield pb_grpc.SaliencyServiceStub(channel)


def _tensor(array: np.ndarray, dtype: int | None = None) -> pb.Image:
    code = dtype if dtype is not None else (pb.DATA_TYPE_UINT8 if array.dtype == np.uint8 else pb.DATA_TYPE_FLOAT32)
    return pb.Image(tensor=pb.Tensor(dtype=code, shape=list(array.shape), data=array.tobytes()))


def _params(**values: object) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


GOOD = np.zeros((64, 64, 3), dtype=np.uint8)


def _png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size).save(buffer, format="PNG")
    return buffer.getvalue()


def _localise(masks: list[pb.Tensor], images: int = 1) -> Callable[[pb_grpc.SaliencyServiceStub], object]:
    """A pointing-game Score of `images` blank images with these ground-truth masks."""
    return lambda s: s.Score(
        pb.ScoreRequest(model="shapes", metric="pointing_game", method="grad_cam", images=[_tensor(GOOD)] * images, masks=masks)
    )


INT64_MASK = np.ones((4, 4), np.int64)
ONE_MASK = pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[4, 4], data=np.ones((4, 4), np.uint8).tobytes())


CASES: dict[str, tuple[Callable[[pb_grpc.SaliencyServiceStub], object], grpc.StatusCode, str]] = {
    "undecodable image": (
        lambda s: s.Explain(pb.ExplainRequest(model="shapes", method="grad_cam", images=[pb.Image(encoded=b"\x89PNG garbage")])),
        INVALID,
        "IMAGE_UNDECODABLE",
    ),
    "empty image": (lambda s: s.Explain(pb.ExplainRequest(model="shapes", method="grad_cam", images=[pb.Image()])), INVALID, "IMAGE_EMPTY"),
    "no images": (lambda s: s.Explain(pb.ExplainRequest(model="shapes", method="grad_cam")), INVALID, "NO_IMAGES"),
    "wrong shape": (
        lambda s: s.Explain(pb.ExplainRequest(model="shapes", method="grad_cam", images=[_tensor(np.zeros((64, 64), np.uint8))])),
        INVALID,
        "INVALID_SHAPE",
    ),
    "four channels": (
        lambda s: s.Explain(pb.ExplainRequest(model="shapes", method="grad_cam", images=[_tensor(np.zeros((8, 8, 4), np.uint8))])),
        INVALID,
        "INVALID_SHAPE",
    ),
    "wrong dtype": (
        lambda s: s.Explain(pb.ExplainRequest(model="shapes", method="grad_cam", images=[_tensor(GOOD, pb.DATA_TYPE_UNSPECIFIED)])),
        INVALID,
        "UNSUPPORTED_DTYPE",
    ),
    "bytes do not match shape": (
        lambda s: s.Explain(
            pb.ExplainRequest(
                model="shapes",
                method="grad_cam",
                images=[pb.Image(tensor=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[64, 64, 3], data=b"\0" * 10))],
            )
        ),
        INVALID,
        "TENSOR_SIZE_MISMATCH",
    ),
    "float pixels out of range": (
        lambda s: s.Explain(pb.ExplainRequest(model="shapes", method="grad_cam", images=[_tensor(np.full((8, 8, 3), 255.0, np.float32))])),
        INVALID,
        "VALUE_OUT_OF_RANGE",
    ),
    "unknown model": (
        lambda s: s.Explain(pb.ExplainRequest(model="nope", method="grad_cam", images=[_tensor(GOOD)])),
        NOT_FOUND,
        "MODEL_NOT_FOUND",
    ),
    "model name escaping the repository": (lambda s: s.GetModel(pb.GetModelRequest(name="../shapes")), NOT_FOUND, "MODEL_NOT_FOUND"),
    "model not ready": (
        lambda s: s.Explain(pb.ExplainRequest(model="broken", method="grad_cam", images=[_tensor(GOOD)])),
        PRECONDITION,
        "MODEL_NOT_READY",
    ),
    "unknown method": (
        lambda s: s.Explain(pb.ExplainRequest(model="shapes", method="magic", images=[_tensor(GOOD)])),
        NOT_FOUND,
        "UNKNOWN_METHOD",
    ),
    "no method": (lambda s: s.Explain(pb.ExplainRequest(model="shapes", images=[_tensor(GOOD)])), INVALID, "METHOD_REQUIRED"),
    "unknown parameter": (
        lambda s: s.Explain(
            pb.ExplainRequest(model="shapes", method="integrated_gradients", params=_params(stepz=3), images=[_tensor(GOOD)])
        ),
        NOT_FOUND,
        "UNKNOWN_PARAMETER",
    ),
    "parameter out of range": (
        lambda s: s.Explain(
            pb.ExplainRequest(model="shapes", method="integrated_gradients", params=_params(steps=0), images=[_tensor(GOOD)])
        ),
        INVALID,
        "PARAMETER_OUT_OF_RANGE",
    ),
    "parameter of the wrong type": (
        lambda s: s.Explain(
            pb.ExplainRequest(model="shapes", method="integrated_gradients", params=_params(rule=3), images=[_tensor(GOOD)])
        ),
        INVALID,
        "INVALID_PARAMETER",
    ),
    "target out of range": (
        lambda s: s.Explain(pb.ExplainRequest(model="shapes", method="grad_cam", target=pb.Target(class_index=99), images=[_tensor(GOOD)])),
        INVALID,
        "TARGET_OUT_OF_RANGE",
    ),
    "negative target": (
        lambda s: s.Explain(pb.ExplainRequest(model="shapes", method="grad_cam", target=pb.Target(class_index=-1), images=[_tensor(GOOD)])),
        INVALID,
        "TARGET_OUT_OF_RANGE",
    ),
    "unknown label": (
        lambda s: s.Explain(pb.ExplainRequest(model="shapes", method="grad_cam", target=pb.Target(label="dog"), images=[_tensor(GOOD)])),
        NOT_FOUND,
        "UNKNOWN_LABEL",
    ),
    "unknown layer": (
        lambda s: s.Explain(pb.ExplainRequest(model="shapes", method="grad_cam", layer="fc9", images=[_tensor(GOOD)])),
        NOT_FOUND,
        "UNKNOWN_LAYER",
    ),
    "layer for an input-space method": (
        lambda s: s.Explain(pb.ExplainRequest(model="shapes", method="rise", layer="layer3", images=[_tensor(GOOD)])),
        INVALID,
        "LAYER_NOT_USED",
    ),
    "too many images": (
        lambda s: s.Explain(pb.ExplainRequest(model="shapes", method="saliency", images=[_tensor(GOOD)] * (MAX_BATCH_IMAGES + 1))),
        EXHAUSTED,
        "BATCH_TOO_LARGE",
    ),
    "oversized message": (
        lambda s: s.Explain(
            pb.ExplainRequest(model="shapes", method="saliency", images=[_tensor(np.zeros((MAX_MESSAGE_BYTES // 3 + 64, 1, 3), np.uint8))])
        ),
        EXHAUSTED,
        "MESSAGE_TOO_LARGE",
    ),
    "image with too many pixels": (
        lambda s: s.Explain(pb.ExplainRequest(model="shapes", method="saliency", images=[pb.Image(encoded=_png((5000, 4000)))])),
        EXHAUSTED,
        "IMAGE_TOO_LARGE",
    ),
    "unknown metric": (
        lambda s: s.Score(pb.ScoreRequest(model="shapes", metric="accuracy", method="grad_cam", images=[_tensor(GOOD)])),
        NOT_FOUND,
        "UNKNOWN_METRIC",
    ),
    "metric parameter out of range": (
        lambda s: s.Score(
            pb.ScoreRequest(model="shapes", metric="deletion", metric_params=_params(step=0), method="grad_cam", images=[_tensor(GOOD)])
        ),
        INVALID,
        "PARAMETER_OUT_OF_RANGE",
    ),
    "map count mismatch": (
        lambda s: s.Score(
            pb.ScoreRequest(
                model="shapes",
                metric="deletion",
                images=[_tensor(GOOD)] * 2,
                saliency=[pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[2, 2], data=b"\0" * 16)],
            )
        ),
        INVALID,
        "MAP_COUNT_MISMATCH",
    ),
    "map with NaN": (
        lambda s: s.Score(
            pb.ScoreRequest(
                model="shapes", metric="deletion", images=[_tensor(GOOD)], saliency=[_tensor(np.full((4, 4), np.nan, np.float32)).tensor]
            )
        ),
        INVALID,
        "VALUE_OUT_OF_RANGE",
    ),
    "map and method together": (
        lambda s: s.Score(
            pb.ScoreRequest(
                model="shapes",
                metric="deletion",
                method="grad_cam",
                images=[_tensor(GOOD)],
                saliency=[_tensor(np.ones((4, 4), np.float32)).tensor],
            )
        ),
        INVALID,
        "AMBIGUOUS_SALIENCY",
    ),
    "unknown template": (
        lambda s: s.Verbalize(pb.VerbalizeRequest(model="shapes", method="grad_cam", template="poem", images=[_tensor(GOOD)])),
        NOT_FOUND,
        "UNKNOWN_TEMPLATE",
    ),
    "model-free without maps": (lambda s: s.Verbalize(pb.VerbalizeRequest()), INVALID, "NO_IMAGES"),
    "images without a model": (lambda s: s.Verbalize(pb.VerbalizeRequest(images=[_tensor(GOOD)])), INVALID, "MODEL_REQUIRED"),
    "layer and layers together": (
        lambda s: s.Explain(
            pb.ExplainRequest(model="shapes", method="grad_cam", layer="layer3", layers=["layer2"], images=[_tensor(GOOD)])
        ),
        INVALID,
        "AMBIGUOUS_LAYERS",
    ),
    "a layer twice": (
        lambda s: s.Explain(pb.ExplainRequest(model="shapes", method="grad_cam", layers=["layer3", "layer3"], images=[_tensor(GOOD)])),
        INVALID,
        "DUPLICATE_LAYER",
    ),
    "unknown layer among several": (
        lambda s: s.Explain(pb.ExplainRequest(model="shapes", method="grad_cam", layers=["layer3", "fc9"], images=[_tensor(GOOD)])),
        NOT_FOUND,
        "UNKNOWN_LAYER",
    ),
    "layers for an input method": (
        lambda s: s.Explain(pb.ExplainRequest(model="shapes", method="occlusion", layers=["layer3"], images=[_tensor(GOOD)])),
        INVALID,
        "LAYER_NOT_USED",
    ),
    "foil for a class-agnostic method": (
        lambda s: s.Explain(pb.ExplainRequest(model="shapes", method="eigen_cam", foil=pb.Target(label="star"), images=[_tensor(GOOD)])),
        INVALID,
        "FOIL_NOT_SUPPORTED",
    ),
    "foil equal to the target": (
        lambda s: s.Explain(
            pb.ExplainRequest(
                model="shapes", method="grad_cam", target=pb.Target(label="star"), foil=pb.Target(label="star"), images=[_tensor(GOOD)]
            )
        ),
        INVALID,
        "FOIL_IS_TARGET",
    ),
    "unknown foil label": (
        lambda s: s.Explain(pb.ExplainRequest(model="shapes", method="grad_cam", foil=pb.Target(label="ring"), images=[_tensor(GOOD)])),
        NOT_FOUND,
        "UNKNOWN_LABEL",
    ),
    "foil out of range": (
        lambda s: s.Explain(pb.ExplainRequest(model="shapes", method="grad_cam", foil=pb.Target(class_index=99), images=[_tensor(GOOD)])),
        INVALID,
        "TARGET_OUT_OF_RANGE",
    ),
    "foil with supplied maps": (
        lambda s: s.Score(
            pb.ScoreRequest(
                model="shapes",
                metric="deletion",
                foil=pb.Target(label="star"),
                images=[_tensor(GOOD)],
                saliency=[_tensor(np.ones((4, 4), np.float32)).tensor],
            )
        ),
        INVALID,
        "FOIL_WITHOUT_METHOD",
    ),
    "baseline for a method that takes none": (
        lambda s: s.Explain(pb.ExplainRequest(model="shapes", method="grad_cam", baselines=[_tensor(GOOD)], images=[_tensor(GOOD)])),
        INVALID,
        "BASELINE_NOT_USED",
    ),
    "baselines for two images with three": (
        lambda s: s.Explain(
            pb.ExplainRequest(
                model="shapes",
                method="integrated_gradients",
                params=_params(baseline="supplied"),
                baselines=[_tensor(GOOD), _tensor(GOOD)],
                images=[_tensor(GOOD)] * 3,
            )
        ),
        INVALID,
        "BASELINE_COUNT_MISMATCH",
    ),
    "supplied baseline missing": (
        lambda s: s.Explain(
            pb.ExplainRequest(model="shapes", method="integrated_gradients", params=_params(baseline="supplied"), images=[_tensor(GOOD)])
        ),
        INVALID,
        "BASELINE_MISSING",
    ),
    "unknown metric, streamed": (
        lambda s: list(s.ScoreStream(pb.ScoreRequest(model="shapes", metric="accuracy", method="grad_cam", images=[_tensor(GOOD)]))),
        NOT_FOUND,
        "UNKNOWN_METRIC",
    ),
    "masks for a metric that uses none": (
        lambda s: s.Score(
            pb.ScoreRequest(
                model="shapes",
                metric="deletion",
                method="grad_cam",
                images=[_tensor(GOOD)],
                masks=[_tensor(np.ones((4, 4), np.uint8), pb.DATA_TYPE_UINT8).tensor],
            )
        ),
        INVALID,
        "MASKS_NOT_USED",
    ),
    "localisation metric without masks": (_localise([]), INVALID, "MASKS_REQUIRED"),
    "two masks for three images": (_localise([ONE_MASK, ONE_MASK], images=3), INVALID, "MASK_COUNT_MISMATCH"),
    "int64 mask under an unknown dtype code": (
        _localise([pb.Tensor(dtype=7, shape=[4, 4], data=INT64_MASK.tobytes())]),  # type: ignore[arg-type]
        INVALID,
        "UNSUPPORTED_DTYPE",
    ),
    "int64 mask bytes labelled uint8": (
        _localise([pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[4, 4], data=INT64_MASK.tobytes())]),
        INVALID,
        "TENSOR_SIZE_MISMATCH",
    ),
    "mask with three dimensions": (
        _localise([pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[4, 4, 1], data=bytes(16))]),
        INVALID,
        "INVALID_SHAPE",
    ),
    "mask with NaN": (_localise([_tensor(np.full((4, 4), np.nan, np.float32)).tensor]), INVALID, "VALUE_OUT_OF_RANGE"),
    "mask with no object pixel": (_localise([_tensor(np.zeros((4, 4), np.uint8)).tensor]), INVALID, "EMPTY_MASK"),
    "supplied map for a metric that re-explains": (
        lambda s: s.Score(
            pb.ScoreRequest(
                model="shapes", metric="max_sensitivity", images=[_tensor(GOOD)], saliency=[_tensor(np.ones((4, 4), np.float32)).tensor]
            )
        ),
        INVALID,
        "METHOD_REQUIRED_FOR_METRIC",
    ),
    "contrastive metric without a foil": (
        lambda s: s.Score(pb.ScoreRequest(model="shapes", metric="contrastive_faithfulness", method="grad_cam", images=[_tensor(GOOD)])),
        INVALID,
        "FOIL_REQUIRED",
    ),
    "too few faithfulness runs": (
        lambda s: s.Score(
            pb.ScoreRequest(
                model="shapes", metric="faithfulness_correlation", metric_params=_params(runs=1), method="grad_cam", images=[_tensor(GOOD)]
            )
        ),
        INVALID,
        "PARAMETER_OUT_OF_RANGE",
    ),
    "road removing every pixel": (
        lambda s: s.Score(
            pb.ScoreRequest(
                model="shapes", metric="road", metric_params=_params(percentages="50,100"), method="grad_cam", images=[_tensor(GOOD)]
            )
        ),
        INVALID,
        "PARAMETER_OUT_OF_RANGE",
    ),
    "empty baseline": (
        lambda s: s.Explain(pb.ExplainRequest(model="shapes", method="grad_cam", baselines=[pb.Image()], images=[_tensor(GOOD)])),
        INVALID,
        "BASELINE_EMPTY",
    ),
    # Verbalize (issue 5): tokens, named regions, labels, styles and custom templates.
    "tokens and attributions of different lengths": (
        lambda s: s.Verbalize(pb.VerbalizeRequest(tokens=[pb.TokenAttributions(tokens=["a", "b"], attributions=[1.0])])),
        INVALID,
        "TOKEN_COUNT_MISMATCH",
    ),
    "a token text without tokens": (
        lambda s: s.Verbalize(pb.VerbalizeRequest(tokens=[pb.TokenAttributions()])),
        INVALID,
        "NO_TOKENS",
    ),
    "tokens with an image form": (
        lambda s: s.Verbalize(
            pb.VerbalizeRequest(template="grid_regions", tokens=[pb.TokenAttributions(tokens=["a"], attributions=[1.0])])
        ),
        INVALID,
        "TOKENS_NOT_USED",
    ),
    "a token form without tokens": (
        lambda s: s.Verbalize(pb.VerbalizeRequest(template="token_summary", saliency=[_tensor(np.ones((4, 4), np.float32)).tensor])),
        INVALID,
        "TOKENS_REQUIRED",
    ),
    "tokens with a model": (
        lambda s: s.Verbalize(
            pb.VerbalizeRequest(model="shapes", images=[_tensor(GOOD)], tokens=[pb.TokenAttributions(tokens=["a"], attributions=[1.0])])
        ),
        INVALID,
        "AMBIGUOUS_INPUT",
    ),
    "a text longer than max_words": (
        lambda s: s.Verbalize(
            pb.VerbalizeRequest(
                template="token_spans",
                template_params=_params(max_words=3),
                tokens=[pb.TokenAttributions(tokens=["a"] * 4, attributions=[1.0] * 4)],
            )
        ),
        INVALID,
        "TOO_MANY_TOKENS",
    ),
    "unknown style": (
        lambda s: s.Verbalize(pb.VerbalizeRequest(style="poetic", saliency=[_tensor(np.ones((4, 4), np.float32)).tensor])),
        NOT_FOUND,
        "UNKNOWN_STYLE",
    ),
    "unknown detail": (
        lambda s: s.Verbalize(pb.VerbalizeRequest(detail="verbose", saliency=[_tensor(np.ones((4, 4), np.float32)).tensor])),
        INVALID,
        "INVALID_DETAIL",
    ),
    "unknown placeholder": (
        lambda s: s.Verbalize(
            pb.VerbalizeRequest(
                custom_templates={"grid_regions.first": "{percentage} in {region}"}, saliency=[_tensor(np.ones((4, 4), np.float32)).tensor]
            )
        ),
        INVALID,
        "UNKNOWN_PLACEHOLDER",
    ),
    "unknown template key": (
        lambda s: s.Verbalize(
            pb.VerbalizeRequest(custom_templates={"grid.first": "{percent}"}, saliency=[_tensor(np.ones((4, 4), np.float32)).tensor])
        ),
        INVALID,
        "UNKNOWN_TEMPLATE_KEY",
    ),
    "region sets for a form that has none": (
        lambda s: s.Verbalize(
            pb.VerbalizeRequest(
                saliency=[_tensor(np.ones((4, 4), np.float32)).tensor],
                regions=[pb.RegionSet(regions=[pb.NamedRegion(name="dog", mask=_tensor(np.ones((4, 4), np.uint8)).tensor)])],
            )
        ),
        INVALID,
        "REGIONS_NOT_USED",
    ),
    "named regions without regions": (
        lambda s: s.Verbalize(pb.VerbalizeRequest(template="named_regions", saliency=[_tensor(np.ones((4, 4), np.float32)).tensor])),
        INVALID,
        "REGIONS_REQUIRED",
    ),
    "region set count mismatch": (
        lambda s: s.Verbalize(
            pb.VerbalizeRequest(
                template="named_regions",
                saliency=[_tensor(np.ones((4, 4), np.float32)).tensor] * 3,
                regions=[pb.RegionSet(regions=[pb.NamedRegion(name="dog", mask=_tensor(np.ones((4, 4), np.uint8)).tensor)])] * 2,
            )
        ),
        INVALID,
        "REGION_SET_COUNT_MISMATCH",
    ),
    "a region name twice": (
        lambda s: s.Verbalize(
            pb.VerbalizeRequest(
                template="named_regions",
                saliency=[_tensor(np.ones((4, 4), np.float32)).tensor],
                regions=[pb.RegionSet(regions=[pb.NamedRegion(name="dog", mask=_tensor(np.ones((4, 4), np.uint8)).tensor)] * 2)],
            )
        ),
        INVALID,
        "DUPLICATE_REGION_NAME",
    ),
    "a region mask of the wrong size": (
        lambda s: s.Verbalize(
            pb.VerbalizeRequest(
                template="named_regions",
                saliency=[_tensor(np.ones((4, 4), np.float32)).tensor],
                regions=[
                    pb.RegionSet(regions=[pb.NamedRegion(name="dog", mask=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[4, 4], data=b"\x01"))])
                ],
            )
        ),
        INVALID,
        "TENSOR_SIZE_MISMATCH",
    ),
    "labels without a model": (
        lambda s: s.Verbalize(
            pb.VerbalizeRequest(labels=[pb.Target(label="star")], saliency=[_tensor(np.ones((4, 4), np.float32)).tensor])
        ),
        INVALID,
        "LABELS_NEED_MODEL",
    ),
    "label count mismatch": (
        lambda s: s.Verbalize(
            pb.VerbalizeRequest(
                model="shapes", method="grad_cam", images=[_tensor(GOOD)], labels=[pb.Target(label="star"), pb.Target(label="circle")]
            )
        ),
        INVALID,
        "LABEL_COUNT_MISMATCH",
    ),
    "unknown true label": (
        lambda s: s.Verbalize(
            pb.VerbalizeRequest(model="shapes", method="grad_cam", images=[_tensor(GOOD)], labels=[pb.Target(label="dragon")])
        ),
        NOT_FOUND,
        "UNKNOWN_LABEL",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_a_precise_status_with_error_info(stub: pb_grpc.SaliencyServiceStub, case: str) -> None:
    call, code, reason = CASES[case]
    with pytest.raises(grpc.RpcError) as caught:
        call(stub)
    error = caught.value
    assert error.code() == code, f"{case}: {error.code()} {error.details()}"
    assert error.code() != grpc.StatusCode.INTERNAL
    assert len(error.details()) > 15, "the message must say what to do"
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status in the trailers"
    infos = [error_details_pb2.ErrorInfo() for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    for info, detail in zip(infos, [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)], strict=True):
        detail.Unpack(info)
    assert len(infos) == 1
    assert infos[0].domain == "saliency.v1"
    assert infos[0].reason == reason


def test_client_raises_typed_errors_with_code_and_reason(client: SaliencyClient) -> None:
    with pytest.raises(NotFoundError) as not_found:
        client.get_model("nope")
    assert not_found.value.code == grpc.StatusCode.NOT_FOUND and not_found.value.reason == "MODEL_NOT_FOUND"
    with pytest.raises(InvalidArgumentError) as invalid:
        client.explain("shapes", [GOOD], method="integrated_gradients", params={"steps": 100000})
    assert invalid.value.reason == "PARAMETER_OUT_OF_RANGE" and "steps" in str(invalid.value)
    with pytest.raises(FailedPreconditionError):
        client.explain("broken", [GOOD])


def test_server_still_serving_after_bad_input(address: str, client: SaliencyClient) -> None:
    with grpc.insecure_channel(address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    assert client.explain("shapes", [GOOD], method="saliency")[0].saliency.shape == (64, 64)
