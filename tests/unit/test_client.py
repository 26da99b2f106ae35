"""The Python client: public surface, codec, error mapping, overlay and CLI, against a fake in-process server."""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import socket
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import numpy as np
import pytest
import pytest_asyncio
from google.protobuf import any_pb2, struct_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from PIL import Image

import saliency_client
from saliency.v1 import saliency_service_pb2 as pb
from saliency.v1 import saliency_service_pb2_grpc as pb_grpc
from saliency_client import (
    AsyncSaliencyClient,
    InternalError,
    NotFoundError,
    ResourceExhaustedError,
    SaliencyClient,
    SaliencyError,
    UnavailableError,
    _codec,
    overlay,
)
from saliency_client._cli import _parse_param, main

LABELS = ("circle", "square", "star")


# --- fake service ---------------------------------------------------------------------------------


def _model_message(description: str = "a tiny fake") -> pb.Model:
    return pb.Model(
        name="shapes",
        version="1",
        task="classification",
        description=description,
        input=pb.ModelInput(height_px=64, width_px=64, channels=3, layout="NCHW", mean=[0.5] * 3, std=[0.25] * 3),
        labels=LABELS,
        layers=[pb.Layer(name="layer3", shape=[32, 8, 8])],
        default_layer="layer3",
        ready=True,
        device="cpu",
    )


def _provenance(request_method: str) -> pb.Provenance:
    params = struct_pb2.Struct()
    params.update({"steps": 8})
    return pb.Provenance(
        model="shapes", model_version="1", method=request_method, params=params, layer="layer3", seed=7, timings_ms={"predict": 1.5}
    )


class _FakeServicer(pb_grpc.SaliencyServiceServicer):
    """Answers like the real service would, from fixed data; GetModel knows no model."""

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.GetModelResponse:
        info = error_details_pb2.ErrorInfo(reason="MODEL_NOT_FOUND", domain="saliency.v1", metadata={"model": request.name})
        detail = any_pb2.Any()
        detail.Pack(info)
        status = status_pb2.Status(code=grpc.StatusCode.NOT_FOUND.value[0], message=f"no model {request.name!r}", details=[detail])
        await context.abort_with_status(rpc_status.to_status(status))
        raise AssertionError("unreachable")

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        caller = dict(context.invocation_metadata() or ()).get("x-caller", "a tiny fake")
        return pb.ListModelsResponse(models=[_model_message(description=caller)])

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "batch too large")
        raise AssertionError("unreachable")

    async def Explain(self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext) -> pb.ExplainResponse:
        explanations = []
        for image in request.images:
            height, width = image.tensor.shape[0], image.tensor.shape[1]
            saliency = np.arange(height * width, dtype=np.float32).reshape(height, width)
            target = request.target.class_index if request.target.WhichOneof("kind") == "class_index" else 2
            explanations.append(
                pb.Explanation(
                    saliency=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[height, width], data=saliency.tobytes()),
                    target_index=target,
                    target_label=LABELS[target],
                    predicted_index=2,
                    predicted_label="star",
                    probabilities=[0.1, 0.2, 0.7],
                    provenance=_provenance(request.method),
                )
            )
        return pb.ExplainResponse(explanations=explanations)

    async def Verbalize(self, request: pb.VerbalizeRequest, context: grpc.aio.ServicerContext) -> pb.VerbalizeResponse:
        steps = request.method_params.fields["steps"].number_value if "steps" in request.method_params.fields else 0
        text = f"{request.method} with steps={steps:g}: the evidence is in the upper left."
        return pb.VerbalizeResponse(
            verbalizations=[pb.Verbalization(text=text, facts=[pb.Fact(region="upper left", share=0.6, sign="positive")])]
        )


