"""Load against the real `saliency-service serve` process, then SIGTERM while it is still loaded.

16 clients, each on its own channel, send a mix of Explain (grad_cam), Score (deletion), Verbalize
(grid_regions) and ModelInfer on `shapes` for 60 s (RELIABILITY_FULL=1) or 10 s (CI). The server has
workers + max_queue >= 16, so every call must succeed. Its resident memory (VmRSS of the server process,
/proc/<pid>/status) must grow by less than 10% between the end of the warm-up and the end of the run.
Then, with the clients still sending, SIGTERM: calls in flight finish OK, later calls are refused, exit 0.
Draining is tested on purpose, not by the luck of timing: one long ScoreStream (deletion, step 8: about 2,000
forward passes) is started at the end of the load, and SIGTERM is sent only once its first progress event
has arrived, so the server is surely working on it; it must still end with its response.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from saliency.oip import grpc_predict_v2_pb2 as oip
from saliency.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from saliency.v1 import saliency_service_pb2 as pb
from saliency.v1 import saliency_service_pb2_grpc as pb_grpc
from saliency_service.shapes.generator import HELDOUT_SEED_OFFSET, generate
from tests.e2e.test_serve_process import _free_port, _wait_serving

from .common import FULL, SUMMARY

CLIENTS = 16
DURATION = 60.0 if FULL else 12.0
WARMUP = 10.0 if FULL else 5.0
"""RSS is compared from the end of the warm-up (allocator arenas, onnxruntime and torch caches filled) to the end."""
RSS_GROWTH_LIMIT = 0.10
CALL_TIMEOUT = 120.0
WORKERS = 4
MAX_QUEUE = 16
DRAIN_MARGIN = 0.1
"""A call sent this long before SIGTERM is surely at the server: it must finish OK. One sent within the margin
either side of the signal may be served or refused; one sent after it must be refused."""
REFUSE_AFTER = 0.5
LONG_STEP = 8
"""The drain probe's deletion step: 128 x 128 / 8 = 2,048 perturbation passes, seconds of work on this server."""

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@dataclass
class Outcome:
    rpc: str
    started: float
    ended: float
    code: str


@dataclass
class Record:
    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)


