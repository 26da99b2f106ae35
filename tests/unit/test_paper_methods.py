"""CF-CAM, NormGrad and LP-CAM (METHODS.md §2, §3, §5): plain references that follow the formulas, analytic cases,
DBSCAN and k-means on known clusterings, the prototype file, and localisation on the shipped `shapes` model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from saliency_service.config import EMBEDDED_REPOSITORY
from saliency_service.core.errors import FailedPrecondition, SaliencyError
from saliency_service.core.methods import METHODS, MethodInput
from saliency_service.core.methods.cf_cam import automatic_eps, cf_cam_map, dbscan, filter_kernel
from saliency_service.core.methods.lp_cam import (
    LpCamPrototypes,
    build_prototypes,
    cached_prototypes,
    cosine_kmeans,
    head_probabilities,
    load_prototypes,
    prototype_file,
)
from saliency_service.core.models.model import LoadedModel
from saliency_service.core.models.repository import ModelRepository
from saliency_service.core.params import resolve_params
from saliency_service.shapes.generator import HELDOUT_SEED_OFFSET, generate_batch
from saliency_service.shapes.network import preprocess

# ---------------------------------------------------------------- helpers


def _run(
    model: LoadedModel, method: str, x: np.ndarray, targets: np.ndarray, given: dict[str, object] | None = None, **extra: object
) -> np.ndarray:
    cls = METHODS.get(method)
    params = resolve_params(cls.params, given or {}, method)
    layer = extra.pop("layer", model.config.default_layer)
    request = MethodInput(model, x, targets, params, layer, 0, **extra)  # type: ignore[arg-type]
    return cls().attribute(request)


def _objective(model: LoadedModel, targets: np.ndarray) -> torch.Tensor:
    weights = torch.zeros((len(targets), model.config.num_classes))
    weights[torch.arange(len(targets)), torch.from_numpy(targets)] = 1.0
    return weights


def _inputs(model: LoadedModel, n: int, seed: int) -> np.ndarray:
    spec = model.config.input
    return np.random.default_rng(seed).standard_normal((n, 3, spec.height, spec.width)).astype(np.float32)


def _upsample_max(maps: np.ndarray, height: int, width: int, relu: bool = True) -> np.ndarray:
    tensor = torch.from_numpy(np.maximum(maps, 0) if relu else maps).float()[:, None]
    up = F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False)[:, 0].numpy()
    peak = up.reshape(len(up), -1).max(axis=1)[:, None, None]
    return np.where(peak > 0, up / np.where(peak > 0, peak, 1.0), up)


def _upsample_minmax(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    up = F.interpolate(torch.from_numpy(maps).float()[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0].numpy()
    up = up - up.reshape(len(up), -1).min(axis=1)[:, None, None]
    return up / (up.reshape(len(up), -1).max(axis=1)[:, None, None] + 1e-7)


# ---------------------------------------------------------------- DBSCAN


def _reference_dbscan(points: np.ndarray, eps: float, min_samples: int) -> list[int]:
    """Ester et al.'s algorithm, literally: visit points in order, expand clusters from core points."""
    n = len(points)

    def region(i: int) -> list[int]:
        return [j for j in range(n) if math.dist(points[i], points[j]) <= eps]

    labels = [-1] * n
    visited = [False] * n
    cluster = -1
    for i in range(n):
        if visited[i] or len(region(i)) < min_samples:
            continue
        cluster += 1
        seeds = [i]
        while seeds:
            j = seeds.pop(0)
            if labels[j] == -1:
                labels[j] = cluster
            if visited[j]:
                continue
            visited[j] = True
            neighbours = region(j)
            if len(neighbours) >= min_samples:
                seeds.extend(k for k in neighbours if labels[k] == -1)
    return labels


