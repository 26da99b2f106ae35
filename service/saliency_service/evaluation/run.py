"""Every method against every metric on generated held-out shapes images, through any `Scorer`.

The loop, the skip rules and the outputs are the same whether the scorer is the in-process engine
(`saliency-service evaluate`) or a server over gRPC (`saliency evaluate`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

import numpy as np

from saliency_service.evaluation.aggatt import aggatt_bins, write_aggatt
from saliency_service.evaluation.table import Row, Skipped, markdown, summarise, write_csv, write_plot
from saliency_service.shapes.generator import LABELS, generate_batch, generate_grid, heldout_seeds
from saliency_service.shapes.grid import GRID_LABELS

ProgressFn = Callable[[str, int, int], None]
"""progress(stage, done, total) within one Score call."""


class ProgressView(Protocol):
    """A live view of each Score call's streamed progress (e.g. the client's ProgressBar), closed before each result line."""

    def update(self, stage: str, done: int, total: int) -> None: ...

    def close(self) -> None: ...


LIGHT: Mapping[str, Mapping[str, Any]] = {
    "rise": {"masks": 256},
    "integrated_gradients": {"steps": 16},
    "occlusion": {"window": 32, "stride": 32},
}
"""Default parameters for the costly methods (applied only where the method declares the parameter)."""

METHOD_REQUIRED = "METHOD_REQUIRED_FOR_METRIC"
"""The server's reason when a metric must re-run the method: the evaluation then sends the method, not its maps."""

MASKS_NOT_USED = "MASKS_NOT_USED"
"""The server's reason when masks are sent to a metric that takes none: the metric is retried without them."""


class CannotRun(Exception):
    """A combination the server refuses as asked (a missing foil, a model without a grid): skipped, with its reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class Scorer(Protocol):
    """What the evaluation needs from a server: its catalogue, Score and Explain on uint8 images."""

    def catalog(self) -> Catalog: ...

    def score(
        self,
        model: str,
        images: np.ndarray,
        method: str,
        metric: str,
        *,
        method_params: Mapping[str, Any],
        metric_params: Mapping[str, Any],
        masks: np.ndarray | None,
        seed: int,
        progress: ProgressFn,
        saliency: np.ndarray | None = None,
    ) -> list[float]:
        """One value per image; raises CannotRun for a request the server refuses as invalid or unservable.

        With `saliency` (one map per image, already made by `method`) the maps are scored as supplied
        maps and `method` is not run again."""
        ...

    def explain(self, model: str, images: np.ndarray, method: str, *, method_params: Mapping[str, Any], seed: int) -> list[np.ndarray]:
        """One H x W float32 map per image."""
        ...


@dataclass(frozen=True)
class Catalog:
    methods: Mapping[str, frozenset[str]]
    """Method id -> the names of its parameters."""
    metrics: Mapping[str, bool]
    """Metric id -> higher is better."""
    labels: Mapping[str, tuple[str, ...]]
    """Model name -> its labels (which say which generated dataset fits it)."""


@dataclass(frozen=True)
class Plan:
    model: str = "shapes"
    methods: str = "all"
    metrics: str = "all"
    n: int = 200
    seed: int = 0
    batch: int = 25
    method_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Per-method overrides on top of LIGHT."""
    metric_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    aggatt: str = "auto"
    """The metric whose per-image values bin the AggAtt maps; "auto": grid_pointing_game on a grid model; "" none."""


@dataclass(frozen=True)
class Dataset:
    name: str
    images: np.ndarray
    """N x H x W x 3 uint8."""
    masks: np.ndarray | None
    """N x H x W bool ground truth of the class to explain, or None when the dataset has none."""
    no_masks_reason: str = ""


@dataclass(frozen=True)
class Evaluation:
    rows: list[Row]
    skipped: list[Skipped]
    higher_is_better: dict[str, bool]
    settings: dict[str, str]
    aggatt_files: list[Path] = field(default_factory=list)


class UnknownIds(ValueError):
    """`--methods` or `--metrics` named ids the server does not have."""


def select(ids: str, available: Sequence[str], kind: str) -> list[str]:
    """`all`, or a comma list of ids that must all be available (else UnknownIds naming the available ones)."""
    if ids.strip() == "all":
        return sorted(available)
    chosen = [name.strip() for name in ids.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in available]
    if unknown or not chosen:
        raise UnknownIds(f"unknown {kind} {', '.join(unknown) or '(none given)'}; available: {', '.join(sorted(available))}")
    return list(dict.fromkeys(chosen))


