"""LRP composites and Guided Backprop on exported programs, against plain re-implementations (METHODS.md §6).

The reference below builds every conv / pooling / dense layer of a small residual CNN as an explicit
matrix (by probing the layer with basis images), folds BatchNorm by hand, and applies each LRP rule as
written in the table of METHODS.md §6 with contribution matrices C[j, i] = x_i w_ij. The fast path runs
the torch.export program through the rule interpreter. The reference net has a BatchNorm after a ReLU
(nothing to fold into: relevance passes through it, as Zennit's BatchNorm -> Pass) besides two folded ones.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from saliency_service.core.errors import InvalidArgument
from saliency_service.core.methods import METHODS, MethodInput, rules
from saliency_service.core.methods.lrp import COMPOSITES, GUIDED_BACKPROP, composite_rules, input_relevance
from saliency_service.core.methods.rules import _transpose_for, _vjp, plan_for, positive_part, zbox_bounds
from saliency_service.core.methods.salient_relevance import context_aware_saliency
from saliency_service.core.models.export import export_model
from saliency_service.core.models.model import LoadedModel, RuntimeOptions
from saliency_service.core.params import resolve_params

torch.set_num_threads(1)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SIZE = (12, 16)
POOLED = (6, 8)


class RefNet(nn.Module):
    """conv-BN-ReLU, a residual block (conv-ReLU-BN-conv-BN, + skip, ReLU), 2x2 max pool, global average pool, dense head.

    bn1 and bn3 follow a conv (folded); bn2 follows a ReLU, so there is nothing to fold it into (Pass).
    """

    def __init__(self, bias: bool = True, bn: bool = True, residual: bool = True) -> None:
        super().__init__()
        self.residual = residual
        self.c1 = nn.Conv2d(3, 4, 3, padding=1, bias=bias)
        self.bn1: nn.Module = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.act1 = nn.ReLU()
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, bias=bias)
        self.act2 = nn.ReLU()
        self.bn2: nn.Module = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.c3 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn3: nn.Module = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.act3 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.bn1(self.c1(x)))
        branch = self.bn3(self.c3(self.bn2(self.act2(self.c2(h)))))
        # In place, as torchvision's `out += identity`: the rules must see through aten.add_.
        h = self.act3(branch.add_(h) if self.residual else branch)
        return self.fc(self.gap(self.pool(h)).flatten(1))


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.Conv2d | nn.Linear):
                layer.weight.copy_(0.6 * torch.randn(layer.weight.shape, generator=generator))
                if layer.bias is not None:
                    layer.bias.copy_(0.2 * torch.randn(layer.bias.shape, generator=generator))
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.copy_(0.3 * torch.randn(layer.num_features, generator=generator))
                layer.running_var.copy_(0.5 + torch.rand(layer.num_features, generator=generator))
                layer.weight.copy_(1 + 0.3 * torch.randn(layer.num_features, generator=generator))
                layer.bias.copy_(0.2 * torch.randn(layer.num_features, generator=generator))
    return module.eval()


def _export(module: nn.Module, repository: Path, name: str, size: tuple[int, int], layer: str, classes: int = 3) -> LoadedModel:
    folder = export_model(
        module.eval(),
        torch.zeros((1, 3, *size)),
        repository,
        name,
        labels=[f"c{i}" for i in range(classes)],
        layers=[layer],
        mean=MEAN,
        std=STD,
    )
    return LoadedModel.load(folder, RuntimeOptions(max_batch=64, threads=1, prefer_cuda=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lrp_models")


@pytest.fixture(scope="module")
def ref_net(repo: Path) -> tuple[RefNet, LoadedModel]:
    net = _randomise(RefNet(), 3)
    # Declaring the first conv puts a probe between it and its BatchNorm: folding must see through it.
    return net, _export(net, repo, "ref", SIZE, "c1")


@pytest.fixture(scope="module")
def bias_free_net(repo: Path) -> tuple[RefNet, LoadedModel]:
    net = _randomise(RefNet(bias=False, bn=False, residual=False), 4)
    return net, _export(net, repo, "bias-free", SIZE, "act3")


@pytest.fixture(scope="module")
def bias_free_residual_net(repo: Path) -> tuple[RefNet, LoadedModel]:
    net = _randomise(RefNet(bias=False, bn=False), 4)
    return net, _export(net, repo, "bias-free-residual", SIZE, "act3")


def _inputs(count: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((count, 3, *SIZE)).astype(np.float32))


def _objective(targets: list[int], foils: list[int] | None, classes: int = 3) -> torch.Tensor:
    weights = torch.zeros((len(targets), classes))
    weights[torch.arange(len(targets)), targets] = 1.0
    if foils is not None:
        weights[torch.arange(len(targets)), foils] = -1.0
    return weights


# ---- the plain reference ----


def _stab(z: np.ndarray, eps: float) -> np.ndarray:
    return z + eps * np.where(z >= 0, 1.0, -1.0)


def _matrix(fn: Callable[[torch.Tensor], torch.Tensor], in_shape: tuple[int, ...]) -> np.ndarray:
    """The (n_out x n_in) matrix of a linear map, from its responses to the basis images."""
    n = int(np.prod(in_shape))
    with torch.no_grad():
        out = fn(torch.eye(n, dtype=torch.float64).reshape(n, *in_shape))
    return out.reshape(n, -1).T.numpy()


def _conv_matrices(conv: nn.Conv2d, bn: nn.Module, in_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights, bias and all-ones matrix (for Flat) of conv [+ BN folded by hand: W s, (b - mu) s + beta]."""
    weight = conv.weight.detach().double()
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
    if isinstance(bn, nn.BatchNorm2d):
        scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
        weight = weight * scale[:, None, None, None]
        bias = (bias - bn.running_mean.double()) * scale + bn.bias.detach().double()
    hw = in_shape[1] * in_shape[2]
    matrix = _matrix(lambda t: nn.functional.conv2d(t, weight, None, conv.stride, conv.padding), in_shape)
    ones = _matrix(lambda t: nn.functional.conv2d(t, torch.ones_like(weight), None, conv.stride, conv.padding), in_shape)
    return matrix, np.repeat(bias.numpy(), hw), ones


