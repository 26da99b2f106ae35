"""Speed of each Explain method on the embedded `shapes` model, as ratios measured in one run.

    .venv/bin/pip install -e '.[peers]'      # Captum, for the peer columns (optional)
    .venv/bin/python benchmarks/bench_explain.py [--batch 32] [--repeats 5] [--out benchmarks/RESULTS.md]

The unit is the onnxruntime forward pass of the same batch on the same machine (ratio 1.0 = one
forward pass). Every method runs through the engine the server uses (decode excluded: images are
pre-normalised), so the numbers include target resolution and post-processing.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from saliency_service.config import EMBEDDED_REPOSITORY
from saliency_service.core.methods import METHODS, MethodInput
from saliency_service.core.metrics import METRICS, MetricInput
from saliency_service.core.models.model import LoadedModel, RuntimeOptions
from saliency_service.core.params import resolve_params
from saliency_service.shapes.generator import HELDOUT_SEED_OFFSET, generate_batch
from saliency_service.shapes.network import preprocess


def _median_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up: allocators, onnxruntime arenas, autograd graph caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="append a markdown table to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = LoadedModel.load(EMBEDDED_REPOSITORY / "shapes", RuntimeOptions(threads=args.threads, prefer_cuda=False))
    images, labels, _ = generate_batch([HELDOUT_SEED_OFFSET + 900_000 + i for i in range(args.batch)])
    x = preprocess(images).numpy()
    targets = labels.astype(np.int64)

    forward = _median_seconds(lambda: model.logits(x), args.repeats)
    rows: list[tuple[str, str, float, str]] = [("onnxruntime forward pass", "", forward, "")]

    cases = {
        "grad_cam": {},
        "eigen_cam": {},
        "saliency": {},
        "integrated_gradients": {"steps": 50},
    }
    for name, params in cases.items():
        method = METHODS.get(name)
        resolved = resolve_params(method.params, params, name)
        layer = model.config.default_layer if method.uses_layer else None
        request = MethodInput(model, x, targets, resolved, layer, 0)
        seconds = _median_seconds(lambda method=method, request=request: method().attribute(request), args.repeats)
        rows.append((name, ", ".join(f"{k}={v}" for k, v in params.items()), seconds, ""))

    for metric_name in ("deletion", "insertion"):
        metric = METRICS.get(metric_name)
        resolved = resolve_params(metric.params, {}, metric_name)
        saliency = np.random.default_rng(0).random((args.batch, 128, 128)).astype(np.float32)
        request = MetricInput(model, x, saliency, targets, resolved, 0)
        seconds = _median_seconds(lambda metric=metric, request=request: metric().score(request), args.repeats)
        passes = 128 * 128 // int(resolved["step"]) + 1
        rows.append(
            (
                f"score {metric_name}",
                f"step={resolved['step']} ({passes} forward passes per image)",
                seconds,
                f"{seconds / (forward * passes):.2f}x its passes",
            )
        )

    rows.extend(_captum_rows(model, x, targets, args.repeats))

    machine = f"{_cpu_name()}, {args.threads} threads, torch {torch.__version__}, batch {args.batch} images 128x128"
    lines = [
        f"### Explain and Score on `shapes` — {machine}",
        "",
        "| what | parameters | median seconds | x onnxruntime forward | note |",
        "|---|---|---|---|---|",
    ]
    for name, params, seconds, note in rows:
        lines.append(f"| {name} | {params} | {seconds:.4f} | {seconds / forward:.1f} | {note} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with args.out.open("a") as out:
            out.write("\n" + table + "\n")


def _captum_rows(model: LoadedModel, x: np.ndarray, targets: np.ndarray, repeats: int) -> list[tuple[str, str, float, str]]:
    """Captum on the same torch program (the peer for gradient methods); skipped when not installed."""
    try:
        from captum.attr import IntegratedGradients, Saliency
    except ImportError:
        print("captum not installed: pip install -e '.[peers]' for the peer rows")
        return []
    program = model.program

    class Forward(torch.nn.Module):
        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            logits, _ = program.forward(inputs, program.zero_probes(len(inputs)))
            return logits

    module = Forward()
    inputs = torch.from_numpy(x)
    target = torch.from_numpy(targets)
    ig = IntegratedGradients(module)
    saliency = Saliency(module)
    return [
        (
            "captum IntegratedGradients",
            "n_steps=50, gausslegendre",
            _median_seconds(lambda: ig.attribute(inputs, target=target, n_steps=50, internal_batch_size=256), repeats),
            "peer of integrated_gradients",
        ),
        ("captum Saliency", "abs=True", _median_seconds(lambda: saliency.attribute(inputs, target=target), repeats), "peer of saliency"),
    ]


if __name__ == "__main__":
    main()