def dataset(labels: Sequence[str], n: int) -> Dataset:
    """The first `n` held-out images that fit a model with these labels: single shapes, or 2x2 grids for shapes_grid."""
    if tuple(labels) == LABELS:
        images, _, masks = generate_batch(heldout_seeds(n))
        return Dataset("held-out shapes images (seeds from HELDOUT_SEED_OFFSET), with object masks", images, masks)
    if tuple(labels) == GRID_LABELS:
        grids = [generate_grid(seed) for seed in heldout_seeds(n)]
        return Dataset(
            "held-out 2x2 shapes grids (generate_grid, seeds from HELDOUT_SEED_OFFSET)",
            np.stack([grid.image for grid in grids]),
            None,
            "the grid dataset has no mask of the predicted cell's object",
        )
    raise UnknownIds("evaluate generates shapes images, so it serves models with the shapes or shapes_grid labels")


def method_params(plan: Plan, method: str, declared: frozenset[str]) -> dict[str, Any]:
    light = {key: value for key, value in LIGHT.get(method, {}).items() if key in declared}
    return {**light, **plan.method_params.get(method, {})}


def _line(out: TextIO, text: str) -> None:
    print(text, file=out, flush=True)


def evaluate(scorer: Scorer, plan: Plan, out_dir: Path, *, log: TextIO | None = None, progress: ProgressView | None = None) -> Evaluation:
    """Run the plan and write table.csv, table.md, table.png (and aggatt_<method>.png) into `out_dir`.

    Each combination's first batch decides whether it runs: a CannotRun there skips it with its reason;
    a failure on a later batch is an error. `progress` shows each Score call's streamed progress.
    """
    log = log or sys.stderr
    catalog = scorer.catalog()
    if plan.model not in catalog.labels:
        raise UnknownIds(f"unknown model {plan.model}; available: {', '.join(sorted(catalog.labels))}")
    methods = select(plan.methods, list(catalog.methods), "method")
    metrics = select(plan.metrics, list(catalog.metrics), "metric")
    if plan.n < 1 or plan.batch < 1:
        raise UnknownIds(f"--n and --batch must be at least 1 (got {plan.n}, {plan.batch})")
    aggatt_metric = plan.aggatt
    is_grid = tuple(catalog.labels[plan.model]) == GRID_LABELS
    if aggatt_metric == "auto":
        aggatt_metric = "grid_pointing_game" if is_grid and "grid_pointing_game" in metrics else ""
    elif aggatt_metric and aggatt_metric not in metrics:
        raise UnknownIds(f"--aggatt {aggatt_metric} is not among the metrics run ({', '.join(metrics)})")
    data = dataset(catalog.labels[plan.model], plan.n)
    out_dir.mkdir(parents=True, exist_ok=True)

    rows: list[Row] = []
    skipped: list[Skipped] = []
    aggatt_files: list[Path] = []
    takes_masks: dict[str, bool] = {}
    takes_maps: dict[str, bool] = {}
    total = len(methods) * len(metrics)
    started = time.perf_counter()
    for m_index, method in enumerate(methods):
        params = method_params(plan, method, catalog.methods[method])
        # Each batch's maps are made once per method and scored as supplied maps by every metric that
        # only reads them; metrics that re-run the method get the method instead.
        cache = _MapCache(scorer, plan, method, params, data.images)
        for k_index, metric in enumerate(metrics):
            step = m_index * len(metrics) + k_index + 1
            tick = time.perf_counter()
            values: list[float] = []
            reason = ""
            for first in range(0, plan.n, plan.batch):
                images = data.images[first : first + plan.batch]
                masks = None if data.masks is None else data.masks[first : first + plan.batch]
                try:
                    supplied = cache.maps(first) if takes_maps.get(metric, True) else None
                    values += _score_batch(
                        scorer,
                        plan,
                        method,
                        metric,
                        params,
                        images,
                        masks,
                        takes_masks,
                        progress.update if progress else _quiet,
                        supplied,
                        takes_maps,
                    )
                except CannotRun as refused:
                    if first > 0:
                        raise
                    reason = str(refused)
                    if refused.reason == "MASKS_REQUIRED" and data.masks is None:
                        reason = f"MASKS_REQUIRED: {data.no_masks_reason}"
                    break
            seconds = time.perf_counter() - tick
            if progress is not None:
                progress.close()
            if reason:
                skipped.append(Skipped(method, metric, reason))
                _line(log, f"[{step}/{total}] {method} x {metric}: skipped ({reason}) {seconds:.1f}s")
                continue
            row = summarise(method, metric, values, plan.seed)
            rows.append(row)
            _line(
                log,
                f"[{step}/{total}] {method} x {metric}: {len(values)}/{plan.n} images, mean {row.mean:.4f} "
                f"in {seconds:.1f}s (elapsed {time.perf_counter() - started:.0f}s)",
            )
            if metric == aggatt_metric:
                maps = [
                    m
                    for first in range(0, plan.n, plan.batch)
                    for m in scorer.explain(
                        plan.model, data.images[first : first + plan.batch], method, method_params=params, seed=plan.seed
                    )
                ]
                path = out_dir / f"aggatt_{method}.png"
                write_aggatt(path, aggatt_bins(np.stack(maps), np.asarray(values)), f"AggAtt: {method}, bins by {metric}")
                aggatt_files.append(path)

    higher = {metric: catalog.metrics[metric] for metric in metrics}
    settings = {
        "model": plan.model,
        "images": f"n = {plan.n} {data.name}",
        "seed": f"{plan.seed} (methods, metrics and the bootstrap)",
        "batch": str(plan.batch),
        "target": "the predicted class",
        "method parameters": "; ".join(
            f"{m} {json_like(method_params(plan, m, catalog.methods[m]))}" for m in methods if method_params(plan, m, catalog.methods[m])
        )
        or "defaults",
        "metric parameters": "; ".join(f"{m} {json_like(plan.metric_params[m])}" for m in metrics if plan.metric_params.get(m))
        or "defaults",
        "aggatt": f"maps binned by {aggatt_metric}" if aggatt_metric else "off",
        "seconds": f"{time.perf_counter() - started:.0f}",
    }
    result = Evaluation(rows, skipped, higher, settings, aggatt_files)
    write_outputs(out_dir, result)
    return result


