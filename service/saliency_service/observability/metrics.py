"""All Prometheus metrics. Names carry units; labels are bounded (rpc, model, method, code, kind).

Recorded at the seams: the API interceptor, the worker pool, and the model's pass observer —
never inside an algorithm.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)

REQUESTS = Counter("saliency_requests_total", "Finished RPCs.", ["rpc", "model", "method", "code"])
REQUEST_SECONDS = Histogram("saliency_request_duration_seconds", "RPC latency.", ["rpc", "model", "method"], buckets=_LATENCY_BUCKETS)
IN_FLIGHT = Gauge("saliency_in_flight_requests", "RPCs being handled now.", ["rpc"])
QUEUE_SECONDS = Histogram("saliency_queue_duration_seconds", "Time a request waits for a worker.", ["rpc"], buckets=_LATENCY_BUCKETS)
REQUEST_IMAGES = Histogram("saliency_request_images", "Images per request.", ["rpc"], buckets=_BATCH_BUCKETS)
MERGED_REQUESTS = Histogram(
    "saliency_dynamic_batch_requests", "Requests served by one engine call (dynamic batching).", ["rpc", "model"], buckets=_BATCH_BUCKETS
)
MODEL_PASSES = Counter("saliency_model_passes_total", "Batched forward/backward passes.", ["model", "kind"])
MODEL_PASS_ITEMS = Counter("saliency_model_pass_items_total", "Items through forward/backward passes.", ["model", "kind"])
PASS_BATCH_SIZE = Histogram("saliency_model_pass_batch_size", "Items per forward/backward pass.", ["model", "kind"], buckets=_BATCH_BUCKETS)
IDLE_WORKERS = Gauge("saliency_idle_workers", "Worker threads with nothing to do now (0 while jobs wait for one).")
ADMITTED_JOBS = Gauge(
    "saliency_admitted_jobs",
    "Jobs holding a place in the work pool: running, queued, or a dynamic batch still gathering. "
    "At workers + max_queue, requests get RESOURCE_EXHAUSTED.",
)
MODEL_READY = Gauge("saliency_model_ready", "1 when the model is loaded and serving, else 0.", ["model"])


def observe_pass(model: str, kind: str, batch: int) -> None:
    """The `PassObserver` given to every loaded model."""
    MODEL_PASSES.labels(model, kind).inc()
    MODEL_PASS_ITEMS.labels(model, kind).inc(batch)
    PASS_BATCH_SIZE.labels(model, kind).observe(batch)