def test_dbscan_known_clustering() -> None:
    points = np.array([[0, 0], [0, 1], [1, 0], [1, 1], [10, 10], [10, 11], [11, 10], [5, 5], [30, 0]], dtype=float)
    np.testing.assert_array_equal(dbscan(points, eps=1.5, min_samples=3), [0, 0, 0, 0, 1, 1, 1, -1, -1])
    # eps is inclusive: at exactly the distance the pair is a cluster; just below, both are noise.
    pair = np.array([[0.0, 0.0], [3.0, 4.0]])
    np.testing.assert_array_equal(dbscan(pair, eps=5.0, min_samples=2), [0, 0])
    np.testing.assert_array_equal(dbscan(pair, eps=4.999, min_samples=2), [-1, -1])


def test_dbscan_border_point_joins_the_first_cluster_and_chains() -> None:
    # 0-1 and 3-4 are core pairs (min_samples 2 + the border); point 2 is reachable from both sides.
    line = np.array([[0.0], [1.0], [2.0], [3.0], [4.0]])
    np.testing.assert_array_equal(dbscan(line, eps=1.0, min_samples=3), [0, 0, 0, 0, 0])  # a chain of cores: one cluster
    gap = np.array([[0.0], [0.5], [1.5], [2.5], [3.0]])
    # cores: 0,1 (each other) and 3,4; point 2 is within 1.0 of 1 and of 3 but has only 3 neighbours incl. itself
    labels = dbscan(gap, eps=1.0, min_samples=4)
    assert list(labels) == _reference_dbscan(gap, 1.0, 4)


def test_dbscan_matches_the_reference_on_random_points() -> None:
    rng = np.random.default_rng(3)
    for trial in range(20):
        points = np.concatenate([rng.normal(c, 0.4, (8, 3)) for c in rng.uniform(-3, 3, (3, 3))] + [rng.uniform(-6, 6, (4, 3))])
        eps, samples = float(rng.uniform(0.3, 1.5)), int(rng.integers(1, 6))
        assert list(dbscan(points, eps, samples)) == _reference_dbscan(points, eps, samples), trial


def test_automatic_eps_counts_both_orders_and_is_floored() -> None:
    points = np.array([[0.0], [1.0], [3.0]])  # distances 1, 2, 3, each twice
    assert automatic_eps(points, 25.0) == pytest.approx(float(np.percentile([1, 1, 2, 2, 3, 3], 25)))
    assert automatic_eps(np.zeros((3, 2)), 25.0) == 1e-5


# ---------------------------------------------------------------- CF-CAM


def _reference_cf_cam_item(a: np.ndarray, g: np.ndarray, params: dict[str, object]) -> np.ndarray:
    """METHODS.md §2 step by step, with loops: tiers, DBSCAN, per-cluster filter by explicit correlation, weights, map."""
    k_count, h, w = a.shape
    norms = [math.sqrt(float((a[k] ** 2).sum())) for k in range(k_count)]
    threshold = np.percentile(norms, float(params["important_percentile"]))  # type: ignore[arg-type]
    important = [k for k in range(k_count) if norms[k] >= threshold]
    rest = [k for k in range(k_count) if k not in important]
    labels = {k: -1 for k in rest}
    if len(rest) >= 2:
        rows = [a[k].reshape(-1) for k in rest]
        distances = [math.dist(rows[i], rows[j]) for i in range(len(rest)) for j in range(len(rest)) if i != j]
        eps = float(params["eps"]) or max(float(np.percentile(distances, float(params["eps_percentile"]))), 1e-5)  # type: ignore[arg-type]
        samples = int(params["min_samples"]) or max(2, int(0.05 * len(rest)))  # type: ignore[call-overload]
        labels = dict(zip(rest, _reference_dbscan(np.array(rows), eps, samples), strict=True))
    weights = {k: float(g[k].mean()) for k in important}
    for cluster in sorted({c for c in labels.values() if c >= 0}):
        members = [k for k, c in labels.items() if c == cluster]
        mean = sum(g[k] for k in members) / len(members)
        ci, cj = (h - 1) // 2, (w - 1) // 2
        sigma = float(params["sigma_spatial"])  # type: ignore[arg-type]
        kernel = np.zeros((h, w))
        for i in range(h):
            for j in range(w):
                r2 = (i - ci) ** 2 + (j - cj) ** 2
                kernel[i, j] = (1.0 if r2 == 0 else 0.0) if sigma == 0 else math.exp(-r2 / (2 * sigma**2))
                if params["filter"] == "bilateral":
                    kernel[i, j] *= math.exp(-((mean[i, j] - mean.mean()) ** 2) / (2 * float(params["sigma_range"]) ** 2))  # type: ignore[arg-type]
        kernel /= kernel.sum() + 1e-6
        filtered = np.zeros((h, w))
        for i in range(h):
            for j in range(w):
                for p in range(h):
                    for q in range(w):
                        y, x = i + p - ci, j + q - cj
                        if 0 <= y < h and 0 <= x < w:
                            filtered[i, j] += kernel[p, q] * mean[y, x]
        for k in members:
            weights[k] = float(filtered.mean())
    kept = sorted(weights)
    values = np.array([weights[k] for k in kept])
    if params["weighting"] == "softmax":
        values = np.exp(values - values.max()) / np.exp(values - values.max()).sum()
    return sum(v * a[k] for v, k in zip(values, kept, strict=True))  # type: ignore[return-value]


