"""Issue 7's benchmark: every method and Score metric, in-process and through gRPC, against the peers.

    PYTHONPATH=service:clients/python:. .venv-peers/bin/python -m benchmarks.bench_all \\
        --models shapes,resnet18,resnet50 --batch 1,8 [--quick] [--profile] [--out benchmarks/RESULTS.md]

Run with `.venv-peers/bin/python` (`make peers` builds it) for every peer column; with `.venv/bin/python` only
Captum's rows appear. ResNet-18 and ResNet-50 (random weights, `benchmarks/resnet.py`) are exported with the
project's exporter into a temporary model repository next to the embedded `shapes`, and loaded by the
ModelRepository the server uses. The unit of every ratio is the onnxruntime forward pass of the same model
and batch, measured in the same run ("x fwd"). Peers run on the same nn.Module, inputs and targets.

What is timed:
- Explain: `Engine.explain` on uint8 H x W x 3 images, as the servicer calls it (decode, the prediction
  forward pass, the method, resizing); "method only" is the method's `attribute` on the normalised batch
  with targets given, which is what a peer gets. ours/peer uses "method only" where it was measured.
- Each figure is a median over --repeats runs after one warm-up run; a run that takes longer than --slow
  seconds is timed once (its first run is the sample). With --quick, such a method is not repeated at the
  larger batches, and ResNet-50's Score-CAM and Ablation-CAM (2048 forward passes per image) are skipped.
- Memory: the peak rise of the process's resident set (/proc/self/statm, sampled every 2 ms by a thread)
  over its value just before the method's first run, after returning freed heap to the OS (malloc_trim).
  It covers torch, onnxruntime and numpy alike; memory an allocator kept from earlier calls is not counted.
- gRPC: the real `saliency-service serve` in a process of its own (as deployed) on the same repository, called
  by `SaliencyClient`; its time alternates with the same Explain in-process and with the forward pass.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch
from benchmarks import peers as peer_library
from benchmarks import resnet
from benchmarks.measure import measure, measure_alternating
from benchmarks.report import SETTLE_SECONDS, STREAM_BLOCK, STREAM_ROUNDS, THROUGHPUT_ROUNDS, CallTimes, GrpcTiming, Report, Row, render
from tests.e2e.test_serve_process import _free_port, _wait_serving

from saliency_service.config import EMBEDDED_REPOSITORY, ENV_PREFIX
from saliency_service.core.engine import Engine, ExplainJob, ScoreJob
from saliency_service.core.errors import SaliencyError
from saliency_service.core.images import ImageLimits
from saliency_service.core.methods import METHODS, MethodInput
from saliency_service.core.metrics import METRICS, MetricInput
from saliency_service.core.models.export import export_model
from saliency_service.core.models.model import LoadedModel, RuntimeOptions
from saliency_service.core.models.repository import ModelRepository
from saliency_service.core.params import resolve_params
from saliency_service.core.types import RawTensor, TargetRequest
from saliency_service.shapes.generator import HELDOUT_SEED_OFFSET, generate_batch

RESNETS = ("resnet18", "resnet50")
MODELS = ("shapes", *RESNETS)
LAYER = "layer4"
# ResNet-50's layer4 has 2048 channels: one forward pass per channel and image.
PER_CHANNEL = ("score_cam", "ablation_cam")
# The Score metrics issue 7 sets a target for (against their forward passes); every metric is also timed through
# Engine.score by `bench_suite`.
SCORED_METRICS = ("deletion", "insertion")


# ---- the model repository ----


def build_repository(root: Path, models: Sequence[str]) -> dict[str, torch.nn.Module]:
    """`shapes` copied from the embedded repository, the ResNets exported (or reused when `root` has them)."""
    modules: dict[str, torch.nn.Module] = {}
    for name in models:
        if name == "shapes":
            if not (root / name).is_dir():
                shutil.copytree(EMBEDDED_REPOSITORY / name, root / name)
            continue
        modules[name] = resnet.build(name)
        if (root / name / "config.json").is_file():
            continue
        print(f"exporting {name} into {root} ...", file=sys.stderr, flush=True)
        export_model(
            modules[name],
            torch.zeros(1, 3, resnet.IMAGE_SIZE, resnet.IMAGE_SIZE),
            root,
            name,
            labels=[f"class_{i}" for i in range(resnet.CLASSES)],
            layers=[LAYER],
            mean=resnet.MEAN,
            std=resnet.STD,
            description=f"{name} with seeded random weights (benchmarks/resnet.py)",
            overwrite=True,
        )
    return modules


def images_for(name: str, model: LoadedModel, batch: int) -> list[np.ndarray]:
    """uint8 H x W x 3 images: held-out generated shapes, or seeded noise at the model's size."""
    if name == "shapes":
        images, _, _ = generate_batch([HELDOUT_SEED_OFFSET + 900_000 + i for i in range(batch)])
        return [np.asarray(image, dtype=np.uint8) for image in images]
    spec = model.config.input
    rng = np.random.default_rng(batch)
    return [rng.integers(0, 256, (spec.height, spec.width, 3), dtype=np.uint8) for _ in range(batch)]


