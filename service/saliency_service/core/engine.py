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

from saliency_service.core.errors import InvalidArgument, ResourceExhausted
from saliency_service.core.images import (
    ImageLimits,
    check_batch,
    decode_image,
    decode_map,
    decode_mask,
    resize_map,
    resize_mask,
    to_model_input,
)
from saliency_service.core.methods import METHODS, MethodInput, SaliencyMethod
from saliency_service.core.methods.base import Activation
from saliency_service.core.metrics import METRICS, MetricInput, ScoreMetric
from saliency_service.core.metrics.base import ProgressFn, no_progress
from saliency_service.core.models.model import LoadedModel
from saliency_service.core.models.repository import ModelRepository
from saliency_service.core.params import ParamValue, resolve_params
from saliency_service.core.types import (
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
from saliency_service.core.verbalize import TEMPLATES, Template, VerbalizeInput
from saliency_service.core.verbalize.base import Outcome
from saliency_service.core.verbalize.phrasebook import load_styles, phrases_for
from saliency_service.core.verbalize.token_forms import checked_tokens

DEFAULT_TEMPLATE = "grid_regions"
DEFAULT_TOKEN_TEMPLATE = "token_summary"
MAX_REGIONS = 64
"""Most named regions in one set."""
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
    foil: TargetRequest | None = None
    layers: Sequence[str] = ()
    baselines: Sequence[ImageInput] = ()


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
    foil: TargetRequest | None = None
    layers: Sequence[str] = ()
    baselines: Sequence[ImageInput] = ()
    masks: Sequence[RawTensor] = ()


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
    foil: TargetRequest | None = None
    layers: Sequence[str] = ()
    baselines: Sequence[ImageInput] = ()
    tokens: Sequence[TokenAttributions] = ()
    labels: Sequence[TargetRequest] = ()
    """The true class per image (one shared, or one per image), for the correctness line."""
    regions: Sequence[Sequence[NamedRegion]] = ()
    """Caller-named regions: one set shared by every image, or one set per image."""
    detail: str = ""
    style: str = ""
    custom_templates: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _MethodCall:
    """How the maps of a request are made: everything the three use cases share."""

    method: str
    params: Mapping[str, object]
    target: TargetRequest | None
    foil: TargetRequest | None
    layer: str
    layers: Sequence[str]
    baselines: Sequence[ImageInput]
    seed: int

    @classmethod
    def of(cls, job: ExplainJob | ScoreJob | VerbalizeJob) -> _MethodCall:
        params = job.params if isinstance(job, ExplainJob) else job.method_params
        return cls(job.method, params, job.target, job.foil, job.layer, job.layers, job.baselines, job.seed)


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
    foil: int | None = None
    activations: Mapping[str, Activation] = field(default_factory=dict)
    """Layer activations from the prediction pass (on the model's device), for methods that start their backward pass there."""


@dataclass(frozen=True)
class _Maps:
    """Maps at the model's input resolution plus the provenance that made them."""

    maps: np.ndarray
    method: str
    params: Mapping[str, ParamValue]
    layers: tuple[str, ...]
    per_layer: Mapping[str, np.ndarray] = field(default_factory=dict)
    made_by: tuple[_Resolved, np.ndarray | None] | None = None
    """The resolved method and the baselines that made the maps; None for supplied maps."""


@dataclass(frozen=True)
class _Resolved:
    method: type[SaliencyMethod]
    params: dict[str, ParamValue]
    layers: tuple[str, ...]


class Engine:
    def __init__(self, repository: ModelRepository, limits: ImageLimits = ImageLimits()) -> None:
        self.repository = repository
        self.limits = limits
        load_styles()  # a broken style file stops the server at start, not the first Verbalize

    # ---- use cases ----

    def explain(self, job: ExplainJob) -> list[Explanation]:
        timer = _Timer()
        model = self.repository.get(job.model)
        call = _MethodCall.of(job)
        resolved = self._resolve_method(model, call)
        batch = self._prepare(model, job.images, job.target, timer, call.foil, resolved)
        maps = self._attribute(model, resolved, batch, self._baselines(model, call.baselines, len(job.images)), job.seed, timer)
        provenance = self._provenance(model, maps, batch, job.seed, timer)
        labels = model.config.labels
        return [
            Explanation(
                saliency=resize_map(maps.maps[i], h, w),
                target=int(batch.targets[i]),
                label=labels[int(batch.targets[i])],
                predicted=int(batch.predicted[i]),
                probabilities=batch.probabilities[i],
                provenance=provenance,
                layer_maps={layer: resize_map(layer_maps[i], h, w) for layer, layer_maps in maps.per_layer.items()},
            )
            for i, (h, w) in enumerate(batch.sizes)
        ]

    def score(self, job: ScoreJob, progress: ProgressFn = no_progress) -> list[ScoreResult]:
        """Score every image's map; `progress(stage, done, total)` hears how far long metrics have come."""
        timer = _Timer()
        model = self.repository.get(job.model)
        metric_cls = METRICS.get(job.metric)
        metric_params = resolve_params(metric_cls.params, job.metric_params, f"metric '{job.metric}'")
        self._check_metric_needs(metric_cls, job)
        call = _MethodCall.of(job)
        batch, made = self._maps_for(model, job.images, job.saliency, call, timer, foil_with_maps=metric_cls.needs_foil)
        masks = self._masks(model, job.masks, len(job.images)) if job.masks else None
        explain = None
        if made.made_by is not None:
            resolved, baseline = made.made_by
            served = model

            def explain(x: np.ndarray, targets: np.ndarray, model: LoadedModel | None = None) -> np.ndarray:
                again = _Batch([], x, np.zeros(0), np.zeros(0), np.asarray(targets, dtype=np.int64), batch.foil)
                base = baseline
                if base is not None and len(base) != len(x):
                    base = np.repeat(base, len(x) // len(base), axis=0)  # k copies per item, item-major
                return self._attribute(model or served, resolved, again, base, job.seed, _Timer()).maps

        foils = None if batch.foil is None else np.full(len(batch.targets), batch.foil, dtype=np.int64)
        with timer.stage("score"):
            values = metric_cls().score(
                MetricInput(model, batch.x, made.maps, batch.targets, metric_params, job.seed, masks, explain, foils, progress)
            )
        provenance = self._provenance(model, made, batch, job.seed, timer)
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
                curve_x=value.curve_x,
                components=value.components,
                maps=value.maps,
            )
            for i, value in enumerate(values)
        ]

    @staticmethod
    def _check_metric_needs(metric_cls: type[ScoreMetric], job: ScoreJob) -> None:
        name = metric_cls.name
        if metric_cls.needs_masks and not job.masks:
            raise InvalidArgument(
                "MASKS_REQUIRED",
                f"metric '{name}' measures localisation against a ground truth: send `masks`, one per image (nonzero on the object)",
                {"metric": name},
            )
        if job.masks and not metric_cls.needs_masks:
            users = [m for m in METRICS.names() if METRICS.get(m).needs_masks]
            raise InvalidArgument(
                "MASKS_NOT_USED",
                f"metric '{name}' does not use ground-truth masks; drop `masks` or use one of: {', '.join(users) or 'none'}",
                {"metric": name},
            )
        if metric_cls.needs_method and not job.method:
            raise InvalidArgument(
                "METHOD_REQUIRED_FOR_METRIC",
                f"metric '{name}' re-explains (other inputs, classes or a changed model), so it needs the method, not a finished map: "
                "send `method` (and its parameters) instead of `saliency`",
                {"metric": name},
            )
        if metric_cls.needs_foil and not _names_class(job.foil):
            raise InvalidArgument(
                "FOIL_REQUIRED",
                f"metric '{name}' measures a contrast 'why the target, not the foil': name a `foil` class "
                "(with a contrastive method's maps, or with your own maps of that contrast)",
                {"metric": name},
            )

    def _masks(self, model: LoadedModel, masks: Sequence[RawTensor], count: int) -> np.ndarray:
        """Ground-truth masks at the model's input resolution, one per image."""
        if len(masks) != count:
            raise InvalidArgument("MASK_COUNT_MISMATCH", f"{len(masks)} masks for {count} images; send one mask per image")
        check_batch(masks, self.limits, "masks")
        spec = model.config.input
        return np.stack([resize_mask(decode_mask(tensor, i, self.limits), spec.height, spec.width) for i, tensor in enumerate(masks)])

    def verbalize(self, job: VerbalizeJob) -> list[Verbalization]:
        """One text per map (the model's, or the caller's) or per token text, in the request's style and detail."""
        timer = _Timer()
        name = job.template or (DEFAULT_TOKEN_TEMPLATE if job.tokens else DEFAULT_TEMPLATE)
        template_cls = TEMPLATES.get(name)
        template_params = resolve_params(template_cls.params, job.template_params, f"template '{name}'")
        phrases = phrases_for(job.style, job.detail, job.custom_templates)
        template = template_cls()
        self._check_template_input(template_cls, job)
        if job.tokens:
            check_batch(job.tokens, self.limits, "token texts")
            checked = [checked_tokens(tokens, i) for i, tokens in enumerate(job.tokens)]
            with timer.stage("verbalize"):
                return [template.render(VerbalizeInput(None, None, None, template_params, tokens=t, phrases=phrases)) for t in checked]
        if not job.model:
            # Model-free: the caller's maps alone.
            if job.images or job.method:
                raise InvalidArgument(
                    "MODEL_REQUIRED", "images or a method were sent without a model; name the model, or send only `saliency` maps"
                )
            if job.labels:
                raise InvalidArgument(
                    "LABELS_NEED_MODEL", "`labels` are compared with a model's prediction; name the model, or drop `labels`"
                )
            check_batch(job.saliency, self.limits, "saliency maps")
            maps = [decode_map(tensor, i, self.limits) for i, tensor in enumerate(job.saliency)]
            regions = self._regions(job.regions, [m.shape for m in maps])
            with timer.stage("verbalize"):
                return [
                    template.render(VerbalizeInput(saliency, None, None, template_params, regions=regions[i], phrases=phrases))
                    for i, saliency in enumerate(maps)
                ]
        model = self.repository.get(job.model)
        batch, made = self._maps_for(model, job.images, job.saliency, _MethodCall.of(job), timer)
        labels = model.config.labels
        count = len(batch.targets)
        regions = self._regions(job.regions, [made.maps[i].shape for i in range(count)])
        truths = self._true_labels(model, job.labels, batch.predicted)
        with timer.stage("verbalize"):
            texts: list[Verbalization] = []
            for i in range(count):
                target, predicted = int(batch.targets[i]), int(batch.predicted[i])
                outcome = Outcome(
                    predicted=labels[predicted],
                    predicted_probability=float(batch.probabilities[i, predicted]),
                    true_label=None if truths is None else labels[int(truths[i])],
                    foil=None if batch.foil is None else labels[batch.foil],
                    foil_probability=None if batch.foil is None else float(batch.probabilities[i, batch.foil]),
                )
                request = VerbalizeInput(
                    made.maps[i],
                    labels[target],
                    float(batch.probabilities[i, target]),
                    template_params,
                    regions=regions[i],
                    phrases=phrases,
                    outcome=outcome,
                )
                texts.append(template.render(request))
        provenance = self._provenance(model, made, batch, job.seed, timer)
        return [Verbalization(text.text, text.facts, name, provenance) for text in texts]

    @staticmethod
    def _check_template_input(template_cls: type[Template], job: VerbalizeJob) -> None:
        """The form reads what the request sends: token attributions, or maps (with regions for named_regions)."""
        name = template_cls.name
        token_forms = [t.name for t in TEMPLATES if t.unit == "tokens"]
        if job.tokens:
            if template_cls.unit != "tokens":
                raise InvalidArgument(
                    "TOKENS_NOT_USED",
                    f"template '{name}' describes image maps; for `tokens` use one of: {', '.join(token_forms)}",
                    {"template": name},
                )
            if job.model or job.images or job.saliency or job.method or job.regions or job.labels:
                raise InvalidArgument(
                    "AMBIGUOUS_INPUT",
                    "`tokens` are verbalized model-free and alone; drop model, images, saliency, method, regions and labels",
                )
            return
        if template_cls.unit == "tokens":
            raise InvalidArgument(
                "TOKENS_REQUIRED",
                f"template '{name}' describes token attributions; send `tokens` (tokens and attributions)",
                {"template": name},
            )
        if job.regions and not template_cls.uses_regions:
            users = [t.name for t in TEMPLATES if t.uses_regions]
            raise InvalidArgument(
                "REGIONS_NOT_USED", f"template '{name}' does not use `regions`; drop them or use: {', '.join(users)}", {"template": name}
            )
        if template_cls.uses_regions and not job.regions:
            raise InvalidArgument(
                "REGIONS_REQUIRED", f"template '{name}' describes caller-named regions; send `regions` (name and mask)", {"template": name}
            )

    def _regions(
        self, sets: Sequence[Sequence[NamedRegion]], shapes: Sequence[tuple[int, ...]]
    ) -> list[tuple[tuple[str, np.ndarray], ...]]:
        """Each map's named regions, masks resized to the map: one set shared by every map, or one set per map."""
        if not sets:
            return [() for _ in shapes]
        if len(sets) not in (1, len(shapes)):
            raise InvalidArgument(
                "REGION_SET_COUNT_MISMATCH",
                f"{len(sets)} region sets for {len(shapes)} maps; send one set shared by every map, or one set per map",
                {"region_sets": len(sets), "maps": len(shapes)},
            )
        decoded = []
        for s, regions in enumerate(sets):
            if not regions:
                raise InvalidArgument("NO_REGIONS", f"region set {s} is empty; send at least one named region", {"region_set": s})
            if len(regions) > MAX_REGIONS:
                raise ResourceExhausted(
                    "TOO_MANY_REGIONS",
                    f"region set {s} has {len(regions)} regions; at most {MAX_REGIONS}",
                    {"region_set": s, "limit": MAX_REGIONS},
                )
            names = [region.name for region in regions]
            for region in regions:
                if not region.name.strip():
                    raise InvalidArgument("EMPTY_REGION_NAME", f"region set {s} has a region without a name", {"region_set": s})
                if names.count(region.name) > 1:
                    raise InvalidArgument(
                        "DUPLICATE_REGION_NAME", f"region set {s} names '{region.name}' twice; names must be unique", {"region_set": s}
                    )
            decoded.append([(r.name, decode_mask(r.mask, i, self.limits, f"region mask of set {s}")) for i, r in enumerate(regions)])
        chosen = decoded * len(shapes) if len(decoded) == 1 else decoded
        return [
            tuple((name, resize_mask(mask, shape[0], shape[1])) for name, mask in masks)
            for masks, shape in zip(chosen, shapes, strict=True)
        ]

    def _true_labels(self, model: LoadedModel, labels: Sequence[TargetRequest], predicted: np.ndarray) -> np.ndarray | None:
        """The caller's true class per image (one shared, or one per image), as indices."""
        if not labels:
            return None
        if len(labels) not in (1, len(predicted)):
            raise InvalidArgument(
                "LABEL_COUNT_MISMATCH", f"{len(labels)} labels for {len(predicted)} images; send one label, or one per image"
            )
        indices = [int(self._targets(model, label, predicted[:1], "label")[0]) for label in labels]
        return np.array(indices * len(predicted) if len(indices) == 1 else indices, dtype=np.int64)

    # ---- shared steps ----

    def _resolve_method(self, model: LoadedModel, call: _MethodCall) -> _Resolved:
        if not call.method:
            raise InvalidArgument("METHOD_REQUIRED", f"name a saliency method; available: {', '.join(METHODS.names())}")
        method = METHODS.get(call.method)
        params = resolve_params(method.params, call.params, f"method '{call.method}'")
        if call.layer and call.layers:
            raise InvalidArgument(
                "AMBIGUOUS_LAYERS", "set either `layer` (one layer) or `layers` (several), not both", {"layer": call.layer}
            )
        requested = tuple(call.layers) or ((call.layer,) if call.layer else ())
        if method.uses_layer:
            layers = requested or ((model.config.default_layer,) if model.config.default_layer else ())
            if not layers:
                raise InvalidArgument("NO_LAYER", f"method '{call.method}' needs a layer, and model '{model.name}' declares none")
        elif requested and not method.layer_optional:
            optional = [name for name in METHODS.names() if METHODS.get(name).layer_optional]
            raise InvalidArgument(
                "LAYER_NOT_USED",
                f"method '{call.method}' works on the input, not at a layer; leave `layer` and `layers` empty "
                f"(input methods that also work at a layer: {', '.join(optional)})",
                {"layer": ",".join(requested)},
            )
        else:
            layers = requested
        for layer in layers:
            model.config.layer(layer)
        if len(set(layers)) != len(layers):
            raise InvalidArgument("DUPLICATE_LAYER", f"`layers` names a layer twice: {', '.join(layers)}", {"layers": ",".join(layers)})
        if _names_class(call.foil) and not method.contrastive:
            raise InvalidArgument(
                "FOIL_NOT_SUPPORTED",
                f"method '{call.method}' is class-agnostic, so a foil (contrast class) has no meaning for it; drop `foil`",
                {"method": call.method},
            )
        if call.baselines and not method.takes_baseline:
            takers = [name for name in METHODS.names() if METHODS.get(name).takes_baseline]
            raise InvalidArgument(
                "BASELINE_NOT_USED",
                f"method '{call.method}' takes no baseline; drop `baselines` or use one of: {', '.join(takers) or 'none'}",
                {"method": call.method},
            )
        return _Resolved(method, params, layers)

    def _prepare(
        self,
        model: LoadedModel,
        images: Sequence[ImageInput],
        target: TargetRequest | None,
        timer: _Timer,
        foil: TargetRequest | None = None,
        resolved: _Resolved | None = None,
    ) -> _Batch:
        check_batch(images, self.limits)
        with timer.stage("decode"):
            decoded = [decode_image(image, i, self.limits) for i, image in enumerate(images)]
            x = to_model_input(decoded, model.config.input)
        # The prediction pass also returns the activations of a layer method's layers: CAMs start their
        # backward pass there (when torch can run just the head after the layer) and the forward-only
        # CAMs read them, so the trunk runs once, in onnxruntime.
        layers = list(resolved.layers) if resolved is not None and resolved.method.uses_layer else []
        with timer.stage("predict"):
            if layers:
                logits, activations = model.predict(x, layers)
            else:
                logits, activations = model.logits(x), {}
        probabilities = _softmax(logits)
        predicted = probabilities.argmax(axis=1)
        targets = self._targets(model, target, predicted)
        foil_index = None
        if _names_class(foil):
            foil_index = int(self._targets(model, foil, predicted, "foil")[0])
            same = np.flatnonzero(targets == foil_index)
            if len(same):
                raise InvalidArgument(
                    "FOIL_IS_TARGET",
                    f"image {int(same[0])}: the foil '{model.config.labels[foil_index]}' is also the class being explained; "
                    "name a different foil, or set `target` explicitly",
                    {"image_index": int(same[0]), "foil": foil_index},
                )
        return _Batch(
            sizes=[(image.shape[0], image.shape[1]) for image in decoded],
            x=x,
            probabilities=probabilities,
            predicted=predicted,
            targets=targets,
            foil=foil_index,
            activations=activations,
        )

    def _baselines(self, model: LoadedModel, baselines: Sequence[ImageInput], count: int) -> np.ndarray | None:
        """The caller's reference inputs in the model's space: one per image (a single one is shared)."""
        if not baselines:
            return None
        if len(baselines) not in (1, count):
            raise InvalidArgument(
                "BASELINE_COUNT_MISMATCH", f"{len(baselines)} baselines for {count} images; send one baseline, or one per image"
            )
        check_batch(baselines, self.limits, "baselines")
        decoded = [decode_image(image, i, self.limits) for i, image in enumerate(baselines)]
        x = to_model_input(decoded, model.config.input)
        return np.repeat(x, count, axis=0) if len(x) == 1 else x

    @staticmethod
    def _targets(model: LoadedModel, target: TargetRequest | None, predicted: np.ndarray, role: str = "target") -> np.ndarray:
        if target is None or not _names_class(target):
            return predicted.astype(np.int64)
        if target.label:
            index = model.config.class_index(target.label)
        else:
            assert target.class_index is not None  # narrowed above; not an input check
            index = target.class_index
            if not 0 <= index < model.config.num_classes:
                raise InvalidArgument(
                    "TARGET_OUT_OF_RANGE",
                    f"{role} class {index} is out of range for model '{model.name}' "
                    f"({model.config.num_classes} classes: 0..{model.config.num_classes - 1})",
                    {"target": index, "num_classes": model.config.num_classes},
                )
        return np.full(len(predicted), index, dtype=np.int64)

    def _attribute(
        self, model: LoadedModel, resolved: _Resolved, batch: _Batch, baseline: np.ndarray | None, seed: int, timer: _Timer
    ) -> _Maps:
        method, layers = resolved.method, resolved.layers
        foils = None if batch.foil is None else np.full(len(batch.targets), batch.foil, dtype=np.int64)

        def run(layer: str | None, at: tuple[str, ...]) -> np.ndarray:
            request = MethodInput(model, batch.x, batch.targets, resolved.params, layer, seed, foils, baseline, at, batch.activations)
            return method().attribute(request)

        with timer.stage("attribute"):
            if method.multi_layer or len(layers) <= 1:
                return _Maps(run(layers[0] if layers else None, layers), method.name, resolved.params, layers, {}, (resolved, baseline))
            per_layer = {layer: run(layer, (layer,)) for layer in layers}
        return _Maps(combine_layers(list(per_layer.values())), method.name, resolved.params, layers, per_layer, (resolved, baseline))

    def _maps_for(
        self,
        model: LoadedModel,
        images: Sequence[ImageInput],
        saliency: Sequence[RawTensor],
        call: _MethodCall,
        timer: _Timer,
        foil_with_maps: bool = False,
    ) -> tuple[_Batch, _Maps]:
        """Maps for Score and Verbalize: the caller's (resized to the model) or a method's.

        `foil_with_maps`: supplied maps may come with a foil (a contrastive metric reads it); otherwise a
        foil only shapes how a method makes its maps.
        """
        if saliency:
            if call.method or call.params or call.layer or call.layers or call.baselines:
                raise InvalidArgument("AMBIGUOUS_SALIENCY", "send either saliency maps or a method to compute them, not both")
            if not foil_with_maps and _names_class(call.foil):
                raise InvalidArgument("FOIL_WITHOUT_METHOD", "a foil shapes how a method makes its maps; with supplied maps, drop `foil`")
            if len(saliency) != len(images):
                raise InvalidArgument(
                    "MAP_COUNT_MISMATCH", f"{len(saliency)} saliency maps for {len(images)} images; send one map per image"
                )
            check_batch(saliency, self.limits, "saliency maps")
            spec = model.config.input
            maps = np.stack([resize_map(decode_map(tensor, i, self.limits), spec.height, spec.width) for i, tensor in enumerate(saliency)])
            foil = call.foil if foil_with_maps else None
            return self._prepare(model, images, call.target, timer, foil), _Maps(maps, SUPPLIED, {}, ())
        resolved = self._resolve_method(model, call)
        batch = self._prepare(model, images, call.target, timer, call.foil, resolved)
        baseline = self._baselines(model, call.baselines, len(images))
        return batch, self._attribute(model, resolved, batch, baseline, call.seed, timer)

    @staticmethod
    def _provenance(model: LoadedModel, maps: _Maps, batch: _Batch, seed: int, timer: _Timer) -> Provenance:
        return Provenance(
            model=model.name,
            model_version=model.config.version,
            method=maps.method,
            params=dict(maps.params),
            layer=maps.layers[0] if maps.layers else "",
            seed=seed,
            timings_ms=dict(timer.ms),
            layers=maps.layers,
            foil=batch.foil,
            foil_label="" if batch.foil is None else model.config.labels[batch.foil],
        )


def _names_class(target: TargetRequest | None) -> bool:
    """Whether a target or foil of the request names a class (an index or a label)."""
    return target is not None and (target.class_index is not None or bool(target.label))


def combine_layers(maps: Sequence[np.ndarray]) -> np.ndarray:
    """Several layers' B x H x W maps as one: each item's map scaled by its max |value|, then averaged.

    Scaling keeps the sign and makes layers with different magnitudes count equally; an all-zero map
    stays zero.
    """
    scaled = []
    for layer_maps in maps:
        peak = np.abs(layer_maps).reshape(len(layer_maps), -1).max(axis=1)
        scaled.append(layer_maps / np.where(peak > 0, peak, 1.0)[:, None, None])
    combined: np.ndarray = np.mean(scaled, axis=0).astype(np.float32)
    return combined


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    probabilities: np.ndarray = (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
    return probabilities
