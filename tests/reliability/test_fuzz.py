"""Hypothesis fuzzing of every RPC of SaliencyService and inference.GRPCInferenceService, and of the raw wire.

Invariants for every request: no INTERNAL or UNKNOWN status, every error carries a google.rpc.ErrorInfo
with a reason (UNIMPLEMENTED for an unknown method path is grpc's own answer and carries none), nothing
hangs (each call has a deadline well beyond the compute cap), and the server is healthy afterwards.
CI mode: about 500 requests; RELIABILITY_FULL=1: more than 10,000.
"""

from __future__ import annotations

import io
import math
import struct as struct_module
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from saliency.oip import grpc_predict_v2_pb2 as oip
from saliency.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from saliency.v1 import saliency_service_pb2 as pb
from saliency.v1 import saliency_service_pb2_grpc as pb_grpc
from saliency_service.config import Settings
from saliency_service.core.methods import METHODS
from saliency_service.core.metrics import METRICS
from saliency_service.core.verbalize import TEMPLATES
from saliency_service.shapes.generator import HELDOUT_SEED_OFFSET, generate
from tests.api.conftest import RunningServer, start_server, stop_server

from .common import FORBIDDEN, FULL, SUMMARY, error_reason, make_repository

# Requests per test: the full mode sums to 10,800, the CI mode to 540.
SHARE = {"explain": 2600, "score": 1600, "verbalize": 1600, "infer": 2000, "metadata": 1000, "raw": 1600, "raw_stream": 400}
SCALE = 1.0 if FULL else 0.05
CALL_TIMEOUT = 60.0
"""Far beyond what any request may cost under the compute cap below: a call that reaches it counts as a hang."""

METHOD_NAMES = METHODS.names()
METRIC_NAMES = METRICS.names()
TEMPLATE_NAMES = TEMPLATES.names()
PARAM_NAMES = sorted({p.name for cls in [*METHODS, *METRICS, *TEMPLATES] for p in cls.params})
LAYERS = ["layer1", "layer2", "layer3"]
MODELS = ["shapes", "broken", "headless", "", "missing"]


def _examples(name: str) -> int:
    return max(10, int(SHARE[name] * SCALE))