def _rule(kind: str, x: np.ndarray, w: np.ndarray, b: np.ndarray, r: np.ndarray, ones: np.ndarray | None = None, **k: Any) -> np.ndarray:
    """Relevance at the input of z = w x + b for upper relevance r (METHODS.md §6 table), with C[j, i] = x_i w_ij."""
    eps = k.get("eps", 1e-6)
    wp, wn, xp, xn, bp, bn_ = np.maximum(w, 0), np.minimum(w, 0), np.maximum(x, 0), np.minimum(x, 0), np.maximum(b, 0), np.minimum(b, 0)
    if kind == "epsilon":
        c = w * x[None]
        return (c * (r / _stab(c.sum(1) + b, eps))[:, None]).sum(0)
    if kind == "zplus":
        c = wp * xp[None] + wn * xn[None]
        return (c * (r / _stab(c.sum(1) + bp, eps))[:, None]).sum(0)
    if kind == "alpha_beta":
        cp, cn = wp * xp[None] + wn * xn[None], wn * xp[None] + wp * xn[None]
        return 2 * (cp * (r / _stab(cp.sum(1) + bp, eps))[:, None]).sum(0) - (cn * (r / _stab(cn.sum(1) + bn_, eps))[:, None]).sum(0)
    if kind == "gamma":
        g = k.get("gamma", 0.25)
        z = w @ x + b
        up, down = w + g * wp, w + g * wn
        cu, cd = up * xp[None] + down * xn[None], down * xp[None] + up * xn[None]
        ru = np.where(z > 0, r, 0) / _stab(cu.sum(1) + b + g * bp, eps)
        rd = np.where(z < 0, r, 0) / _stab(cd.sum(1) + b + g * bn_, eps)
        return (cu * ru[:, None]).sum(0) + (cd * rd[:, None]).sum(0)
    if kind == "zbox":
        low, high = k["low"], k["high"]
        c = w * x[None] - wp * low[None] - wn * high[None]
        return (c * (r / _stab(c.sum(1), eps))[:, None]).sum(0)
    assert kind == "flat" and ones is not None
    return (ones * (r / _stab(ones.sum(1), eps))[:, None]).sum(0)