@pytest.mark.parametrize(
    "given",
    [
        {},
        {"weighting": "linear"},
        {"weighting": "linear", "filter": "gaussian", "sigma_spatial": 1.5, "important_percentile": 50.0},
        {"weighting": "linear", "sigma_spatial": 0.0, "sigma_range": 1e-4, "eps": 3.0, "min_samples": 2},
    ],
)
def test_cf_cam_matches_the_reference(tiny_cnn, given: dict[str, object]) -> None:
    model = tiny_cnn.model
    x, targets = _inputs(model, 3, seed=21), np.array([0, 1, 3], dtype=np.int64)
    fast = _run(model, "cf_cam", x, targets, given)
    params = resolve_params(METHODS.get("cf_cam").params, given, "cf_cam")
    _, a, g = model.layer_gradient(torch.from_numpy(x), _objective(model, targets), "features")
    a, g = a.double().numpy(), g.double().numpy()
    reference = np.stack([_reference_cf_cam_item(a[i], g[i], params) for i in range(len(x))])
    spec = model.config.input
    np.testing.assert_allclose(fast, _upsample_max(reference, spec.height, spec.width), atol=1e-5)


def test_cf_cam_reference_case_has_clusters(tiny_cnn) -> None:
    """The reference comparison above must exercise tier 2: some item's channels form a cluster at the default eps."""
    from saliency_service.core.methods.cf_cam import cluster_labels

    model = tiny_cnn.model
    x = _inputs(model, 3, seed=21)
    _, a, _ = model.layer_gradient(torch.from_numpy(x), _objective(model, np.array([0, 1, 3])), "features")
    labels = [cluster_labels(item.reshape(len(item), -1).double().numpy(), 75.0, 0.0, 25.0, 0) for item in a]
    assert any((item >= 0).any() for item in labels)
    assert any((item == -1).any() for item in labels) or any((item >= 0).sum() >= 2 for item in labels)


def test_cf_cam_one_cluster_sigma_zero_is_a_known_cam() -> None:
    """Channel 0 high-norm (tier 1); channels 1-4 nearly equal (one cluster); channel 5 far away (noise).

    With sigma 0 the filter is the identity, so M = w0 A0 + wbar (A1 + ... + A4), wbar the cluster's mean gradient mean,
    and the noise channel is left out. With linear weighting the map is exactly that.
    """
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, (6, 7))
    a = np.stack([10 * base + 5] + [base + 0.01 * rng.standard_normal((6, 7)) for _ in range(4)] + [base + 4.0])
    g = rng.standard_normal((6, 6, 7))
    at, gt = torch.from_numpy(a), torch.from_numpy(g)
    # Gaussian filter: with sigma 0 it is the identity (up to the code's 1e-6 guard in the normalisation).
    common = {"important_percentile": 90.0, "eps": 0.5, "min_samples": 2, "sigma_spatial": 0.0, "sigma_range": None}
    linear = cf_cam_map(at, gt, weighting="linear", **common).numpy()  # type: ignore[arg-type]
    wbar = float(np.mean([g[k].mean() for k in range(1, 5)]))
    np.testing.assert_allclose(linear, g[0].mean() * a[0] + wbar * a[1:5].sum(axis=0), rtol=1e-5)
    # Softmax over the 5 kept channels: two distinct weights.
    soft = cf_cam_map(at, gt, weighting="softmax", **common).numpy()  # type: ignore[arg-type]
    e0, e1 = math.exp(g[0].mean()), math.exp(wbar)
    np.testing.assert_allclose(soft, (e0 * a[0] + e1 * a[1:5].sum(axis=0)) / (e0 + 4 * e1), rtol=1e-5)


