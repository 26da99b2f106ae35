"""The only place proto messages meet numpy arrays and the client's dataclasses.

Requests are built here (with client-side checks of types, shapes and dtypes, so a bad input fails
before any RPC; value ranges are the server's to check) and responses are parsed here, so the sync
and async clients share every line of both.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
from google.protobuf import json_format, struct_pb2

from saliency.v1 import saliency_service_pb2 as pb

from ._types import (
    Explanation,
    Fact,
    InputInfo,
    LayerInfo,
    MethodCatalog,
    MethodInfo,
    ModelInfo,
    ParameterInfo,
    ParameterType,
    Progress,
    Provenance,
    ScoreResult,
    Verbalization,
)

#: One image: a height x width x 3 RGB array (uint8 0..255, or float32/float64 0..1),
#: encoded bytes (PNG, JPEG, ...), or the path of an image file.
ImageLike: TypeAlias = "npt.NDArray[Any] | bytes | pathlib.Path"
#: One image or a sequence of them.
Images: TypeAlias = "ImageLike | Sequence[ImageLike]"
#: One height x width float saliency map or a sequence of them.
SaliencyMaps: TypeAlias = "npt.NDArray[Any] | Sequence[npt.NDArray[Any]]"
#: The class to explain: None for the predicted class, an index, or a label.
TargetLike: TypeAlias = "int | str | None"
#: One text's tokens, or a sequence of texts' tokens.
Tokens: TypeAlias = "Sequence[str] | Sequence[Sequence[str]]"
#: One text's attributions (one number per token), or one sequence per text.
Attributions: TypeAlias = "Sequence[float] | npt.NDArray[Any] | Sequence[Sequence[float] | npt.NDArray[Any]]"
#: Caller-named regions: name -> height x width mask (nonzero inside), shared by every image, or one dict per image.
Regions: TypeAlias = "Mapping[str, npt.NDArray[Any]] | Sequence[Mapping[str, npt.NDArray[Any]]]"

_UINT64_LIMIT = 2**64
_ARRAY_DTYPES: dict[int, np.dtype[Any]] = {
    pb.DATA_TYPE_UINT8: np.dtype(np.uint8),
    pb.DATA_TYPE_FLOAT32: np.dtype("<f4"),
}
_PARAMETER_TYPES: dict[int, ParameterType] = {
    pb.PARAMETER_TYPE_INT: "int",
    pb.PARAMETER_TYPE_FLOAT: "float",
    pb.PARAMETER_TYPE_BOOL: "bool",
    pb.PARAMETER_TYPE_STRING: "string",
}

# --- numpy <-> Tensor ---------------------------------------------------------------------------


def image_message(image: ImageLike, where: str = "image") -> pb.Image:
    """One image as a proto `Image`; raises TypeError/ValueError for a type, dtype or shape it cannot be."""
    if isinstance(image, pathlib.Path):
        image = image.read_bytes()
    if isinstance(image, bytes):
        if not image:
            raise ValueError(f"{where}: encoded image is empty")
        return pb.Image(encoded=image)
    if not isinstance(image, np.ndarray):
        hint = "; wrap a file name in pathlib.Path" if isinstance(image, str) else ""
        raise TypeError(
            f"{where}: expected a numpy array (height x width x 3), encoded bytes or a pathlib.Path, got {type(image).__name__}{hint}"
        )
    if image.ndim != 3 or image.shape[2] != 3:
        hint = "; pass a list of images for a batch" if image.ndim == 4 else ""
        raise ValueError(f"{where}: shape {image.shape} is not height x width x 3 (RGB){hint}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{where}: shape {image.shape} has no pixels")
    if image.dtype == np.uint8:
        return pb.Image(tensor=_tensor(image, pb.DATA_TYPE_UINT8, np.dtype(np.uint8)))
    if image.dtype.kind == "f" and image.dtype.itemsize in (4, 8):  # float32/float64, either byte order
        return pb.Image(tensor=_tensor(image, pb.DATA_TYPE_FLOAT32, np.dtype("<f4")))
    raise TypeError(f"{where}: dtype {image.dtype} is not supported; use uint8 (0..255) or float32 (0..1)")


def saliency_message(saliency: npt.NDArray[Any], where: str = "saliency") -> pb.Tensor:
    """One height x width float map as a float32 proto `Tensor`."""
    if not isinstance(saliency, np.ndarray):
        raise TypeError(f"{where}: expected a numpy array (height x width), got {type(saliency).__name__}")
    if saliency.ndim != 2 or saliency.size == 0:
        raise ValueError(f"{where}: shape {saliency.shape} is not a non-empty height x width map")
    if not np.issubdtype(saliency.dtype, np.floating):
        raise TypeError(f"{where}: dtype {saliency.dtype} is not a float type")
    return _tensor(saliency, pb.DATA_TYPE_FLOAT32, np.dtype("<f4"))


def _tensor(array: npt.NDArray[Any], dtype: pb.DataType.ValueType, wire: np.dtype[Any]) -> pb.Tensor:
    # tobytes() writes C order whatever the array's strides; astype fixes the byte order.
    data = array.astype(wire, copy=False).tobytes()
    return pb.Tensor(dtype=dtype, shape=array.shape, data=data)


def array_from_tensor(tensor: pb.Tensor) -> npt.NDArray[Any]:
    """A read-only array viewing a proto `Tensor`; ValueError when dtype, shape and data disagree."""
    dtype = _ARRAY_DTYPES.get(tensor.dtype)
    if dtype is None:
        raise ValueError(f"tensor has unsupported dtype {pb.DataType.Name(tensor.dtype)}")
    shape = tuple(tensor.shape)
    if any(n < 0 for n in shape):
        raise ValueError(f"tensor has a negative dimension: {shape}")
    expected = math.prod(shape) * dtype.itemsize
    if len(tensor.data) != expected:
        raise ValueError(f"tensor of shape {shape} and dtype {dtype} needs {expected} bytes, got {len(tensor.data)}")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def _one_or_many(value: object, single: tuple[type, ...], what: str, one: str) -> list[Any]:
    if isinstance(value, single):
        return [value]
    if isinstance(value, Sequence):
        return list(value)
    raise TypeError(f"{what}: expected {one} or a sequence of them, got {type(value).__name__}")


def image_messages(images: Images) -> list[pb.Image]:
    """Images (one or a sequence) as proto `Image`s, checked before any RPC."""
    items = _one_or_many(images, (np.ndarray, bytes, pathlib.Path, str), "images", "an image (array, bytes or Path)")
    return [image_message(image, f"images[{i}]") for i, image in enumerate(items)]


def saliency_messages(saliency: SaliencyMaps | None) -> list[pb.Tensor]:
    """Caller-supplied saliency maps (one or a sequence) as float32 proto `Tensor`s."""
    if saliency is None:
        return []
    items = _one_or_many(saliency, (np.ndarray,), "saliency", "a height x width array")
    return [saliency_message(item, f"saliency[{i}]") for i, item in enumerate(items)]


def mask_messages(masks: SaliencyMaps | None) -> list[pb.Tensor]:
    """Ground-truth masks (one or a sequence of height x width bool/integer/float arrays) as uint8 `Tensor`s."""
    if masks is None:
        return []
    items = _one_or_many(masks, (np.ndarray,), "masks", "a height x width array")
    messages = []
    for i, mask in enumerate(items):
        if not isinstance(mask, np.ndarray):
            raise TypeError(f"masks[{i}]: expected a numpy array (height x width), got {type(mask).__name__}")
        if mask.ndim != 2 or mask.size == 0:
            raise ValueError(f"masks[{i}]: shape {mask.shape} is not a non-empty height x width mask")
        messages.append(_tensor((mask != 0).astype(np.uint8), pb.DATA_TYPE_UINT8, np.dtype(np.uint8)))
    return messages


# --- small values --------------------------------------------------------------------------------


def params_struct(params: Mapping[str, Any] | None, what: str = "params") -> struct_pb2.Struct | None:
    """A parameter dict as a `google.protobuf.Struct` (numbers travel as doubles); None stays unset."""
    if params is None:
        return None
    if not isinstance(params, Mapping):
        raise TypeError(f"{what}: expected a dict, got {type(params).__name__}")
    struct = struct_pb2.Struct()
    for key, value in params.items():
        if not isinstance(key, str):
            raise TypeError(f"{what}: key {key!r} is not a string")
        try:
            struct.update({key: value})
        except (ValueError, TypeError) as error:
            raise TypeError(
                f"{what}[{key!r}]: {type(value).__name__} is not a JSON value (bool, int, float, str, None, list, dict)"
            ) from error
    return struct


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A `Struct` as plain Python values (numbers come back as float)."""
    result: dict[str, Any] = json_format.MessageToDict(struct)
    return result