_COMPOSITE_RULES = {
    "notebook": ("epsilon", "epsilon"),
    "epsilon_plus": ("zplus", "zplus"),
    "epsilon_plus_flat": ("flat", "zplus"),
    "epsilon_gamma_box": ("zbox", "gamma"),
    "epsilon_alpha2_beta1": ("alpha_beta", "alpha_beta"),
}


def reference_lrp(net: RefNet, x: np.ndarray, seed: np.ndarray, composite: str | None) -> np.ndarray:
    """Per-item LRP through RefNet by explicit matrices; composite None runs Guided Backprop (seed is the gradient)."""
    first, conv = _COMPOSITE_RULES[composite] if composite else ("", "")
    # The SR notebooks: LRP-0 (stabiliser 1e-9) on convs, z+ with no bias on dense layers.
    eps = 1e-9 if composite == "notebook" else 1e-6
    m1, b1, ones1 = _conv_matrices(net.c1, net.bn1, (3, *SIZE))
    m2, b2, _ = _conv_matrices(net.c2, nn.Identity(), (4, *SIZE))
    m3, b3, _ = _conv_matrices(net.c3, net.bn3, (4, *SIZE))
    fc_w = net.fc.weight.detach().double().numpy()
    fc_b = net.fc.bias.detach().double().numpy() if net.fc.bias is not None else np.zeros(3)
    a0 = x.astype(np.float64).ravel()
    z1 = m1 @ a0 + b1
    a1 = np.maximum(z1, 0)
    z2 = m2 @ a1 + b2
    a2 = np.maximum(z2, 0)
    if isinstance(net.bn2, nn.BatchNorm2d):
        bn2 = net.bn2
        scale = (bn2.weight / torch.sqrt(bn2.running_var + bn2.eps)).detach().double().numpy()
        shift = bn2.bias.detach().double().numpy() - bn2.running_mean.double().numpy() * scale
        bn2_scale, bn2_shift = np.repeat(scale, SIZE[0] * SIZE[1]), np.repeat(shift, SIZE[0] * SIZE[1])
    else:
        bn2_scale, bn2_shift = np.ones_like(a2), np.zeros_like(a2)
    a2 = bn2_scale * a2 + bn2_shift  # relevance passes through this BatchNorm unchanged
    z3 = m3 @ a2 + b3
    s = a1 + z3
    a3 = np.maximum(s, 0).reshape(4, *SIZE)
    # 2x2 max pool: the winner of each window, by explicit loops.
    winners = np.zeros((4, *POOLED), dtype=np.int64)
    a4 = np.zeros((4, *POOLED))
    for ch in range(4):
        for i in range(POOLED[0]):
            for j in range(POOLED[1]):
                window = a3[ch, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2]
                di, dj = np.unravel_index(int(np.argmax(window)), (2, 2))
                winners[ch, i, j] = np.ravel_multi_index((ch, 2 * i + di, 2 * j + dj), a3.shape)
                a4[ch, i, j] = window[di, dj]
    cells = POOLED[0] * POOLED[1]
    gap = np.kron(np.eye(4), np.full((1, cells), 1 / cells))
    a5 = gap @ a4.ravel()
    y = fc_w @ a5 + fc_b

    if composite is None:

        def relu_back(g: np.ndarray, pre: np.ndarray) -> np.ndarray:
            return np.maximum(g, 0) * (pre > 0)

        g5 = fc_w.T @ seed
        g4 = gap.T @ g5
        g3 = np.zeros(a3.size)
        np.add.at(g3, winners.ravel(), g4)
        gs = relu_back(g3, s)
        g2 = relu_back(bn2_scale * (m3.T @ gs), z2)
        g1 = relu_back(gs + m2.T @ g2, z1)
        return m1.T @ g1

    low, high = (np.repeat(np.asarray(v), SIZE[0] * SIZE[1]) for v in zbox_bounds(MEAN, STD))
    r6 = seed * y
    if composite == "notebook":
        r5 = _rule("zplus", a5, fc_w, np.zeros(3), r6, eps=eps)
    else:
        r5 = _rule("epsilon", a5, fc_w, fc_b, r6)
    r4 = _rule("epsilon", a4.ravel(), gap, np.zeros(4), r5, eps=eps)  # Norm: epsilon rule without bias on the pooling matrix
    r3 = np.zeros(a3.size)
    np.add.at(r3, winners.ravel(), r4)
    share = r3 / _stab(s, eps)  # ReLU passes; the sum splits by signed share
    r_skip, r_branch = a1 * share, z3 * share
    r2 = _rule(conv, a2, m3, b3, r_branch, eps=eps)
    r1 = r_skip + _rule(conv, a1, m2, b2, r2, eps=eps)
    return _rule(first, a0, m1, b1, r1, ones1, low=low, high=high, eps=eps)