def test_cf_cam_all_channels_important_is_grad_cam() -> None:
    rng = np.random.default_rng(1)
    a, g = torch.from_numpy(rng.uniform(0, 2, (9, 5, 6))), torch.from_numpy(rng.standard_normal((9, 5, 6)))
    got = cf_cam_map(a, g, important_percentile=0.0, weighting="linear")
    torch.testing.assert_close(got, (g.mean(dim=(1, 2))[:, None, None] * a).sum(dim=0))


def test_cf_cam_filter_kernel() -> None:
    gradient = torch.from_numpy(np.random.default_rng(2).standard_normal((6, 8)) * 1e-4)
    impulse = filter_kernel(gradient, 0.0, 0.1)
    assert impulse[2, 3] == pytest.approx(1.0, abs=1e-5) and float(impulse.sum()) == pytest.approx(1.0, abs=1e-5)
    gaussian, bilateral = filter_kernel(gradient, 5.0, None), filter_kernel(gradient, 5.0, 0.1)
    assert float(gaussian.sum()) == pytest.approx(1.0, abs=1e-5)
    assert int(gaussian.argmax()) == 2 * 8 + 3  # centred at the "same"-padding origin
    torch.testing.assert_close(bilateral, gaussian, atol=1e-7, rtol=1e-5)  # |g| << sigma_range: the paper's Gaussian
    assert not torch.allclose(filter_kernel(gradient * 1e3, 5.0, 0.1), gaussian, rtol=1e-3)  # and not for large gradients


def test_cf_cam_contrast_uses_the_difference_gradient(tiny_cnn) -> None:
    model = tiny_cnn.model
    x, targets, foils = _inputs(model, 2, seed=23), np.array([0, 1], dtype=np.int64), np.array([2, 0], dtype=np.int64)
    _, a, g = model.layer_gradient(torch.from_numpy(x), _objective(model, targets) - _objective(model, foils), "features")
    expected = torch.stack([cf_cam_map(a[i].double(), g[i].double(), weighting="linear") for i in range(2)]).numpy()
    spec = model.config.input
    got = _run(model, "cf_cam", x, targets, {"weighting": "linear"}, foils=foils)
    np.testing.assert_allclose(got, _upsample_max(expected, spec.height, spec.width), atol=1e-5)


def test_cf_cam_rejects_bad_parameters() -> None:
    specs = METHODS.get("cf_cam").params
    for bad in ({"important_percentile": 101.0}, {"eps": -1.0}, {"min_samples": 1.5}, {"filter": "median"}, {"sigma_range": 0.0}):
        with pytest.raises(SaliencyError):
            resolve_params(specs, bad, "cf_cam")


# ---------------------------------------------------------------- NormGrad


def _reference_norm_grad_item(a: np.ndarray, g: np.ndarray, virtual: str, reduction: str) -> np.ndarray:
    """Form each position's weight-gradient contribution explicitly (outer products, 3x3 patches), then reduce it."""
    k_count, h, w = a.shape
    out = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            gu, au = g[:, y, x], a[:, y, x]
            if virtual == "conv1x1":
                contribution = np.outer(gu, au)
            elif virtual == "scaling":
                contribution = au * gu
            elif virtual == "conv3x3":
                patch = []
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        inside = 0 <= y + dy < h and 0 <= x + dx < w
                        patch.append(a[:, y + dy, x + dx] if inside else np.zeros(k_count))
                contribution = np.outer(gu, np.concatenate(patch))
            else:
                contribution = gu
            if reduction == "norm":
                out[y, x] = np.sqrt((contribution**2).sum())
            elif reduction == "filter_norm":
                out[y, x] = np.sqrt((np.maximum(contribution, 0) ** 2).sum())
            elif reduction == "sum":
                out[y, x] = contribution.sum()
            else:
                out[y, x] = contribution.max()
    return out