def target_message(target: TargetLike) -> pb.Target | None:
    """None -> unset (the predicted class), int -> class_index, str -> label."""
    if target is None:
        return None
    if isinstance(target, str):
        return pb.Target(label=target)
    if isinstance(target, (int, np.integer)) and not isinstance(target, (bool, np.bool_)):
        return pb.Target(class_index=int(target))
    raise TypeError(f"target: expected None, a class index (int) or a label (str), got {type(target).__name__}")


def _seed(seed: int) -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, (bool, np.bool_)):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    if not 0 <= int(seed) < _UINT64_LIMIT:
        raise ValueError(f"seed: {seed} is outside 0..2**64-1")
    return int(seed)


# --- requests ------------------------------------------------------------------------------------


def explain_request(
    model: str,
    images: Images,
    method: str,
    target: TargetLike,
    params: Mapping[str, Any] | None,
    layer: str | None,
    seed: int,
) -> pb.ExplainRequest:
    """The ExplainRequest for `SaliencyClient.explain`."""
    return pb.ExplainRequest(
        model=model,
        images=image_messages(images),
        method=method,
        params=params_struct(params),
        target=target_message(target),
        layer=layer or "",
        seed=_seed(seed),
    )


def score_request(
    model: str,
    images: Images,
    method: str,
    metric: str,
    target: TargetLike,
    params: Mapping[str, Any] | None,
    method_params: Mapping[str, Any] | None,
    saliency: SaliencyMaps | None,
    layer: str | None,
    seed: int,
) -> pb.ScoreRequest:
    """The ScoreRequest for `SaliencyClient.score`; `params` are the metric's."""
    return pb.ScoreRequest(
        model=model,
        images=image_messages(images),
        metric=metric,
        metric_params=params_struct(params),
        # Supplied maps replace the method: the default method name is not sent with them.
        method=method if saliency is None else "",
        method_params=params_struct(method_params, "method_params"),
        saliency=saliency_messages(saliency),
        target=target_message(target),
        layer=layer or "",
        seed=_seed(seed),
    )