# ---- tests ----


@pytest.mark.parametrize("composite", COMPOSITES)
def test_lrp_matches_plain_reference(composite: str, ref_net: tuple[RefNet, LoadedModel]) -> None:
    net, model = ref_net
    x = _inputs(3, 0)
    weights = _objective([0, 1, 2], None)
    weights[1, 2] = -1.0  # item 1 is contrastive: class 1 vs class 2
    fast = input_relevance(model, x, weights, composite_rules(composite, model), times_logits=True).numpy()
    for item in range(3):
        ref = reference_lrp(net, x[item].numpy(), weights[item].double().numpy(), composite)
        scale = np.abs(ref).max()
        np.testing.assert_allclose(fast[item].ravel(), ref, rtol=1e-3, atol=1e-4 * scale, err_msg=f"{composite} item {item}")


@pytest.mark.parametrize("composite", ["epsilon_plus", "epsilon_plus_flat", "epsilon_gamma_box"])
def test_conservation_on_bias_free_relu_net(composite: str, bias_free_net: tuple[RefNet, LoadedModel]) -> None:
    """Sum of input relevance == the objective's value (target logit, or target minus foil).

    alpha2beta1 is left out: a unit whose contributions all have one sign sends alpha R (or -beta R) down,
    not R, so that rule does not conserve on a general net (Zennit's does not either); the reference test covers it.
    The net has no residual join: there a branch unit may carry relevance while all its contributions are
    negative, which z+ cannot pass on (see the residual test below).
    """
    net, model = bias_free_net
    x = _inputs(4, 1)
    weights = _objective([0, 1, 2, 0], None)
    weights[3, 1] = -1.0
    with torch.no_grad():
        objective = (net(x) * weights).sum(1)
    relevance = input_relevance(model, x, weights, composite_rules(composite, model), times_logits=True)
    np.testing.assert_allclose(relevance.sum((1, 2, 3)).numpy(), objective.numpy(), rtol=1e-4, atol=1e-6)


def test_residual_split_conserves(bias_free_residual_net: tuple[RefNet, LoadedModel]) -> None:
    """The join h + branch splits relevance by signed share; with gamma convs (which pass on negative units) and a z-box
    first layer, the whole residual net conserves the objective."""
    net, model = bias_free_residual_net
    x = _inputs(4, 1)
    weights = _objective([0, 1, 2, 1], None)
    with torch.no_grad():
        objective = (net(x) * weights).sum(1)
    relevance = input_relevance(model, x, weights, composite_rules("epsilon_gamma_box", model), times_logits=True)
    np.testing.assert_allclose(relevance.sum((1, 2, 3)).numpy(), objective.numpy(), rtol=1e-4, atol=1e-6)
    # And the split itself against the reference (which computes a1 R / s(a1 + z3) and z3 R / s(a1 + z3) explicitly).
    ref = reference_lrp(net, x[0].numpy(), weights[0].double().numpy(), "epsilon_gamma_box")
    np.testing.assert_allclose(relevance[0].ravel().numpy(), ref, rtol=1e-3, atol=1e-5 * np.abs(ref).max())


