"""The three use cases — explain, score, verbalize — over the model repository and the registries.

Everything a request names is validated here, once, before any compute: model, method, metric,
template, parameters, layer, target and images. The engine is synchronous; the API runs it in a
bounded worker pool.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from saliency_service.core.errors import InvalidArgument
from saliency_service.core.images import ImageLimits, check_batch, decode_image, decode_map, resize_map, to_model_input
from saliency_service.core.methods import METHODS, MethodInput, SaliencyMethod
from saliency_service.core.metrics import METRICS, MetricInput
from saliency_service.core.models.model import LoadedModel
from saliency_service.core.models.repository import ModelRepository
from saliency_service.core.params import ParamValue, resolve_params
from saliency_service.core.types import (
    Explanation,
    ImageInput,
    Provenance,
    RawTensor,
    ScoreResult,
    TargetRequest,
    Verbalization,
)
from saliency_service.core.verbalize import TEMPLATES, VerbalizeInput

DEFAULT_TEMPLATE = "grid_regions"
SUPPLIED = "supplied"


@dataclass(frozen=True)
class ExplainJob:
    model: str
    images: Sequence[ImageInput]
    method: str
    params: Mapping[str, object] = field(default_factory=dict)
    target: TargetRequest | None = None
    layer: str = ""
    seed: int = 0


@dataclass(frozen=True)
class ScoreJob:
    model: str
    images: Sequence[ImageInput]
    metric: str
    metric_params: Mapping[str, object] = field(default_factory=dict)
    method: str = ""
    method_params: Mapping[str, object] = field(default_factory=dict)
    saliency: Sequence[RawTensor] = ()
    target: TargetRequest | None = None
    layer: str = ""
    seed: int = 0


@dataclass(frozen=True)
class VerbalizeJob:
    model: str = ""
    images: Sequence[ImageInput] = ()
    method: str = ""
    method_params: Mapping[str, object] = field(default_factory=dict)
    target: TargetRequest | None = None
    layer: str = ""
    seed: int = 0
    template: str = ""
    template_params: Mapping[str, object] = field(default_factory=dict)
    saliency: Sequence[RawTensor] = ()


class _Timer:
    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - start) * 1000.0


@dataclass(frozen=True)
class _Batch:
    """Decoded images with the model's prediction and the resolved targets."""

    sizes: list[tuple[int, int]]
    x: np.ndarray
    probabilities: np.ndarray
    predicted: np.ndarray
    targets: np.ndarray


@dataclass(frozen=True)
class _Maps:
    """Maps at the model's input resolution plus the provenance that made them."""

    maps: np.ndarray
    method: str
    params: Mapping[str, ParamValue]
    layer: str