def json_like(params: Mapping[str, Any]) -> str:
    return "{" + ", ".join(f"{key}={value}" for key, value in sorted(params.items())) + "}"


class _MapCache:
    """One method's maps per batch of the dataset, made on first use (None where Explain refuses)."""

    def __init__(self, scorer: Scorer, plan: Plan, method: str, params: Mapping[str, Any], images: np.ndarray) -> None:
        self.scorer, self.plan, self.method, self.params, self.images = scorer, plan, method, params, images
        self._maps: dict[int, np.ndarray | None] = {}

    def maps(self, first: int) -> np.ndarray | None:
        if first not in self._maps:
            batch = self.images[first : first + self.plan.batch]
            try:
                made = self.scorer.explain(self.plan.model, batch, self.method, method_params=self.params, seed=self.plan.seed)
                self._maps[first] = np.stack(made)
            except CannotRun:
                self._maps[first] = None
        return self._maps[first]


def _score_batch(
    scorer: Scorer,
    plan: Plan,
    method: str,
    metric: str,
    params: Mapping[str, Any],
    images: np.ndarray,
    masks: np.ndarray | None,
    takes_masks: dict[str, bool],
    progress: ProgressFn,
    supplied: np.ndarray | None = None,
    takes_maps: dict[str, bool] | None = None,
) -> list[float]:
    """Score one batch. Masks go to a metric until the server says it takes none, and the method's maps
    (`supplied`) until it says it must re-run the method; both are remembered per metric."""
    takes_maps = {} if takes_maps is None else takes_maps
    while True:
        send = masks if takes_masks.get(metric, True) else None
        maps = supplied if takes_maps.get(metric, True) else None
        kwargs: dict[str, Any] = dict(
            method_params=params, metric_params=plan.metric_params.get(metric, {}), seed=plan.seed, progress=progress
        )
        if maps is not None:
            kwargs["saliency"] = maps
        try:
            return scorer.score(plan.model, images, method, metric, masks=send, **kwargs)
        except CannotRun as refused:
            if refused.reason == MASKS_NOT_USED and send is not None:
                takes_masks[metric] = False
            elif refused.reason == METHOD_REQUIRED and maps is not None:
                takes_maps[metric] = False
            else:
                raise


def _quiet(stage: str, done: int, total: int) -> None:
    """The progress sink when nobody watches."""


def write_outputs(out_dir: Path, result: Evaluation) -> None:
    """table.csv, table.md and table.png."""
    write_csv(out_dir / "table.csv", result.rows)
    text = markdown(result.rows, result.higher_is_better, result.skipped, result.settings)
    if result.aggatt_files:
        text += "\n## AggAtt\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in result.aggatt_files) + "\n"
    (out_dir / "table.md").write_text(f"# Evaluation: {result.settings['model']}\n\n" + text)
    if result.rows:
        write_plot(
            out_dir / "table.png",
            result.rows,
            result.higher_is_better,
            f"{result.settings['model']}: {result.settings['images'].split(' held-out')[0]} held-out images",
        )
