"""Peer tier: every CAM method against pytorch-grad-cam 1.5.7 on one small torch CNN.

The same nn.Module is exported with `export_model` (ONNX + torch program, what the service runs)
and handed to pytorch-grad-cam. Per method and image, the Pearson correlation of the two maps must
be >= 0.99; the measured values are printed (run with -s) as a table at the end.

Choices where the service differs from pytorch-grad-cam by design, and what is compared:
- Eigen-CAM: the service's default is the paper's uncentred SVD; `center=True` is pytorch-grad-cam's.
  Both Eigen methods fix the SVD's sign, pytorch-grad-cam does not: the images below are ones where
  numpy's sign agrees (checked, not assumed: `_peer_sign_agrees`).
- Ablation-CAM divides by |y| (pytorch-grad-cam by y): the same where y > 0, which is checked.
- Score-CAM upsamples its masks with align_corners=False, pytorch-grad-cam with True (r ~ 0.9996;
  1.000000 when the service's masks are switched to True). Grad-CAM++: pytorch-grad-cam adds 1e-6
  to alpha's denominator, the service does not (r ~ 0.99999).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("pytorch_grad_cam")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from pytorch_grad_cam import (  # noqa: E402
    AblationCAM,
    EigenCAM,
    EigenGradCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection  # noqa: E402
from torch import nn  # noqa: E402

from saliency_service import export_model  # noqa: E402
from saliency_service.core.methods import METHODS, MethodInput  # noqa: E402
from saliency_service.core.models.model import LoadedModel, RuntimeOptions  # noqa: E402
from saliency_service.core.params import resolve_params  # noqa: E402

torch.set_num_threads(1)

SIZE = (32, 40)
LAYERS = ("block2", "block3")
MIN_CORRELATION = 0.99

# service id -> (pytorch-grad-cam class, the service's params that select the peer's variant)
PEERS: dict[str, tuple[type, dict[str, object]]] = {
    "grad_cam": (GradCAM, {}),
    "grad_cam_plus_plus": (GradCAMPlusPlus, {}),
    "hires_cam": (HiResCAM, {}),
    "xgrad_cam": (XGradCAM, {}),
    "layer_cam": (LayerCAM, {}),
    "eigen_cam": (EigenCAM, {"center": True}),
    "eigen_grad_cam": (EigenGradCAM, {"center": True}),
    "score_cam": (ScoreCAM, {}),
    "ablation_cam": (AblationCAM, {}),
}

CORRELATIONS: dict[tuple[str, str], list[float]] = {}
SIGN_SKIPPED: dict[tuple[str, str], int] = {}


class PeerCnn(nn.Module):
    """Three conv-BN-ReLU blocks (ReLU: exact zeros, so pytorch-grad-cam ablates to 0 as the paper does) and a dense head."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()

        def block(inputs: int, outputs: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1), nn.BatchNorm2d(outputs), nn.ReLU())

        self.block1 = block(3, 8, 1)
        self.block2 = block(8, 12, 2)
        self.block3 = block(12, 16, 2)
        self.head = nn.Linear(16 * 8 * 10, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block3(self.block2(self.block1(x))).flatten(1))


@pytest.fixture(scope="module")
def peer_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[PeerCnn, LoadedModel]:
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    module = PeerCnn()
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu", generator=generator)
                layer.bias.normal_(0.0, 0.1, generator=generator)
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.normal_(0.0, 0.2, generator=generator)
                layer.running_var.uniform_(0.5, 1.5, generator=generator)
                layer.weight.normal_(1.0, 0.2, generator=generator)
                layer.bias.normal_(0.1, 0.2, generator=generator)
    module.eval()
    repository = tmp_path_factory.mktemp("peer-models")
    folder = export_model(
        module,
        torch.zeros((1, 3, *SIZE)),
        repository,
        "peer-cnn",
        labels=[f"c{i}" for i in range(5)],
        layers=list(LAYERS),
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
    )
    return module, LoadedModel.load(folder, RuntimeOptions(max_batch=64, threads=1, prefer_cuda=False))