@pytest_asyncio.fixture(scope="module")
async def server_address() -> AsyncIterator[str]:
    server = grpc.aio.server()
    pb_grpc.add_SaliencyServiceServicer_to_server(_FakeServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(grace=None)


@pytest.fixture
def closed_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"127.0.0.1:{port}"


def _rgb(height: int = 6, width: int = 5) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


# --- public surface -------------------------------------------------------------------------------


def test_public_surface_is_pinned() -> None:
    assert saliency_client.__all__ == [
        "AsyncSaliencyClient",
        "CancelledError",
        "DeadlineExceededError",
        "Explanation",
        "Fact",
        "FailedPreconditionError",
        "ImageLike",
        "InputInfo",
        "InternalError",
        "InvalidArgumentError",
        "LayerInfo",
        "MethodCatalog",
        "MethodInfo",
        "ModelInfo",
        "NotFoundError",
        "ParameterInfo",
        "PermissionDeniedError",
        "Progress",
        "Provenance",
        "ResourceExhaustedError",
        "SaliencyClient",
        "SaliencyError",
        "ScoreResult",
        "UnauthenticatedError",
        "UnavailableError",
        "Verbalization",
        "overlay",
    ]
    for name in saliency_client.__all__:
        assert getattr(saliency_client, name) is not None
    assert (pathlib.Path(saliency_client.__file__).parent / "py.typed").exists()
    error_names = [n for n in saliency_client.__all__ if n.endswith("Error") and n != "SaliencyError"]
    assert all(issubclass(getattr(saliency_client, n), SaliencyError) for n in error_names)


# --- codec ----------------------------------------------------------------------------------------


def test_uint8_image_round_trips_through_a_tensor() -> None:
    image = _rgb()
    message = _codec.image_message(image)
    assert message.tensor.dtype == pb.DATA_TYPE_UINT8
    assert list(message.tensor.shape) == [6, 5, 3]
    np.testing.assert_array_equal(_codec.array_from_tensor(message.tensor), image)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, ">f4"])
def test_float_images_travel_as_little_endian_float32(dtype: str) -> None:
    image = np.random.default_rng(1).random((4, 3, 3)).astype(dtype)
    message = _codec.image_message(image)
    assert message.tensor.dtype == pb.DATA_TYPE_FLOAT32
    decoded = _codec.array_from_tensor(message.tensor)
    assert decoded.dtype == np.float32
    np.testing.assert_allclose(decoded, image.astype(np.float32))


def test_non_contiguous_image_is_sent_in_c_order() -> None:
    image = _rgb(8, 8)[::2, ::-1]
    np.testing.assert_array_equal(_codec.array_from_tensor(_codec.image_message(image).tensor), image)


def test_bytes_and_paths_travel_encoded(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "image.png"
    Image.fromarray(_rgb()).save(path)
    assert _codec.image_message(path.read_bytes()).encoded == path.read_bytes()
    assert _codec.image_message(path).encoded == path.read_bytes()


def test_a_single_image_is_a_batch_of_one() -> None:
    image = _rgb()
    assert _codec.image_messages(image) == _codec.image_messages([image])
    assert len(_codec.image_messages((image, image.tobytes()))) == 2


def test_saliency_maps_travel_as_float32() -> None:
    saliency = np.linspace(-1, 1, 12).reshape(3, 4)
    [message] = _codec.saliency_messages(saliency)
    assert message.dtype == pb.DATA_TYPE_FLOAT32
    np.testing.assert_allclose(_codec.array_from_tensor(message), saliency.astype(np.float32))
    assert _codec.saliency_messages(None) == []
    with pytest.raises(ValueError, match="height x width"):
        _codec.saliency_messages([np.zeros((2, 2, 1))])
    with pytest.raises(TypeError, match="float"):
        _codec.saliency_messages([np.zeros((2, 2), dtype=np.int32)])


def test_tensor_decoding_checks_dtype_and_length() -> None:
    with pytest.raises(ValueError, match="bytes"):
        _codec.array_from_tensor(pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[2, 2], data=b"\0" * 12))
    with pytest.raises(ValueError, match="dtype"):
        _codec.array_from_tensor(pb.Tensor(shape=[1], data=b"\0"))
    decoded = _codec.array_from_tensor(pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[2, 1], data=b"\x01\x02"))
    assert decoded.tolist() == [[1], [2]]


