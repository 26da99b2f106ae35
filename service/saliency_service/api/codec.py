"""The only place where proto messages become core values and back."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from google.protobuf import json_format, struct_pb2

from saliency.v1 import saliency_service_pb2 as pb
from saliency_service.core.engine import ExplainJob, ScoreJob, VerbalizeJob
from saliency_service.core.errors import InvalidArgument
from saliency_service.core.methods import SaliencyMethod
from saliency_service.core.metrics.base import ScoreMetric
from saliency_service.core.models.repository import ModelStatus
from saliency_service.core.params import ParamSpec, ParamValue
from saliency_service.core.types import (
    EncodedImage,
    Explanation,
    ImageInput,
    NamedRegion,
    Provenance,
    RawTensor,
    ScoreResult,
    TargetRequest,
    TokenAttributions,
    Verbalization,
)
from saliency_service.core.verbalize.base import Template

_DTYPE_NAMES = {pb.DATA_TYPE_UINT8: "uint8", pb.DATA_TYPE_FLOAT32: "float32"}
_PARAM_TYPES = {
    "int": pb.PARAMETER_TYPE_INT,
    "float": pb.PARAMETER_TYPE_FLOAT,
    "bool": pb.PARAMETER_TYPE_BOOL,
    "string": pb.PARAMETER_TYPE_STRING,
}


# ---- requests ----


def _tensor(message: pb.Tensor) -> RawTensor:
    return RawTensor(dtype=_DTYPE_NAMES.get(message.dtype, ""), shape=tuple(message.shape), data=message.data)


def _images(messages: Sequence[pb.Image], role: str = "image") -> list[ImageInput]:
    images: list[ImageInput] = []
    for index, message in enumerate(messages):
        kind = message.WhichOneof("data")
        if kind == "encoded":
            images.append(EncodedImage(message.encoded))
        elif kind == "tensor":
            images.append(_tensor(message.tensor))
        else:
            raise InvalidArgument(
                f"{role.upper()}_EMPTY", f"{role} {index} has neither `encoded` bytes nor a `tensor`", {f"{role}_index": index}
            )
    return images


def _params(struct: struct_pb2.Struct) -> dict[str, Any]:
    try:
        return json_format.MessageToDict(struct)
    except ValueError:  # a NaN or infinite number_value, which JSON (and so no parameter) can hold
        raise InvalidArgument(
            "INVALID_PARAMETER", "a parameter holds a NaN or infinite number; parameters must be finite numbers, strings or booleans"
        ) from None


def _target(message: pb.Target, present: bool) -> TargetRequest | None:
    if not present:
        return None
    kind = message.WhichOneof("kind")
    if kind == "class_index":
        return TargetRequest(class_index=message.class_index)
    if kind == "label":
        return TargetRequest(label=message.label)
    return None


def explain_job(request: pb.ExplainRequest) -> ExplainJob:
    return ExplainJob(
        model=request.model,
        images=_images(request.images),
        method=request.method,
        params=_params(request.params),
        target=_target(request.target, request.HasField("target")),
        layer=request.layer,
        seed=request.seed,
        foil=_target(request.foil, request.HasField("foil")),
        layers=list(request.layers),
        baselines=_images(request.baselines, "baseline"),
    )


def score_job(request: pb.ScoreRequest) -> ScoreJob:
    return ScoreJob(
        model=request.model,
        images=_images(request.images),
        metric=request.metric,
        metric_params=_params(request.metric_params),
        method=request.method,
        method_params=_params(request.method_params),
        saliency=[_tensor(t) for t in request.saliency],
        target=_target(request.target, request.HasField("target")),
        layer=request.layer,
        seed=request.seed,
        foil=_target(request.foil, request.HasField("foil")),
        layers=list(request.layers),
        baselines=_images(request.baselines, "baseline"),
        masks=[_tensor(t) for t in request.masks],
    )


def verbalize_job(request: pb.VerbalizeRequest) -> VerbalizeJob:
    return VerbalizeJob(
        model=request.model,
        images=_images(request.images),
        method=request.method,
        method_params=_params(request.method_params),
        target=_target(request.target, request.HasField("target")),
        layer=request.layer,
        seed=request.seed,
        template=request.template,
        template_params=_params(request.template_params),
        saliency=[_tensor(t) for t in request.saliency],
        foil=_target(request.foil, request.HasField("foil")),
        layers=list(request.layers),
        baselines=_images(request.baselines, "baseline"),
        tokens=[TokenAttributions(tuple(t.tokens), tuple(t.attributions)) for t in request.tokens],
        labels=[label for label in (_target(m, True) for m in request.labels) if label is not None],
        regions=[[NamedRegion(r.name, _tensor(r.mask)) for r in region_set.regions] for region_set in request.regions],
        detail=request.detail,
        style=request.style,
        custom_templates=dict(request.custom_templates),
    )


# ---- responses ----


def _struct(values: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(dict(values))
    return struct


def provenance(value: Provenance) -> pb.Provenance:
    return pb.Provenance(
        model=value.model,
        model_version=value.model_version,
        method=value.method,
        params=_struct(value.params),
        layer=value.layer,
        seed=value.seed,
        timings_ms=dict(value.timings_ms),
        layers=list(value.layers),
        foil_index=value.foil,
        foil_label=value.foil_label,
    )


def float_tensor(array: np.ndarray) -> pb.Tensor:
    data = np.ascontiguousarray(array, dtype="<f4")
    return pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=list(data.shape), data=data.tobytes())


def explain_response(explanations: Sequence[Explanation], labels: Sequence[str]) -> pb.ExplainResponse:
    return pb.ExplainResponse(
        explanations=[
            pb.Explanation(
                saliency=float_tensor(e.saliency),
                target_index=e.target,
                target_label=e.label,
                predicted_index=e.predicted,
                predicted_label=labels[e.predicted],
                probabilities=e.probabilities.tolist(),
                provenance=provenance(e.provenance),
                layer_maps=[pb.LayerMap(layer=layer, saliency=float_tensor(saliency)) for layer, saliency in e.layer_maps.items()],
            )
            for e in explanations
        ]
    )


def score_response(results: Sequence[ScoreResult]) -> pb.ScoreResponse:
    return pb.ScoreResponse(
        results=[
            pb.ScoreResult(
                metric=r.metric,
                value=r.value,
                curve=np.asarray(r.curve, dtype=np.float64).tolist(),
                target_index=r.target,
                target_label=r.label,
                higher_is_better=r.higher_is_better,
                metric_params=_struct(r.params),
                provenance=provenance(r.provenance),
                curve_x=np.asarray(r.curve_x, dtype=np.float64).tolist(),
                components=dict(r.components),
                maps=[float_tensor(m) for m in r.maps],
            )
            for r in results
        ]
    )


def score_progress(stage: str, done: int, total: int) -> pb.ScoreEvent:
    return pb.ScoreEvent(progress=pb.Progress(stage=stage, done=done, total=total))


def verbalize_response(items: Sequence[Verbalization]) -> pb.VerbalizeResponse:
    return pb.VerbalizeResponse(
        verbalizations=[
            pb.Verbalization(
                text=v.text,
                facts=[
                    pb.Fact(region=f.region, share=f.share, sign=f.sign, rank=f.rank, kind=f.kind, value=f.value, start=f.start, end=f.end)
                    for f in v.facts
                ],
                template=v.template,
                provenance=provenance(v.provenance) if v.provenance is not None else None,
            )
            for v in items
        ]
    )


def model(status: ModelStatus) -> pb.Model:
    message = pb.Model(name=status.name, ready=status.ready, reason=status.reason)
    config = status.config
    if config is not None:
        message.version = config.version
        message.task = config.task
        message.description = config.description
        message.input.CopyFrom(
            pb.ModelInput(
                height_px=config.input.height,
                width_px=config.input.width,
                channels=config.input.channels,
                layout=config.input.layout,
                mean=list(config.input.mean),
                std=list(config.input.std),
            )
        )
        message.labels.extend(config.labels)
        message.layers.extend(pb.Layer(name=layer.name, shape=list(layer.shape)) for layer in config.layers)
        message.default_layer = config.default_layer or ""
    if status.model is not None:
        message.device = status.model.onnx.device
    return message


def _value(value: ParamValue) -> struct_pb2.Value:
    if isinstance(value, bool):
        return struct_pb2.Value(bool_value=value)
    if isinstance(value, str):
        return struct_pb2.Value(string_value=value)
    return struct_pb2.Value(number_value=float(value))


def _parameter(spec: ParamSpec) -> pb.Parameter:
    message = pb.Parameter(name=spec.name, type=_PARAM_TYPES[spec.type], description=spec.description, choices=list(spec.choices))
    message.default_value.CopyFrom(_value(spec.default))
    if spec.minimum is not None:
        message.minimum = spec.minimum
    if spec.maximum is not None:
        message.maximum = spec.maximum
    return message


def method(cls: type[SaliencyMethod]) -> pb.Method:
    return pb.Method(
        name=cls.name,
        description=cls.description,
        family=cls.family,
        uses_layer=cls.uses_layer,
        parameters=[_parameter(p) for p in cls.params],
        multi_layer=cls.multi_layer,
        contrastive=cls.contrastive,
        takes_baseline=cls.takes_baseline,
        layer_optional=cls.layer_optional,
    )


def metric(cls: type[ScoreMetric]) -> pb.Metric:
    return pb.Metric(
        name=cls.name, description=cls.description, higher_is_better=cls.higher_is_better, parameters=[_parameter(p) for p in cls.params]
    )


def template(cls: type[Template]) -> pb.Template:
    return pb.Template(name=cls.name, description=cls.description, parameters=[_parameter(p) for p in cls.params])