def _settings(name: str) -> Any:
    return settings(
        max_examples=_examples(name),
        deadline=None,
        database=None,
        derandomize=not FULL,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
        phases=(Phase.explicit, Phase.generate),  # no shrinking: the count of requests stays the bound set here
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repository = make_repository(tmp_path_factory.mktemp("fuzz-repository"))
    running = start_server(
        Settings(
            model_repository=repository,
            host="127.0.0.1",
            port=0,
            metrics_port=0,
            workers=2,
            max_queue=4,
            onnx_max_batch=32,
            max_pass_items=400,  # bounds the work any fuzzed request can ask for (answered COMPUTE_LIMIT beyond)
            max_batch_images=4,
            max_image_pixels=512 * 512,
            max_message_bytes=1024 * 1024,
            grace_seconds=1.0,
        )
    )
    yield running
    pool = running.server.pool
    deadline = time.monotonic() + 30
    while pool.outstanding and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert pool.outstanding == 0, "fuzzed work still holds workers after the run"
        with grpc.insecure_channel(running.address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            image = np.asarray(generate(HELDOUT_SEED_OFFSET + 4242).image)
            request = pb.ExplainRequest(model="shapes", method="grad_cam", images=[pb.Image(encoded=_png(image))])
            response = pb_grpc.SaliencyServiceStub(channel).Explain(request, timeout=60)
            assert len(response.explanations) == 1
        SUMMARY.add("fuzz: server healthy afterwards (health SERVING, a valid Explain answered, no worker held)")
    finally:
        stop_server(running)


@pytest.fixture(scope="module")
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024), ("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(server.address, options=options) as ch:
        yield ch


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


GOOD = np.asarray(generate(HELDOUT_SEED_OFFSET + 4243).image)
GOOD_PNG = _png(GOOD)
SMALL = np.asarray(Image.fromarray(GOOD).resize((24, 24)))


TRANSPORT_CAP = "SERVER: Received message larger than max"
"""grpc's own answer to a message over the transport cap, which the server sets at twice max_message_bytes as a
backstop (api/server.py): by design it carries no ErrorInfo; under the cap the application's MESSAGE_TOO_LARGE does."""


def check(rpc: str, call: Callable[[], object]) -> None:
    """Make one call and hold it to the invariants; count its status for the summary."""
    started = time.monotonic()
    try:
        call()
        code, reason, details = grpc.StatusCode.OK, "", ""
    except grpc.RpcError as error:
        code = error.code()  # type: ignore[attr-defined]
        reason = "" if code == grpc.StatusCode.OK else error_reason(error)
        details = error.details()  # type: ignore[attr-defined]
    SUMMARY.fuzz_codes[code.name] += 1
    SUMMARY.fuzz_by_rpc[rpc] += 1
    if reason:
        SUMMARY.fuzz_reasons[reason] += 1
    problem = ""
    if code in FORBIDDEN:
        problem = f"{code.name}: {details}"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - started >= CALL_TIMEOUT * 0.9:
        problem = f"hang: no answer within {CALL_TIMEOUT} s"
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and not reason and details.startswith(TRANSPORT_CAP):
        SUMMARY.fuzz_reasons["(transport cap, no ErrorInfo)"] += 1
    elif code not in (grpc.StatusCode.OK, grpc.StatusCode.UNIMPLEMENTED) and not reason:
        problem = f"{code.name} without an ErrorInfo reason: {details}"
    if problem:
        SUMMARY.fuzz_violations.append(f"{rpc}: {problem}")
    assert not problem, f"{rpc}: {problem}"


# ---- strategies ----


def mostly(values: list[str], size: int = 20) -> st.SearchStrategy[str]:
    """One of `values` three times in four, else any text: most requests get past the name lookups into the
    decoders and methods, and some try names nobody declared."""
    known, anything = st.sampled_from(values), st.text(max_size=size)
    return st.integers(0, 3).flatmap(lambda i: known if i < 3 else anything)


names = mostly(["shapes"] * 8 + MODELS, 40)
floats = st.floats(allow_nan=True, allow_infinity=True)
json_leaf = st.one_of(st.none(), st.booleans(), floats, st.integers(-(10**12), 10**12), st.text(max_size=30))
json_value = st.recursive(
    json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=8
)


@st.composite
def structs(draw: st.DrawFn) -> struct_pb2.Struct:
    """Params: real names with values of any type (and wild numbers), plus unknown names."""
    keys = draw(st.lists(st.one_of(st.sampled_from(PARAM_NAMES), st.text(max_size=20)), max_size=4, unique=True))
    message = struct_pb2.Struct()
    for key in keys:
        value = draw(st.one_of(json_value, st.sampled_from([0, -1, 1, 2, 3, 7, 64, 10**9, 0.5, -0.5, 1e308, "sum", "zero", "blur"])))
        if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
            message.fields[key].number_value = value  # Struct can hold them; json cannot, so set them directly
        else:
            message.update({key: value})
    return message


@st.composite
def tensors(draw: st.DrawFn, image: bool = True) -> pb.Tensor:
    dtype = draw(st.sampled_from([pb.DATA_TYPE_UINT8, pb.DATA_TYPE_FLOAT32, pb.DATA_TYPE_UNSPECIFIED, 7, -3]))
    kind = draw(st.sampled_from(["consistent", "random", "huge", "nan"]))
    if kind == "huge":
        shape = draw(st.lists(st.sampled_from([0, -1, 1, 3, 2**31, 2**40, 2**62, -(2**62)]), max_size=4))
        return pb.Tensor(dtype=dtype, shape=shape, data=draw(st.binary(max_size=64)))
    dims = draw(st.lists(st.integers(0, 40), min_size=0, max_size=4))
    if image and kind == "consistent" and draw(st.booleans()):
        dims = [draw(st.integers(1, 40)), draw(st.integers(1, 40)), draw(st.sampled_from([1, 3, 4]))]
    count = int(np.prod(dims)) if dims else 1
    width = 4 if dtype == pb.DATA_TYPE_FLOAT32 else 1
    if kind == "random":
        data = draw(st.binary(max_size=512))
    elif kind == "nan":
        values = np.full(count, draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e30, -5.0])), dtype="<f4")
        data = values.tobytes()
    else:
        data = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).random(count, dtype=np.float32).astype("<f4").tobytes()
        data = data if width == 4 else data[:count]
    return pb.Tensor(dtype=dtype, shape=dims, data=data)