def test_epsilon_absorbs_exactly_what_the_rule_says(bias_free_net: tuple[RefNet, LoadedModel]) -> None:
    """Only the dense head is epsilon in epsilon_plus: the sum becomes y^2 / (y + eps sign y), the rest is conserved."""
    net, model = bias_free_net
    x = _inputs(3, 2)
    weights = _objective([0, 1, 2], None)
    with torch.no_grad():
        y = (net(x) * weights).sum(1).double().numpy()
    relevance = input_relevance(model, x, weights, composite_rules("epsilon_plus", model, epsilon=0.5), times_logits=True)
    np.testing.assert_allclose(relevance.sum((1, 2, 3)).numpy(), y * y / (y + 0.5 * np.sign(y)), rtol=1e-4)


def test_single_linear_layer_is_weight_times_input(linear_net) -> None:  # type: ignore[no-untyped-def]
    model = linear_net.model
    head = linear_net.module.head
    spec = model.config.input
    x = np.random.default_rng(3).standard_normal((2, 3, spec.height, spec.width)).astype(np.float32)
    targets = np.array([1, 2])
    # The identity 1x1 conv in front is the first layer: Flat keeps each pixel's relevance (z+ would drop negative inputs).
    for composite, epsilon in (("epsilon_plus_flat", 1e-6), ("epsilon_plus_flat", 0.7)):
        request = MethodInput(
            model=model,
            x=x,
            targets=targets,
            params=resolve_params(METHODS.get("lrp").params, {"composite": composite, "epsilon": epsilon}, "lrp"),
            layer=None,
            seed=0,
        )
        maps = METHODS.get("lrp")().attribute(request)
        w = head.weight.detach().numpy()[targets].reshape(2, 3, spec.height, spec.width)
        y = (head(torch.from_numpy(x).flatten(1)).detach().numpy())[[0, 1], targets]
        expected = (x * w).sum(1) * (y / (y + epsilon * np.sign(y)))[:, None, None]
        np.testing.assert_allclose(maps, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max(), err_msg=f"{composite} eps={epsilon}")


@pytest.fixture(scope="module")
def two_layer(repo: Path) -> LoadedModel:
    """On a 1x1 image: a 1x1 conv (3 -> 2, no bias), ReLU, flatten, dense (2 -> 2, no bias), with hand-picked weights."""
    net = nn.Sequential(nn.Conv2d(3, 2, 1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -1.0, -0.5], [-2.0, 1.0, 1.0]])[:, :, None, None])
        net[3].weight.copy_(torch.tensor([[2.0, 1.0], [0.5, -1.0]]))
    return _export(net, repo, "two-layer", (1, 1), "1", classes=2)


def test_zplus_and_alpha_beta_by_hand(two_layer: LoadedModel) -> None:
    """x = (1, -1, 2): contributions to hidden unit 1 are (1, 1, -1), h = (1, 0), y0 = 2.

    Dense epsilon gives R_h = (2, 0). z+: positive parts (1, 1, 0) / 2 * 2 = (1, 1, 0).
    alpha2beta1: 2 (1, 1, 0) / 2 * 2 - (0, 0, -1) / (-1) * 2 = (2, 2, -2).
    """
    x = torch.tensor([1.0, -1.0, 2.0]).view(1, 3, 1, 1)
    weights = _objective([0], None, classes=2)
    zplus = input_relevance(two_layer, x, weights, composite_rules("epsilon_plus", two_layer), times_logits=True)
    alpha_beta = input_relevance(two_layer, x, weights, composite_rules("epsilon_alpha2_beta1", two_layer), times_logits=True)
    np.testing.assert_allclose(zplus.ravel().numpy(), [1.0, 1.0, 0.0], atol=1e-5)
    np.testing.assert_allclose(alpha_beta.ravel().numpy(), [2.0, 2.0, -2.0], atol=1e-5)