def test_params_round_trip_through_a_struct() -> None:
    params = {"steps": 32, "center": True, "name": "box", "scales": [1, 2.5], "nested": {"a": None}}
    struct = _codec.params_struct(params)
    assert struct is not None
    assert _codec.struct_to_dict(struct) == {
        "steps": 32.0,
        "center": True,
        "name": "box",
        "scales": [1.0, 2.5],
        "nested": {"a": None},
    }
    assert _codec.params_struct(None) is None
    with pytest.raises(TypeError, match="steps"):
        _codec.params_struct({"steps": object()})
    with pytest.raises(TypeError, match="string"):
        _codec.params_struct({1: 2})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("target", "kind", "value"),
    [(None, None, None), (2, "class_index", 2), (np.int64(1), "class_index", 1), ("star", "label", "star")],
)
def test_target_variants(target: int | str | None, kind: str | None, value: int | str | None) -> None:
    request = _codec.explain_request("shapes", _rgb(), "grad_cam", target, None, None, 0)
    assert request.HasField("target") is (kind is not None)
    assert request.target.WhichOneof("kind") == kind
    if kind is not None:
        assert getattr(request.target, kind) == value


def test_requests_carry_every_argument() -> None:
    saliency = np.ones((6, 5), dtype=np.float32)
    score = _codec.score_request("shapes", [_rgb()], "rise", "insertion", "star", {"steps": 4}, {"masks": 8}, None, "layer2", 3)
    assert (score.model, score.method, score.metric, score.layer, score.seed) == ("shapes", "rise", "insertion", "layer2", 3)
    assert _codec.struct_to_dict(score.metric_params) == {"steps": 4.0}
    assert _codec.struct_to_dict(score.method_params) == {"masks": 8.0}
    assert len(score.saliency) == 0 and score.target.label == "star"
    # Supplied maps replace the method, so the default method name is not sent with them.
    supplied = _codec.score_request("shapes", [_rgb()], "grad_cam", "deletion", None, None, None, [saliency], None, 0)
    assert supplied.method == "" and len(supplied.saliency) == 1

    model_free = _codec.verbalize_request(None, None, "grad_cam", None, {"grid": 2}, "grid_regions", None, [saliency], None, 0)
    assert model_free.model == "" and len(model_free.images) == 0 and len(model_free.saliency) == 1
    assert _codec.struct_to_dict(model_free.template_params) == {"grid": 2.0}
    assert model_free.template == "grid_regions"


@pytest.mark.parametrize(
    ("images", "error", "match"),
    [
        (np.zeros((6, 5), dtype=np.uint8), ValueError, "height x width x 3"),
        (np.zeros((6, 5, 4), dtype=np.uint8), ValueError, "height x width x 3"),
        (np.zeros((2, 6, 5, 3), dtype=np.uint8), ValueError, "list of images"),
        (np.zeros((0, 5, 3), dtype=np.uint8), ValueError, "no pixels"),
        (np.zeros((6, 5, 3), dtype=np.int64), TypeError, "int64"),
        ("image.png", TypeError, "pathlib.Path"),
        ([_rgb(), 3], TypeError, r"images\[1\]"),
        (42, TypeError, "images"),
        (b"", ValueError, "empty"),
    ],
)
def test_bad_images_fail_before_any_rpc(closed_address: str, images: object, error: type[Exception], match: str) -> None:
    # Against a closed port, a request that got as far as an RPC would raise UnavailableError.
    with SaliencyClient(closed_address, timeout=5) as client, pytest.raises(error, match=match):
        client.explain("shapes", images)  # type: ignore[arg-type]


def test_bad_small_values_fail_before_any_rpc(closed_address: str) -> None:
    with SaliencyClient(closed_address, timeout=5) as client:
        with pytest.raises(TypeError, match="target"):
            client.explain("shapes", _rgb(), target=True)
        with pytest.raises(ValueError, match="seed"):
            client.explain("shapes", _rgb(), seed=-1)
        with pytest.raises(TypeError, match="params"):
            client.explain("shapes", _rgb(), params=[("steps", 3)])  # type: ignore[arg-type]