def verbalize_request(
    model: str | None,
    images: Images | None,
    method: str,
    target: TargetLike,
    params: Mapping[str, Any] | None,
    template: str | None,
    method_params: Mapping[str, Any] | None,
    saliency: SaliencyMaps | None,
    layer: str | None,
    seed: int,
    *,
    tokens: Tokens | None = None,
    attributions: Attributions | None = None,
    labels: TargetLike | Sequence[int | str] = None,
    regions: Regions | None = None,
    detail: str | None = None,
    style: str | None = None,
    custom_templates: Mapping[str, str] | None = None,
) -> pb.VerbalizeRequest:
    """The VerbalizeRequest for `SaliencyClient.verbalize`; `params` are the template's."""
    token_texts = token_messages(tokens, attributions)
    return pb.VerbalizeRequest(
        model=model or "",
        images=image_messages(images) if images is not None else [],
        # Supplied maps or tokens replace the method: the default method name is not sent with them.
        method=method if saliency is None and not token_texts else "",
        method_params=params_struct(method_params, "method_params"),
        target=target_message(target),
        layer=layer or "",
        seed=_seed(seed),
        template=template or "",
        template_params=params_struct(params),
        saliency=saliency_messages(saliency),
        tokens=token_texts,
        labels=label_messages(labels),
        regions=region_sets(regions),
        detail=detail or "",
        style=style or "",
        custom_templates=dict(custom_templates or {}),
    )


