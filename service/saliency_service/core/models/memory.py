"""How many items one pass may take, so that a batch that would not fit in memory is split instead of failing.

Every forward and backward pass runs in chunks of `LoadedModel.max_batch` items. At load that size is capped so a
chunk's activations fit a memory budget: a `torch` forward of one item through the program is watched, and the
bytes of every tensor an operation makes (views excluded) are summed. A backward pass keeps at most those
activations and makes gradients of the same sizes, so one item needs at most `PASS_OVERHEAD` times that sum;
onnxruntime, which frees what its plan no longer needs, needs less. The budget defaults to a quarter of the
memory the process may use (its cgroup's limit in a container, else the machine's RAM) or of the GPU's, so two
workers' passes together stay under half of it.

Where memory runs out anyway (other processes, a model the estimate misjudges), `OnnxRunner` halves its chunk
and runs the chunk again (`is_out_of_memory`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

PASS_OVERHEAD = 2
"""A backward pass holds the saved activations and their gradients: twice the forward's tensors at most."""

BUDGET_SHARE = 4
"""The default budget is 1/BUDGET_SHARE of the memory the process may use."""

_CGROUP_FILES = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def memory_limit_bytes() -> int:
    """The memory this process may use: its cgroup's limit (v2, then v1) when there is one, else the machine's RAM."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in _CGROUP_FILES:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < physical:  # "max" (v2) or a huge number (v1) means no limit
            return int(text)
    return physical


def default_budget(device: torch.device) -> int:
    """Bytes one pass may use when the settings name none: a quarter of the GPU's memory, or of the process's."""
    if device.type == "cuda":
        _, total = torch.cuda.mem_get_info(device)
        return int(total) // BUDGET_SHARE
    return memory_limit_bytes() // BUDGET_SHARE


class _Allocations(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Sums the bytes of every tensor that an operation returns, except views of tensors that already exist."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for tensor in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(tensor, torch.Tensor):
                    self.bytes += tensor.numel() * tensor.element_size()
        return out


def activation_bytes(run: object, x: torch.Tensor) -> int:
    """Bytes of the tensors that `run(x)` makes (a forward pass of one item, usually), under no_grad."""
    watcher = _Allocations()
    with torch.no_grad(), watcher:
        run(x)  # type: ignore[operator]
    return watcher.bytes


def fitted_batch(max_batch: int, budget: int, item_bytes: int) -> int:
    """The largest chunk, at most `max_batch`, whose pass (PASS_OVERHEAD x item_bytes per item) fits `budget`; at least 1."""
    if item_bytes <= 0:
        return max_batch
    return max(1, min(max_batch, budget // (PASS_OVERHEAD * item_bytes)))


_OUT_OF_MEMORY = ("failed to allocate memory", "out of memory", "can't allocate memory", "not enough memory", "bad_alloc")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception from numpy, torch or onnxruntime says that an allocation failed."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    message = str(exc).lower()
    return any(phrase in message for phrase in _OUT_OF_MEMORY)
