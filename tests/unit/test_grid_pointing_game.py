"""The DiFull grid (`shapes_grid`) and `grid_pointing_game`: METRICS.md §5's known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saliency_service.config import EMBEDDED_REPOSITORY
from saliency_service.core.engine import Engine, ScoreJob
from saliency_service.core.errors import FailedPrecondition
from saliency_service.core.images import ImageLimits, to_model_input
from saliency_service.core.methods import METHODS
from saliency_service.core.metrics.grid_pointing_game import cell_shares
from saliency_service.core.models.config import GridSpec
from saliency_service.core.models.model import RuntimeOptions
from saliency_service.core.models.repository import ModelRepository
from saliency_service.core.types import RawTensor, TargetRequest
from saliency_service.shapes.generator import HELDOUT_SEED_OFFSET, LABELS, generate, generate_grid
from saliency_service.shapes.grid import GRID_LABELS, GridNet, shipped_shapes

# Backprop methods: the target's head cannot see the other cells, so their gradient there is exactly zero.
EXACT = ["saliency", "input_x_gradient", "integrated_gradients", "guided_backprop", "hires_cam"]
SEEDS = [HELDOUT_SEED_OFFSET + i for i in range(3)]


@pytest.fixture(scope="module")
def engine() -> Engine:
    repository = ModelRepository(EMBEDDED_REPOSITORY, RuntimeOptions(prefer_cuda=False))
    repository.load_all()
    return Engine(repository, ImageLimits(max_images=8))


def _raw(image: np.ndarray) -> RawTensor:
    return RawTensor("uint8", image.shape, image.tobytes())


def _score(engine: Engine, method: str, *, cell: int, saliency: list[np.ndarray] | None = None, **params: object) -> list[float]:
    """grid_pointing_game of `method` (or supplied maps) for cell `cell`'s true class on each test grid."""
    scores = []
    for seed in SEEDS:
        sample = generate_grid(seed)
        job = ScoreJob(
            model="shapes_grid",
            images=[_raw(sample.image)],
            metric="grid_pointing_game",
            method="" if saliency else method,
            method_params=params,
            saliency=[RawTensor("float32", saliency[0].shape, saliency[0].tobytes())] if saliency else (),
            target=TargetRequest(class_index=sample.label(cell)),
        )
        scores += [result.value for result in engine.score(job)]
    return scores


def test_grid_model_is_the_shapes_model_per_cell() -> None:
    trunk = shipped_shapes()
    net = GridNet(trunk).eval()
    sample = generate_grid(SEEDS[0])
    x = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        logits = net(x)
        for cell, (top, left) in enumerate([(0, 0), (0, 128), (128, 0), (128, 128)]):
            alone = trunk(x[:, :, top : top + 128, left : left + 128])
            torch.testing.assert_close(logits[:, cell * len(LABELS) : (cell + 1) * len(LABELS)], alone, atol=1e-5, rtol=1e-5)
    assert len(set(sample.classes)) == 4
    assert [GRID_LABELS[sample.label(cell)].split("/")[1] for cell in range(4)] == [LABELS[c] for c in sample.classes]
    for cell in range(4):
        assert (sample.object_masks[cell] <= sample.cell_masks[cell]).all() and sample.object_masks[cell].any()


def test_grid_sample_reuses_the_single_image_generator() -> None:
    sample = generate_grid(SEEDS[1])
    first = generate(SEEDS[1] * 64)
    assert sample.classes[0] == first.label
    np.testing.assert_array_equal(sample.image[:128, :128], first.image)


def test_shipped_grid_model_classifies_each_cell(engine: Engine) -> None:
    model = engine.repository.get("shapes_grid")
    assert model.config.grid == GridSpec(2, 2) and model.config.labels == GRID_LABELS
    correct = total = 0
    for seed in SEEDS:
        sample = generate_grid(seed)
        logits = model.logits(to_model_input([sample.image.astype(np.float32) / 255.0], model.config.input))
        for cell in range(4):
            head = logits[0, cell * len(LABELS) : (cell + 1) * len(LABELS)]
            correct += int(head.argmax() == sample.classes[cell])
            total += 1
    assert correct >= total - 1


@pytest.mark.parametrize("method", EXACT)
@pytest.mark.parametrize("cell", [0, 3])
def test_backprop_methods_score_one(engine: Engine, method: str, cell: int) -> None:
    params = {"steps": 8} if method == "integrated_gradients" else {}
    assert _score(engine, method, cell=cell, **params) == pytest.approx([1.0] * len(SEEDS), abs=1e-6)


@pytest.mark.parametrize("cell", [0, 3])
def test_grad_cam_at_the_stitched_trunk_layer_is_nearly_one(engine: Engine, cell: int) -> None:
    # Not exact: Grad-CAM's channel weights (the target head's) multiply every cell's activations, so other
    # cells can get positive weight after the ReLU; on these grids that share is measured below 1%.
    assert np.mean(_score(engine, "grad_cam", cell=cell)) > 0.99


def test_uniform_and_random_maps_score_chance(engine: Engine) -> None:
    assert _score(engine, "", cell=1, saliency=[np.ones((256, 256), np.float32)]) == pytest.approx([0.25] * len(SEEDS))
    noise = np.random.default_rng(0).random((256, 256)).astype(np.float32)
    assert _score(engine, "", cell=2, saliency=[noise]) == pytest.approx([0.25] * len(SEEDS), abs=0.01)


@pytest.mark.skipif("random" not in METHODS, reason="the `random` baseline method is not registered in this build")
def test_random_method_scores_chance(engine: Engine) -> None:
    assert np.mean(_score(engine, "random", cell=0)) == pytest.approx(0.25, abs=0.03)


def test_cell_shares_known_answers() -> None:
    maps = np.zeros((3, 4, 6), np.float32)
    maps[0, :2, :3] = 1.0  # all in cell 0
    maps[1, 2:, 3:] = 2.0
    maps[1, :2, :3] = -5.0  # negative attribution does not count
    maps[2] = -1.0  # nothing positive: 0 everywhere
    np.testing.assert_allclose(cell_shares(maps, 2, 2), [[1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]])


def test_grid_pointing_game_refuses_a_model_without_a_grid(engine: Engine) -> None:
    image = generate(SEEDS[0]).image
    with pytest.raises(FailedPrecondition) as error:
        engine.score(ScoreJob(model="shapes", images=[_raw(image)], metric="grid_pointing_game", method="saliency"))
    assert error.value.reason == "MODEL_HAS_NO_GRID"