def token_messages(tokens: Tokens | None, attributions: Attributions | None) -> list[pb.TokenAttributions]:
    """Token texts with their attributions: one text (a sequence of str and one of numbers) or several."""
    if tokens is None and attributions is None:
        return []
    if tokens is None or attributions is None:
        raise ValueError("tokens and attributions go together: send both, one attribution per token")
    if isinstance(tokens, str) or not isinstance(tokens, Sequence):
        raise TypeError(f"tokens: expected a sequence of str (one text) or of sequences of str, got {type(tokens).__name__}")
    one = len(tokens) > 0 and isinstance(tokens[0], str)
    texts: list[Sequence[str]] = [tokens] if one else list(tokens)  # type: ignore[list-item]
    values: list[Any] = [attributions] if one else list(attributions)
    if len(texts) != len(values):
        raise ValueError(f"tokens has {len(texts)} texts and attributions {len(values)}; send one attribution sequence per text")
    messages = []
    for i, (text, numbers) in enumerate(zip(texts, values, strict=True)):
        if isinstance(text, str) or not all(isinstance(token, str) for token in text):
            raise TypeError(f"tokens[{i}]: expected a sequence of str")
        array = np.asarray(numbers, dtype=np.float64)
        if array.ndim != 1:
            raise ValueError(f"attributions[{i}]: expected one number per token, got shape {array.shape}")
        messages.append(pb.TokenAttributions(tokens=list(text), attributions=array.tolist()))
    return messages


def label_messages(labels: TargetLike | Sequence[int | str]) -> list[pb.Target]:
    """True classes (one shared, or one per image) as proto `Target`s."""
    if labels is None:
        return []
    items = [labels] if isinstance(labels, (int, str, np.integer)) else list(labels)
    messages = []
    for label in items:
        message = target_message(label)
        if message is None:
            raise TypeError("labels: expected class indices or labels, got None")
        messages.append(message)
    return messages


def region_sets(regions: Regions | None) -> list[pb.RegionSet]:
    """Named regions (name -> mask), one dict shared by every image or one per image, as proto `RegionSet`s."""
    if regions is None:
        return []
    sets = [regions] if isinstance(regions, Mapping) else list(regions)
    messages = []
    for s, named in enumerate(sets):
        if not isinstance(named, Mapping):
            raise TypeError(f"regions[{s}]: expected a dict of name -> mask, got {type(named).__name__}")
        masks = mask_messages([np.asarray(mask) for mask in named.values()])
        messages.append(pb.RegionSet(regions=[pb.NamedRegion(name=str(name), mask=mask) for name, mask in zip(named, masks, strict=True)]))
    return messages


def add_method_options(
    request: pb.ExplainRequest | pb.ScoreRequest | pb.VerbalizeRequest,
    foil: TargetLike,
    layers: Sequence[str] | None,
    baselines: Images | None,
) -> None:
    """Set the options every map-making request shares: contrast class, several layers, baselines."""
    foil_message = target_message(foil)
    if foil_message is not None:
        request.foil.CopyFrom(foil_message)
    if layers is not None:
        if isinstance(layers, str):
            raise TypeError("layers: expected a sequence of layer names; for one layer use `layer=`")
        request.layers.extend(str(layer) for layer in layers)
    if baselines is not None:
        request.baselines.extend(image_messages(baselines))


# --- responses -----------------------------------------------------------------------------------


