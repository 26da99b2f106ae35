"""The peer libraries' versions of our methods, on the same nn.Module, inputs and targets.

Each peer is imported only when installed (Captum is in the dev extra; pytorch-grad-cam and Zennit need
torchvision and live in `.venv-peers`, see the Makefile's `peers`). A peer is a zero-argument callable
that returns the attribution, so the benchmark times it exactly as it times our methods.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import torch
from benchmarks import resnet
from torch import nn


@dataclass(frozen=True)
class Peer:
    method: str
    """Our method id that this peer is compared with."""
    name: str
    """Library and class, with the parameters that make it comparable."""
    run: Callable[[], torch.Tensor]


def versions() -> dict[str, str]:
    """Installed peer libraries and their versions."""
    found = {}
    for distribution in ("captum", "grad-cam", "zennit"):
        try:
            found[distribution] = version(distribution)
        except PackageNotFoundError:
            continue
    return found


def peers(
    net: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    params: Mapping[str, Mapping[str, object]],
    internal_batch: int,
) -> list[Peer]:
    """Every installed peer for `net` (one of `benchmarks.resnet`'s), with our methods' `params` mirrored."""
    found: list[Peer] = []
    found.extend(_captum(net, x, targets, params, internal_batch))
    found.extend(_grad_cam(net, x, targets))
    found.extend(_zennit(net, x, targets))
    return found


def _captum(
    net: nn.Module, x: torch.Tensor, targets: torch.Tensor, params: Mapping[str, Mapping[str, object]], internal_batch: int
) -> list[Peer]:
    try:
        from captum.attr import GuidedBackprop, InputXGradient, IntegratedGradients, LayerGradCam, Occlusion, Saliency
    except ImportError:
        return []
    steps = int(params["integrated_gradients"].get("steps", 50))  # type: ignore[call-overload]
    window = int(params["occlusion"].get("window", 15))  # type: ignore[call-overload]
    stride = int(params["occlusion"].get("stride", 8))  # type: ignore[call-overload]
    return [
        Peer("saliency", "Captum Saliency (abs)", lambda: Saliency(net).attribute(x, target=targets, abs=True)),
        Peer("input_x_gradient", "Captum InputXGradient", lambda: InputXGradient(net).attribute(x, target=targets)),
        Peer(
            "integrated_gradients",
            f"Captum IntegratedGradients ({steps} steps, gausslegendre)",
            lambda: IntegratedGradients(net).attribute(
                x, target=targets, n_steps=steps, method="gausslegendre", internal_batch_size=internal_batch
            ),
        ),
        Peer("grad_cam", "Captum LayerGradCam (layer4)", lambda: LayerGradCam(net, net.layer4).attribute(x, target=targets)),
        Peer(
            "occlusion",
            f"Captum Occlusion ({window}px window, stride {stride})",
            lambda: Occlusion(net).attribute(
                x,
                target=targets,
                sliding_window_shapes=(3, window, window),
                strides=(3, stride, stride),
                baselines=0.0,
                perturbations_per_eval=internal_batch,
            ),
        ),
        Peer("guided_backprop", "Captum GuidedBackprop", lambda: GuidedBackprop(net).attribute(x, target=targets)),
    ]


def _grad_cam(net: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> list[Peer]:
    try:
        from pytorch_grad_cam import GradCAM, ScoreCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        return []
    outputs = [ClassifierOutputTarget(int(t)) for t in targets]

    def run(cam_class: type) -> torch.Tensor:
        # The context manager removes pytorch-grad-cam's hooks when done.
        with cam_class(model=net, target_layers=[net.layer4]) as cam:
            return torch.from_numpy(cam(input_tensor=x, targets=outputs))

    return [
        Peer("grad_cam", "pytorch-grad-cam GradCAM (layer4)", lambda: run(GradCAM)),
        Peer("score_cam", "pytorch-grad-cam ScoreCAM (layer4, its batch of 16)", lambda: run(ScoreCAM)),
    ]


def _zennit(net: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> list[Peer]:
    try:
        from zennit.attribution import Gradient
        from zennit.canonizers import CompositeCanonizer, SequentialMergeBatchNorm
        from zennit.composites import EpsilonPlusFlat
        from zennit.layer import Sum
        from zennit.torchvision import ResNetBasicBlockCanonizer, ResNetBottleneckCanonizer
    except ImportError:
        return []

    # Zennit's ResNet canonizers match torchvision's block classes; ours have the same attributes, so only
    # the class check changes: the rewritten forward and the Sum module are Zennit's own.
    class Bottleneck(ResNetBottleneckCanonizer):  # type: ignore[misc]
        @classmethod
        def _attribute_map(cls, name: str, module: nn.Module) -> dict[str, object] | None:
            if isinstance(module, resnet.Bottleneck):
                return {"forward": cls.forward.__get__(module), "canonizer_sum": Sum()}
            return None

    class BasicBlock(ResNetBasicBlockCanonizer):  # type: ignore[misc]
        @classmethod
        def _attribute_map(cls, name: str, module: nn.Module) -> dict[str, object] | None:
            if isinstance(module, resnet.BasicBlock):
                return {"forward": cls.forward.__get__(module), "canonizer_sum": Sum()}
            return None

    onehot = torch.eye(resnet.CLASSES, device=x.device)[targets]

    def run() -> torch.Tensor:
        composite = EpsilonPlusFlat(canonizers=[CompositeCanonizer([SequentialMergeBatchNorm(), Bottleneck(), BasicBlock()])])
        with Gradient(model=net, composite=composite) as attributor:
            _, relevance = attributor(x.clone(), lambda output: output * onehot)
        return relevance

    return [Peer("lrp", "Zennit EpsilonPlusFlat + ResNet canonizer, Gradient", run)]


@dataclass(frozen=True)
class MetricPeer:
    metric: str
    """Our metric id that this peer is compared with."""
    name: str
    run: Callable[[], object]


def metric_peers(
    net: nn.Module | None,
    x: torch.Tensor,
    targets: torch.Tensor,
    maps: torch.Tensor,
    masks: torch.Tensor,
    batch_limit: int,
    device: str = "cpu",
) -> list[MetricPeer]:
    """Quantus 0.6.0's versions of our Score metrics, on the same inputs, maps and masks (empty without quantus).

    Map-only metrics (pointing game, relevance mass and rank, sparseness, complexity) need no model. The model
    metrics get the same nn.Module as the method peers and the same amount of work as ours: faithfulness
    correlation with 100 runs of 224 pixels, and pixel flipping with one pixel row per step (our deletion with
    `step` = the image width), each with Quantus' own "black" baseline; the comparison is of time, not of values
    (tests/peers compares values). Without a module (the `shapes` model) only the map-only metrics run. `device`:
    where Quantus runs the module (it takes numpy batches and moves them there itself).
    """
    try:
        import quantus
    except ImportError:
        return []
    x_np, y_np = x.numpy(), targets.numpy()
    a_np, s_np = maps[:, None].numpy(), masks[:, None].float().numpy()
    quiet = {"disable_warnings": True, "display_progressbar": False}

    def call(metric: object, model: nn.Module | None = None) -> Callable[[], object]:
        def run() -> object:
            return metric(model=model, x_batch=x_np, y_batch=y_np, a_batch=a_np, s_batch=s_np, device=device, batch_size=batch_limit)  # type: ignore[operator]

        return run

    found = [
        MetricPeer("pointing_game", "Quantus PointingGame", call(quantus.PointingGame(**quiet))),
        MetricPeer("relevance_mass", "Quantus RelevanceMassAccuracy", call(quantus.RelevanceMassAccuracy(**quiet))),
        MetricPeer("relevance_rank", "Quantus RelevanceRankAccuracy", call(quantus.RelevanceRankAccuracy(**quiet))),
        MetricPeer("sparseness", "Quantus Sparseness", call(quantus.Sparseness(**quiet))),
        MetricPeer("complexity", "Quantus Complexity", call(quantus.Complexity(**quiet))),
    ]
    if net is not None:
        width = x.shape[-1]
        faithfulness = quantus.FaithfulnessCorrelation(
            nr_runs=100, subset_size=224, perturb_baseline="black", normalise=False, abs=False, return_aggregate=False, **quiet
        )
        flipping = quantus.PixelFlipping(features_in_step=width, perturb_baseline="black", normalise=False, abs=False, **quiet)
        found += [
            MetricPeer("faithfulness_correlation", "Quantus FaithfulnessCorrelation (100 runs of 224 px)", call(faithfulness, net)),
            MetricPeer("deletion", f"Quantus PixelFlipping ({width} px per step)", call(flipping, net)),
        ]
    return found
