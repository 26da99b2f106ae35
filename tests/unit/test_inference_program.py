"""The inference copy of a torch program: BatchNorms folded into convolutions, channels-last weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from saliency_service.config import EMBEDDED_REPOSITORY
from saliency_service.core.models.model import LoadedModel
from saliency_service.core.models.torch_runner import inference_program

BATCH_NORM = torch.ops.aten.batch_norm.default


class Small(nn.Module):
    """conv (no bias) + BN, conv (bias) + BN, a conv with no BN, a BN that follows no conv, and a conv whose
    output is used twice (its BN cannot be folded). No ReLU, so the function is smooth and values compare tightly."""

    def __init__(self) -> None:
        super().__init__()
        self.input_norm = nn.BatchNorm2d(3)
        self.a = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.a_norm = nn.BatchNorm2d(4)
        self.b = nn.Conv2d(4, 5, 3, padding=1, bias=True)
        self.b_norm = nn.BatchNorm2d(5)
        self.c = nn.Conv2d(5, 5, 1)
        self.d = nn.Conv2d(5, 5, 1)
        self.d_norm = nn.BatchNorm2d(5)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for norm in (self.input_norm, self.a_norm, self.b_norm, self.d_norm):
                size = norm.num_features
                norm.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                norm.bias.copy_(torch.randn(size, generator=generator))
                norm.running_mean.copy_(torch.randn(size, generator=generator))
                norm.running_var.copy_(torch.rand(size, generator=generator) + 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b_norm(self.b(self.a_norm(self.a(self.input_norm(x)))))
        y = self.c(y)
        z = self.d(y)
        return (self.d_norm(z) + z).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def small() -> tuple[nn.Module, torch.fx.GraphModule]:
    module = Small().eval()
    program = torch.export.export(module, (torch.zeros(2, 3, 8, 8),)).module()
    return module, program


def _norms(module: torch.nn.Module) -> int:
    return sum(1 for node in module.graph.nodes if node.target is BATCH_NORM)  # type: ignore[union-attr]


def test_folds_exactly_the_batch_norms_that_follow_a_single_use_convolution(small: tuple[nn.Module, torch.fx.GraphModule]) -> None:
    module, program = small
    fast, channels_last = inference_program(program)
    assert channels_last
    assert _norms(program) == 4
    assert _norms(fast) == 2  # the input's BN (no conv before it) and d_norm (d's output is used twice)
    # The folded weight of `a` is W * gamma / sqrt(var + eps), per output channel.
    a = module.a_norm
    scale = a.weight.double() / torch.sqrt(a.running_var.double() + a.eps)
    expected = (module.a.weight.double() * scale.view(-1, 1, 1, 1)).float()
    weights = [t for name, t in fast.named_buffers() if name.startswith("_inference_") and name.endswith("_weight")]
    assert any(w.shape == expected.shape and torch.equal(w, expected) for w in weights)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    # b's folded bias is (b - mean) * s + beta.
    b = module.b_norm
    scale_b = b.weight.double() / torch.sqrt(b.running_var.double() + b.eps)
    bias_b = ((module.b.bias.double() - b.running_mean.double()) * scale_b + b.bias.double()).float()
    biases = [t for name, t in fast.named_buffers() if name.startswith("_inference_") and name.endswith("_bias")]
    assert any(t.shape == bias_b.shape and torch.equal(t, bias_b) for t in biases)


def test_the_folded_program_computes_the_same_values_and_gradients(small: tuple[nn.Module, torch.fx.GraphModule]) -> None:
    module, program = small
    fast, _ = inference_program(program)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    reference = module(xs[0])
    folded = fast(xs[1].contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(folded, reference, rtol=1e-5, atol=1e-5)
    weights = torch.tensor([[1.0, -2.0, 0.5, 0.0, 3.0], [0.0, 1.0, 0.0, 0.0, 0.0]])
    (g_reference,) = torch.autograd.grad((reference * weights).sum(), xs[0])
    (g_folded,) = torch.autograd.grad((folded * weights).sum(), xs[1])
    torch.testing.assert_close(g_folded, g_reference, rtol=1e-5, atol=1e-6)


def test_a_program_without_convolutions_is_left_as_it_is() -> None:
    dense = torch.export.export(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval(), (torch.zeros(2, 4),)).module()
    fast, channels_last = inference_program(dense)
    assert fast is dense and not channels_last


def test_shapes_runs_the_folded_program_and_randomisation_refolds() -> None:
    shapes = LoadedModel.load(EMBEDDED_REPOSITORY / "shapes")
    runner = shapes.program
    assert _norms(runner.module) > 0 and _norms(runner.fast) == 0
    x = torch.randn(3, 3, shapes.config.input.height, shapes.config.input.width, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        exported, *_ = runner.module(x, tuple(runner.zero_probes(3)))
        logits, _ = runner.forward(x, runner.zero_probes(3))
        torch.testing.assert_close(logits, exported, rtol=1e-4, atol=1e-4)
        # A re-drawn copy folds its own parameters: its fast program follows its module, not the original's.
        layer = runner.parameter_layers()[-2]  # a BatchNorm or conv near the top
        redrawn = runner.reinitialized([layer], seed=5)
        redrawn_exported, *_ = redrawn.module(x, tuple(redrawn.zero_probes(3)))
        redrawn_logits, _ = redrawn.forward(x, redrawn.zero_probes(3))
    torch.testing.assert_close(redrawn_logits, redrawn_exported, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(redrawn_logits, logits, atol=1e-3)
