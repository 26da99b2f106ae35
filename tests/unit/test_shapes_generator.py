"""Tests for the procedural shapes dataset and the ShapesNet architecture."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_dilation

from saliency_service.shapes.generator import (
    HELDOUT_SEED_OFFSET,
    IMAGE_SIZE,
    LABELS,
    MAX_SHAPE_SIZE,
    MIN_SHAPE_SIZE,
    TRAIN_SEED_OFFSET,
    Sample,
    generate,
    generate_batch,
    heldout_seeds,
    train_seeds,
)
from saliency_service.shapes.network import MEAN, STD, ShapesNet, preprocess

N_SAMPLES = 120


@pytest.fixture(scope="module")
def singles() -> list[Sample]:
    return [generate(seed) for seed in range(N_SAMPLES)]


@pytest.fixture(scope="module")
def pairs() -> list[Sample]:
    return [generate(seed, n_shapes=2) for seed in range(1000, 1000 + N_SAMPLES // 2)]


def test_labels_are_distinct_lowercase_names() -> None:
    assert 6 <= len(LABELS) <= 8
    assert len(set(LABELS)) == len(LABELS)
    assert all(name == name.lower() and name.isalpha() for name in LABELS)


def test_same_seed_gives_identical_sample() -> None:
    for n_shapes in (1, 2):
        a = generate(1234, n_shapes=n_shapes)
        b = generate(1234, n_shapes=n_shapes)
        assert np.array_equal(a.image, b.image)
        assert a.label == b.label
        assert len(a.objects) == len(b.objects) == n_shapes
        for oa, ob in zip(a.objects, b.objects, strict=True):
            assert np.array_equal(oa.mask, ob.mask)
            assert oa.bbox == ob.bbox


def test_different_seeds_give_different_images(singles: list[Sample]) -> None:
    images = {s.image.tobytes() for s in singles}
    assert len(images) == len(singles)
    assert not np.array_equal(singles[0].mask, singles[1].mask)


def test_sample_types_and_shapes(singles: list[Sample]) -> None:
    s = singles[0]
    assert s.image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and s.image.dtype == np.uint8
    assert isinstance(s.label, int) and 0 <= s.label < len(LABELS)
    obj = s.objects[0]
    assert obj.mask.shape == (IMAGE_SIZE, IMAGE_SIZE) and obj.mask.dtype == np.bool_
    assert obj.label == LABELS[obj.class_index] and obj.class_index == s.label
    assert s.mask is obj.mask
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.label = 0  # type: ignore[misc]  # frozen dataclass


def test_custom_size() -> None:
    s = generate(7, size=160)
    assert s.image.shape == (160, 160, 3) and s.mask.shape == (160, 160)


def test_every_class_reachable_and_roughly_balanced(singles: list[Sample]) -> None:
    counts = np.bincount([s.label for s in singles], minlength=len(LABELS))
    assert (counts > 0).all(), counts
    assert counts.max() < 3 * counts.min(), counts


def test_masks_plausible_and_inside_image(singles: list[Sample]) -> None:
    for s in singles:
        mask = s.mask
        area = int(mask.sum())
        # Smallest possible object: a star or heart of diameter MIN_SHAPE_SIZE;
        # largest: a rotated square reaching MAX_SHAPE_SIZE * 1.05.
        assert 0.1 * MIN_SHAPE_SIZE**2 < area < 1.2 * MAX_SHAPE_SIZE**2, (s.label, area)
        # No object touches the image border, so it lies fully inside.
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
        x0, y0, x1, y1 = s.objects[0].bbox
        ys, xs = np.nonzero(mask)
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert MIN_SHAPE_SIZE * 0.6 <= max(x1 - x0, y1 - y0) <= MAX_SHAPE_SIZE * 1.5


def test_object_is_flat_coloured_and_stands_out(singles: list[Sample]) -> None:
    for s in singles:
        img = s.image.astype(np.float64)
        inside = img[s.mask]
        # One fill colour plus small grain.
        assert inside.std(axis=0).max() < 10.0
        # A band of background around the object, differing clearly in colour.
        around = binary_dilation(s.mask, iterations=4) & ~s.mask
        diff = np.linalg.norm(inside.mean(axis=0) - img[around].mean(axis=0))
        assert diff > 30.0, (s.label, diff)


def test_pairs_have_distinct_classes_and_little_overlap(pairs: list[Sample]) -> None:
    for s in pairs:
        a, b = s.objects
        assert a.class_index != b.class_index
        assert s.label == a.class_index
        assert np.array_equal(s.mask, a.mask)
        # Visible masks are disjoint by construction; the first object must
        # also keep almost all of its own area (little occlusion).
        assert not (a.mask & b.mask).any()
        assert a.mask.sum() > 0 and b.mask.sum() > 0
    # Placement is retried until shapes barely touch: the second object may
    # cover only a sliver of the first one's bounding box.
    crowded = [s for s in pairs if _bbox_intrusion(s) > 0.1]
    assert len(crowded) <= len(pairs) // 10


def _bbox_intrusion(s: Sample) -> float:
    """Pixels of the second object inside the first one's bbox, relative to its area."""
    a, b = s.objects
    x0, y0, x1, y1 = a.bbox
    return int(b.mask[y0:y1, x0:x1].sum()) / max(1, int(a.mask.sum()))