@st.composite
def images(draw: st.DrawFn) -> pb.Image:
    kind = draw(st.sampled_from(["good", "good", "good", "small", "garbage", "truncated", "tensor", "empty", "good_tensor", "good_tensor"]))
    if kind == "good":
        return pb.Image(encoded=GOOD_PNG)
    if kind == "small":
        return pb.Image(encoded=_png(SMALL))
    if kind == "garbage":
        return pb.Image(encoded=draw(st.binary(max_size=256)))
    if kind == "truncated":
        return pb.Image(encoded=GOOD_PNG[: draw(st.integers(0, len(GOOD_PNG)))])
    if kind == "good_tensor":
        return pb.Image(tensor=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=list(SMALL.shape), data=SMALL.tobytes()))
    if kind == "empty":
        return pb.Image()
    return pb.Image(tensor=draw(tensors()))


@st.composite
def targets(draw: st.DrawFn) -> pb.Target | None:
    kind = draw(st.sampled_from(["none", "index", "label", "empty"]))
    if kind == "none":
        return None
    if kind == "index":
        return pb.Target(class_index=draw(st.one_of(st.integers(-3, 8), st.integers(-(2**31), 2**31 - 1))))
    if kind == "label":
        return pb.Target(label=draw(st.one_of(st.sampled_from(["circle", "star", "heart", "Star", ""]), st.text(max_size=12))))
    return pb.Target()


common = {
    "model": names,
    "images": st.lists(images(), max_size=5),
    "target": targets(),
    "foil": targets(),
    "layer": mostly(["", *LAYERS, "fc", "layer9"], 12),
    "layers": st.lists(st.one_of(st.sampled_from(LAYERS), st.text(max_size=8)), max_size=4),
    "seed": st.integers(0, 2**64 - 1),
    "baselines": st.lists(images(), max_size=3),
}
method_names = mostly(["", *METHOD_NAMES, *METHOD_NAMES])


def _build(cls: Any, values: dict[str, Any]) -> Any:
    message = cls()
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, list):
            getattr(message, key).extend(value)
        elif hasattr(value, "CopyFrom"):
            getattr(message, key).CopyFrom(value)
        else:
            setattr(message, key, value)
    return message


# ---- SaliencyService ----


@_settings("explain")
@given(st.fixed_dictionaries({**common, "method": method_names, "params": structs()}))
def test_fuzz_explain(channel: grpc.Channel, values: dict[str, Any]) -> None:
    request = _build(pb.ExplainRequest, values)
    check("Explain", lambda: pb_grpc.SaliencyServiceStub(channel).Explain(request, timeout=CALL_TIMEOUT))


@_settings("score")
@given(
    st.fixed_dictionaries(
        {
            **common,
            "metric": mostly(["", *METRIC_NAMES], 12),
            "metric_params": structs(),
            "method": method_names,
            "method_params": structs(),
            "saliency": st.lists(tensors(image=False), max_size=3),
            "masks": st.lists(tensors(image=False), max_size=2),
        }
    ),
    st.booleans(),
)
def test_fuzz_score(channel: grpc.Channel, values: dict[str, Any], streamed: bool) -> None:
    request = _build(pb.ScoreRequest, values)
    stub = pb_grpc.SaliencyServiceStub(channel)
    if streamed:
        check("ScoreStream", lambda: list(stub.ScoreStream(request, timeout=CALL_TIMEOUT)))
    else:
        check("Score", lambda: stub.Score(request, timeout=CALL_TIMEOUT))