def raw(image: np.ndarray) -> RawTensor:
    return RawTensor("uint8", tuple(image.shape), image.tobytes())


def normalised(model: LoadedModel, images: Sequence[np.ndarray]) -> np.ndarray:
    spec = model.config.input
    x = np.stack(images).astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


# ---- the plan: which parameters per model ----


def chosen(choice: str, name: str) -> bool:
    """Whether a --methods or --metrics choice ('all', 'none' or comma-separated ids) takes `name`."""
    return choice == "all" or name in choice.split(",")


def method_params(name: str, size: int, quick: bool) -> tuple[dict[str, dict[str, object]], dict[str, str]]:
    """Parameters per method for this model (defaults unless reduced), and a note per reduced or skipped method."""
    params: dict[str, dict[str, object]] = {method: {} for method in METHODS.names()}
    notes: dict[str, str] = {}
    params["integrated_gradients"] = {"steps": 50}
    if size >= 224:
        masks = 200 if quick else 1000
        params["rise"] = {"masks": masks}
        notes["rise"] = f"{masks} masks (default 6000)"
        if quick and name == "resnet50":
            params["occlusion"] = {"window": 32, "stride": 32}
            notes["occlusion"] = "32px window, stride 32 (default 15/8)"
    if quick and name == "resnet50":
        for method in PER_CHANNEL:
            notes[method] = "skipped with --quick: 2048 forward passes per image"
    return params, notes


