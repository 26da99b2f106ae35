"""Every RPC through the real client against the in-process server and the shipped `shapes` model."""

from __future__ import annotations

import io
import math
import re

import numpy as np
import pytest
from PIL import Image

from saliency_client import AsyncSaliencyClient, Progress, SaliencyClient
from saliency_service.core.methods import METHODS
from saliency_service.shapes.generator import LABELS, Sample

FIRST_METHODS = ("grad_cam", "eigen_cam", "integrated_gradients", "saliency")
# Cheaper settings for the costly methods, so every method runs through the RPC in seconds.
LIGHT: dict[str, dict[str, object]] = {
    "rise": {"masks": 256},
    "integrated_gradients": {"steps": 16},
    "occlusion": {"window": 32, "stride": 32},
}


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_list_models_reports_ready_and_not_ready(client: SaliencyClient) -> None:
    models = {m.name: m for m in client.list_models()}
    assert set(models) == {"shapes", "vit_shapes", "broken"}
    shapes = models["shapes"]
    assert shapes.ready and shapes.reason == ""
    assert shapes.labels == LABELS
    assert (shapes.inputs.height_px, shapes.inputs.width_px, shapes.inputs.channels) == (128, 128, 3)
    assert shapes.default_layer in [layer.name for layer in shapes.layers]
    assert not models["broken"].ready
    assert "ONNX" in models["broken"].reason


def test_get_model(client: SaliencyClient) -> None:
    model = client.get_model("shapes")
    assert model.name == "shapes" and model.ready
    assert all(len(layer.shape) == 3 for layer in model.layers)


def test_list_methods_publishes_every_parameter(client: SaliencyClient) -> None:
    catalog = client.list_methods()
    names = {m.name for m in catalog.methods}
    assert set(FIRST_METHODS) <= names
    assert {"deletion", "insertion"} <= {m.name for m in catalog.metrics}
    assert "grid_regions" in {t.name for t in catalog.templates}
    steps = next(p for p in catalog.get("integrated_gradients").parameters if p.name == "steps")
    assert steps.type == "int" and steps.default == 50 and steps.minimum == 1 and steps.maximum is not None
    rule = next(p for p in catalog.get("integrated_gradients").parameters if p.name == "rule")
    assert "gauss_legendre" in rule.choices
    assert catalog.get("grad_cam").uses_layer and not catalog.get("saliency").uses_layer
    assert catalog.get("deletion").higher_is_better is False and catalog.get("insertion").higher_is_better is True
    for info in [*catalog.methods, *catalog.metrics, *catalog.templates]:
        assert info.description, f"{info.name} has no description"


@pytest.mark.parametrize("model", ["shapes", "vit_shapes"])
@pytest.mark.parametrize("method", METHODS.names())
def test_explain_each_method(client: SaliencyClient, samples: list[Sample], method: str, model: str) -> None:
    """Every method through the RPC on the CNN and on the ViT (token layers)."""
    sample = samples[1]
    (explanation,) = client.explain(model, [sample.image], method=method, seed=3, params=LIGHT.get(method))
    assert explanation.saliency.shape == (128, 128)
    assert explanation.saliency.dtype == np.float32
    assert np.isfinite(explanation.saliency).all()
    assert explanation.predicted == explanation.target == sample.label
    assert explanation.label == LABELS[sample.label]
    assert math.isclose(float(explanation.probabilities.sum()), 1.0, rel_tol=1e-4)
    provenance = explanation.provenance
    assert (provenance.model, provenance.method, provenance.seed) == (model, method, 3)
    assert provenance.model_version
    assert "attribute" in provenance.timings_ms
    assert bool(provenance.layer) == METHODS.get(method).uses_layer