def test_batchnorm_merge_equals_hand_folded_net(ref_net: tuple[RefNet, LoadedModel], repo: Path) -> None:
    net, model = ref_net
    folded = copy.deepcopy(net)
    with torch.no_grad():
        for conv, bn in ((folded.c1, net.bn1), (folded.c3, net.bn3)):
            assert isinstance(bn, nn.BatchNorm2d)
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv.weight.mul_(scale[:, None, None, None])
            bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
            conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
    folded.bn1, folded.bn3 = nn.Identity(), nn.Identity()
    by_hand = _export(folded, repo, "folded", SIZE, "act3")
    x = _inputs(2, 5)
    weights = _objective([2, 0], None)
    for composite in COMPOSITES:
        merged = input_relevance(model, x, weights, composite_rules(composite, model), times_logits=True)
        expected = input_relevance(by_hand, x, weights, composite_rules(composite, by_hand), times_logits=True)
        np.testing.assert_allclose(merged.numpy(), expected.numpy(), rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_guided_backprop_matches_hand_reference(ref_net: tuple[RefNet, LoadedModel]) -> None:
    net, model = ref_net
    x = _inputs(2, 7)
    weights = _objective([1, 0], [2, 2])
    fast = input_relevance(model, x, weights, GUIDED_BACKPROP, times_logits=False).numpy()
    for item in range(2):
        ref = reference_lrp(net, x[item].numpy(), weights[item].double().numpy(), None)
        np.testing.assert_allclose(fast[item].ravel(), ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())


def test_guided_backprop_matches_captum(ref_net: tuple[RefNet, LoadedModel]) -> None:
    captum_attr = pytest.importorskip("captum.attr")
    net, model = ref_net
    x = _inputs(3, 8)
    targets = [0, 1, 2]
    ours = input_relevance(model, x, _objective(targets, None), GUIDED_BACKPROP, times_logits=False)
    theirs = captum_attr.GuidedBackprop(net).attribute(x.clone().requires_grad_(True), target=targets).detach()
    pearson = float(np.corrcoef(ours.ravel().numpy(), theirs.ravel().numpy())[0, 1])
    assert pearson >= 0.999
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-4, atol=1e-6 * float(theirs.abs().max()))


class TinyAttention(nn.Module):
    """Input centring, patch embedding, layer norm, softmax self-attention, GELU MLP: ops with no LRP rule of their own."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 2, stride=2)
        self.norm = nn.LayerNorm(8)
        self.qkv = nn.Linear(8, 24)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean((2, 3), keepdim=True)  # centring: a statistic, not pooling
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(self.norm(tokens)).chunk(3, dim=-1)
        tokens = tokens + torch.softmax(q @ k.transpose(1, 2) / 8**0.5, dim=-1) @ v
        tokens = tokens + self.mlp(self.norm(tokens))
        return self.head(tokens.mean(1))


def test_ops_without_rules_fall_back_to_the_gradient(repo: Path) -> None:
    torch.manual_seed(0)
    model = _export(TinyAttention(), repo, "attention", SIZE, "embed")
    x = _inputs(2, 9)
    for composite in COMPOSITES:
        relevance = input_relevance(model, x, _objective([0, 1], None), composite_rules(composite, model), True)
        assert torch.isfinite(relevance).all() and relevance.abs().sum() > 0
    plan = plan_for(model.program.module, composite_rules("epsilon_plus", model))
    ruled = {str(node.target) for node in (*plan.linear, *plan.passed, *plan.norm, *plan.split_add)}
    # Rules for the embedding conv, the dense layers on tokens, GELU (Pass, as Zennit), the token mean and the residual sums;
    # layer norm, softmax and the attention products keep their plain gradient.
    assert {"aten.conv2d.default", "aten.linear.default", "aten.gelu.default", "aten.mean.dim", "aten.add.Tensor"} <= ruled
    assert not any(name in op for op in ruled for name in ("layer_norm", "softmax", "matmul", "bmm"))
    assert not plan.folded
    means = [node for node in model.program.module.graph.nodes if str(node.target) == "aten.mean.dim"]
    assert [node in plan.norm for node in means] == [False, True], "the centring mean keeps its gradient, the token mean pools"


def test_unknown_composite_is_invalid_argument(ref_net: tuple[RefNet, LoadedModel]) -> None:
    with pytest.raises(InvalidArgument):
        composite_rules("epsilon_minus", ref_net[1])
    with pytest.raises(InvalidArgument):
        resolve_params(METHODS.get("lrp").params, {"composite": "nope"}, "lrp")


# ---- Salient Relevance (METHODS.md §4) ----


def _slow_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (D65) -> CIE L*a*b*, pixel by pixel."""
    out = np.zeros_like(rgb)
    matrix = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]])
    white = np.array([0.95047, 1.0, 1.08883])
    for i in range(rgb.shape[1]):
        for j in range(rgb.shape[2]):
            c = rgb[:, i, j]
            linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
            t = matrix @ linear / white
            f = np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
            out[:, i, j] = (116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2]))
    return out