def _fmt_params(params: dict[str, object]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


# ---- the in-process part ----


def bench_model(
    name: str,
    model: LoadedModel,
    module: torch.nn.Module | None,
    engine: Engine,
    batches: Sequence[int],
    args: argparse.Namespace,
    report: Report,
) -> None:
    size = model.config.input.height
    params, notes = method_params(name, size, args.quick)
    too_slow: dict[str, str] = {}
    for batch in batches:
        print(f"{name} batch {batch} ...", file=sys.stderr, flush=True)
        images = images_for(name, model, batch)
        x = normalised(model, images)
        forward = measure(lambda x=x: model.logits(x), max(args.repeats, 5), args.slow).median
        report.forward[(name, batch)] = forward
        targets = model.logits(x).argmax(axis=1).astype(np.int64)
        if module is not None:
            # The peers get the exported module itself: check the served artifacts compute the same logits.
            with torch.no_grad():
                eager = module(torch.from_numpy(x).to(args.device)).cpu().numpy()
            difference = float(np.abs(eager - model.logits(x)).max())
            if difference > 1e-3 * max(1.0, float(np.abs(eager).max())):
                raise SystemExit(f"{name}: the module and the repository's artifacts differ by {difference:.3g}; delete the repository")
        peers = []
        if module is not None:
            peers = peer_library.peers(
                module, torch.from_numpy(x).to(args.device), torch.from_numpy(targets).to(args.device), params, args.max_batch
            )
        for method_name in METHODS.names():
            if not chosen(args.methods, method_name):
                continue
            method = METHODS.get(method_name)
            if method_name in notes and "skipped" in notes[method_name]:
                report.rows.append(Row(name, batch, method_name, "", note=notes[method_name]))
                continue
            if method_name in too_slow:
                report.rows.append(Row(name, batch, method_name, "", note=too_slow[method_name]))
                continue
            job = ExplainJob(name, [raw(image) for image in images], method_name, params[method_name])
            row = Row(name, batch, method_name, _fmt_params(params[method_name]), note=notes.get(method_name, ""))
            try:
                row.explain = measure(lambda job=job: engine.explain(job), args.repeats, args.slow)
            except SaliencyError as exc:
                row.note = f"not run: {exc.message[:80]}"
                report.rows.append(row)
                continue
            mine = [p for p in peers if p.method == method_name]
            peer_times = []
            if row.explain.median < 1.0 or mine:
                # What a peer is compared with: the method alone, alternating with the peers (one run each when slow).
                resolved = resolve_params(method.params, params[method_name], method_name)
                layer = model.config.default_layer if method.uses_layer else None
                request = MethodInput(model, x, targets, resolved, layer, 0, layers=(layer,) if layer else ())
                row.method_only, *peer_times = measure_alternating(
                    [lambda method=method, request=request: method().attribute(request), *(p.run for p in mine)], args.repeats, args.slow
                )
            report.rows.append(row)
            for peer, timing in zip(mine, peer_times, strict=True):
                report.rows.append(Row(name, batch, method_name, "", peer=peer.name, peer_time=timing))
                if method_name == "integrated_gradients":
                    report.completeness.append(
                        (name, batch, _completeness(model, x, targets, row.explain.result), _completeness(model, x, targets, timing.result))
                    )
            if method_name == "integrated_gradients" and not any(p.method == method_name for p in peers):
                report.completeness.append((name, batch, _completeness(model, x, targets, row.explain.result), None))
            if args.quick and row.explain.samples == 1:
                too_slow[method_name] = f"not repeated at larger batches with --quick ({row.explain.median:.1f} s at batch {batch})"
        for metric_name in SCORED_METRICS:
            if not chosen(args.metrics, metric_name):
                continue
            report.scores.append(_bench_metric(model, metric_name, x, targets, forward, args))
        if args.metrics != "none":
            bench_suite(name, model, module, engine, images, x, targets, args, report)


def bench_suite(
    name: str,
    model: LoadedModel,
    module: torch.nn.Module | None,
    engine: Engine,
    images: Sequence[np.ndarray],
    x: np.ndarray,
    targets: np.ndarray,
    args: argparse.Namespace,
    report: Report,
) -> None:
    """Every Score metric through `Engine.score` at its defaults (as Score serves it), and Quantus where it has the metric.

    The request supplies a seeded random map and, for localisation metrics, a centred box as the ground-truth mask;
    metrics that re-explain name `grad_cam`, and contrastive ones name a foil. A
    metric that does not apply to the model (the grid pointing game needs a grid model) is noted, not timed.
    Targets are the predicted classes; the foil is the lowest class no image predicts (see below where there is none).
    """
    spec = model.config.input
    batch = len(images)
    rng = np.random.default_rng(7)
    maps = rng.random((batch, spec.height, spec.width)).astype(np.float32)
    masks = np.zeros((batch, spec.height, spec.width), dtype=bool)
    masks[:, spec.height // 4 : 3 * spec.height // 4, spec.width // 4 : 3 * spec.width // 4] = True
    # The foil must differ from every item's target: the lowest class no image predicts, or where every class is
    # predicted by some image (shapes, batch 8), contrastive metrics explain class 0 against class 1 for all.
    free = set(range(model.config.num_classes)) - {int(t) for t in targets}
    foil, foil_target = (min(free), None) if free else (1, 0)
    metric_peers: list[peer_library.MetricPeer] = []
    if not args.no_quantus:
        metric_peers = peer_library.metric_peers(
            module,
            torch.from_numpy(x),
            torch.from_numpy(targets),
            torch.from_numpy(maps),
            torch.from_numpy(masks),
            args.max_batch,
            str(args.device),
        )
    for metric_name in METRICS.names():
        if not chosen(args.metrics, metric_name):
            continue
        cls = METRICS.get(metric_name)
        job = ScoreJob(
            name,
            [raw(image) for image in images],
            metric_name,
            method="grad_cam" if cls.needs_method else "",
            saliency=() if cls.needs_method else [RawTensor("float32", m.shape, m.tobytes()) for m in maps],
            target=TargetRequest(class_index=foil_target) if cls.needs_foil and foil_target is not None else None,
            foil=TargetRequest(class_index=foil) if cls.needs_foil else None,
            masks=[RawTensor("uint8", m.shape, m.astype(np.uint8).tobytes()) for m in masks] if cls.needs_masks else (),
        )
        try:
            timing = measure(lambda job=job: engine.score(job), args.repeats, args.slow)
        except SaliencyError as exc:
            report.suite.append((name, batch, metric_name, None, None, f"not run: {exc.message[:90]}"))
            continue
        only = None
        if not cls.needs_method:  # the metric alone, on the normalised batch, as a peer gets it
            request = MetricInput(
                model,
                x,
                maps,
                np.full(batch, foil_target) if cls.needs_foil and foil_target is not None else targets,
                resolve_params(cls.params, {}, metric_name),
                0,
                masks=masks if cls.needs_masks else None,
                foils=np.full(batch, foil) if cls.needs_foil else None,
            )
            only = measure(lambda request=request, cls=cls: cls().score(request), args.repeats, args.slow)
        report.suite.append((name, batch, metric_name, timing, only, ""))
        for peer in (p for p in metric_peers if p.metric == metric_name):
            report.suite.append((name, batch, metric_name, None, measure(peer.run, args.repeats, args.slow), peer.name))


def _completeness(model: LoadedModel, x: np.ndarray, targets: np.ndarray, result: Any) -> float:
    """max over items of |sum(attribution) - (f(x) - f(0))| / |f(x) - f(0)|, f the target logit (zero baseline)."""
    if isinstance(result, torch.Tensor):
        sums = result.detach().cpu().double().reshape(len(x), -1).sum(dim=1).numpy()
    else:
        sums = np.asarray([float(np.asarray(e.saliency, dtype=np.float64).sum()) for e in result])
    rows = np.arange(len(x))
    gap = model.logits(x)[rows, targets].astype(np.float64) - model.logits(np.zeros_like(x))[rows, targets]
    return float(np.max(np.abs(sums - gap) / np.maximum(np.abs(gap), 1e-12)))


def _bench_metric(
    model: LoadedModel, metric_name: str, x: np.ndarray, targets: np.ndarray, forward: float, args: argparse.Namespace
) -> tuple[str, int, str, int, float, float]:
    """Deletion/insertion with one image row of pixels per step (224 steps on 224 px), against its forward passes."""
    spec = model.config.input
    metric = METRICS.get(metric_name)
    resolved = resolve_params(metric.params, {"step": spec.width}, metric_name)
    saliency = np.random.default_rng(0).random((len(x), spec.height, spec.width)).astype(np.float32)
    request = MetricInput(model, x, saliency, targets, resolved, 0)
    steps = spec.height * spec.width // spec.width
    images = len(x) * (steps + 1)
    # The floor: onnxruntime on that many images, in batches as large as the metric's, timed alternately with the
    # metric so that load from other processes falls on both alike.
    chunk = min(images, model.max_batch)
    probe = np.random.default_rng(1).standard_normal((chunk, 3, spec.height, spec.width)).astype(np.float32)

    def floor_run() -> None:
        for start in range(0, images, chunk):
            model.logits(probe[: min(chunk, images - start)])

    timing, floor = measure_alternating([lambda: metric().score(request), floor_run], args.repeats, args.slow * 10)
    return (model.name, len(x), metric_name, steps, timing.median, floor.median)


# ---- through gRPC ----


@contextmanager
def serving_process(root: Path, args: argparse.Namespace, log: Path) -> Iterator[str]:
    """The real `saliency-service serve` on 127.0.0.1 in its own process, as it is deployed: its Python (and GIL) is
    not the client's, so the client's encoding and decoding do not hold up the server's threads. Yields the address."""
    port = _free_port()
    settings = {
        "model_repository": root,
        "host": "127.0.0.1",
        "port": port,
        "metrics_port": 0,
        "workers": 2,
        "torch_threads": args.threads,
        "onnx_threads": args.threads,
        "onnx_max_batch": args.max_batch,
        "prefer_cuda": str(args.gpu).lower(),
        "float16": str(args.float16).lower(),
        "log_level": "WARNING",
    }
    env = {**os.environ, **{f"{ENV_PREFIX}{key.upper()}": str(value) for key, value in settings.items()}}
    address = f"127.0.0.1:{port}"
    with log.open("wb") as output:
        process = subprocess.Popen([sys.executable, "-m", "saliency_service", "serve"], env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            try:
                _wait_serving(address, process, timeout=600)
            except (RuntimeError, TimeoutError) as exc:
                raise RuntimeError(f"{exc}; its log: {log}") from None
            yield address
        finally:
            process.terminate()
            process.wait(timeout=120)


def bench_grpc(
    address: str, engine: Engine, models: dict[str, LoadedModel], batches: Sequence[int], args: argparse.Namespace, report: Report
) -> None:
    from saliency_client import SaliencyClient

    with SaliencyClient(address, timeout=600) as client:
        for name, model in models.items():
            if model.config.input.height < 224:
                continue
            for batch in batches:
                print(f"gRPC {name} batch {batch} ...", file=sys.stderr, flush=True)
                images = images_for(name, model, batch)
                job = ExplainJob(name, [raw(image) for image in images], "grad_cam")
                engine.explain(job)
                client.explain(name, images, method="grad_cam")
                x = normalised(model, images)
                # The forward pass (the unit of "x fwd"), Explain in-process and Explain through gRPC, timed two ways:
                # - a stream: blocks of STREAM_BLOCK calls, each sent when the last returns (as Triton's perf_analyzer
                #   times concurrency 1), the three's blocks alternated for STREAM_ROUNDS rounds;
                # - after idle: one call of each in turn, each after a SETTLE_SECONDS pause, so that every thread of
                #   both processes has gone to sleep (and one's spinning OpenMP threads cannot slow the next).
                # The server's own timed work per call (decode, predict, attribute: provenance.timings_ms) is kept too:
                # the wall time beyond it is what gRPC itself costs, whatever the speed of either process at the time.
                stream = _alternated(model, engine, client, job, x, images, rounds=STREAM_ROUNDS, block=STREAM_BLOCK, pause=0.0)
                idle = _alternated(model, engine, client, job, x, images, rounds=max(20, 4 * args.repeats), block=1, pause=SETTLE_SECONDS)
                report.grpc.append(GrpcTiming(name, batch, stream, idle))
        for name, model in models.items():
            print(f"concurrency {name} ...", file=sys.stderr, flush=True)
            image = images_for(name, model, 1)
            total = 120 if name == "shapes" else 24
            one, eight = [], []
            for _ in range(THROUGHPUT_ROUNDS):  # alternated, so that a slow spell of the machine falls on both
                one.append(_throughput(address, name, image, 1, total))
                eight.append(_throughput(address, name, image, 8, total))
            report.concurrency.append((name, statistics.median(one), statistics.median(eight)))


def _alternated(
    model: LoadedModel,
    engine: Engine,
    client: Any,
    job: ExplainJob,
    x: np.ndarray,
    images: list[np.ndarray],
    *,
    rounds: int,
    block: int,
    pause: float,
) -> CallTimes:
    """p50s of the forward pass, Explain in-process and through gRPC: `rounds` rounds of `block` calls of each in turn,
    `pause` seconds before every call; and gRPC's own cost (wall time minus the server's timed work), p50."""
    local: list[float] = []
    remote: list[float] = []
    forward: list[float] = []
    served: list[float] = []
    calls = (
        (forward, partial(model.logits, x)),
        (local, partial(engine.explain, job)),
        (remote, partial(_explain_remote, client, job.model, images, served)),
    )
    for _ in range(rounds):
        for times, call in calls:
            for _ in range(block):
                if pause:
                    time.sleep(pause)
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
    cost = statistics.median(wall - work for wall, work in zip(remote, served, strict=True))
    return CallTimes(statistics.median(local), statistics.median(remote), statistics.median(forward), cost, len(remote))


def _explain_remote(client: Any, model: str, images: list[np.ndarray], served: list[float]) -> None:
    """Explain grad_cam through the client; appends the seconds of work the server timed for the call."""
    explanations = client.explain(model, images, method="grad_cam")
    served.append(sum(explanations[0].provenance.timings_ms.values()) / 1000)


def _throughput(address: str, model: str, image: list[np.ndarray], clients: int, total: int) -> float:
    """Requests per second when `clients` threads, each with its own channel, send `total` Explain grad_cam calls in all."""
    from saliency_client import SaliencyClient

    per_client = max(1, total // clients) if clients > 1 else total
    channels = [SaliencyClient(address, timeout=600) for _ in range(clients)]
    try:
        for channel in channels:
            channel.explain(model, image, method="grad_cam")
        barrier = threading.Barrier(clients + 1)

        def work(channel: Any) -> None:
            barrier.wait()
            for _ in range(per_client):
                channel.explain(model, image, method="grad_cam")

        threads = [threading.Thread(target=work, args=(channel,)) for channel in channels]
        for thread in threads:
            thread.start()
        barrier.wait()
        start = time.perf_counter()
        for thread in threads:
            thread.join()
        return clients * per_client / (time.perf_counter() - start)
    finally:
        for channel in channels:
            channel.close()


# ---- profile ----


def profile(engine: Engine, model: LoadedModel, name: str, methods: Sequence[str], calls: int) -> list[str]:
    """cProfile (where Python time goes, onnxruntime's run included) and torch.profiler (which aten ops) per method."""
    out = []
    images = images_for(name, model, 1)
    for method in methods:
        job = ExplainJob(name, [raw(image) for image in images], method)
        engine.explain(job)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            engine.explain(job)
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(12)
        lines = [line for line in text.getvalue().splitlines() if line.strip()][-14:]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as torch_profile:
            engine.explain(job)
        ops = torch_profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=10)
        out.append(
            f"#### Profile: Explain {method} on {name}, batch 1 ({calls} call{'s' if calls > 1 else ''}, cProfile by own time)\n\n```\n"
            + "\n".join(lines)
            + f"\n```\n\ntorch.profiler, one call, top aten ops by self CPU time:\n\n```\n{ops}\n```\n"
        )
    return out


# ---- the report ----


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--methods", default="all", help="'all' or comma-separated method ids (others are not run)")
    parser.add_argument("--metrics", default="all", help="'all', 'none' or comma-separated Score metric ids (both Score tables)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, reduced perturbation methods, slow methods once")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per figure (default 5, 3 with --quick)")
    parser.add_argument("--slow", type=float, default=2.0, help="a first run longer than this many seconds is the only sample")
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads")
    parser.add_argument("--max-batch", type=int, default=64, help="images per forward/backward pass (the server's onnx_max_batch)")
    parser.add_argument("--repository", type=Path, default=None, help="keep the exported models here and reuse them (default: a temp dir)")
    parser.add_argument("--no-grpc", action="store_true", help="skip the gRPC and concurrency part")
    parser.add_argument("--no-quantus", action="store_true", help="time our Score metrics without Quantus beside them")
    parser.add_argument("--profile", action="store_true", help="profile Explain grad_cam, lrp (largest model), score_cam (resnet18)")
    parser.add_argument("--out", type=Path, default=None, help="append the dated section to this markdown file")
    parser.add_argument("--gpu", action="store_true", help="onnxruntime's CUDA provider and torch on the GPU, ours and the peers'")
    parser.add_argument("--float16", action="store_true", help="our ONNX graphs in half precision (the server's `float16` setting)")
    args = parser.parse_args()
    args.repeats = args.repeats or (3 if args.quick else 5)
    names = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    batches = [int(b) for b in args.batch.split(",")]
    if args.gpu and not (torch.cuda.is_available() and "CUDAExecutionProvider" in onnxruntime.get_available_providers()):
        parser.error("--gpu needs onnxruntime's CUDA provider (onnxruntime-gpu) and a CUDA build of torch")
    args.device = torch.device("cuda" if args.gpu else "cpu")
    torch.set_num_threads(args.threads)
    started, load_start = time.perf_counter(), os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="bench-repository-") as temporary:
        root = args.repository or Path(temporary)
        root.mkdir(parents=True, exist_ok=True)
        modules = {name: module.to(args.device) for name, module in build_repository(root, names).items()}
        options = RuntimeOptions(max_batch=args.max_batch, threads=args.threads, prefer_cuda=args.gpu, float16=args.float16)
        repository = ModelRepository(root, options)
        repository.load_all()
        engine = Engine(repository, ImageLimits(max_images=max(64, *batches)))
        models = {name: repository.get(name) for name in names}
        report = Report()
        for name in names:
            bench_model(name, models[name], modules.get(name), engine, batches, args, report)
        if not args.no_grpc:
            with serving_process(root, args, root / "bench-server.log") as address:
                bench_grpc(address, engine, models, batches, args, report)
        if args.profile:
            largest = max(names, key=lambda n: (models[n].config.input.height, n))
            report.profiles = profile(engine, models[largest], largest, ("grad_cam", "lrp"), calls=3)
            if "resnet18" in models:  # where Score-CAM's time goes, against its floor of one pass per live channel
                report.profiles += profile(engine, models["resnet18"], "resnet18", ("score_cam",), calls=1)

    text = render(report, args, (load_start, os.getloadavg()[0]), time.perf_counter() - started)
    print(text)
    if args.out:
        with args.out.open("a") as out:
            out.write("\n" + text)


if __name__ == "__main__":
    main()