@pytest.mark.parametrize("virtual", ["conv1x1", "scaling", "conv3x3", "bias"])
def test_norm_grad_matches_the_reference(tiny_cnn, virtual: str) -> None:
    model = tiny_cnn.model
    x, targets = _inputs(model, 2, seed=31), np.array([2, 1], dtype=np.int64)
    _, a, g = model.layer_gradient(torch.from_numpy(x), _objective(model, targets), "features")
    a, g = a.double().numpy(), g.double().numpy()
    spec = model.config.input
    for reduction in ("norm", "filter_norm", "sum", "max"):
        fast = _run(model, "norm_grad", x, targets, {"virtual_layer": virtual, "reduction": reduction})
        reference = np.stack([_reference_norm_grad_item(a[i], g[i], virtual, reduction) for i in range(2)])
        np.testing.assert_allclose(fast, _upsample_minmax(reference, spec.height, spec.width), atol=2e-5, err_msg=f"{virtual}/{reduction}")


def test_norm_grad_is_activation_norm_times_gradient_norm_on_a_linear_model(linear_net) -> None:
    """LinearNet: A = x (identity 1x1 conv), G = W_c reshaped, so NormGrad(u) = |x_u| |W_c,u| with no approximation."""
    model = linear_net.model
    x, targets = _inputs(model, 2, seed=41), np.array([0, 2], dtype=np.int64)
    spec = model.config.input
    weight = linear_net.module.head.weight.detach().double().numpy().reshape(-1, 3, spec.height, spec.width)
    expected = np.stack([np.linalg.norm(x[i], axis=0) * np.linalg.norm(weight[t], axis=0) for i, t in enumerate(targets)])
    # The layer is at input resolution, so upsampling is the identity and only min-max remains.
    got = _run(model, "norm_grad", x, targets)
    np.testing.assert_allclose(got, _upsample_minmax(expected, spec.height, spec.width), atol=1e-5)


def test_norm_grad_several_layers_from_one_backward_pass(tiny_cnn) -> None:
    model = tiny_cnn.model
    x, targets = _inputs(model, 2, seed=51), np.array([3, 0], dtype=np.int64)
    layers = ("stem", "features")
    singles = [_run(model, "norm_grad", x, targets, layer=layer) for layer in layers]
    product = _run(model, "norm_grad", x, targets, layers=layers)
    np.testing.assert_allclose(product, singles[0] * singles[1], atol=1e-6)
    summed = _run(model, "norm_grad", x, targets, {"combine": "sum"}, layers=layers)
    np.testing.assert_allclose(summed, (singles[0] + singles[1]) / 2, atol=1e-6)
    one = _run(model, "norm_grad", x, targets, layers=("features",))
    np.testing.assert_array_equal(one, singles[1])


def test_norm_grad_contrast_uses_the_difference_gradient(tiny_cnn) -> None:
    model = tiny_cnn.model
    x, targets, foils = _inputs(model, 2, seed=61), np.array([0, 1], dtype=np.int64), np.array([2, 3], dtype=np.int64)
    weights = _objective(model, targets) - _objective(model, foils)
    _, a, g = model.layer_gradient(torch.from_numpy(x), weights, "features")
    expected = (a.double().norm(dim=1) * g.double().norm(dim=1)).numpy()
    spec = model.config.input
    got = _run(model, "norm_grad", x, targets, foils=foils)
    np.testing.assert_allclose(got, _upsample_minmax(expected, spec.height, spec.width), atol=1e-5)


# ---------------------------------------------------------------- LP-CAM: k-means, prototypes, file


