"""Gradients through a `torch.export` program, loaded without executing code from the file.

The program's signature is `forward(x, probes) -> (logits, *activations)`: each declared layer's
output has a zero probe added and is also returned. The gradient of an objective with respect to a
probe is the gradient with respect to that layer's activation, and autograd walks only the head,
so no hooks are installed at request time and concurrent requests share one module safely.

Forward and backward passes run a copy of the program made for inference once at load (`inference_program`):
each eval-mode BatchNorm folded into the convolution before it, and convolution weights and inputs in
channels-last memory, the layout oneDNN's CPU kernels prefer. On ResNet-50 this halves the time of an input
gradient against the program as exported. The program as exported stays for what needs its own layers (LRP's
rules, parameter names for randomisation).
"""

from __future__ import annotations

import copy
import io
import json
import math
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch

from saliency_service.core.errors import FailedPrecondition

# Tensors stored as raw bytes are safe; anything pickled could run code when loaded.
_SAFE_CONSTANT_PREFIX = "tensor_"


def vet_pt2_archive(path: Path) -> None:
    """Refuse a .pt2 archive that would make torch unpickle anything other than plain tensors."""
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if name.endswith(("_weights_config.json", "_constants_config.json")):
                    config = json.loads(archive.read(name)).get("config", {})
                    for fqn, meta in config.items():
                        path_name = str(meta.get("path_name", ""))
                        if meta.get("use_pickle"):
                            raise FailedPrecondition(
                                "UNSAFE_MODEL_FILE", f"{path}: '{fqn}' is stored as a pickle; refusing to load it", {"path": str(path)}
                            )
                        if name.endswith("_constants_config.json") and not path_name.startswith(_SAFE_CONSTANT_PREFIX):
                            raise FailedPrecondition(
                                "UNSAFE_MODEL_FILE",
                                f"{path}: constant '{fqn}' is a custom object; refusing to load it",
                                {"path": str(path)},
                            )
                elif "/sample_inputs/" in name:
                    # torch falls back to a full unpickle when weights_only fails: make sure it cannot.
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
    except FailedPrecondition:
        raise
    except Exception as exc:
        raise FailedPrecondition("TORCH_LOAD_FAILED", f"{path} is not a valid torch export archive: {exc}", {"path": str(path)}) from None