def test_generate_batch_matches_generate() -> None:
    seeds = [3, 11, 42]
    images, labels, masks = generate_batch(seeds)
    assert images.shape == (3, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
    assert labels.shape == (3,) and labels.dtype == np.int64
    assert masks.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and masks.dtype == np.bool_
    for i, seed in enumerate(seeds):
        s = generate(seed)
        assert np.array_equal(images[i], s.image)
        assert labels[i] == s.label
        assert np.array_equal(masks[i], s.mask)
    _, pair_labels, pair_masks = generate_batch(seeds, n_shapes=2)
    assert np.array_equal(pair_masks[0], generate(3, n_shapes=2).mask)
    assert pair_labels[0] == generate(3, n_shapes=2).label


def test_heldout_seeds_disjoint_from_training() -> None:
    assert TRAIN_SEED_OFFSET + 0 == train_seeds(1)[0]
    held = heldout_seeds(1000)
    assert min(held) == HELDOUT_SEED_OFFSET == 10_000_000
    assert max(train_seeds(1000, start=HELDOUT_SEED_OFFSET - 1000)) < min(held)
    with pytest.raises(ValueError):
        train_seeds(10, start=HELDOUT_SEED_OFFSET - 5)
    assert not np.array_equal(generate(held[0]).image, generate(0).image)


def test_preprocess_normalises() -> None:
    images = np.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    images[1] = 255
    x = preprocess(images)
    assert x.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and x.dtype == torch.float32
    for c in range(3):
        assert x[0, c, 0, 0].item() == pytest.approx(-MEAN[c] / STD[c], rel=1e-5)
        assert x[1, c, 0, 0].item() == pytest.approx((1 - MEAN[c]) / STD[c], rel=1e-5)
    with pytest.raises(ValueError):
        preprocess(images.astype(np.float32))


def test_shapesnet_output_and_layer3_resolution() -> None:
    model = ShapesNet(num_classes=len(LABELS)).eval()
    assert sum(p.numel() for p in model.parameters()) <= 300_000
    seen: dict[str, torch.Size] = {}
    handle = model.layer3.register_forward_hook(lambda _m, _i, out: seen.__setitem__("layer3", out.shape))
    try:
        with torch.no_grad():
            logits = model(torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE))
    finally:
        handle.remove()
    assert logits.shape == (2, len(LABELS))
    assert torch.isfinite(logits).all()
    assert tuple(seen["layer3"][-2:]) == (16, 16)
    for name in ("layer1", "layer2", "layer3", "pool", "fc"):
        assert hasattr(model, name)
