"""Forward passes through onnxruntime, CUDA when it loads, CPU otherwise.

Two ways in. `run` takes and returns numpy arrays (host memory). `run_tensors` takes a torch tensor and
returns torch tensors on that tensor's device through onnxruntime's I/O binding: the input is read where
it lies and every output is written straight into a torch tensor, so on CUDA a batch made on the GPU
(Score-CAM's masked images) and its logits never cross to the host. On the CPU the same binding reads
and writes the torch tensors' own memory.

`float16` converts the graph's weights and arithmetic to half precision when the session is made
(onnxruntime's own converter, inputs and outputs kept float32); where a provider has no half-precision
kernel for an op (most of the CPU provider's), onnxruntime casts around it and runs the float32 kernel.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnxruntime as ort
import torch

from saliency_service.core.errors import FailedPrecondition, ResourceExhausted
from saliency_service.core.models.memory import is_out_of_memory

log = logging.getLogger(__name__)
T = TypeVar("T")


def float16_graph(path: Path) -> bytes:
    """The ONNX model at `path` with float32 weights and activations turned to float16; its inputs and outputs stay float32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
    return bytes(model.SerializeToString())


class OnnxRunner:
    """One onnxruntime session; both ways in split large batches into chunks of `max_batch`.

    A chunk that runs out of memory is halved, for this call and the ones after, and run again (`_chunked`).
    """

    def __init__(self, path: Path, *, max_batch: int = 256, threads: int = 0, prefer_cuda: bool = True, float16: bool = False) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        # Idle onnxruntime threads otherwise spin for a while after each run and take the cores from the
        # torch pass that follows (measured: a ResNet-50 torch forward 102 ms right after a run, 62 ms
        # with spinning off, and onnxruntime no slower).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if prefer_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            graph: str | bytes = float16_graph(path) if float16 else str(path)
            self.session = ort.InferenceSession(graph, sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
            raise FailedPrecondition("ONNX_LOAD_FAILED", f"cannot load ONNX model {path}: {exc}", {"path": str(path)}) from None
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [output.name for output in self.session.get_outputs()]
        self.providers = self.session.get_providers()
        self.max_batch = max_batch
        self.float16 = float16

    @property
    def device(self) -> str:
        return "cuda" if self.providers and self.providers[0] == "CUDAExecutionProvider" else "cpu"

    def run(self, x: np.ndarray, outputs: Sequence[str]) -> list[np.ndarray]:
        """Run the graph on a float32 N x C x H x W batch and return the named outputs."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        chunks = self._chunked(len(x), lambda start, end: self.session.run(list(outputs), {self.input_name: x[start:end]}))
        if len(chunks) == 1:
            return list(chunks[0])
        return [np.concatenate([chunk[j] for chunk in chunks]) for j in range(len(outputs))]

    def run_tensors(self, x: torch.Tensor, outputs: Sequence[str], shapes: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
        """The named outputs for a float32 N x C x H x W tensor, as float32 tensors on `x`'s device (I/O binding).

        `shapes` gives each output's shape after the batch dimension (the model config knows them).
        """
        if len(outputs) != len(shapes):
            raise ValueError(f"{len(outputs)} outputs but {len(shapes)} shapes")
        x = x.detach().to(torch.float32).contiguous()
        results = [torch.empty((len(x), *shape), dtype=torch.float32, device=x.device) for shape in shapes]
        if x.device.type == "cuda":
            # onnxruntime reads the input on its own stream: whatever torch queued to make it must be done.
            torch.cuda.current_stream(x.device).synchronize()

        def run_chunk(start: int, end: int) -> None:
            part = x[start:end]
            binding = self.session.io_binding()
            binding.bind_input(self.input_name, *_where(part), np.float32, tuple(part.shape), part.data_ptr())
            for name, result in zip(outputs, results, strict=True):
                out = result[start:end]
                binding.bind_output(name, *_where(out), np.float32, tuple(out.shape), out.data_ptr())
            self.session.run_with_iobinding(binding)

        self._chunked(len(x), run_chunk)
        return results

    def _chunked(self, total: int, run_chunk: Callable[[int, int], T]) -> list[T]:
        """`run_chunk(start, end)` over items [0, total) in chunks of `max_batch`, in order.

        When a chunk runs out of memory, `max_batch` becomes half that chunk, rounded up (later calls keep it), and the chunk
        runs again in halves; a single item that does not fit is RESOURCE_EXHAUSTED.
        """
        results: list[T] = []
        start = 0
        while start < total:
            end = min(start + self.max_batch, total)
            try:
                results.append(run_chunk(start, end))
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                if end - start == 1:
                    raise ResourceExhausted(
                        "OUT_OF_MEMORY",
                        f"one item does not fit in memory for this model's forward pass ({exc}); free memory on the server or give it more",
                    ) from None
                self.max_batch = (end - start + 1) // 2
                log.warning("onnxruntime ran out of memory on %d items; passes now take at most %d", end - start, self.max_batch)
                continue
            start = end
        return results


def _where(tensor: torch.Tensor) -> tuple[str, int]:
    """onnxruntime's (device type, device id) for a torch tensor's memory."""
    return tensor.device.type, tensor.device.index or 0
