"""The benchmark's figures and the markdown section made from them, with issue 7's targets checked."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime
import torch
from benchmarks import peers as peer_library
from benchmarks.measure import Timing

#: Rounds of 1 client then 8 clients in the throughput figure (the median of each is reported).
THROUGHPUT_ROUNDS = 3
#: Seconds of quiet before each timed call where in-process and gRPC calls alternate.
SETTLE_SECONDS = 0.02
STREAM_ROUNDS = 4
STREAM_BLOCK = 10


@dataclass
class Row:
    model: str
    batch: int
    what: str
    params: str
    explain: Timing | None = None
    method_only: Timing | None = None
    peer: str = ""
    peer_time: Timing | None = None
    note: str = ""


@dataclass(frozen=True)
class CallTimes:
    """p50 seconds of the three alternated calls, and gRPC's own cost per call (client wall time minus the server's timed work)."""

    local: float
    remote: float
    forward: float
    cost: float
    calls: int

    @property
    def overhead(self) -> float:
        """gRPC's p50 over the in-process p50, minus 1."""
        return self.remote / self.local - 1

    @property
    def share(self) -> float:
        """gRPC's own cost as a share of the in-process p50."""
        return max(self.cost, 0.0) / self.local


@dataclass(frozen=True)
class GrpcTiming:
    model: str
    batch: int
    stream: CallTimes
    """Calls back to back, in alternated blocks (how a pipeline that keeps the server busy sees it)."""
    idle: CallTimes
    """Each call after a pause long enough for every thread to sleep (how an occasional caller sees it)."""


@dataclass
class Report:
    forward: dict[tuple[str, int], float] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    scores: list[tuple[str, int, str, int, float, float]] = field(default_factory=list)
    """model, batch, metric, steps, seconds, floor seconds."""
    completeness: list[tuple[str, int, float, float | None]] = field(default_factory=list)
    grpc: list[GrpcTiming] = field(default_factory=list)
    """Explain grad_cam in-process and through gRPC, with the forward pass, in a stream and after idle pauses."""
    concurrency: list[tuple[str, float, float]] = field(default_factory=list)
    suite: list[tuple[str, int, str, Timing | None, Timing | None, str]] = field(default_factory=list)
    """model, batch, metric, Score time, metric-only time (both None: not run), and the peer's name or why it did not run."""
    profiles: list[str] = field(default_factory=list)


def _ratio(value: float, unit: float) -> str:
    return f"{value / unit:.2f}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _device(args: argparse.Namespace) -> str:
    """Where the models and peers ran (`--gpu`), and in what precision (`--float16`)."""
    precision = "; our ONNX graphs in float16" if getattr(args, "float16", False) else ""
    if getattr(args, "gpu", False):
        return f"Device: {torch.cuda.get_device_name()} (onnxruntime's CUDA provider, torch and the peers on CUDA){precision}."
    return f"Device: the CPU{precision}."