def _torch_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[-2:] == (height, width):
        return image
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    return nn.functional.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False)[0].double().numpy()


def _slow_patches(image: np.ndarray, side: int) -> tuple[list[np.ndarray], list[np.ndarray], tuple[int, int]]:
    stride = max(1, side // 2)
    height, width = image.shape[1:]
    rows, cols = (height - side) // stride + 1, (width - side) // stride + 1
    patches, centres = [], []
    for i in range(rows):
        for j in range(cols):
            patches.append(image[:, i * stride : i * stride + side, j * stride : j * stride + side].ravel())
            centres.append(np.array([i * stride + (side - 1) / 2, j * stride + (side - 1) / 2]) / max(height, width))
    return patches, centres, (rows, cols)


def slow_context_aware(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """Goferman et al.'s CA saliency as listed in METHODS.md §4, with loops over patch pairs and a brute-force distance map."""
    height, width = rgb.shape[1:]
    factor = min(1.0, max_side / max(height, width))
    h, w = round(height * factor), round(width * factor)
    lab = _slow_lab(np.clip(_torch_resize(rgb, h, w), 0, 1))
    for ch in range(3):
        span = lab[ch].max() - lab[ch].min()
        lab[ch] = (lab[ch] - lab[ch].min()) / span if span > 0 else 0.0

    def scaled(scale: float, side: int) -> np.ndarray:
        return _torch_resize(lab, max(side, round(h * scale)), max(side, round(w * scale)))

    maps = []
    for scale, side in ((1.0, 7), (0.8, 5), (0.5, 3), (0.3, 3)):
        query, query_pos, grid = _slow_patches(scaled(scale, side), side)
        pool, pool_pos = list(query), list(query_pos)
        for sub in (scale / 2, scale / 4):
            if sub >= 0.2 - 1e-9:
                more, more_pos, _ = _slow_patches(scaled(sub, side), side)
                pool += more
                pool_pos += more_pos
        if len(pool) < 2:
            continue  # too small at this scale: no patch to compare with
        values = np.zeros(len(query))
        for i, (patch, centre) in enumerate(zip(query, query_pos, strict=True)):
            d = [
                np.linalg.norm(patch - other) / (1 + 3 * np.linalg.norm(centre - other_pos))
                for k, (other, other_pos) in enumerate(zip(pool, pool_pos, strict=True))
                if k != i
            ]
            values[i] = np.mean(sorted(d)[: min(64, len(d))])
        grid_map = (1 - np.exp(-(49 / side**2) * values)).reshape(grid)
        maps.append(_torch_resize(grid_map[None], h, w)[0])
    if not maps:
        return np.zeros((height, width))
    mean = np.mean(maps, axis=0)
    if mean.max() <= 0:
        return np.zeros((height, width))
    attended = np.argwhere(mean > 0.8 * mean.max())
    distance = np.array([[np.sqrt(((attended - (i, j)) ** 2).sum(1)).min() for j in range(w)] for i in range(h)])
    distance = distance / distance.max() if distance.max() > 0 else distance
    return _torch_resize((mean * (1 - distance))[None], height, width)[0]


def test_context_aware_saliency_matches_slow_reference() -> None:
    rng = np.random.default_rng(12)
    rgb = np.zeros((3, 30, 40))
    rgb[:, 6:16, 8:20] = rng.random((3, 1, 1))  # a distinctive block on a noisy background
    rgb += 0.2 * rng.random(rgb.shape)
    rgb = np.clip(rgb, 0, 1)
    for side in (40, 24):
        fast = context_aware_saliency(torch.from_numpy(rgb).float(), side).numpy()
        slow = slow_context_aware(rgb, side)
        np.testing.assert_allclose(fast, slow, atol=2e-5, err_msg=f"max_side={side}")
    # The distinctive block is the most salient part.
    fast = context_aware_saliency(torch.from_numpy(rgb).float(), 40).numpy()
    assert fast[6:16, 8:20].mean() > 2 * fast[20:, 28:].mean()


def test_salient_relevance_is_ca_saliency_of_notebook_lrp(ref_net: tuple[RefNet, LoadedModel]) -> None:
    net, model = ref_net
    x = _inputs(2, 13)
    targets = np.array([0, 2])
    method = METHODS.get("salient_relevance")
    request = MethodInput(
        model=model, x=x.numpy(), targets=targets, params=resolve_params(method.params, {}, method.name), layer=None, seed=0
    )
    maps = method().attribute(request)
    for item in range(2):
        relevance = reference_lrp(net, x[item].numpy(), np.eye(3)[targets[item]], "notebook").reshape(3, *SIZE)
        image = np.abs(relevance)
        image = (image - image.min()) / (image.max() - image.min())
        expected = slow_context_aware(image, 250)
        assert expected.max() > 0
        np.testing.assert_allclose(maps[item], expected, atol=1e-4)


@pytest.mark.parametrize(
    ("target", "args"),
    [
        ("conv2d", dict(stride=[2, 2], padding=[1, 1], dilation=[1, 1], groups=1)),
        ("conv2d", dict(stride=[1, 1], padding=[2, 2], dilation=[2, 2], groups=2)),
        ("conv2d_short", {}),
        ("convolution", dict(stride=[2, 1], padding=[0, 1], dilation=[1, 1], groups=1)),
        ("linear", {}),
    ],
)
def test_the_transposed_op_equals_autograd_through_a_forward(target: str, args: dict[str, Any]) -> None:
    """The rules' input-gradient shortcut (no forward pass) gives what the generic autograd path gives."""
    aten = torch.ops.aten
    generator = torch.Generator().manual_seed(3)
    if target == "linear":
        x, weight = torch.randn(5, 7, generator=generator), torch.randn(4, 7, generator=generator)
        op, template = aten.linear.default, [x, weight, None]
    else:
        groups = int(args.get("groups", 1))
        x, weight = torch.randn(2, 4, 9, 8, generator=generator), torch.randn(6, 4 // groups, 3, 3, generator=generator)
        if target == "conv2d_short":  # defaults left out of the exported call
            op, template = aten.conv2d.default, [x, weight, None]
        elif target == "conv2d":
            op, template = aten.conv2d.default, [x, weight, None, args["stride"], args["padding"], args["dilation"], groups]
        else:
            op = aten.convolution.default
            template = [x, weight, None, args["stride"], args["padding"], args["dilation"], False, [0, 0], groups]

    def call(inp: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        full = list(template)
        full[0], full[1] = inp, w
        out: torch.Tensor = op(*full)
        return out

    transpose = _transpose_for(op, template, {}, 0, 1)
    assert transpose is not None
    vector = torch.randn(call(x, weight, None).shape, generator=generator)
    torch.testing.assert_close(transpose(x, weight, vector), _vjp(call, x, weight, vector), rtol=1e-5, atol=1e-5)


def test_the_positive_part_of_a_weight_is_kept_while_it_lives_and_redone_when_it_changes() -> None:
    weight = torch.tensor([[-1.0, 2.0], [3.0, -4.0]])
    first = positive_part(weight)
    assert torch.equal(first, weight.clamp(min=0))
    assert positive_part(weight) is first, "the same, unchanged weight: the kept part"
    weight.mul_(-1)  # changed in place: its version moves on
    assert torch.equal(positive_part(weight), weight.clamp(min=0))
    other = weight.clone()
    assert positive_part(other) is not positive_part(weight)
    key = id(other)
    del other
    assert key not in rules._POSITIVE_PARTS, "the entry goes with its weight"