class Engine:
    def __init__(self, repository: ModelRepository, limits: ImageLimits = ImageLimits()) -> None:
        self.repository = repository
        self.limits = limits

    # ---- use cases ----

    def explain(self, job: ExplainJob) -> list[Explanation]:
        timer = _Timer()
        model = self.repository.get(job.model)
        method, params, layer = self._resolve_method(model, job.method, job.params, job.layer)
        batch = self._prepare(model, job.images, job.target, timer)
        maps = self._attribute(model, method, params, layer, batch, job.seed, timer)
        provenance = self._provenance(model, maps, job.seed, timer)
        labels = model.config.labels
        return [
            Explanation(
                saliency=resize_map(maps.maps[i], h, w),
                target=int(batch.targets[i]),
                label=labels[int(batch.targets[i])],
                predicted=int(batch.predicted[i]),
                probabilities=batch.probabilities[i],
                provenance=provenance,
            )
            for i, (h, w) in enumerate(batch.sizes)
        ]

    def score(self, job: ScoreJob) -> list[ScoreResult]:
        timer = _Timer()
        model = self.repository.get(job.model)
        metric_cls = METRICS.get(job.metric)
        metric_params = resolve_params(metric_cls.params, job.metric_params, f"metric '{job.metric}'")
        maps = self._maps_for(model, job.images, job.saliency, job.method, job.method_params, job.layer, job.target, job.seed, timer)
        batch, made = maps
        with timer.stage("score"):
            values = metric_cls().score(MetricInput(model, batch.x, made.maps, batch.targets, metric_params, job.seed))
        provenance = self._provenance(model, made, job.seed, timer)
        labels = model.config.labels
        return [
            ScoreResult(
                metric=job.metric,
                value=value.value,
                curve=value.curve,
                target=int(batch.targets[i]),
                label=labels[int(batch.targets[i])],
                params=metric_params,
                higher_is_better=metric_cls.higher_is_better,
                provenance=provenance,
            )
            for i, value in enumerate(values)
        ]

    def verbalize(self, job: VerbalizeJob) -> list[Verbalization]:
        timer = _Timer()
        name = job.template or DEFAULT_TEMPLATE
        template_cls = TEMPLATES.get(name)
        template_params = resolve_params(template_cls.params, job.template_params, f"template '{name}'")
        template = template_cls()
        if not job.model:
            # Model-free: the caller's maps alone.
            if job.images or job.method:
                raise InvalidArgument(
                    "MODEL_REQUIRED", "images or a method were sent without a model; name the model, or send only `saliency` maps"
                )
            check_batch(job.saliency, self.limits, "saliency maps")
            maps = [decode_map(tensor, i, self.limits) for i, tensor in enumerate(job.saliency)]
            with timer.stage("verbalize"):
                return [template.render(VerbalizeInput(saliency, None, None, template_params)) for saliency in maps]
        model = self.repository.get(job.model)
        batch, made = self._maps_for(model, job.images, job.saliency, job.method, job.method_params, job.layer, job.target, job.seed, timer)
        labels = model.config.labels
        with timer.stage("verbalize"):
            texts = [
                template.render(
                    VerbalizeInput(
                        made.maps[i], labels[int(batch.targets[i])], float(batch.probabilities[i, int(batch.targets[i])]), template_params
                    )
                )
                for i in range(len(batch.targets))
            ]
        provenance = self._provenance(model, made, job.seed, timer)
        return [Verbalization(text.text, text.facts, name, provenance) for text in texts]

    # ---- shared steps ----

    def _resolve_method(
        self, model: LoadedModel, name: str, given: Mapping[str, object], layer: str
    ) -> tuple[type[SaliencyMethod], dict[str, ParamValue], str]:
        if not name:
            raise InvalidArgument("METHOD_REQUIRED", f"name a saliency method; available: {', '.join(METHODS.names())}")
        method = METHODS.get(name)
        params = resolve_params(method.params, given, f"method '{name}'")
        if method.uses_layer:
            layer = layer or (model.config.default_layer or "")
            if not layer:
                raise InvalidArgument("NO_LAYER", f"method '{name}' needs a layer, and model '{model.name}' declares none")
            model.config.layer(layer)
        elif layer:
            raise InvalidArgument(
                "LAYER_NOT_USED", f"method '{name}' works on the input, not at a layer; leave `layer` empty", {"layer": layer}
            )
        return method, params, layer

    def _prepare(self, model: LoadedModel, images: Sequence[ImageInput], target: TargetRequest | None, timer: _Timer) -> _Batch:
        check_batch(images, self.limits)
        with timer.stage("decode"):
            decoded = [decode_image(image, i, self.limits) for i, image in enumerate(images)]
            x = to_model_input(decoded, model.config.input)
        with timer.stage("predict"):
            logits = model.logits(x)
        probabilities = _softmax(logits)
        predicted = probabilities.argmax(axis=1)
        return _Batch(
            sizes=[(image.shape[0], image.shape[1]) for image in decoded],
            x=x,
            probabilities=probabilities,
            predicted=predicted,
            targets=self._targets(model, target, predicted),
        )

    @staticmethod
    def _targets(model: LoadedModel, target: TargetRequest | None, predicted: np.ndarray) -> np.ndarray:
        if target is None or (target.class_index is None and not target.label):
            return predicted.astype(np.int64)
        if target.label:
            index = model.config.class_index(target.label)
        else:
            assert target.class_index is not None  # narrowed above; not an input check
            index = target.class_index
            if not 0 <= index < model.config.num_classes:
                raise InvalidArgument(
                    "TARGET_OUT_OF_RANGE",
                    f"target class {index} is out of range for model '{model.name}' "
                    f"({model.config.num_classes} classes: 0..{model.config.num_classes - 1})",
                    {"target": index, "num_classes": model.config.num_classes},
                )
        return np.full(len(predicted), index, dtype=np.int64)

    def _attribute(
        self,
        model: LoadedModel,
        method: type[SaliencyMethod],
        params: Mapping[str, ParamValue],
        layer: str,
        batch: _Batch,
        seed: int,
        timer: _Timer,
    ) -> _Maps:
        with timer.stage("attribute"):
            maps = method().attribute(MethodInput(model, batch.x, batch.targets, params, layer or None, seed))
        return _Maps(np.asarray(maps, dtype=np.float32), method.name, params, layer)

    def _maps_for(
        self,
        model: LoadedModel,
        images: Sequence[ImageInput],
        saliency: Sequence[RawTensor],
        method_name: str,
        method_params: Mapping[str, object],
        layer: str,
        target: TargetRequest | None,
        seed: int,
        timer: _Timer,
    ) -> tuple[_Batch, _Maps]:
        """Maps for Score and Verbalize: the caller's (resized to the model) or a method's."""
        if saliency:
            if method_name or method_params or layer:
                raise InvalidArgument("AMBIGUOUS_SALIENCY", "send either saliency maps or a method to compute them, not both")
            if len(saliency) != len(images):
                raise InvalidArgument(
                    "MAP_COUNT_MISMATCH", f"{len(saliency)} saliency maps for {len(images)} images; send one map per image"
                )
            check_batch(saliency, self.limits, "saliency maps")
            spec = model.config.input
            maps = np.stack([resize_map(decode_map(tensor, i, self.limits), spec.height, spec.width) for i, tensor in enumerate(saliency)])
            return self._prepare(model, images, target, timer), _Maps(maps, SUPPLIED, {}, "")
        method, params, layer = self._resolve_method(model, method_name, method_params, layer)
        batch = self._prepare(model, images, target, timer)
        return batch, self._attribute(model, method, params, layer, batch, seed, timer)

    @staticmethod
    def _provenance(model: LoadedModel, maps: _Maps, seed: int, timer: _Timer) -> Provenance:
        return Provenance(
            model=model.name,
            model_version=model.config.version,
            method=maps.method,
            params=dict(maps.params),
            layer=maps.layer,
            seed=seed,
            timings_ms=dict(timer.ms),
        )


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    probabilities: np.ndarray = (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
    return probabilities