def test_responses_parse_into_dataclasses() -> None:
    saliency = np.arange(6, dtype=np.float32).reshape(2, 3)
    response = pb.ExplainResponse(
        explanations=[
            pb.Explanation(
                saliency=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[2, 3], data=saliency.tobytes()),
                target_index=1,
                target_label="square",
                predicted_index=2,
                predicted_label="star",
                probabilities=[0.25, 0.25, 0.5],
                provenance=_provenance("grad_cam"),
            )
        ]
    )
    [explanation] = _codec.explanations(response)
    np.testing.assert_array_equal(explanation.saliency, saliency)
    assert explanation.saliency.dtype == np.float32 and not explanation.saliency.flags.writeable
    assert (explanation.target, explanation.label, explanation.predicted, explanation.predicted_label) == (1, "square", 2, "star")
    assert explanation.probabilities.dtype == np.float32 and explanation.probabilities.tolist() == [0.25, 0.25, 0.5]
    assert explanation.provenance == saliency_client.Provenance(
        model="shapes", model_version="1", method="grad_cam", params={"steps": 8.0}, layer="layer3", seed=7, timings_ms={"predict": 1.5}
    )

    [result] = _codec.score_results(
        pb.ScoreResponse(results=[pb.ScoreResult(metric="deletion", value=0.25, curve=[0.9, 0.5, 0.1], higher_is_better=False)])
    )
    assert (result.metric, result.value, result.higher_is_better) == ("deletion", 0.25, False)
    assert result.curve.tolist() == [0.9, 0.5, 0.1] and result.params == {}

    with_provenance, without = _codec.verbalizations(
        pb.VerbalizeResponse(
            verbalizations=[
                pb.Verbalization(text="a", facts=[pb.Fact(region="top", share=0.5, sign="positive", rank=0)], provenance=_provenance("x")),
                pb.Verbalization(text="b", template="grid_regions"),
            ]
        )
    )
    assert with_provenance.facts == (saliency_client.Fact(region="top", share=0.5, sign="positive", rank=0),)
    assert with_provenance.provenance is not None and with_provenance.provenance.method == "x"
    assert without.provenance is None and without.facts == ()


def test_method_catalog_parses_and_looks_up() -> None:
    steps = pb.Parameter(name="steps", type=pb.PARAMETER_TYPE_INT, default_value=struct_pb2.Value(number_value=32), minimum=1, maximum=512)
    mode = pb.Parameter(name="mode", type=pb.PARAMETER_TYPE_STRING, default_value=struct_pb2.Value(string_value="a"), choices=["a", "b"])
    catalog = _codec.method_catalog(
        pb.ListMethodsResponse(
            methods=[pb.Method(name="integrated_gradients", family="gradient", parameters=[steps, mode])],
            metrics=[pb.Metric(name="deletion", higher_is_better=False)],
            templates=[pb.Template(name="grid_regions")],
        )
    )
    method = catalog.get("integrated_gradients")
    assert method.kind == "method" and method.family == "gradient" and method.higher_is_better is None
    assert method.parameters[0] == saliency_client.ParameterInfo(
        name="steps", type="int", default=32, minimum=1.0, maximum=512.0, choices=(), description=""
    )
    assert method.parameters[1].minimum is None and method.parameters[1].choices == ("a", "b")
    assert catalog.get("deletion").higher_is_better is False
    assert catalog.get("grid_regions", kind="template").kind == "template"
    with pytest.raises(KeyError):
        catalog.get("grid_regions", kind="method")


# --- calls and error mapping ------------------------------------------------------------------------


def _assert_model_not_found(error: NotFoundError) -> None:
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.reason == "MODEL_NOT_FOUND"
    assert error.metadata == {"model": "nope"}
    assert error.message == "no model 'nope'"
    assert str(error) == "NOT_FOUND MODEL_NOT_FOUND: no model 'nope'"


async def test_sync_client_maps_rich_errors_and_parses_models(server_address: str) -> None:
    def calls() -> tuple[list[saliency_client.ModelInfo], NotFoundError]:
        with SaliencyClient(server_address, timeout=10, metadata=[("x-caller", "sync test")]) as client:
            models = client.list_models()
            with pytest.raises(NotFoundError) as raised:
                client.get_model("nope")
            return models, raised.value

    # The fake server runs on this event loop, so the blocking client must run elsewhere.
    models, error = await asyncio.to_thread(calls)
    _assert_model_not_found(error)
    [model] = models
    assert model.name == "shapes" and model.ready and model.labels == LABELS
    assert model.description == "sync test"
    assert model.inputs == saliency_client.InputInfo(64, 64, 3, "NCHW", (0.5,) * 3, (0.25,) * 3)
    assert model.layers == (saliency_client.LayerInfo("layer3", (32, 8, 8)),) and model.default_layer == "layer3"


