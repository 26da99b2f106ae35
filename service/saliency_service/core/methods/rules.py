"""Backward rules on the exported program: LRP rules (METHODS.md §6) and Guided Backprop, with no user code.

The model's gradient artifact is a `torch.export` program whose unlifted `GraphModule` holds aten ops.
`RuleInterpreter` runs that graph node by node and swaps chosen ops for custom autograd Functions: the
forward value is unchanged, the backward pass applies a rule instead of the chain rule. Relevance is then
read as the input "gradient" after seeding the output, exactly as Zennit does with hooks (Anders et al.,
"Software for dataset-wide XAI", arXiv 2106.13200), but nothing is installed on the shared module.

Which op gets which rule is a `RulePlan`, built once per (program, rule set) from the graph:

* linear-type ops (conv2d / convolution / linear / addmm / mm with a constant weight) get the composite's
  rule; a BatchNorm whose input is such an op's only use is folded into it (Zennit's
  `SequentialMergeBatchNorm`: ``W' = W s``, ``b' = (b - mu) s + beta``, ``s = gamma / sqrt(var + eps)``),
  and a BatchNorm without one passes relevance through (Zennit maps BatchNorm to Pass);
* elementwise activations pass relevance through (Zennit's `Activation` -> Pass; that includes GELU, SiLU,
  Softplus and Tanh, as in Zennit);
* in-place variants (``relu_``, ``add_``, from ``nn.ReLU(inplace=True)`` or ``out += identity``) run out of place;
* average pooling, adaptive average pooling, mean and sum reductions use the Norm rule (epsilon rule with
  weights 1/n, no bias), except a mean or sum that is combined with its own input again (centring, as in
  ``x - x.mean()``): that is a statistic and keeps its plain gradient;
* an addition of two tensors that both depend on the input (a residual join) splits relevance in
  proportion to each operand's signed contribution (Zennit's ResNet canonizer + Norm on `Sum`);
* everything else -- max pooling (relevance goes to the winner), reshapes, and ops with no rule such as
  layer norm, softmax or a matmul of two activations -- keeps its plain gradient, so any exported model runs.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import fx

from saliency_service.core.errors import InvalidArgument

RuleKind = Literal["epsilon", "gamma", "zplus", "alpha_beta", "zbox", "flat"]
Affine = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
"""out = f(input, weight, bias): linear in input and in weight; bias added per output unit."""

_aten = torch.ops.aten

# ---- op tables (aten overloads as they appear in exported programs) ----

_ELEMENTWISE_ACTIVATIONS = {
    _aten.relu.default,
    _aten.relu_.default,
    _aten.leaky_relu.default,
    _aten.leaky_relu_.default,
    _aten.elu.default,
    _aten.elu_.default,
    _aten.silu_.default,
    _aten.hardtanh_.default,
    _aten.gelu.default,
    _aten.sigmoid.default,
    _aten.silu.default,
    _aten.softplus.default,
    _aten.tanh.default,
    _aten.hardtanh.default,
    _aten.hardswish.default,
    _aten.hardsigmoid.default,
    _aten.relu6.default,
    _aten.selu.default,
    _aten.celu.default,
    _aten.mish.default,
}
_RELU = {_aten.relu.default, _aten.relu_.default}
_POOLS = {
    _aten.avg_pool1d.default,
    _aten.avg_pool2d.default,
    _aten.avg_pool3d.default,
    _aten.adaptive_avg_pool1d.default,
    _aten.adaptive_avg_pool2d.default,
    _aten.adaptive_avg_pool3d.default,
    _aten.mean.dim,
    _aten.sum.dim_IntList,
}
_ADDS = {_aten.add.Tensor, _aten.add_.Tensor}
# In-place variants (nn.ReLU(inplace=True), `out += identity`) run out of place under a rule: the rule
# Functions keep their inputs for the backward pass, which an in-place update would overwrite.
_OUT_OF_PLACE: dict[Any, Any] = {
    _aten.relu_.default: _aten.relu.default,
    _aten.add_.Tensor: _aten.add.Tensor,
    _aten.hardtanh_.default: _aten.hardtanh.default,
    _aten.leaky_relu_.default: _aten.leaky_relu.default,
    _aten.elu_.default: _aten.elu.default,
    _aten.silu_.default: _aten.silu.default,
}
_BATCH_NORMS: set[Any] = {_aten.batch_norm.default, _aten._native_batch_norm_legit_no_training.default}


@dataclass(frozen=True)
class LinearRule:
    """One LRP rule for linear-type ops (METHODS.md §6 table); `epsilon` is the epsilon rule's epsilon and every other rule's stabiliser."""

    kind: RuleKind
    epsilon: float = 1e-6
    gamma: float = 0.25
    alpha: float = 2.0
    beta: float = 1.0
    low: tuple[float, ...] = ()
    high: tuple[float, ...] = ()
    """ZBox bounds per input channel (normalised space)."""
    zero_bias: bool = False
    """Leave the bias out of every term (as the SR notebooks' z+ rule does)."""


@dataclass(frozen=True)
class RuleSet:
    """Which rule each kind of op gets: a composite (Zennit) or Guided Backprop."""

    conv: LinearRule | None
    dense: LinearRule | None
    first: LinearRule | None = None
    first_kinds: Literal["conv", "any"] = "conv"
    """Which op counts as the first layer: the first convolution, or the first conv or dense op."""
    norm_stabilizer: float = 1e-6
    guided_relu: bool = False
    """Guided Backprop: ReLU passes only positive gradients where its input was positive; nothing else changes."""

    @property
    def lrp(self) -> bool:
        return self.conv is not None


def stabilize(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """z + epsilon * sign(z), with sign(0) = +1 (Zennit's stabiliser)."""
    sign = torch.where(z >= 0, 1.0, -1.0).to(z.dtype)
    return z + epsilon * sign


# ---- rule backward passes ----


Transpose = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""transpose(like, weight, vector) = d(sum(vector * f(x, weight)))/dx for an `Affine` f, without running f."""


def _vjp(call: Affine, like: torch.Tensor, weight: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """d(sum(vector * f(x, weight)))/dx; f is linear in x, so this does not depend on x.

    The generic way: autograd through one forward of f on a zero probe. Convolutions and dense ops
    have a `Transpose` instead (`_transpose_for`), which skips that forward.
    """
    with torch.enable_grad():
        probe = torch.zeros_like(like, requires_grad=True)
        (grad,) = torch.autograd.grad(call(probe, weight, None), probe, vector)
    return grad


def _spatial(value: Any, dims: int) -> list[int]:
    values = [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
    return values * dims if len(values) == 1 else values


def _transpose_for(target: Any, args: Sequence[Any], kwargs: dict[str, Any], spec_input: int, spec_weight: int) -> Transpose | None:
    """The input-gradient of a convolution or dense op as its own op (the transposed convolution), or None."""
    if kwargs or (spec_input, spec_weight) != (0, 1):
        return None
    if target == _aten.linear.default:
        return lambda like, weight, vector: vector @ weight
    if target not in (_aten.conv2d.default, _aten.convolution.default) or not isinstance(args[1], torch.Tensor):
        return None
    dims = args[1].ndim - 2
    if target == _aten.conv2d.default:
        stride, padding, dilation, groups = (list(args[3:7]) + [1, 0, 1, 1][len(args[3:7]) :])[:4]
        output_padding: Any = [0] * dims
    else:
        if len(args) < 9 or args[6]:  # transposed convolutions keep the generic path
            return None
        stride, padding, dilation, _, output_padding, groups = args[3:9]
    if isinstance(padding, str):
        return None
    stride, padding, dilation = _spatial(stride, dims), _spatial(padding, dims), _spatial(dilation, dims)
    output_padding = _spatial(output_padding, dims)

    def transpose(like: torch.Tensor, weight: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        grads = _aten.convolution_backward(
            vector, like, weight, None, stride, padding, dilation, False, output_padding, int(groups), [True, False, False]
        )
        grad: torch.Tensor = grads[0]
        return grad

    return transpose


# id(weight) -> (a weak reference to it, its version, its positive part). Tensors cannot be
# WeakKeyDictionary keys (== is elementwise), so the entry goes when the reference's callback fires.
_POSITIVE_PARTS: dict[int, tuple[weakref.ref[torch.Tensor], int, torch.Tensor]] = {}
_POSITIVE_PARTS_LOCK = threading.Lock()


def positive_part(weight: torch.Tensor) -> torch.Tensor:
    """weight.clamp(min=0), kept while `weight` lives and is not changed in place.

    A served program's weights are the same tensors call after call; clamping all of them again is a
    pass over every parameter per explanation (about 11M values for ResNet-18), a sizeable part of a
    batch-1 LRP call. Only the positive part is kept (one more copy of the weights, not two): z+ after
    a ReLU needs nothing else, and the negative part is weight minus it.
    """
    key = id(weight)
    with _POSITIVE_PARTS_LOCK:
        cached = _POSITIVE_PARTS.get(key)
    if cached is not None and cached[0]() is weight and cached[1] == weight._version:
        return cached[2]
    positive = weight.clamp(min=0)
    reference = weakref.ref(weight, lambda _: _forget(key))
    with _POSITIVE_PARTS_LOCK:
        _POSITIVE_PARTS[key] = (reference, weight._version, positive)
    return positive


def _forget(key: int) -> None:
    with _POSITIVE_PARTS_LOCK:
        _POSITIVE_PARTS.pop(key, None)


def _bias(bias: torch.Tensor | None, modify: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
    return None if bias is None else modify(bias)


def linear_relevance(
    rule: LinearRule,
    call: Affine,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    relevance: torch.Tensor,
    transpose: Transpose | None = None,
    output: torch.Tensor | None = None,
) -> torch.Tensor:
    """Relevance at the input of out = call(x, weight, bias) given relevance at its output, by `rule`.

    `transpose` (the op's input-gradient) and `output` (call(x, weight, bias), from the forward pass)
    are optional shortcuts that spare forward passes; the result is the same without them.
    """
    eps = rule.epsilon
    if rule.zero_bias:
        bias, output = None, None
    pos, neg = x.clamp(min=0), x.clamp(max=0)
    # After a ReLU the input has no negative part: the terms that read it are exactly zero, and skipping them
    # halves the convolutions of z+, alpha-beta and gamma (Zennit computes them anyway).
    signed = rule.kind in ("zplus", "alpha_beta", "gamma") and bool(neg.any())
    w_pos = positive_part(weight)
    # z+ on a non-negative input reads no negative weights (split and spread skip them unless signed); every other
    # rule does. weight - w_pos is exactly weight.clamp(max=0).
    w_neg = weight - w_pos if signed or rule.kind != "zplus" else w_pos

    def out(inp: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return call(inp, w, b)

    def back(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _vjp(call, x, w, v) if transpose is None else transpose(x, w, v)

    def split(inp_w_pos: torch.Tensor, inp_w_neg: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """out(x+, inp_w_pos, b) + out(x-, inp_w_neg): the response of the two halves of the input."""
        z = out(pos, inp_w_pos, b)
        return z + out(neg, inp_w_neg, None) if signed else z

    def spread(w_for_pos: torch.Tensor, w_for_neg: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x+ * back(w_for_pos, v) + x- * back(w_for_neg, v)."""
        r = pos * back(w_for_pos, v)
        return r + neg * back(w_for_neg, v) if signed else r

    if rule.kind == "epsilon":
        z = out(x, weight, bias) if output is None else output
        return x * back(weight, relevance / stabilize(z, eps))
    if rule.kind == "zplus":
        v = relevance / stabilize(split(w_pos, w_neg, _bias(bias, lambda b: b.clamp(min=0))), eps)
        return spread(w_pos, w_neg, v)
    if rule.kind == "alpha_beta":
        z_pos = split(w_pos, w_neg, _bias(bias, lambda b: b.clamp(min=0)))
        z_neg = split(w_neg, w_pos, _bias(bias, lambda b: b.clamp(max=0)))
        v_pos, v_neg = relevance / stabilize(z_pos, eps), relevance / stabilize(z_neg, eps)
        return rule.alpha * spread(w_pos, w_neg, v_pos) - rule.beta * spread(w_neg, w_pos, v_neg)
    if rule.kind == "gamma":
        g = rule.gamma
        w_up, w_down = weight + g * w_pos, weight + g * w_neg
        z = out(x, weight, bias) if output is None else output
        z_up = split(w_up, w_down, _bias(bias, lambda b: b + g * b.clamp(min=0)))
        z_down = split(w_down, w_up, _bias(bias, lambda b: b + g * b.clamp(max=0)))
        v_up = (z > 0).to(z.dtype) * relevance / stabilize(z_up, eps)
        v_down = (z < 0).to(z.dtype) * relevance / stabilize(z_down, eps)
        if not signed:
            return pos * (back(w_up, v_up) + back(w_down, v_down))
        return pos * (back(w_up, v_up) + back(w_down, v_down)) + neg * (back(w_down, v_up) + back(w_up, v_down))
    if rule.kind == "zbox":
        shape = (1, -1) + (1,) * (x.ndim - 2)
        low = torch.tensor(rule.low, dtype=x.dtype, device=x.device).view(shape).expand_as(x)
        high = torch.tensor(rule.high, dtype=x.dtype, device=x.device).view(shape).expand_as(x)
        # The biases of the three terms cancel (b - b+ - b-), so they are left out.
        z = out(x, weight, None) - out(low, w_pos, None) - out(high, w_neg, None)
        v = relevance / stabilize(z, eps)
        return x * back(weight, v) - low * back(w_pos, v) - high * back(w_neg, v)
    # flat: all weights and inputs 1, no bias.
    ones_w = torch.ones_like(weight)
    z = out(torch.ones_like(x), ones_w, None)
    return back(ones_w, relevance / stabilize(z, eps))


class _LinearRuleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: _Layer) -> torch.Tensor:
        output = layer.call(x, layer.weight, layer.bias)
        ctx.save_for_backward(x, output)
        ctx.layer = layer
        return output

    @staticmethod
    def backward(ctx: Any, relevance: torch.Tensor) -> tuple[torch.Tensor, None]:
        x, output = ctx.saved_tensors
        layer: _Layer = ctx.layer
        return linear_relevance(layer.rule, layer.call, x, layer.weight, layer.bias, relevance, layer.transpose, output), None


class _PassFunction(torch.autograd.Function):
    """Forward: fn(x), elementwise. Backward: relevance passes through unchanged (Zennit's Pass)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return fn(x)

    @staticmethod
    def backward(ctx: Any, relevance: torch.Tensor) -> tuple[torch.Tensor, None]:
        return relevance, None


class _NormFunction(torch.autograd.Function):
    """A parameter-free linear op (pooling, mean, sum) under the Norm rule: R_i = x_i * d/dx_i sum_j R_j z_j / s(z_j)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], epsilon: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.fn, ctx.epsilon = fn, epsilon
        return fn(x)

    @staticmethod
    def backward(ctx: Any, relevance: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            probe = x.detach().requires_grad_(True)
            z = ctx.fn(probe)
            (grad,) = torch.autograd.grad(z, probe, relevance / stabilize(z.detach(), ctx.epsilon))
        return x * grad, None, None


class _SplitAddFunction(torch.autograd.Function):
    """A residual join a + b: each operand gets relevance in proportion to its signed share, a / s(a + b)."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, epsilon: float) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        ctx.epsilon = epsilon
        return a + b

    @staticmethod
    def backward(ctx: Any, relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        a, b = ctx.saved_tensors
        share = relevance / stabilize(a + b, ctx.epsilon)
        return a * share, b * share, None


class _GuidedReluFunction(torch.autograd.Function):
    """ReLU whose backward keeps only positive gradients at positive inputs (Springenberg et al., ICLR-W 2015)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        guided: torch.Tensor = grad.clamp(min=0) * (x > 0).to(grad.dtype)
        return guided


def _apply(function: type[torch.autograd.Function], *args: Any) -> Any:
    return function.apply(*args)  # type: ignore[no-untyped-call]


# ---- planning: which node gets which treatment ----


@dataclass
class _Layer:
    """One linear-type op with its (possibly BN-folded) parameters and rule, made at run time."""

    call: Affine
    weight: torch.Tensor
    bias: torch.Tensor | None
    rule: LinearRule
    transpose: Transpose | None = None


@dataclass(frozen=True)
class _LinearSpec:
    input_index: int
    weight_index: int
    bias_index: int | None
    out_axis: int
    """The weight axis that indexes output channels (for BatchNorm folding)."""
    folded_bn: fx.Node | None
    rule: LinearRule


@dataclass
class RulePlan:
    linear: dict[fx.Node, _LinearSpec] = field(default_factory=dict)
    passed: set[fx.Node] = field(default_factory=set)
    """Elementwise ops (activations, unfolded BatchNorm) whose backward passes relevance through."""
    folded: set[fx.Node] = field(default_factory=set)
    """BatchNorm nodes folded into their linear op: they return their input."""
    norm: set[fx.Node] = field(default_factory=set)
    split_add: set[fx.Node] = field(default_factory=set)
    guided: set[fx.Node] = field(default_factory=set)


def _linear_layout(node: fx.Node, depends: set[fx.Node]) -> tuple[int, int, int | None, int] | None:
    """(input arg, weight arg, bias slot, output axis of the weight) when `node` is a linear op of x with a constant weight.

    The bias slot is the argument position that takes a bias (None for mm, which has none).
    """
    target, args = node.target, node.args
    if target in (_aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default, _aten.linear.default):
        layout: tuple[int, int, int | None, int] = (0, 1, 2, 0)
    elif target == _aten.convolution.default:
        # A transposed convolution's output channels are weight axis 1.
        layout = (0, 1, 2, 1 if args[6] else 0)
    elif target == _aten.addmm.default:
        if node.kwargs or len(args) > 3:
            return None
        layout = (1, 2, 0, 1)
    elif target == _aten.mm.default:
        layout = (0, 1, None, 1)
    else:
        return None
    inp, weight = args[layout[0]], args[layout[1]]
    bias = args[layout[2]] if layout[2] is not None and layout[2] < len(args) else None
    if not isinstance(inp, fx.Node) or inp not in depends or not isinstance(weight, fx.Node) or weight in depends:
        return None
    if isinstance(bias, fx.Node) and bias in depends:
        return None
    return layout


def _dependents(graph: fx.Graph, source: fx.Node) -> set[fx.Node]:
    """Nodes whose value depends on `source` (the image input)."""
    depends = {source}
    for node in graph.nodes:
        if any(arg in depends for arg in node.all_input_nodes):
            depends.add(node)
    return depends


def _batch_norm_user(node: fx.Node, order: dict[fx.Node, int], probes: set[fx.Node]) -> fx.Node | None:
    """The eval-mode BatchNorm that is `node`'s only user, when its parameters are computed before `node`.

    A declared layer's probe may sit between the two (conv -> + probe -> BN): probes are zero whenever
    rules run, so the BatchNorm can still be folded into the conv (the layer's returned activation then
    reads the folded value, which relevance never uses).
    """
    current = node
    while True:
        users = [user for user in current.users if user.op != "output"]
        if len(users) != 1:
            return None
        user = users[0]
        if user.target in _ADDS and len(user.args) == 2 and user.args[0] is current and user.args[1] in probes:
            current = user
            continue
        break
    bn = user
    if bn.target not in _BATCH_NORMS or bn.args[0] is not current:
        return None
    if bn.target == _aten.batch_norm.default and bn.args[5]:
        return None
    if any(isinstance(a, fx.Node) and order[a] > order[node] for a in bn.args[1:]):
        return None
    return bn


def _is_statistic(node: fx.Node) -> bool:
    """A mean or sum that is combined with its own input again (centring, x - x.mean()) is a statistic, not
    pooling: it keeps its plain gradient, as it would in Zennit, where only pooling modules get the Norm rule."""
    source = node.args[0]
    return any(source in user.all_input_nodes for user in node.users)


def _ndim(node: fx.Node) -> int:
    value = node.meta.get("val")
    return int(value.ndim) if isinstance(value, torch.Tensor) else -1


def _check_box_input(node: Any, rule: LinearRule) -> None:
    """The z-box bounds are per image channel: the first conv must read a tensor with that many channels."""
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    channels = int(value.shape[1]) if isinstance(value, torch.Tensor) and value.ndim > 1 else -1
    if channels != len(rule.low):
        raise InvalidArgument(
            "COMPOSITE_NOT_APPLICABLE",
            f"the z-box rule needs the first convolution to read the {len(rule.low)}-channel image, but it reads "
            f"{channels} channels; use a composite without z-box (e.g. epsilon_plus_flat)",
            {"parameter": "composite"},
        )


def build_plan(graph: fx.Graph, rules: RuleSet) -> RulePlan:
    """Assign a treatment to each node of an exported program's graph (see the module docstring)."""
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    depends = _dependents(graph, placeholders[0])
    plan = RulePlan()
    if rules.guided_relu:
        plan.guided = {node for node in graph.nodes if node.op == "call_function" and node.target in _RELU and node in depends}
        return plan
    seen_first = False
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in graph.nodes:
        if node.op != "call_function" or node not in depends:
            continue
        target = node.target
        layout = _linear_layout(node, depends)
        if layout is not None:
            is_conv = target in (_aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default, _aten.convolution.default)
            rule = rules.conv if is_conv else rules.dense
            if rules.first is not None and not seen_first and (is_conv or rules.first_kinds == "any"):
                rule, seen_first = rules.first, True
            if rule is None:
                raise ValueError("an LRP rule set needs a rule for convolutions and for dense layers")
            if rule.kind == "zbox":
                _check_box_input(node.args[layout[0]], rule)
            # BatchNorm normalises axis 1: fold only into ops whose output channels are axis 1.
            foldable = (is_conv and not (target == _aten.convolution.default and bool(node.args[6]))) or _ndim(node) == 2
            bn = _batch_norm_user(node, order, set(placeholders[1:])) if foldable else None
            plan.linear[node] = _LinearSpec(layout[0], layout[1], layout[2], layout[3], bn, rule)
            if bn is not None:
                plan.folded.add(bn)
        elif target in _BATCH_NORMS and node not in plan.folded and not (target == _aten.batch_norm.default and node.args[5]):
            plan.passed.add(node)
        elif target in _ELEMENTWISE_ACTIVATIONS:
            plan.passed.add(node)
        elif target in _POOLS and not _is_statistic(node):
            plan.norm.add(node)
        elif target in _ADDS and len(node.args) == 2 and not node.kwargs:
            a, b = node.args
            if isinstance(a, fx.Node) and isinstance(b, fx.Node) and a in depends and b in depends:
                plan.split_add.add(node)
    return plan


_PLANS: weakref.WeakKeyDictionary[fx.GraphModule, dict[RuleSet, RulePlan]] = weakref.WeakKeyDictionary()
_PLANS_LOCK = threading.Lock()


def plan_for(module: fx.GraphModule, rules: RuleSet) -> RulePlan:
    """The cached plan of `module` under `rules` (built on first use)."""
    with _PLANS_LOCK:
        cached = _PLANS.setdefault(module, {})
        if rules not in cached:
            cached[rules] = build_plan(module.graph, rules)
        return cached[rules]


def _fold_batch_norm(bn_args: Sequence[Any], target: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale s and shift t with BN(y) = s * y + t in eval mode, per channel."""
    _, gamma, beta, mean, var = bn_args[:5]
    eps = bn_args[7] if target == _aten.batch_norm.default else bn_args[6]
    scale = torch.rsqrt(var + eps)
    if gamma is not None:
        scale = scale * gamma
    shift = -mean * scale
    if beta is not None:
        shift = shift + beta
    return scale, shift


class RuleInterpreter(fx.Interpreter):
    """Runs an exported program with the plan's rule Functions in place of the planned ops."""

    def __init__(self, module: fx.GraphModule, plan: RulePlan, rules: RuleSet) -> None:
        super().__init__(module, garbage_collect_values=True)
        self.plan = plan
        self.rules = rules

    def run_node(self, n: fx.Node) -> Any:
        plan = self.plan
        if n.op != "call_function" or not (
            n in plan.linear or n in plan.passed or n in plan.folded or n in plan.norm or n in plan.split_add or n in plan.guided
        ):
            return super().run_node(n)
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            target: Any = _OUT_OF_PLACE.get(n.target, n.target)
            if n in plan.linear:
                return self._linear(n, plan.linear[n], args, kwargs)
            if n in plan.folded:
                # The preceding linear op already returned BN(its output).
                if target == _aten._native_batch_norm_legit_no_training.default:
                    empty = args[0].new_zeros(0)
                    return (args[0], empty, empty)
                return args[0]
            if n in plan.passed:
                return self._elementwise(_PassFunction, target, args, kwargs)
            if n in plan.norm:
                rest = args[1:]
                return _apply(_NormFunction, args[0], lambda t: target(t, *rest, **kwargs), self.rules.norm_stabilizer)
            if n in plan.split_add:
                a, b = args
                if a.shape != b.shape:
                    return target(*args, **kwargs)
                return _apply(_SplitAddFunction, a, b, self.rules.norm_stabilizer)
            return _apply(_GuidedReluFunction, args[0])

    @staticmethod
    def _elementwise(function: Any, target: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        if target == _aten._native_batch_norm_legit_no_training.default:
            rest = args[1:]
            out = _apply(function, args[0], lambda t: target(t, *rest, **kwargs)[0])
            empty = out.new_zeros(0)
            return (out, empty, empty)
        rest = args[1:]
        return _apply(function, args[0], lambda t: target(t, *rest, **kwargs))

    def _linear(self, n: fx.Node, spec: _LinearSpec, args: Sequence[Any], kwargs: dict[str, Any]) -> torch.Tensor:
        target: Any = n.target
        slot = spec.bias_index
        weight: torch.Tensor = args[spec.weight_index]
        bias: torch.Tensor | None = args[slot] if slot is not None and slot < len(args) else None
        if spec.folded_bn is not None:
            bn_args = [None] + [self.env[a] if isinstance(a, fx.Node) else a for a in spec.folded_bn.args[1:]]
            scale, shift = _fold_batch_norm(bn_args, spec.folded_bn.target)
            shape = [1] * weight.ndim
            shape[spec.out_axis] = -1
            weight = weight * scale.view(shape)
            bias = shift if bias is None else bias * scale + shift
        template = list(args)
        if slot is not None and slot >= len(template):
            template.append(None)
        addmm = target == _aten.addmm.default

        def call(inp: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
            full = list(template)
            full[spec.input_index], full[spec.weight_index] = inp, w
            if slot is None:
                out: torch.Tensor = target(*full, **kwargs)
                return out if b is None else out + b
            full[slot] = b if b is not None or not addmm else torch.zeros_like(template[slot])
            result: torch.Tensor = target(*full, **kwargs)
            return result

        layer = _Layer(call, weight, bias, spec.rule, _transpose_for(target, template, kwargs, spec.input_index, spec.weight_index))
        output: torch.Tensor = _apply(_LinearRuleFunction, args[spec.input_index], layer)
        return output


def run_with_rules(
    module: fx.GraphModule, rules: RuleSet, x: torch.Tensor, probes: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward through the program with rule Functions in place; same outputs as `module(x, probes)`."""
    interpreter = RuleInterpreter(module, plan_for(module, rules), rules)
    logits, *activations = interpreter.run(x, tuple(probes))
    return logits, list(activations)


def zbox_bounds(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalised images of pixel values 0 and 1, per channel: (0 - mean) / std and (1 - mean) / std."""
    if len(mean) != len(std) or any(s <= 0 for s in std):
        raise InvalidArgument("INVALID_INPUT_SPEC", "the model's input spec needs one positive std per mean for z-box bounds")
    return tuple(-m / s for m, s in zip(mean, std, strict=True)), tuple((1 - m) / s for m, s in zip(mean, std, strict=True))