class TorchRunner:
    """A frozen, probe-instrumented program: no parameter gradients, shared by all requests."""

    def __init__(self, path: Path, layer_shapes: Sequence[tuple[int, ...]], *, device: str = "cpu") -> None:
        vet_pt2_archive(path)
        try:
            program = torch.export.load(str(path))
            module = program.module()
        except Exception as exc:
            raise FailedPrecondition("TORCH_LOAD_FAILED", f"cannot load torch program {path}: {exc}", {"path": str(path)}) from None
        for parameter in module.parameters():
            parameter.requires_grad_(False)
        self.module = module.to(device)
        self.fast, self._channels_last = inference_program(self.module)
        self.device = torch.device(device)
        self.layer_shapes = [tuple(shape) for shape in layer_shapes]
        self._heads: dict[int, torch.fx.GraphModule | None] = {}

    def head(self, probe_index: int) -> torch.fx.GraphModule | None:
        """The part of the program from a layer's activation to the logits, or None when there is none.

        The head exists when the logits depend on the input only through that activation (the layer's
        output plus its probe): true for the last stage of a CNN, where only pooling and the classifier
        follow; false where a residual stream bypasses the layer (a transformer block's norm) or the
        rest of the graph reads the input's shape. Built once per layer, from the program's own graph:
        the nodes downstream of the probe's add that the logits need, with the add as the input.
        """
        if probe_index not in self._heads:
            self._heads[probe_index] = _cut_head(self.fast, probe_index)
        return self._heads[probe_index]

    def run_head(self, head: torch.fx.GraphModule, activation: torch.Tensor) -> torch.Tensor:
        """The logits from a layer's activation through `head`, in the memory layout the program runs in."""
        return head(self.layout(activation))  # type: ignore[no-any-return]

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """`x` in the memory layout the inference program runs in (channels-last for a 4-D input of a CNN)."""
        return x.contiguous(memory_format=torch.channels_last) if self._channels_last and x.dim() == 4 else x

    def zero_probes(self, batch: int) -> list[torch.Tensor]:
        return [torch.zeros((batch, *shape), device=self.device) for shape in self.layer_shapes]

    def forward(self, x: torch.Tensor, probes: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logits, *activations = self.fast(self.layout(x), tuple(probes))
        return logits, list(activations)

    def parameter_layers(self) -> list[str]:
        """The modules that own parameters, by path (e.g. "model.layer1.0.conv1"), input side first.

        The order is the order the parameters were registered in, which for the usual
        `nn.Module` definitions is the order of the forward pass.
        """
        layers: list[str] = []
        for name, _ in self.module.named_parameters():
            owner = name.rpartition(".")[0]
            if owner not in layers:
                layers.append(owner)
        return layers

    def reinitialized(self, layers: Sequence[str], seed: int) -> TorchRunner:
        """A copy whose named layers (see `parameter_layers`) get freshly drawn parameters; this runner is untouched.

        Each layer is drawn as torch initialises that kind of layer by default, read from its parameter
        shapes: a layer with a weight of two or more dimensions (convolution, linear, embeddings) gets
        U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for every parameter (Kaiming-uniform with a = sqrt(5), as
        `reset_parameters` does), fan_in = the weight's elements per output unit; a layer with only
        one-dimensional parameters (a normalisation layer) gets weight 1, bias 0, running mean 0 and
        running variance 1. Layer i of `parameter_layers` draws from its own generator seeded with
        seed + 1 + i, so a layer gets the same values whichever other layers are re-drawn with it:
        re-drawing a growing list of layers is cascading randomisation.
        """
        known = self.parameter_layers()
        unknown = [layer for layer in layers if layer not in known]
        if unknown:
            raise ValueError(f"the program has no parameter layer {unknown[0]!r}")
        module = copy.deepcopy(self.module)
        parameters = dict(module.named_parameters())
        buffers = dict(module.named_buffers())
        with torch.no_grad():
            for layer in layers:
                generator = torch.Generator().manual_seed(seed + 1 + known.index(layer))
                own = {name.rpartition(".")[2]: tensor for name, tensor in parameters.items() if name.rpartition(".")[0] == layer}
                dense = [tensor for tensor in own.values() if tensor.dim() >= 2]
                if dense:
                    fan_in = math.prod(dense[0].shape[1:])
                    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                    for tensor in own.values():
                        tensor.copy_(torch.rand(tensor.shape, generator=generator) * 2 * bound - bound)
                    continue
                for short, tensor in own.items():
                    tensor.fill_(1.0 if short == "weight" else 0.0)
                for name, buffer in buffers.items():
                    owner, _, short = name.rpartition(".")
                    if owner == layer and short in ("running_mean", "running_var", "num_batches_tracked"):
                        buffer.fill_(1 if short == "running_var" else 0)
        runner = copy.copy(self)
        runner.module = module
        runner.fast, runner._channels_last = inference_program(module)
        runner._heads = {}
        return runner


_CONV2D = torch.ops.aten.conv2d.default
_BATCH_NORM = torch.ops.aten.batch_norm.default


def _attribute(module: torch.nn.Module, target: str) -> torch.Tensor:
    value: object = module
    for part in target.split("."):
        value = getattr(value, part)
    assert isinstance(value, torch.Tensor)
    return value


def inference_program(module: torch.nn.Module) -> tuple[torch.nn.Module, bool]:
    """A copy of the program for inference and gradients, and whether it runs channels-last (see the module docstring).

    A BatchNorm is folded when it is eval-mode, the only user of a 2-D convolution, and its statistics and
    the convolution's parameters are constants: BN(conv(x, W, b)) = conv(x, W * s, b * s + t) with
    s = gamma / sqrt(var + eps), t = beta - mean * s, computed in float64. Gradients are the same function's;
    values agree with the exported program to float32 rounding. Tensors not folded are shared, not copied.
    A program with no 2-D convolution (or a module that is not a graph) is returned as it is.
    """
    graph = getattr(module, "graph", None)
    if not isinstance(graph, torch.fx.Graph):
        return module, False
    with warnings.catch_warnings():  # copying torch.export's pytree codegen warns about a deprecated isinstance
        warnings.simplefilter("ignore", FutureWarning)
        fast = torch.fx.GraphModule(module, copy.deepcopy(graph))
    graph = fast.graph
    convs = [node for node in graph.nodes if node.op == "call_function" and node.target is _CONV2D]
    if not convs:
        return module, False

    def constant(arg: object) -> torch.Tensor | None:
        if arg is None:
            return None
        if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
            return _attribute(module, str(arg.target))
        raise LookupError

    for index, conv in enumerate(convs):
        args = list(conv.args) + [None] * max(0, 3 - len(conv.args))
        try:
            weight, bias = constant(args[1]), constant(args[2])
        except LookupError:
            continue
        assert weight is not None
        with torch.no_grad():
            weight, bias = weight.double(), None if bias is None else bias.double()
            users = list(conv.users)
            bn = users[0] if len(users) == 1 else None
            folded = False
            if bn is not None and bn.target is _BATCH_NORM and bn.args[0] is conv and not bn.args[5]:
                try:
                    gamma, beta, mean, var = (constant(arg) for arg in bn.args[1:5])
                except LookupError:
                    gamma = beta = mean = var = None
                if mean is not None and var is not None:
                    scale = torch.rsqrt(var.double() + float(bn.args[7]))
                    if gamma is not None:
                        scale = scale * gamma.double()
                    shift = -mean.double() * scale + (0.0 if beta is None else beta.double())
                    weight = weight * scale.view(-1, 1, 1, 1)
                    bias = shift if bias is None else bias * scale + shift
                    folded = True
            fast.register_buffer(f"_inference_{index}_weight", weight.float().contiguous(memory_format=torch.channels_last))
            if bias is not None:
                fast.register_buffer(f"_inference_{index}_bias", bias.float())
        with graph.inserting_before(conv):
            args[1] = graph.get_attr(f"_inference_{index}_weight")
            args[2] = graph.get_attr(f"_inference_{index}_bias") if bias is not None else None
        conv.args = tuple(args)
        if folded:
            assert bn is not None
            bn.replace_all_uses_with(conv)
            graph.erase_node(bn)
    graph.eliminate_dead_code()
    graph.lint()
    fast.recompile()
    return fast, True


def _cut_head(module: torch.nn.Module, probe_index: int) -> torch.fx.GraphModule | None:
    """See `TorchRunner.head`."""
    graph = getattr(module, "graph", None)
    if not isinstance(graph, torch.fx.Graph):
        return None
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    if len(placeholders) <= 1 + probe_index:
        return None
    probe = placeholders[1 + probe_index]
    # Besides the add, torch.export's input guards may read the probe; they do not lead to the logits.
    adds = [user for user in probe.users if user.op == "call_function" and user.target is torch.ops.aten.add.Tensor]
    if len(adds) != 1:
        return None
    cut = adds[0]
    output = next(node for node in graph.nodes if node.op == "output")
    results = output.args[0]
    if not isinstance(results, (tuple, list)) or not isinstance(results[0], torch.fx.Node):
        return None
    logits = results[0]
    downstream = {cut}
    for node in graph.nodes:  # topological order: users come after what they use
        if any(isinstance(arg, torch.fx.Node) and arg in downstream for arg in node.all_input_nodes):
            downstream.add(node)
    needed: set[torch.fx.Node] = set()
    stack = [logits]
    while stack:
        node = stack.pop()
        if node in needed:
            continue
        needed.add(node)
        if node is cut or node.op == "get_attr":
            continue
        if node not in downstream:
            return None  # the logits read something the activation does not carry
        stack.extend(node.all_input_nodes)
    head = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {cut: head.placeholder("activation")}
    for node in graph.nodes:
        if node in needed and node is not cut:
            env[node] = head.node_copy(node, lambda arg: env[arg])
    head.output(env[logits])
    return torch.fx.GraphModule(module, head)