def render(report: Report, args: argparse.Namespace, load: tuple[float, float], elapsed: float) -> str:
    peers = ", ".join(f"{name} {version}" for name, version in peer_library.versions().items()) or "none installed"
    lines = [
        f"### Issue 7 benchmark, {datetime.date.today().isoformat()}: every method, Score metric, gRPC and peers",
        "",
        f"Machine: {_cpu_name()}, {os.cpu_count()} cores, {args.threads} threads for torch and onnxruntime; "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, Python {platform.python_version()}; peers: {peers}. "
        f"Load average (1 min) {load[0]:.1f} at the start, {load[1]:.1f} at the end (other processes were running); "
        f"{elapsed / 60:.0f} minutes in all. {_device(args)}",
        "",
        "```",
        "PYTHONPATH=service:clients/python:. " + shlex.join([Path(sys.executable).name, "-m", "benchmarks.bench_all", *sys.argv[1:]]),
        "```",
        "",
        "Ratios to the onnxruntime forward pass of the same model and batch (x fwd). Explain: the in-process use case on uint8 "
        "images (decode, prediction, method, resize); method only: `attribute` on the normalised batch with targets given. "
        "ours/peer: our method-only time (Explain where that was not measured) over the peer's, on the same nn.Module, inputs "
        "and targets. Peak MB: the process's resident-set rise during the first call.",
        "",
        "| model | batch | method | params | Explain x fwd | method only x fwd | peak MB | peer | peer x fwd | ours/peer | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ours: dict[tuple[str, int, str], float] = {}
    for (model, batch), forward in report.forward.items():
        lines.append(f"| {model} | {batch} | onnxruntime forward | {forward * 1000:.1f} ms | 1.00 | | | | | | |")
        for row in (r for r in report.rows if r.model == model and r.batch == batch):
            if row.peer_time is not None:
                mine = ours.get((model, batch, row.what))
                versus = f"**{mine / row.peer_time.median:.2f}**" if mine else ""
                lines.append(
                    f"| {model} | {batch} | {row.what} | | | | {row.peer_time.peak_mb:.0f} | {row.peer} | "
                    f"{_ratio(row.peer_time.median, forward)} | {versus} | |"
                )
                continue
            if row.explain is None:
                lines.append(f"| {model} | {batch} | {row.what} | {row.params} | | | | | | | {row.note} |")
                continue
            only = row.method_only
            ours[(model, batch, row.what)] = (only or row.explain).median
            note = row.note + ("; one run" if row.explain.samples == 1 else "")
            lines.append(
                f"| {model} | {batch} | {row.what} | {row.params} | {_ratio(row.explain.median, forward)} | "
                f"{_ratio(only.median, forward) if only else ''} | {row.explain.peak_mb:.0f} | | | | {note.strip('; ')} |"
            )
    lines += [
        "",
        "Score metrics: one pixel row per step (224 steps on 224 px, 128 on `shapes`), a random map; the floor is onnxruntime "
        f"on the same number of images in the model's passes (at most {args.max_batch} images, fewer where a pass would not "
        "fit the memory budget: see the README's Configuration).",
        "",
        "| model | batch | metric | steps | seconds | x its forward passes |",
        "|---|---|---|---|---|---|",
    ]
    for model, batch, metric, steps, seconds, floor in report.scores:
        lines.append(f"| {model} | {batch} | {metric} | {steps} | {seconds:.2f} | {seconds / floor:.2f} |")
    if report.suite:
        lines += [
            "",
            "Every Score metric at its defaults on a supplied seeded random map (a centred box as the mask; `grad_cam` for the "
            "metrics that re-explain), and Quantus on the same inputs where it has the metric. Score: the whole request "
            "through `Engine.score` (decoding, the prediction pass, checks); metric only: the metric on the normalised batch, "
            "as a peer gets it; ours/peer compares the metric only.",
            "",
            "| model | batch | metric | who | Score x fwd | metric only x fwd | seconds | ours/peer |",
            "|---|---|---|---|---|---|---|---|",
        ]
        mine: dict[tuple[str, int, str], float] = {}
        for model, batch, metric, score, only, who in report.suite:
            forward = report.forward[(model, batch)]
            if score is None and only is None:
                lines.append(f"| {model} | {batch} | {metric} | ours | | | | {who} |")
            elif not who:
                assert score is not None
                if only is not None:
                    mine[(model, batch, metric)] = only.median
                only_ratio = _ratio(only.median, forward) if only is not None else ""
                seconds = (only or score).median
                lines.append(f"| {model} | {batch} | {metric} | ours | {_ratio(score.median, forward)} | {only_ratio} | {seconds:.3f} | |")
            else:
                assert only is not None
                ours_time = mine.get((model, batch, metric))
                versus = f"**{ours_time / only.median:.2f}**" if ours_time is not None else ""
                lines.append(f"| {model} | {batch} | {metric} | {who} | | {_ratio(only.median, forward)} | {only.median:.3f} | {versus} |")
    if report.completeness:
        lines += [
            "",
            "Integrated Gradients, 50 steps, zero baseline: completeness error, max over the batch of "
            "abs(sum(attribution) - (f(x) - f(0))) / abs(f(x) - f(0)), f the target logit.",
            "",
            "| model | batch | ours | Captum |",
            "|---|---|---|---|",
        ]
        for model, batch, mine, theirs in report.completeness:
            lines.append(f"| {model} | {batch} | {mine:.2e} | {'' if theirs is None else f'{theirs:.2e}'} |")
    if report.grpc:
        lines += [
            "",
            "Explain grad_cam through gRPC (the `saliency-service serve` process and the Python client, uint8 images) "
            "against the same Explain in-process and the onnxruntime forward pass, timed two ways. Stream: "
            f"{STREAM_ROUNDS} rounds of {STREAM_BLOCK} calls of each of the three back to back (each call sent when the "
            "last returns, as Triton's perf_analyzer times concurrency 1), the blocks alternated. After idle: one call of "
            f"each in turn, each after a {SETTLE_SECONDS * 1000:.0f} ms pause, so that every thread of both processes has "
            "gone to sleep and must be woken. p50 over the calls; x fwd against the forward timed the same way. gRPC's own "
            "cost: per call, the client's wall time minus the work the server timed for it (decode, predict, attribute in "
            "provenance.timings_ms), p50; its share is of the in-process p50.",
            "",
            "| model | batch | timing | in-process p50 ms | gRPC p50 ms | gRPC overhead | gRPC's own cost ms | its share | gRPC x fwd |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for timing in report.grpc:
            for label, times in (("stream", timing.stream), ("after idle", timing.idle)):
                lines.append(
                    f"| {timing.model} | {timing.batch} | {label} | {times.local * 1000:.1f} | {times.remote * 1000:.1f} | "
                    f"{100 * times.overhead:+.1f}% | {times.cost * 1000:.1f} | {100 * times.share:.1f}% | "
                    f"{_ratio(times.remote, times.forward)} |"
                )
    if report.concurrency:
        lines += [
            "",
            "Throughput of Explain grad_cam, one image per request, server with 2 workers: 8 concurrent clients "
            f"against 1, alternated {THROUGHPUT_ROUNDS} times, the median of each; the forward pass's images per second "
            "at each batch size for comparison.",
            "",
            "| model | 1 client req/s | 8 clients req/s | ratio | onnxruntime images/s by batch |",
            "|---|---|---|---|---|",
        ]
        for model, one, eight in report.concurrency:
            curve = ", ".join(f"{b}: {b / f:.0f}" for (m, b), f in sorted(report.forward.items()) if m == model)
            lines.append(f"| {model} | {one:.1f} | {eight:.1f} | {eight / one:.2f} | {curve} |")
    lines += ["", "Reading it, against issue 7's targets (generated from the figures above):", ""]
    lines += [f"- {line}" for line in targets(report, ours)]
    for text in report.profiles:
        lines += ["", text]
    return "\n".join(lines) + "\n"


def targets(report: Report, ours: dict[tuple[str, int, str], float]) -> list[str]:
    out = []

    def verdict(value: float, limit: float, lower_is_better: bool = True) -> str:
        met = value <= limit if lower_is_better else value >= limit
        return "met" if met else f"**not met** by {value / limit:.2f}x" if lower_is_better else f"**not met** ({value / limit:.2f} of it)"

    explain = {(r.model, r.batch, r.what): r.explain.median for r in report.rows if r.explain is not None}
    for (model, batch), forward in sorted(report.forward.items()):
        if model == "resnet50" and (model, batch, "grad_cam") in explain:
            ratio = explain[(model, batch, "grad_cam")] / forward
            out.append(f"grad_cam ResNet-50 batch {batch} in-process: {ratio:.2f}x fwd (target 1.3x): {verdict(ratio, 1.3)}")
    for timing in report.grpc:
        if timing.model == "resnet50":
            ratio = timing.stream.remote / timing.stream.forward
            idle = timing.idle.remote / timing.idle.forward
            out.append(
                f"grad_cam ResNet-50 batch {timing.batch} through gRPC: {ratio:.2f}x fwd in a stream, {idle:.2f}x after idle "
                f"(target 1.5x): {verdict(max(ratio, idle), 1.5)}"
            )
    peer_rows = [r for r in report.rows if r.peer_time is not None and (r.model, r.batch, r.what) in ours]
    limits = {"integrated_gradients": ("Captum", 0.7), "score_cam": ("pytorch-grad-cam", 0.5), "lrp": ("Zennit", 0.5)}
    for row in peer_rows:
        assert row.peer_time is not None
        ratio = ours[(row.model, row.batch, row.what)] / row.peer_time.median
        library, limit = limits.get(row.what, ("", 1.0))
        if library and library.lower() in row.peer.lower():
            extra = ""
            if row.what == "integrated_gradients":
                errors = [(m, t) for mo, b, m, t in report.completeness if (mo, b) == (row.model, row.batch)]
                if errors and errors[0][1] is not None:
                    mine, theirs = errors[0]
                    which = "equal or smaller" if mine <= theirs else "larger"
                    extra = f"; completeness error {mine:.1e} vs Captum's {theirs:.1e} ({which})"
            head = f"{row.what} {row.model} batch {row.batch}: {ratio:.2f}x {row.peer}"
            out.append(f"{head} (target {limit}x): {verdict(ratio, limit)}{extra}")
        else:
            out.append(f"{row.what} {row.model} batch {row.batch}: {ratio:.2f}x {row.peer} (ahead of the peer: {verdict(ratio, 1.0)})")
    for model, batch, metric, steps, seconds, floor in report.scores:
        if steps >= 224:
            ratio = seconds / floor
            head = f"{metric} {model} batch {batch}, {steps} steps: {ratio:.2f}x its forward passes"
            out.append(f"{head} (target 1.2x): {verdict(ratio, 1.2)}")
    for timing in report.grpc:
        stream, idle = timing.stream, timing.idle
        head = (
            f"gRPC overhead {timing.model} batch {timing.batch} (224x224), p50: in a stream {100 * stream.overhead:+.1f}% "
            f"(gRPC's own cost {stream.cost * 1000:.1f} ms, {100 * stream.share:.1f}%); after idle {100 * idle.overhead:+.1f}% "
            f"(own cost {idle.cost * 1000:.1f} ms, {100 * idle.share:.1f}%)"
        )
        out.append(
            f"{head} (target 10%): {verdict(max(stream.overhead, 0), 0.10)} in a stream, {verdict(max(idle.overhead, 0), 0.10)} after idle"
        )
    for model, one, eight in report.concurrency:
        ratio = eight / one
        if model == "shapes":
            out.append(f"8 clients vs 1 on shapes: {ratio:.2f}x the throughput (target 2x): {verdict(ratio, 2.0, lower_is_better=False)}")
        else:
            out.append(f"8 clients vs 1 on {model}: {ratio:.2f}x the throughput (figure to write down; no target)")
    return out