@_settings("verbalize")
@given(
    st.fixed_dictionaries(
        {
            **common,
            "model": st.one_of(names, st.just("")),
            "method": method_names,
            "method_params": structs(),
            "template": mostly(["", *TEMPLATE_NAMES], 12),
            "template_params": structs(),
            "saliency": st.lists(tensors(image=False), max_size=3),
        }
    )
)
def test_fuzz_verbalize(channel: grpc.Channel, values: dict[str, Any]) -> None:
    request = _build(pb.VerbalizeRequest, values)
    check("Verbalize", lambda: pb_grpc.SaliencyServiceStub(channel).Verbalize(request, timeout=CALL_TIMEOUT))


# ---- Open Inference Protocol ----


@st.composite
def infer_requests(draw: st.DrawFn) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(
        model_name=draw(names), model_version=draw(st.sampled_from(["", "1", "2", "x"])), id=draw(st.text(max_size=8))
    )
    for _ in range(draw(st.integers(0, 2))):
        shape = draw(
            st.one_of(
                st.just([draw(st.integers(-1, 6)), 3, 128, 128]),
                st.lists(st.sampled_from([-1, 0, 1, 3, 128, 2**31, 2**62]), max_size=5),
            )
        )
        tensor = request.inputs.add(
            name=draw(st.sampled_from(["input", "x", ""])),
            datatype=draw(st.sampled_from(["FP32", "FP16", "INT8", "BYTES", "fp32", ""])),
            shape=shape,
        )
        count = int(np.prod(shape)) if shape and all(0 <= d <= 16 for d in shape[:1]) and all(0 <= d <= 128 for d in shape) else 0
        mode = draw(st.sampled_from(["raw", "raw_wrong", "contents", "contents_wrong", "nan", "none"]))
        if mode == "raw":
            request.raw_input_contents.append(np.zeros(count, dtype="<f4").tobytes())
        elif mode == "raw_wrong":
            request.raw_input_contents.append(draw(st.binary(max_size=128)))
        elif mode == "contents":
            tensor.contents.fp32_contents.extend(np.zeros(count, dtype=np.float32).tolist())
        elif mode == "contents_wrong":
            tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=16)))
        elif mode == "nan":
            values = np.zeros(count, dtype="<f4")
            values[: max(1, count // 2)] = np.nan
            request.raw_input_contents.append(values.tobytes())
    for _ in range(draw(st.integers(0, 3))):
        output = request.outputs.add(name=draw(st.sampled_from(["logits", "layer1", "layer3", "nope", ""])))
        if draw(st.booleans()):
            parameter = output.parameters["classification"]
            kind = draw(st.sampled_from(["int64", "uint64", "string", "bool", "double"]))
            if kind == "int64":
                parameter.int64_param = draw(st.integers(-(2**63), 2**63 - 1))
            elif kind == "uint64":
                parameter.uint64_param = draw(st.integers(0, 2**64 - 1))
            elif kind == "string":
                parameter.string_param = draw(st.text(max_size=4))
            elif kind == "bool":
                parameter.bool_param = draw(st.booleans())
            else:
                parameter.double_param = draw(floats)
    if draw(st.booleans()):
        request.parameters["priority"].string_param = draw(st.text(max_size=4))
    return request


@_settings("infer")
@given(infer_requests())
def test_fuzz_model_infer(channel: grpc.Channel, request: oip.ModelInferRequest) -> None:
    check("ModelInfer", lambda: oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=CALL_TIMEOUT))


@_settings("metadata")
@given(
    st.sampled_from(
        [
            "ModelReady",
            "ModelMetadata",
            "RepositoryIndex",
            "ServerLive",
            "ServerReady",
            "ServerMetadata",
            "GetModel",
            "ListModels",
            "ListMethods",
        ]
    ),
    names,
    st.text(max_size=6),
    st.booleans(),
)
def test_fuzz_metadata_rpcs(channel: grpc.Channel, rpc: str, name: str, version: str, ready: bool) -> None:
    inference = oip_grpc.GRPCInferenceServiceStub(channel)
    saliency = pb_grpc.SaliencyServiceStub(channel)
    calls: dict[str, Callable[[], object]] = {
        "ModelReady": lambda: inference.ModelReady(oip.ModelReadyRequest(name=name, version=version), timeout=CALL_TIMEOUT),
        "ModelMetadata": lambda: inference.ModelMetadata(oip.ModelMetadataRequest(name=name, version=version), timeout=CALL_TIMEOUT),
        "RepositoryIndex": lambda: inference.RepositoryIndex(
            oip.RepositoryIndexRequest(repository_name=name, ready=ready), timeout=CALL_TIMEOUT
        ),
        "ServerLive": lambda: inference.ServerLive(oip.ServerLiveRequest(), timeout=CALL_TIMEOUT),
        "ServerReady": lambda: inference.ServerReady(oip.ServerReadyRequest(), timeout=CALL_TIMEOUT),
        "ServerMetadata": lambda: inference.ServerMetadata(oip.ServerMetadataRequest(), timeout=CALL_TIMEOUT),
        "GetModel": lambda: saliency.GetModel(pb.GetModelRequest(name=name), timeout=CALL_TIMEOUT),
        "ListModels": lambda: saliency.ListModels(pb.ListModelsRequest(), timeout=CALL_TIMEOUT),
        "ListMethods": lambda: saliency.ListMethods(pb.ListMethodsRequest(), timeout=CALL_TIMEOUT),
    }
    check(rpc, calls[rpc])


# ---- the raw wire: random bytes as the serialized request of every RPC ----

PATHS = [
    *(f"/saliency.v1.SaliencyService/{m}" for m in ("Explain", "Score", "Verbalize", "ListModels", "GetModel", "ListMethods")),
    *(
        f"/inference.GRPCInferenceService/{m}"
        for m in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer", "RepositoryIndex")
    ),
    "/saliency.v1.SaliencyService/Unknown",
    "/inference.GRPCInferenceService/ModelStreamInfer",
]


@st.composite
def wire_bytes(draw: st.DrawFn) -> bytes:
    """Random bytes, or a valid field tag followed by junk (gets past the first byte of the parser)."""
    kind = draw(st.sampled_from(["random", "tagged", "varint"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "varint":
        return bytes([draw(st.integers(0, 255))]) + b"\xff" * draw(st.integers(1, 12))
    field_number, wire_type = draw(st.integers(1, 15)), draw(st.integers(0, 7))
    length = draw(st.integers(0, 2**20))
    varint = bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        varint.append(byte | (0x80 if length else 0))
        if not length:
            break
    return struct_module.pack("B", (field_number << 3) | wire_type) + bytes(varint) + draw(st.binary(max_size=64))


@_settings("raw")
@given(st.sampled_from(PATHS), wire_bytes())
def test_fuzz_raw_bytes_on_every_rpc(channel: grpc.Channel, path: str, raw: bytes) -> None:
    call = channel.unary_unary(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    check(path.rsplit("/", 1)[-1] + "(raw)", lambda: call(raw, timeout=CALL_TIMEOUT))


@_settings("raw_stream")
@given(wire_bytes())
def test_fuzz_raw_bytes_on_the_streaming_rpc(channel: grpc.Channel, raw: bytes) -> None:
    path = "/saliency.v1.SaliencyService/ScoreStream"
    call = channel.unary_stream(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    check("ScoreStream(raw)", lambda: list(call(raw, timeout=CALL_TIMEOUT)))


def test_fuzz_repository_exists(tmp_path: Path) -> None:
    """make_repository really makes two NOT READY models beside `shapes` (the fuzzing leans on them)."""
    root = make_repository(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["broken", "headless", "shapes"]