def _read_only(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    array.setflags(write=False)
    return array


def provenance(message: pb.Provenance) -> Provenance:
    """A proto `Provenance` as the dataclass."""
    return Provenance(
        model=message.model,
        model_version=message.model_version,
        method=message.method,
        params=struct_to_dict(message.params),
        layer=message.layer,
        seed=message.seed,
        timings_ms=dict(message.timings_ms),
        layers=tuple(message.layers),
        foil=message.foil_index if message.HasField("foil_index") else None,
        foil_label=message.foil_label,
    )


def explanations(response: pb.ExplainResponse) -> list[Explanation]:
    """Each `Explanation` of an ExplainResponse, in request order."""
    return [
        Explanation(
            saliency=array_from_tensor(e.saliency).astype(np.float32, copy=False),
            target=e.target_index,
            label=e.target_label,
            predicted=e.predicted_index,
            predicted_label=e.predicted_label,
            probabilities=_read_only(np.array(e.probabilities, dtype=np.float32)),
            provenance=provenance(e.provenance),
            layer_maps={m.layer: array_from_tensor(m.saliency).astype(np.float32, copy=False) for m in e.layer_maps},
        )
        for e in response.explanations
    ]


def score_results(response: pb.ScoreResponse) -> list[ScoreResult]:
    """Each `ScoreResult` of a ScoreResponse, in request order."""
    return [
        ScoreResult(
            metric=r.metric,
            value=r.value,
            curve=_read_only(np.array(r.curve, dtype=np.float64)),
            target=r.target_index,
            label=r.target_label,
            higher_is_better=r.higher_is_better,
            params=struct_to_dict(r.metric_params),
            provenance=provenance(r.provenance),
            curve_x=_read_only(np.array(r.curve_x, dtype=np.float64)),
            components=dict(r.components),
            maps=tuple(array_from_tensor(m) for m in r.maps),
        )
        for r in response.results
    ]


def progress(message: pb.Progress) -> Progress:
    return Progress(stage=message.stage, done=message.done, total=message.total)


def verbalizations(response: pb.VerbalizeResponse) -> list[Verbalization]:
    """Each `Verbalization` of a VerbalizeResponse, in request order."""
    return [
        Verbalization(
            text=v.text,
            facts=tuple(
                Fact(region=f.region, share=f.share, sign=f.sign, rank=f.rank, kind=f.kind, value=f.value, start=f.start, end=f.end)
                for f in v.facts
            ),
            template=v.template,
            provenance=provenance(v.provenance) if v.HasField("provenance") else None,
        )
        for v in response.verbalizations
    ]


def model_info(message: pb.Model) -> ModelInfo:
    """A proto `Model` as `ModelInfo`."""
    inputs = message.input
    return ModelInfo(
        name=message.name,
        version=message.version,
        task=message.task,
        description=message.description,
        labels=tuple(message.labels),
        inputs=InputInfo(
            height_px=inputs.height_px,
            width_px=inputs.width_px,
            channels=inputs.channels,
            layout=inputs.layout,
            mean=tuple(inputs.mean),
            std=tuple(inputs.std),
        ),
        layers=tuple(LayerInfo(name=layer.name, shape=tuple(layer.shape)) for layer in message.layers),
        default_layer=message.default_layer,
        ready=message.ready,
        reason=message.reason,
        device=message.device,
    )


def models(response: pb.ListModelsResponse) -> list[ModelInfo]:
    """Every model of a ListModelsResponse."""
    return [model_info(m) for m in response.models]


def model(response: pb.GetModelResponse) -> ModelInfo:
    """The model of a GetModelResponse."""
    return model_info(response.model)


def _parameter(message: pb.Parameter) -> ParameterInfo:
    # An unspecified type is a server bug; treating the value as opaque text keeps the catalog usable.
    kind = _PARAMETER_TYPES.get(message.type, "string")
    default: Any = json_format.MessageToDict(message.default_value) if message.HasField("default_value") else None
    if kind == "int" and isinstance(default, float) and default.is_integer():
        default = int(default)  # Struct numbers are doubles; an int parameter's default reads as an int
    return ParameterInfo(
        name=message.name,
        type=kind,
        default=default,
        minimum=message.minimum if message.HasField("minimum") else None,
        maximum=message.maximum if message.HasField("maximum") else None,
        choices=tuple(message.choices),
        description=message.description,
    )


def _parameters(messages: Sequence[pb.Parameter]) -> tuple[ParameterInfo, ...]:
    return tuple(_parameter(p) for p in messages)


def method_catalog(response: pb.ListMethodsResponse) -> MethodCatalog:
    """A ListMethodsResponse as a `MethodCatalog`."""
    return MethodCatalog(
        methods=tuple(
            MethodInfo(
                kind="method",
                name=m.name,
                description=m.description,
                parameters=_parameters(m.parameters),
                family=m.family,
                uses_layer=m.uses_layer,
                multi_layer=m.multi_layer,
                contrastive=m.contrastive,
                takes_baseline=m.takes_baseline,
                layer_optional=m.layer_optional,
            )
            for m in response.methods
        ),
        metrics=tuple(
            MethodInfo(
                kind="metric",
                name=m.name,
                description=m.description,
                parameters=_parameters(m.parameters),
                higher_is_better=m.higher_is_better,
            )
            for m in response.metrics
        ),
        templates=tuple(
            MethodInfo(kind="template", name=t.name, description=t.description, parameters=_parameters(t.parameters))
            for t in response.templates
        ),
        styles={s.name: s.description for s in response.styles},
    )
