"""Gradients through a `torch.export` program, loaded without executing code from the file.

The program's signature is `forward(x, probes) -> (logits, *activations)`: each declared layer's
output has a zero probe added and is also returned. The gradient of an objective with respect to a
probe is the gradient with respect to that layer's activation, and autograd walks only the head,
so no hooks are installed at request time and concurrent requests share one module safely.
"""

from __future__ import annotations

import copy
import io
import json
import math
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
        self.device = device
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
            self._heads[probe_index] = _cut_head(self.module, probe_index)
        return self._heads[probe_index]

    def zero_probes(self, batch: int) -> list[torch.Tensor]:
        return [torch.zeros((batch, *shape), device=self.device) for shape in self.layer_shapes]

    def forward(self, x: torch.Tensor, probes: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logits, *activations = self.module(x, tuple(probes))
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
        runner._heads = {}
        return runner


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