def test_map_comes_back_at_the_input_images_resolution(client: SaliencyClient, image: np.ndarray) -> None:
    big = np.asarray(Image.fromarray(image).resize((200, 150)))
    explanations = client.explain("shapes", [big, _png(image), image.astype(np.float32) / 255.0], method="grad_cam")
    assert [e.saliency.shape for e in explanations] == [(150, 200), (128, 128), (128, 128)]
    np.testing.assert_allclose(explanations[1].saliency, explanations[2].saliency, atol=1e-5)


def test_target_by_index_and_label_and_batch_equals_single(client: SaliencyClient, samples: list[Sample]) -> None:
    images = [s.image for s in samples[:3]]
    by_label = client.explain("shapes", images, method="saliency", target="heart")
    by_index = client.explain("shapes", images, method="saliency", target=LABELS.index("heart"))
    assert all(e.target == LABELS.index("heart") and e.label == "heart" for e in by_label)
    for a, b in zip(by_label, by_index, strict=True):
        np.testing.assert_array_equal(a.saliency, b.saliency)
    for i, image in enumerate(images):
        (single,) = client.explain("shapes", [image], method="saliency", target="heart")
        np.testing.assert_allclose(single.saliency, by_label[i].saliency, rtol=1e-4, atol=1e-6)


def test_grad_cam_peak_lies_on_the_shape(client: SaliencyClient, samples: list[Sample]) -> None:
    explanations = client.explain("shapes", [s.image for s in samples], method="grad_cam")
    hits = [bool(s.mask.flat[int(np.argmax(e.saliency))]) for s, e in zip(samples, explanations, strict=True)]
    assert sum(hits) >= len(hits) - 1, hits


def test_score_deletion_and_insertion(client: SaliencyClient, samples: list[Sample]) -> None:
    images = [s.image for s in samples[:2]]
    deletion = client.score("shapes", images, method="grad_cam", metric="deletion")
    insertion = client.score("shapes", images, method="grad_cam", metric="insertion", params={"step": 256})
    for result in deletion:
        assert 0.0 <= result.value <= 1.0
        assert len(result.curve) == 128 * 128 // 128 + 1
        assert result.higher_is_better is False and result.metric == "deletion"
        assert result.provenance.method == "grad_cam"
    for result in insertion:
        assert len(result.curve) == 128 * 128 // 256 + 1
        assert result.params["step"] == 256


