"""Layer-wise Relevance Propagation with Zennit's composites (METHODS.md §6) and Guided Backprop.

Both run the exported program through `rules.RuleInterpreter`: no user code, no hooks on the shared
module. LRP: Bach et al., PLoS ONE 2015; Montavon et al., "Layer-wise relevance propagation: an
overview", 2019; composites and canonizers as defined by Zennit (Anders et al., arXiv 2106.13200).
Guided Backprop: Springenberg et al., "Striving for simplicity", ICLR workshop 2015.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from saliency_service.core.errors import InvalidArgument
from saliency_service.core.methods.base import METHODS, MethodInput, SaliencyMethod
from saliency_service.core.methods.noise import GradientMethod, channel_reduced
from saliency_service.core.methods.rules import LinearRule, RuleSet, run_with_rules, zbox_bounds
from saliency_service.core.models.model import LoadedModel
from saliency_service.core.params import ParamSpec, ParamValue

COMPOSITES = ("epsilon_plus", "epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1")
GUIDED_BACKPROP = RuleSet(conv=None, dense=None, guided_relu=True)


def composite_rules(name: str, model: LoadedModel, epsilon: float = 1e-6, gamma: float = 0.25, stabilizer: float = 1e-6) -> RuleSet:
    """Zennit's composite `name` as a RuleSet (METHODS.md §6 "Composites").

    Dense layers always get Epsilon(epsilon); convolutions get z+ (epsilon_plus, epsilon_plus_flat),
    Gamma(gamma) (epsilon_gamma_box) or alpha=2, beta=1 (epsilon_alpha2_beta1). The first layer gets Flat
    (epsilon_plus_flat: the first conv or dense op) or z-box with the pixel range 0..1 normalised by the
    model's mean/std (epsilon_gamma_box: the first conv).
    """
    dense = LinearRule("epsilon", epsilon=epsilon)
    if name == "epsilon_plus":
        return RuleSet(conv=LinearRule("zplus", epsilon=stabilizer), dense=dense, norm_stabilizer=stabilizer)
    if name == "epsilon_plus_flat":
        return RuleSet(
            conv=LinearRule("zplus", epsilon=stabilizer),
            dense=dense,
            first=LinearRule("flat", epsilon=stabilizer),
            first_kinds="any",
            norm_stabilizer=stabilizer,
        )
    if name == "epsilon_gamma_box":
        spec = model.config.input
        low, high = zbox_bounds(spec.mean, spec.std)
        return RuleSet(
            conv=LinearRule("gamma", epsilon=stabilizer, gamma=gamma),
            dense=dense,
            first=LinearRule("zbox", epsilon=stabilizer, low=low, high=high),
            first_kinds="conv",
            norm_stabilizer=stabilizer,
        )
    if name == "epsilon_alpha2_beta1":
        return RuleSet(conv=LinearRule("alpha_beta", epsilon=stabilizer, alpha=2.0, beta=1.0), dense=dense, norm_stabilizer=stabilizer)
    raise InvalidArgument(
        "INVALID_PARAMETER", f"unknown LRP composite '{name}'; use one of {', '.join(COMPOSITES)}", {"parameter": "composite"}
    )


def input_relevance(model: LoadedModel, x: torch.Tensor, weights: torch.Tensor, rules: RuleSet, times_logits: bool) -> torch.Tensor:
    """B x C x H x W relevance (or modified gradient) at the input, in chunks of `gradient_batch`.

    The output is seeded with `weights` (the request's objective), times the logits when `times_logits`
    (LRP: the seed `onehot * y_c` makes the input relevance sum to the logit, METHODS.md §6 "Seeding").
    """
    program = model.program
    # The inference copy has its BatchNorms folded into their convolutions, as the rules would fold them.
    module = program.fast if isinstance(program.fast, torch.fx.GraphModule) else program.module
    origin = x.device
    x, weights = x.to(model.device), weights.to(model.device)
    parts = []
    step = model.gradient_batch
    for start in range(0, len(x), step):
        xs = x[start : start + step].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits, _ = run_with_rules(module, rules, program.layout(xs), program.zero_probes(len(xs)))
            seed = weights[start : start + step].to(logits.dtype)
            if times_logits:
                seed = seed * logits.detach()
            (relevance,) = torch.autograd.grad(logits, xs, seed)
        parts.append(relevance.detach())
    return torch.cat(parts).to(origin)


LRP_PARAMS = (
    ParamSpec(
        "composite",
        "string",
        "epsilon_plus_flat",
        "Zennit composite: epsilon_plus (conv z+, dense epsilon), epsilon_plus_flat (same, first layer flat), "
        "epsilon_gamma_box (first conv z-box on the 0..1 pixel range, other convs gamma, dense epsilon), "
        "epsilon_alpha2_beta1 (conv alpha=2 beta=1, dense epsilon).",
        choices=COMPOSITES,
    ),
    ParamSpec("epsilon", "float", 1e-6, "Epsilon of the dense layers' epsilon rule (1e-6 is about LRP-0).", minimum=0.0, maximum=1e3),
    ParamSpec("gamma", "float", 0.25, "Gamma of the gamma rule (epsilon_gamma_box only).", minimum=0.0, maximum=1e3),
    ParamSpec(
        "stabilizer",
        "float",
        1e-6,
        "Added to every other rule's denominator with the denominator's sign, to avoid division by zero.",
        minimum=1e-12,
        maximum=1.0,
    ),
)


def rules_from_params(params: Mapping[str, ParamValue], model: LoadedModel) -> RuleSet:
    """The RuleSet named by validated LRP_PARAMS values."""
    return composite_rules(str(params["composite"]), model, float(params["epsilon"]), float(params["gamma"]), float(params["stabilizer"]))


@METHODS.register("lrp")
class Lrp(SaliencyMethod):
    description = (
        "Layer-wise Relevance Propagation with a Zennit composite (BatchNorm folded into the preceding conv/linear, "
        "residual sums split in proportion, max pooling to the winner), seeded with the objective's logit: "
        "relevance summed over channels, signed; it sums to about logit[target] (minus logit[foil]) minus the bias share. "
        "Ops with no LRP rule (layer norm, softmax, attention products) use the plain gradient."
    )
    family = "relevance"
    params = LRP_PARAMS

    def maps(self, request: MethodInput) -> torch.Tensor:
        rules = rules_from_params(request.params, request.model)
        relevance = input_relevance(request.model, request.input(), request.objective(), rules, times_logits=True)
        return relevance.sum(dim=1).float()


@METHODS.register("guided_backprop")
class GuidedBackprop(GradientMethod):
    description = (
        "Guided Backprop (Springenberg et al.): the input gradient where every ReLU passes back only positive "
        "gradients at positive inputs; other ops keep their plain gradient."
    )
    own_params = (
        ParamSpec(
            "abs",
            "bool",
            True,
            "True: max over channels of |guided gradient|. False: the signed guided gradient summed over channels.",
        ),
    )

    def attribute_once(self, request: MethodInput) -> torch.Tensor:
        gradient = input_relevance(request.model, request.input(), request.objective(), GUIDED_BACKPROP, times_logits=False)
        return channel_reduced(gradient, bool(request.params["abs"]))