def test_cosine_kmeans_recovers_directional_clusters() -> None:
    rng = np.random.default_rng(5)
    directions = np.eye(3)
    # Cosine clusters: same direction, very different lengths.
    points = np.concatenate([d * rng.uniform(0.5, 20, (15, 1)) + 0.02 * rng.standard_normal((15, 3)) for d in directions])
    truth = np.repeat(np.arange(3), 15)
    centres, assignment = cosine_kmeans(points, 3, seed=0)
    # Same partition up to a relabelling, and each centre is the mean of its members' raw vectors.
    pairs = {(int(t), int(c)) for t, c in zip(truth, assignment, strict=True)}
    assert len(pairs) == 3 and len({c for _, c in pairs}) == 3
    for cluster in range(3):
        np.testing.assert_allclose(centres[cluster], points[assignment == cluster].mean(axis=0))
    again, _ = cosine_kmeans(points, 3, seed=0)
    np.testing.assert_array_equal(centres, again)
    few, labels = cosine_kmeans(points[:2], 5, seed=0)
    assert few.shape == (2, 3) and sorted(labels) == [0, 1]


@pytest.fixture(scope="module")
def tiny_lp(tiny_cnn, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The tiny CNN with a folder of its own (sharing the loaded artifacts) and prototypes at `features`."""
    shared = tiny_cnn.model
    model = LoadedModel(shared.config, shared.onnx, shared.program, folder=tmp_path_factory.mktemp("tiny_lp"))
    images = _inputs(model, 24, seed=71)
    labels = np.arange(24) % model.config.num_classes
    build_prototypes(model, images, "features", k=3, labels=labels, seed=0).save(prototype_file(model.folder, "features"))  # type: ignore[arg-type]
    return model


def test_head_probabilities_run_the_network_above_the_layer_on_a_constant_map(tiny_cnn) -> None:
    vectors = np.random.default_rng(8).uniform(0, 2, (4, 8))
    module = tiny_cnn.module
    with torch.no_grad():
        constant = torch.from_numpy(vectors).float()[:, :, None, None].expand(-1, -1, 10, 14)
        expected = torch.softmax(module.head(module.mix(constant).flatten(1)).double(), dim=1).numpy()
    np.testing.assert_allclose(head_probabilities(tiny_cnn.model, "features", vectors), expected, atol=1e-5)


def test_prototypes_are_class_and_context_centres(tiny_lp: LoadedModel) -> None:
    prototypes = load_prototypes(tiny_lp, "features")
    probabilities = head_probabilities(tiny_lp, "features", prototypes.prototypes)
    for cls in range(tiny_lp.config.num_classes):
        own = probabilities[(prototypes.classes == cls) & ~prototypes.context, cls]
        assert 1 <= len(own) <= 3
        # Either every kept class centre passes 0.9, or it is the single fallback centre.
        assert (own > 0.9).all() or len(own) == 1
        context = probabilities[(prototypes.classes == cls) & prototypes.context, cls]
        assert ((context > 0.05) & (context < 0.9)).all()


def test_prototype_file_round_trip(tiny_lp: LoadedModel, tmp_path: Path) -> None:
    original = load_prototypes(tiny_lp, "features")
    other = LoadedModel(tiny_lp.config, tiny_lp.onnx, tiny_lp.program, folder=tmp_path)
    original.save(prototype_file(tmp_path, "features"))
    again = load_prototypes(other, "features")
    np.testing.assert_array_equal(again.prototypes, original.prototypes)
    np.testing.assert_array_equal(again.classes, original.classes)
    np.testing.assert_array_equal(again.context, original.context)
    assert again.layer == "features"


def test_missing_prototypes_are_a_failed_precondition_that_says_what_to_run(tiny_cnn, tmp_path: Path) -> None:
    shared = tiny_cnn.model
    bare = LoadedModel(shared.config, shared.onnx, shared.program, folder=tmp_path)
    with pytest.raises(FailedPrecondition) as caught:
        _run(bare, "lp_cam", _inputs(bare, 1, seed=1), np.array([0]))
    assert caught.value.reason == "LP_CAM_PROTOTYPES_MISSING"
    assert "saliency-service lp-cam-prototypes" in caught.value.message and "features" in caught.value.message


@pytest.mark.parametrize(
    "arrays, problem",
    [
        ({"prototypes": np.zeros((2, 5), np.float32)}, "shape"),
        ({"layer": np.array("stem")}, "built for layer"),
        ({"classes": np.array([0, 9])}, "class indices"),
        ({"classes": np.array([0, 0])}, "no class prototype"),
        ({"prototypes": np.array([[np.nan] * 8, [0.0] * 8], np.float32)}, "finite"),
        ({"context": np.array([object(), object()])}, "cannot read"),
    ],
)
def test_invalid_prototype_files_are_rejected(tiny_cnn, tmp_path: Path, arrays: dict[str, np.ndarray], problem: str) -> None:
    shared = tiny_cnn.model
    model = LoadedModel(shared.config, shared.onnx, shared.program, folder=tmp_path)
    content = {
        "version": np.array(1),
        "layer": np.array("features"),
        "prototypes": np.ones((2, 8), np.float32),
        "classes": np.array([0, 1]),
        "context": np.array([False, False]),
    }
    content.update(arrays)
    np.savez(prototype_file(tmp_path, "features"), **content)  # type: ignore[arg-type]
    with pytest.raises(FailedPrecondition) as caught:
        load_prototypes(model, "features")
    assert caught.value.reason == "LP_CAM_PROTOTYPES_INVALID"
    assert problem in caught.value.message


def test_prototypes_are_cached_per_model_and_reloaded_when_the_file_changes(tiny_lp: LoadedModel, tmp_path: Path) -> None:
    model = LoadedModel(tiny_lp.config, tiny_lp.onnx, tiny_lp.program, folder=tmp_path)
    original = load_prototypes(tiny_lp, "features")
    path = prototype_file(tmp_path, "features")
    original.save(path)
    first = cached_prototypes(model, "features")
    assert cached_prototypes(model, "features") is first
    changed = LpCamPrototypes("features", original.prototypes * 2, original.classes, original.context)
    changed.save(path)
    import os

    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10_000_000))
    np.testing.assert_allclose(cached_prototypes(model, "features").prototypes, original.prototypes * 2)


# ---------------------------------------------------------------- LP-CAM: the map


def _reference_lp_cam_item(features: np.ndarray, fg: np.ndarray, ctx: np.ndarray) -> np.ndarray:
    """mean cosine to fg prototypes minus mean cosine to ctx prototypes, ReLU'd (fg alone when ctx is empty), per position."""
    _, h, w = features.shape
    out = np.zeros((h, w))

    def cos(u: np.ndarray, v: np.ndarray) -> float:
        return float(u @ v / ((np.linalg.norm(u) + 1e-12) * (np.linalg.norm(v) + 1e-12)))

    for y in range(h):
        for x in range(w):
            f = features[:, y, x]
            score = sum(cos(f, p) for p in fg) / len(fg)
            if len(ctx):
                score = max(score - sum(cos(f, q) for q in ctx) / len(ctx), 0.0)
            out[y, x] = score
    return out


@pytest.mark.parametrize("given", [{}, {"flip": False}, {"context": False}])
def test_lp_cam_matches_the_reference(tiny_lp: LoadedModel, given: dict[str, object]) -> None:
    x, targets = _inputs(tiny_lp, 3, seed=81), np.array([0, 2, 3], dtype=np.int64)
    fast = _run(tiny_lp, "lp_cam", x, targets, given)
    prototypes = load_prototypes(tiny_lp, "features")
    _, out = tiny_lp.forward(x, ["features"])
    features = out["features"].astype(np.float64)
    if given.get("flip", True):
        features = features + tiny_lp.forward(np.ascontiguousarray(x[..., ::-1]), ["features"])[1]["features"][..., ::-1]
    maps = []
    for item, target in enumerate(targets):
        fg = prototypes.of_class(int(target), context=False)
        ctx = prototypes.of_class(int(target), context=True) if given.get("context", True) else fg[:0]
        maps.append(_reference_lp_cam_item(features[item], fg, ctx))
    spec = tiny_lp.config.input
    np.testing.assert_allclose(fast, _upsample_max(np.stack(maps), spec.height, spec.width, relu=False), atol=1e-5)


def test_lp_cam_contrast_subtracts_the_foils_class_prototypes(tiny_lp: LoadedModel) -> None:
    x, targets, foils = _inputs(tiny_lp, 2, seed=91), np.array([0, 1], dtype=np.int64), np.array([1, 3], dtype=np.int64)
    fast = _run(tiny_lp, "lp_cam", x, targets, {"flip": False}, foils=foils)
    prototypes = load_prototypes(tiny_lp, "features")
    features = tiny_lp.forward(x, ["features"])[1]["features"].astype(np.float64)
    maps = [
        _reference_lp_cam_item(features[i], prototypes.of_class(int(t), False), prototypes.of_class(int(f), False))
        for i, (t, f) in enumerate(zip(targets, foils, strict=True))
    ]
    spec = tiny_lp.config.input
    np.testing.assert_allclose(fast, _upsample_max(np.stack(maps), spec.height, spec.width), atol=1e-5)


def test_lp_cam_peaks_where_the_feature_equals_the_prototype(tiny_cnn, tmp_path: Path) -> None:
    shared = tiny_cnn.model
    model = LoadedModel(shared.config, shared.onnx, shared.program, folder=tmp_path)
    x = _inputs(model, 1, seed=101)
    features = model.forward(x, ["features"])[1]["features"][0].astype(np.float64)
    # The most distinctive position (lowest best cosine to any other position), so no other cell comes close to 1.
    unit = (features / np.linalg.norm(features, axis=0)).reshape(8, -1)
    similarity = unit.T @ unit
    np.fill_diagonal(similarity, -1.0)
    y0, x0 = np.unravel_index(int(similarity.max(axis=1).argmin()), features.shape[1:])
    assert similarity.max() < 1 - 1e-6
    prototype = features[:, y0, x0].astype(np.float32)
    others = np.random.default_rng(0).uniform(0, 1, (3, 8)).astype(np.float32)
    vectors = np.concatenate([prototype[None], others])
    LpCamPrototypes("features", vectors, np.array([0, 1, 2, 3]), np.zeros(4, dtype=bool)).save(prototype_file(tmp_path, "features"))
    maps = _run(model, "lp_cam", x, np.array([0]), {"flip": False, "context": False})
    spec = model.config.input
    # The feature cell (y0, x0) of the 10 x 14 grid covers input pixels [2*y0, 2*y0+2) x [2*x0, 2*x0+2).
    peak_y, peak_x = np.unravel_index(int(maps[0].argmax()), maps[0].shape)
    assert (peak_y // 2, peak_x // 2) == (y0, x0), (peak_y, peak_x)
    assert maps[0].max() == pytest.approx(1.0) and spec.height == 20


# ---------------------------------------------------------------- the shipped `shapes` model


@pytest.fixture(scope="module")
def shapes() -> LoadedModel:
    repository = ModelRepository(EMBEDDED_REPOSITORY)
    repository.load_all()
    return repository.get("shapes")


def test_shipped_prototypes_load_and_are_small(shapes: LoadedModel) -> None:
    assert shapes.folder is not None
    path = prototype_file(shapes.folder, "layer3")
    assert path.stat().st_size < 200_000
    prototypes = load_prototypes(shapes, "layer3")
    assert set(prototypes.classes.tolist()) == set(range(shapes.config.num_classes))


@pytest.mark.parametrize("method, minimum", [("lp_cam", 0.95), ("cf_cam", 0.5), ("norm_grad", 0.65)])
def test_peak_on_the_shape_mask(shapes: LoadedModel, method: str, minimum: float) -> None:
    """Held-out images: how often the map's maximum lies on the predicted shape's mask (measured: see the report)."""
    images, _, masks = generate_batch([HELDOUT_SEED_OFFSET + 800_000 + i for i in range(100)])
    x = preprocess(images).numpy()
    predicted = shapes.logits(x).argmax(axis=1).astype(np.int64)
    maps = _run(shapes, method, x, predicted, layer="layer3")
    peaks = maps.reshape(len(x), -1).argmax(axis=1)
    rate = float(np.mean([mask.flat[peak] for mask, peak in zip(masks, peaks, strict=True)]))
    assert rate >= minimum, rate