def test_score_streams_progress_then_the_same_results_as_score(client: SaliencyClient, samples: list[Sample]) -> None:
    images = [s.image for s in samples[:2]]
    seen: list[Progress] = []
    streamed = client.score("shapes", images, method="grad_cam", metric="deletion", params={"step": 16}, progress=seen.append)
    plain = client.score("shapes", images, method="grad_cam", metric="deletion", params={"step": 16})
    assert [r.value for r in streamed] == pytest.approx([r.value for r in plain])
    assert seen, "no progress arrived"
    assert all(p.stage == "perturbation passes" and 0 < p.done <= p.total for p in seen)
    assert [p.done for p in seen] == sorted(p.done for p in seen)
    assert seen[-1].done == seen[-1].total == 2 * (128 * 128 // 16 + 1)
    # The curve's x axis: the share of pixels removed at each point.
    assert streamed[0].curve_x[0] == 0.0 and streamed[0].curve_x[-1] == 1.0
    assert len(streamed[0].curve_x) == len(streamed[0].curve)
    assert np.allclose(np.diff(streamed[0].curve_x), 16 / (128 * 128))


async def test_async_client_streams_score_progress(address: str, samples: list[Sample]) -> None:
    seen: list[Progress] = []
    async with AsyncSaliencyClient(address, timeout=60) as client:
        results = await client.score("shapes", [samples[0].image], metric="insertion", params={"step": 64}, progress=seen.append)
    assert len(results) == 1 and seen and seen[-1].done == seen[-1].total


def test_score_a_supplied_map_ranks_a_good_map_above_its_inverse(client: SaliencyClient, samples: list[Sample]) -> None:
    masks = [s.mask.astype(np.float32) for s in samples[:3]]
    images = [s.image for s in samples[:3]]
    good = client.score("shapes", images, metric="deletion", saliency=masks)
    bad = client.score("shapes", images, metric="deletion", saliency=[1.0 - m for m in masks])
    assert all(g.provenance.method == "supplied" for g in good)
    assert np.mean([g.value for g in good]) < np.mean([b.value for b in bad])


# Small sample counts: each metric runs through the RPC in seconds on the 128 x 128 shapes model.
METRIC_CASES: dict[str, dict[str, object]] = {
    "road": {"percentages": "20,80"},
    "faithfulness_correlation": {"runs": 12, "subset_size": 256},
    "infidelity": {"samples": 12, "patch_size": 16},
    "max_sensitivity": {"samples": 2},
    "model_randomization": {"layers": 2},
    "random_logit": {},
    "class_sensitivity": {},
    "contrastive_faithfulness": {},
    "group_faithfulness": {"substrate": "blur"},
    "class_in_group": {},
    "group_contrast": {},
}
FOIL_METRICS = ("contrastive_faithfulness", "group_contrast")


@pytest.mark.parametrize("metric", list(METRIC_CASES))
def test_score_each_faithfulness_and_sanity_metric(client: SaliencyClient, samples: list[Sample], metric: str) -> None:
    sample = samples[0]
    # Two classes on: always another label group of `shapes`.
    foil = LABELS[(sample.label + 2) % len(LABELS)] if metric in FOIL_METRICS else None
    (result,) = client.score("shapes", [sample.image], method="grad_cam", metric=metric, params=METRIC_CASES[metric], foil=foil)
    assert result.metric == metric and math.isfinite(result.value)
    assert result.provenance.method == "grad_cam"
    assert len(result.curve) == len(result.curve_x)
    for name, value in METRIC_CASES[metric].items():
        assert result.params[name] == value
    catalog = {m.name: m for m in client.list_methods().metrics}
    assert catalog[metric].higher_is_better == result.higher_is_better


def test_contrastive_faithfulness_of_a_supplied_map_with_a_foil(client: SaliencyClient, samples: list[Sample]) -> None:
    sample = samples[1]
    foil = LABELS[(sample.label + 1) % len(LABELS)]
    mask = sample.mask.astype(np.float32)
    (result,) = client.score("shapes", [sample.image], metric="contrastive_faithfulness", saliency=[mask], target=sample.label, foil=foil)
    assert result.provenance.method == "supplied" and result.provenance.foil == LABELS.index(foil)
    assert list(result.curve_x) == pytest.approx([0.1 * k for k in range(1, 10)])
    # The untouched image's contrast, from Explain's probabilities.
    (explanation,) = client.explain("shapes", [sample.image], method="grad_cam", target=sample.label)
    probabilities = explanation.probabilities
    assert result.components["clean"] == pytest.approx(probabilities[sample.label] - probabilities[LABELS.index(foil)], abs=1e-5)
    assert -1.0 <= result.value <= 1.0


def test_verbalize_names_regions_with_shares_from_the_map(client: SaliencyClient, samples: list[Sample]) -> None:
    sample = samples[2]
    (verbalization,) = client.verbalize("shapes", [sample.image], method="grad_cam")
    label = LABELS[sample.label]
    assert f"'{label}'" in verbalization.text
    assert verbalization.template == "grid_regions"
    shares = [int(p) for p in re.findall(r"(\d+)%", verbalization.text)]
    positives = [f for f in verbalization.facts if f.sign == "positive"]
    assert shares and len(shares) <= len(positives)
    for share, fact in zip(shares, sorted(positives, key=lambda f: f.rank), strict=False):
        assert share == round(100 * fact.share)
        assert fact.region in verbalization.text
    # Facts are the regions the text names: at most all of the positive evidence.
    assert 0.0 < sum(f.share for f in positives) <= 1.0 + 1e-6


def test_verbalize_model_free(client: SaliencyClient) -> None:
    saliency = np.zeros((30, 30), dtype=np.float32)
    saliency[10:20, 10:20] = 1.0
    (verbalization,) = client.verbalize(saliency=[saliency])
    assert "100%" in verbalization.text and "centre" in verbalization.text


async def test_async_client(address: str, image: np.ndarray) -> None:
    async with AsyncSaliencyClient(address, timeout=60) as client:
        models = await client.list_models()
        (explanation,) = await client.explain("shapes", [image], method="grad_cam")
    assert "shapes" in {m.name for m in models}
    assert explanation.saliency.shape == (128, 128)


def test_verbalize_components_and_signed_grid_through_the_rpc(client: SaliencyClient) -> None:
    saliency = np.zeros((60, 60), dtype=np.float32)
    saliency[5:15, 5:15] = 1.0  # top left blob
    saliency[40:50, 40:50] = -1.0  # negative evidence, bottom right
    (components,) = client.verbalize(saliency=[saliency], template="components")
    assert "top left" in components.text and "100%" in components.text
    (signed,) = client.verbalize(saliency=[saliency], params={"sign": "both"})
    signs = {(fact.sign, fact.region) for fact in signed.facts}
    assert ("positive", "top left") in signs and ("negative", "bottom right") in signs
    catalog = client.list_methods()
    threshold = next(p for p in catalog.get("components").parameters if p.name == "threshold")
    assert threshold.minimum == 0.01 and threshold.maximum == 1.0


def test_explain_with_a_foil_and_several_layers(client: SaliencyClient, samples: list[Sample]) -> None:
    sample = samples[1]
    foil = LABELS[(sample.label + 1) % len(LABELS)]
    (explanation,) = client.explain("shapes", [sample.image], method="grad_cam", foil=foil, layers=["layer2", "layer3"])
    assert list(explanation.layer_maps) == ["layer2", "layer3"]
    for saliency in explanation.layer_maps.values():
        assert saliency.shape == (128, 128) and np.isfinite(saliency).all()
    provenance = explanation.provenance
    assert provenance.layers == ("layer2", "layer3") and provenance.layer == "layer2"
    assert (provenance.foil, provenance.foil_label) == (LABELS.index(foil), foil)
    (plain,) = client.explain("shapes", [sample.image], method="grad_cam", layer="layer3")
    assert plain.provenance.foil is None and plain.layer_maps == {}
    catalog = client.list_methods()
    flags = {m.name: (m.contrastive, m.multi_layer) for m in catalog.methods}
    assert flags["grad_cam"] == (True, False) and flags["eigen_cam"] == (False, False)


def test_integrated_gradients_from_a_supplied_baseline(client: SaliencyClient, samples: list[Sample]) -> None:
    sample, other = samples[2], samples[3]
    params = {"baseline": "supplied", "steps": 16}
    # From the image itself the path is empty: the map is zero everywhere.
    (same,) = client.explain("shapes", [sample.image], method="integrated_gradients", params=params, baselines=[sample.image])
    assert np.abs(same.saliency).max() == 0
    # One baseline serves a batch; the map sums to about logit(x) - logit(baseline) (completeness).
    pair = client.explain("shapes", [sample.image, other.image], method="integrated_gradients", params=params, baselines=[other.image])
    assert np.abs(pair[0].saliency).max() > 0 and np.abs(pair[1].saliency).max() == 0


def test_input_methods_at_the_same_layers_as_a_cam(client: SaliencyClient, samples: list[Sample]) -> None:
    """ML-Att: every method at the same layers, so their maps compare fairly."""
    sample = samples[4]
    for method in ("integrated_gradients", "input_x_gradient", "grad_cam"):
        (explanation,) = client.explain("shapes", [sample.image], method=method, layers=["layer2", "layer3"], params=LIGHT.get(method))
        assert explanation.provenance.layers == ("layer2", "layer3")
        assert set(explanation.layer_maps) == {"layer2", "layer3"} and np.isfinite(explanation.saliency).all()
    optional = {m.name for m in client.list_methods().methods if m.layer_optional}
    assert optional == {"saliency", "input_x_gradient", "integrated_gradients"}


def test_score_pointing_game_with_the_generators_masks(client: SaliencyClient, samples: list[Sample]) -> None:
    """The shapes model's Grad-CAM peak lies on the object on (nearly) every held-out image."""
    images, masks = [s.image for s in samples], [s.mask for s in samples]
    results = client.score("shapes", images, method="grad_cam", metric="pointing_game", masks=masks, params={"tolerance_px": 0})
    assert all(r.metric == "pointing_game" and r.higher_is_better and r.params["tolerance_px"] == 0 for r in results)
    assert all(r.value in (0.0, 1.0) and r.components["tied_maxima"] >= 1 for r in results)
    assert sum(r.value for r in results) >= len(results) - 1, [r.value for r in results]


def test_score_localisation_ranks_grad_cam_above_the_random_floor(client: SaliencyClient, samples: list[Sample]) -> None:
    images, masks = [s.image for s in samples], [s.mask for s in samples]
    random = client.score("shapes", images, method="random", metric="relevance_mass", masks=masks, seed=7)
    grad_cam = client.score("shapes", images, method="grad_cam", metric="relevance_mass", masks=masks)
    for result, sample in zip(random, samples, strict=True):
        # A uniform-noise map puts the object's area share of its mass on the object: 128² pixels make the
        # per-image sd about sqrt(f(1-f)/(3N)) < 0.003, so 0.02 is a wide margin.
        assert result.components["area_share"] == pytest.approx(sample.mask.mean())
        assert result.value == pytest.approx(sample.mask.mean(), abs=0.02)
    pairs = [(g.value, r.value) for g, r in zip(grad_cam, random, strict=True)]
    assert all(g > 2 * r for g, r in pairs), pairs
    # The mask itself, sent as the map, is the perfect localisation.
    perfect = client.score("shapes", images, metric="relevance_rank", saliency=[m.astype(np.float32) for m in masks], masks=masks)
    assert [r.value for r in perfect] == pytest.approx([1.0] * len(samples))


# --- Verbalize: token forms, named regions, contrast, correctness, styles (issue 5) ---------------------------

TOKEN_TEXT = "the film was not good at all".split()


def test_verbalize_tokens_model_free(client: SaliencyClient) -> None:
    values = [0.0, 0.0, 0.0, 0.3, 0.7, 0.0, -0.2]
    (order,) = client.verbalize(tokens=TOKEN_TEXT, attributions=values, template="token_order", params={"sign": "both"})
    assert order.text == (
        "Top tokens: token 'good' with 70.00% of the positive evidence; token 'not' with 30.00% of the positive evidence. "
        "Top tokens: token 'all' with 100.00% of the negative evidence."
    )
    assert [(f.kind, f.region, f.start, f.end, f.sign) for f in order.facts] == [
        ("token", "good", 4, 5, "positive"),
        ("token", "not", 3, 4, "positive"),
        ("token", "all", 6, 7, "negative"),
    ]
    # Several texts at once; without a template the server picks the summary for tokens.
    first, second = client.verbalize(tokens=[TOKEN_TEXT, ["great"]], attributions=[values, np.array([2.0])])
    assert first.template == "token_summary" and second.template == "token_summary"
    assert first.text == "The phrase » not good « is most important for the prediction (100.00%)."
    assert second.text == "The word » great « is most important for the prediction (100.00%)."
    assert (first.facts[0].kind, first.facts[0].start, first.facts[0].end, first.facts[0].share) == ("span", 3, 5, 1.0)
    listed = client.list_methods()
    catalog = {t.name for t in listed.templates}
    assert {"token_order", "token_spans", "token_convolution", "token_compare", "token_summary", "named_regions"} <= catalog
    assert {"plain", "terse"} <= set(listed.styles) and all(listed.styles.values())


def test_verbalize_named_regions_through_the_rpc(client: SaliencyClient) -> None:
    saliency = np.zeros((40, 40), np.float32)
    saliency[:, :20] = 0.7 / 800  # 70% on the left half
    saliency[:20, 20:] = 0.3 / 400  # 30% on the top right quarter
    left = np.zeros((40, 40), np.uint8)
    left[:, :20] = 1
    corner = np.zeros((40, 40), bool)
    corner[:20, 20:] = True
    (result,) = client.verbalize(saliency=[saliency], template="named_regions", regions={"dog": left, "ball": corner})
    assert result.text == "70% of the positive evidence lies in 'dog'; 'ball' adds 30%; 0% lies outside the named regions."
    assert [(f.region, round(f.share, 6)) for f in result.facts] == [("dog", 0.7), ("ball", 0.3), ("", 0.0)]
    # Masks at another resolution are resized to the map (bilinear, kept where >= 0.5): the edges move by a pixel at most.
    (small,) = client.verbalize(saliency=[saliency], template="named_regions", regions={"dog": left[::4, ::4], "ball": corner[::4, ::4]})
    assert [f.share for f in small.facts[:2]] == pytest.approx([0.7, 0.3], abs=0.01)
    (terse,) = client.verbalize(
        saliency=[saliency], template="named_regions", regions=[{"dog": left, "ball": corner}], style="terse", detail="short"
    )
    assert terse.text == "evidence: dog 70%; outside 0%."
    (custom,) = client.verbalize(
        saliency=[saliency],
        template="named_regions",
        regions={"dog": left, "ball": corner},
        custom_templates={"named_regions.first": "{region} holds {percent}%"},
    )
    assert custom.text.startswith("dog holds 70%; 'ball' adds 30%")


def test_verbalize_contrast_and_correctness_from_the_model(client: SaliencyClient, samples: list[Sample]) -> None:
    sample = samples[2]
    (explanation,) = client.explain("shapes", [sample.image], method="grad_cam")
    predicted = explanation.predicted_label
    foil = next(label for label in LABELS if label != predicted)
    wrong = next(label for label in LABELS if label != predicted)
    (result,) = client.verbalize("shapes", [sample.image], method="grad_cam", foil=foil, labels=wrong)
    kinds = [f.kind for f in result.facts]
    assert kinds[:2] == ["prediction", "correctness"] and kinds[-1] == "contrast"
    prediction, correctness, contrast = result.facts[0], result.facts[1], result.facts[-1]
    assert (prediction.region, correctness.region, correctness.value) == (predicted, wrong, 0.0)
    assert prediction.value == pytest.approx(explanation.probabilities[explanation.predicted], abs=1e-6)
    assert f"The model predicts '{predicted}' ({prediction.value:.2f})." in result.text
    assert f"The prediction is wrong: the true class is '{wrong}', not '{predicted}'." in result.text
    foil_probability = float(explanation.probabilities[LABELS.index(foil)])
    assert contrast.value == pytest.approx(foil_probability, abs=1e-6)
    top = next(f for f in result.facts if f.kind == "region" and f.sign == "positive")
    assert (contrast.region, contrast.share) == (top.region, top.share)
    stated = re.search(r"rather than '[^']+' \((\d\.\d\d)\) mainly because of the ([a-z ]+) region, which holds (\d+)%", result.text)
    assert stated is not None, result.text
    assert (float(stated.group(1)), stated.group(2), int(stated.group(3))) == (
        round(foil_probability, 2),
        top.region,
        round(100 * top.share),
    )
    assert result.provenance is not None and result.provenance.foil_label == foil
    (right,) = client.verbalize("shapes", [sample.image], method="grad_cam", labels=[predicted])
    assert f"The prediction is correct: the true class is '{predicted}'." in right.text
    assert [f.value for f in right.facts if f.kind == "correctness"] == [1.0]