async def test_async_client_maps_rich_errors_and_parses_models(server_address: str) -> None:
    async with AsyncSaliencyClient(server_address, timeout=10, metadata=[("x-caller", "async test")]) as client:
        [model] = await client.list_models()
        with pytest.raises(NotFoundError) as raised:
            await client.get_model("nope")
        with pytest.raises(ResourceExhaustedError) as exhausted:
            await client.score("shapes", _rgb())
    _assert_model_not_found(raised.value)
    assert model.name == "shapes" and model.description == "async test"
    assert exhausted.value.reason == "" and exhausted.value.message == "batch too large"
    assert isinstance(exhausted.value.__cause__, grpc.aio.AioRpcError)


async def test_both_clients_explain_through_the_same_codec(server_address: str) -> None:
    images = [_rgb(6, 5), _rgb(3, 4)]
    async with AsyncSaliencyClient(server_address, timeout=10) as client:
        async_result = await client.explain("shapes", images, target=1, params={"steps": 3})

    def sync_call() -> list[saliency_client.Explanation]:
        with SaliencyClient(server_address, timeout=10) as client:
            return client.explain("shapes", images, target=1, params={"steps": 3})

    sync_result = await asyncio.to_thread(sync_call)
    for result in (async_result, sync_result):
        assert [e.saliency.shape for e in result] == [(6, 5), (3, 4)]
        assert [e.label for e in result] == ["square", "square"]


async def test_unimplemented_rpc_is_an_internal_error(server_address: str) -> None:
    async with AsyncSaliencyClient(server_address, timeout=10) as client:
        with pytest.raises(InternalError):
            await client.list_methods()


def test_sync_client_on_a_closed_port_is_unavailable(closed_address: str) -> None:
    with SaliencyClient(closed_address, timeout=5) as client, pytest.raises(UnavailableError) as raised:
        client.list_models()
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE and raised.value.reason == ""


async def test_async_client_on_a_closed_port_is_unavailable(closed_address: str) -> None:
    async with AsyncSaliencyClient(closed_address, timeout=5) as client:
        with pytest.raises(UnavailableError) as raised:
            await client.get_model("shapes")
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE and raised.value.reason == ""


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="timeout"):
        SaliencyClient("localhost:1", timeout=0)


# --- overlay --------------------------------------------------------------------------------------


def test_overlay_shape_dtype_and_hottest_pixel_is_reddest() -> None:
    image = np.full((16, 20, 3), 128, dtype=np.uint8)
    rows, cols = np.mgrid[0:16, 0:20]
    saliency = np.exp(-((rows - 5.0) ** 2 + (cols - 13.0) ** 2) / 8.0) - 0.3
    blended = overlay(image, saliency, alpha=0.6)
    assert blended.shape == (16, 20, 3) and blended.dtype == np.uint8
    pixels = blended.astype(np.int64)
    redness = pixels[..., 0] - np.maximum(pixels[..., 1], pixels[..., 2])
    assert np.unravel_index(np.argmax(redness), redness.shape) == (5, 13)
    assert np.count_nonzero(redness == redness.max()) == 1


def test_overlay_of_a_constant_map_is_uniform_and_alpha_zero_is_the_image() -> None:
    image = _rgb(4, 4)
    flat = overlay(np.zeros_like(image), np.full((4, 4), 3.0))
    assert (flat == flat[0, 0]).all()
    np.testing.assert_array_equal(overlay(image, np.random.default_rng(2).random((4, 4)), alpha=0.0), image)
    with pytest.raises(ValueError, match="differs"):
        overlay(image, np.zeros((3, 4)))
    with pytest.raises(TypeError, match="uint8"):
        overlay(image.astype(np.float32), np.zeros((4, 4)))