class ServeProcess:
    def __init__(self, tmp: Path) -> None:
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "SALIENCY_HOST": "127.0.0.1",
            "SALIENCY_METRICS_PORT": "0",
            "SALIENCY_WORKERS": str(WORKERS),
            "SALIENCY_MAX_QUEUE": str(MAX_QUEUE),
            "SALIENCY_GRACE_SECONDS": "60",
            "SALIENCY_TORCH_THREADS": "1",
            "SALIENCY_ONNX_THREADS": "1",
            "SALIENCY_LOG_LEVEL": "WARNING",
        }
        self.log_path = tmp / "server.log"
        self.log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "saliency_service", "serve", "--port", str(self.port)],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        _wait_serving(self.address, self.process)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    process = ServeProcess(tmp_path_factory.mktemp("load"))
    yield process
    process.stop()


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _calls(channel: grpc.Channel) -> list[tuple[str, Callable[[], object]]]:
    saliency = pb_grpc.SaliencyServiceStub(channel)
    inference = oip_grpc.GRPCInferenceServiceStub(channel)
    images = [generate(HELDOUT_SEED_OFFSET + 7000 + i).image for i in range(2)]
    encoded = [pb.Image(encoded=_png(image)) for image in images]
    mean, std = np.array([0.5, 0.5, 0.498], np.float32), np.array([0.246, 0.245, 0.244], np.float32)
    x = np.stack([((image.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1) for image in images]).astype("<f4")
    explain = pb.ExplainRequest(model="shapes", method="grad_cam", images=encoded[:1])
    score = pb.ScoreRequest(model="shapes", metric="deletion", method="grad_cam", images=encoded[:1])
    score.metric_params.update({"step": 512})
    verbalize = pb.VerbalizeRequest(model="shapes", method="grad_cam", template="grid_regions", images=encoded[:1])
    infer = oip.ModelInferRequest(model_name="shapes", raw_input_contents=[x.tobytes()])
    infer.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    infer.outputs.add(name="logits")
    return [
        ("Explain", lambda: saliency.Explain(explain, timeout=CALL_TIMEOUT)),
        ("Score", lambda: saliency.Score(score, timeout=CALL_TIMEOUT)),
        ("Verbalize", lambda: saliency.Verbalize(verbalize, timeout=CALL_TIMEOUT)),
        ("ModelInfer", lambda: inference.ModelInfer(infer, timeout=CALL_TIMEOUT)),
    ]


def _client(index: int, address: str, record: Record, stop: threading.Event, give_up_at: float) -> None:
    """Send calls back to back until told to stop, or until the server refuses one after SIGTERM."""
    with grpc.insecure_channel(address) as channel:
        calls = _calls(channel)
        i = index
        while not stop.is_set() and time.monotonic() < give_up_at:
            rpc, call = calls[i % len(calls)]
            i += 1
            started = time.monotonic()
            try:
                call()
                code = "OK"
            except grpc.RpcError as error:
                code = error.code().name  # type: ignore[attr-defined]
            record.add(Outcome(rpc, started, time.monotonic(), code))
            if code == "UNAVAILABLE":
                return


@dataclass
class Probe:
    """The long ScoreStream that is mid-run when SIGTERM comes."""

    running: threading.Event = field(default_factory=threading.Event)
    outcome: Outcome | None = None
    progress_events: int = 0
    answered: bool = False


def _long_score(address: str, probe: Probe) -> None:
    image = generate(HELDOUT_SEED_OFFSET + 7100).image
    request = pb.ScoreRequest(model="shapes", metric="deletion", method="grad_cam", images=[pb.Image(encoded=_png(image))])
    request.metric_params.update({"step": LONG_STEP})
    with grpc.insecure_channel(address) as channel:
        started = time.monotonic()
        try:
            for event in pb_grpc.SaliencyServiceStub(channel).ScoreStream(request, timeout=CALL_TIMEOUT):
                if event.HasField("progress"):
                    probe.progress_events += 1
                    probe.running.set()
                else:
                    probe.answered = len(event.response.results) == 1
            code = "OK"
        except grpc.RpcError as error:
            code = error.code().name
        probe.outcome = Outcome("ScoreStream", started, time.monotonic(), code)
        probe.running.set()  # never leave the test waiting


def test_sixteen_clients_then_sigterm_under_load(serve: ServeProcess) -> None:
    pid = serve.process.pid
    record = Record()
    stop = threading.Event()
    began = time.monotonic()
    give_up_at = began + DURATION + 180.0  # every loop is bounded in time as well
    threads = [threading.Thread(target=_client, args=(i, serve.address, record, stop, give_up_at), daemon=True) for i in range(CLIENTS)]
    rss_start = rss_bytes(pid)
    for thread in threads:
        thread.start()
    time.sleep(WARMUP)
    rss_warm = rss_bytes(pid)
    rss_samples = [rss_warm]
    while time.monotonic() - began < DURATION:
        time.sleep(1.0)
        rss_samples.append(rss_bytes(pid))
    rss_end = rss_bytes(pid)
    load_end = time.monotonic()

    # SIGTERM with the 16 clients still sending and the long probe running at the server.
    probe = Probe()
    probe_thread = threading.Thread(target=_long_score, args=(serve.address, probe), daemon=True)
    probe_thread.start()
    assert probe.running.wait(timeout=CALL_TIMEOUT), "the long ScoreStream sent no progress event"
    assert probe.outcome is None, f"the long ScoreStream ended before SIGTERM: {probe.outcome}"
    # The signal's time is bracketed: the test's own threads hold the GIL in turns, so a single reading after
    # send_signal may come late by several switch intervals.
    signal_sent = time.monotonic()
    serve.process.send_signal(signal.SIGTERM)
    sigterm_at = time.monotonic()
    for thread in [*threads, probe_thread]:
        thread.join(timeout=120)
    stop.set()
    exit_code = serve.process.wait(timeout=120)
    drained_at = time.monotonic()

    loaded = [o for o in record.outcomes if o.ended <= load_end]
    after_warmup = [o for o in loaded if o.started >= began + WARMUP]
    failures = Counter(o.code for o in loaded if o.code != "OK")
    in_flight = [o for o in record.outcomes if o.started < signal_sent - DRAIN_MARGIN and o.ended > sigterm_at]
    late = [o for o in record.outcomes if o.started > sigterm_at + REFUSE_AFTER]
    around = [o for o in record.outcomes if signal_sent - DRAIN_MARGIN <= o.started <= sigterm_at + REFUSE_AFTER]
    latencies = np.array([o.ended - o.started for o in after_warmup if o.code == "OK"]) * 1000
    per_rpc = {
        rpc: np.array([o.ended - o.started for o in after_warmup if o.rpc == rpc and o.code == "OK"]) * 1000
        for rpc in ("Explain", "Score", "Verbalize", "ModelInfer")
    }
    growth = (rss_end - rss_warm) / rss_warm
    mib = 1024 * 1024
    SUMMARY.add(
        f"load: {CLIENTS} clients x {DURATION:.0f} s on the real serve process (workers {WORKERS}, max_queue {MAX_QUEUE}): "
        f"{len(loaded)} requests ({len(loaded) / DURATION:.1f}/s), failures {dict(failures) or 0}"
    )
    SUMMARY.add(
        f"  latency after {WARMUP:.0f} s warm-up: p50 {np.percentile(latencies, 50):.0f} ms, p99 {np.percentile(latencies, 99):.0f} ms; "
        + "; ".join(
            f"{rpc} n={len(v)} p50 {np.percentile(v, 50):.0f} p99 {np.percentile(v, 99):.0f}" for rpc, v in per_rpc.items() if len(v)
        )
    )
    SUMMARY.add(
        f"  server RSS: start {rss_start / mib:.0f} MiB, end of warm-up {rss_warm / mib:.0f} MiB, end {rss_end / mib:.0f} MiB "
        f"(growth {100 * growth:+.1f}%, max {max(rss_samples) / mib:.0f} MiB; per 10 s: "
        f"{' '.join(f'{v / mib:.0f}' for v in rss_samples[::10])})"
    )
    SUMMARY.add(
        f"  SIGTERM under load: {len(in_flight)} in-flight calls finished "
        f"{dict(Counter(o.code for o in in_flight))}, {len(around)} sent within {DRAIN_MARGIN}/{REFUSE_AFTER} s of it "
        f"{dict(Counter(o.code for o in around))}, {len(late)} later calls {dict(Counter(o.code for o in late))}, "
        f"exit code {exit_code} after {drained_at - sigterm_at:.1f} s"
    )
    long_call = probe.outcome
    assert long_call is not None, "the long ScoreStream never ended"
    SUMMARY.add(
        f"  drain probe: ScoreStream deletion step {LONG_STEP}, {probe.progress_events} progress events, "
        f"{signal_sent - long_call.started:.1f} s in at SIGTERM, ended {long_call.code} {long_call.ended - sigterm_at:.1f} s after it"
    )

    assert not failures, f"failures under load: {failures}"
    assert set(per_rpc) == {o.rpc for o in after_warmup}, "every RPC of the mix ran"
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew {100 * growth:.1f}% ({rss_warm} -> {rss_end} bytes)"
    assert long_call.code == "OK" and probe.answered, f"the call running at SIGTERM was not drained: {long_call}"
    assert long_call.ended > sigterm_at, "the long ScoreStream ended before SIGTERM; the test did not test draining"
    assert all(o.code == "OK" for o in in_flight), Counter(o.code for o in in_flight)
    assert all(o.code == "UNAVAILABLE" for o in late), Counter(o.code for o in late)
    assert all(o.code in ("OK", "UNAVAILABLE") for o in around), Counter(o.code for o in around)
    assert any(o.started > sigterm_at and o.code == "UNAVAILABLE" for o in record.outcomes), "no new call was refused after SIGTERM"
    assert exit_code == 0
    # After exit, nothing answers.
    with pytest.raises(grpc.RpcError):
        with grpc.insecure_channel(serve.address) as channel:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