def _images(count: int, seed: int) -> np.ndarray:
    """Smooth random images: noise blurred by a 5x5 box, so maps have structure rather than pixel noise."""
    noise = torch.from_numpy(np.random.default_rng(seed).standard_normal((count, 3, SIZE[0] + 4, SIZE[1] + 4)))
    smooth = torch.nn.functional.avg_pool2d(noise, 5, stride=1) * 2.5
    return smooth.float().numpy()


def _peer_sign_agrees(module: nn.Module, layer: str, x: np.ndarray, target: int, with_gradient: bool) -> bool:
    """Whether numpy's SVD sign in pytorch-grad-cam's projection agrees with the service's rule.

    The rule: the map correlates positively with the channel sum.
    """
    captured: dict[str, torch.Tensor] = {}

    def keep(_: nn.Module, __: object, output: torch.Tensor) -> None:
        output.retain_grad()
        captured["a"] = output

    handle = module.get_submodule(layer).register_forward_hook(keep)
    try:
        module(torch.from_numpy(x[None]))[0, target].backward()
    finally:
        handle.remove()
    module.zero_grad(set_to_none=True)
    activation = captured["a"]
    assert activation.grad is not None
    matrix = activation.detach() * activation.grad if with_gradient else activation.detach()
    matrix_np = matrix.numpy()
    projection = get_2d_projection(matrix_np)[0]
    return float((projection * matrix_np[0].sum(axis=0)).sum()) >= 0


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


@pytest.fixture(scope="module", autouse=True)
def correlation_table() -> Iterator[None]:
    yield
    print(f"\nPearson correlation with pytorch-grad-cam 1.5.7 (per image; minimum required {MIN_CORRELATION})")
    print(f"{'method':<20} {'layer':<8} {'n':>2} {'min':>8} {'mean':>8}  notes")
    for (method, layer), values in sorted(CORRELATIONS.items()):
        skipped = SIGN_SKIPPED.get((method, layer), 0)
        note = f"{skipped} image(s) left out: pytorch-grad-cam's SVD sign is flipped there" if skipped else ""
        print(f"{method:<20} {layer:<8} {len(values):>2} {min(values):8.6f} {np.mean(values):8.6f}  {note}")


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("method", sorted(PEERS))
def test_matches_pytorch_grad_cam(method: str, layer: str, peer_case: tuple[PeerCnn, LoadedModel]) -> None:
    module, model = peer_case
    peer_class, params = PEERS[method]
    x = _images(8, seed=21)
    logits = module(torch.from_numpy(x)).detach().numpy()
    targets = logits.argmax(axis=1)
    if method == "ablation_cam":
        assert (logits[np.arange(len(x)), targets] > 0).all(), "y > 0: where dividing by y and by |y| agree"
    keep = np.arange(len(x))
    if method.startswith("eigen"):
        keep = np.array([i for i in keep if _peer_sign_agrees(module, layer, x[i], int(targets[i]), method == "eigen_grad_cam")])
        SIGN_SKIPPED[(method, layer)] = len(x) - len(keep)
        assert len(keep) >= 2, "too few images where pytorch-grad-cam's SVD sign agrees to compare"
    cls = METHODS.get(method)
    ours = cls().attribute(MethodInput(model, x[keep], targets[keep], resolve_params(cls.params, params, method), layer, seed=0))
    target_layer = module.get_submodule(layer)
    with peer_class(model=module, target_layers=[target_layer]) as cam:
        peer = cam(input_tensor=torch.from_numpy(x[keep]), targets=[ClassifierOutputTarget(int(t)) for t in targets[keep]])
    module.zero_grad(set_to_none=True)
    correlations = [_pearson(ours[i], peer[i]) for i in range(len(keep))]
    CORRELATIONS[(method, layer)] = correlations
    assert min(correlations) >= MIN_CORRELATION, f"{method} at {layer}: correlations {correlations}"