# --- CLI ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("steps=32", ("steps", 32)),
        ("center=true", ("center", True)),
        ("sigma=0.5", ("sigma", 0.5)),
        ("baseline=blur", ("baseline", "blur")),
        ("scales=[1, 2]", ("scales", [1, 2])),
        ("expr=a=b", ("expr", "a=b")),
        ("empty=", ("empty", "")),
    ],
)
def test_cli_param_values_are_json_when_they_parse(text: str, expected: tuple[str, object]) -> None:
    assert _parse_param(text) == expected


def test_cli_rejects_a_param_without_a_key() -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        _parse_param("steps")
    with pytest.raises(SystemExit):
        main(["explain", "x.png", "--param", "=3"])


def test_cli_reports_an_unreachable_server_without_a_traceback(
    tmp_path: pathlib.Path, closed_address: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "in.png"
    Image.fromarray(_rgb()).save(path)
    assert main(["explain", str(path), "--server", closed_address, "--out", str(tmp_path / "out.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: UNAVAILABLE") and "Traceback" not in err
    assert not (tmp_path / "out.png").exists()

    monkeypatch.setenv("SALIENCY_SERVER", closed_address)
    assert main(["models"]) == 1
    assert capsys.readouterr().err.startswith("error: UNAVAILABLE")


def test_cli_reports_an_unreadable_image(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", str(tmp_path / "missing.png"), "--server", "127.0.0.1:1"]) == 1
    assert capsys.readouterr().err.startswith("error: cannot read image")


async def test_cli_explain_writes_an_overlay_and_prints_the_verbalization(
    server_address: str, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, out = tmp_path / "in.png", tmp_path / "overlay.png"
    Image.fromarray(_rgb(12, 10)).convert("L").save(path)  # a grayscale file is read as RGB
    argv = ["explain", str(path), "--server", server_address, "--out", str(out), "--target", "1", "--param", "steps=16"]
    assert await asyncio.to_thread(main, argv) == 0
    printed = capsys.readouterr().out
    assert "grad_cam with steps=16: the evidence is in the upper left." in printed
    assert "target: square (index 1) p=0.200; predicted: star p=0.700" in printed
    with Image.open(out) as written:
        assert written.size == (10, 12) and written.mode == "RGB"

    assert await asyncio.to_thread(main, ["models", "--server", server_address]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["NAME", "VERSION", "READY", "REASON"]
    assert table[1].split() == ["shapes", "1", "yes"]


def test_verbalize_request_carries_tokens_labels_regions_and_styles() -> None:
    one = _codec.verbalize_request(None, None, "grad_cam", None, None, None, None, None, None, 0, tokens=["a", "b"], attributions=[0.5, -1])
    assert [(list(t.tokens), list(t.attributions)) for t in one.tokens] == [(["a", "b"], [0.5, -1.0])]
    assert one.method == "" and one.template == ""  # tokens replace the method; the server picks the form
    several = _codec.verbalize_request(
        None,
        None,
        "grad_cam",
        None,
        None,
        "token_order",
        None,
        None,
        None,
        0,
        tokens=[["a"], ["b", "c"]],
        attributions=[[1], np.array([2.0, 3.0])],
    )
    assert [len(t.tokens) for t in several.tokens] == [1, 2]
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    request = _codec.verbalize_request(
        "shapes", [np.zeros((8, 8, 3), np.uint8)], "grad_cam", None, None, "named_regions", None, None, None, 0,
        labels="star", regions={"dog": mask}, detail="short", style="terse", custom_templates={"named_regions.more": "{region}"},
    )  # fmt: skip
    assert [t.label for t in request.labels] == ["star"]
    (region,) = request.regions[0].regions
    assert region.name == "dog" and region.mask.dtype == pb.DATA_TYPE_UINT8 and sum(region.mask.data) == 4
    assert (request.detail, request.style, dict(request.custom_templates)) == ("short", "terse", {"named_regions.more": "{region}"})
    with pytest.raises(ValueError, match="one attribution sequence per text"):
        _codec.verbalize_request(None, None, "", None, None, None, None, None, None, 0, tokens=[["a"], ["b"]], attributions=[[1.0]])
    with pytest.raises(ValueError, match="go together"):
        _codec.verbalize_request(None, None, "", None, None, None, None, None, None, 0, tokens=["a"])
