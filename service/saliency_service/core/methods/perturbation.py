"""Perturbation methods (METHODS.md §7.3, §7.4): Occlusion (Zeiler & Fergus 2014) and RISE (Petsiuk et al. 2018).

Both only run forward passes: every perturbed copy is made on the model's device and goes through
`LoadedModel.logits_tensor` (onnxruntime, I/O binding) in chunks of `model.max_batch`, and scores come from
`MethodInput.objective_values`, so a foil (target vs foil) works as for the gradient methods and nothing but
the finished maps leaves the device.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from saliency_service.core.errors import InvalidArgument, ResourceExhausted
from saliency_service.core.images import gaussian_blur
from saliency_service.core.methods.base import METHODS, MethodInput, SaliencyMethod
from saliency_service.core.params import ParamSpec

MAX_OCCLUSION_WINDOW = 1024
MAX_OCCLUSION_WINDOWS = 65536
OCCLUSION_FILLS = ("zero", "mean", "blur")
MAX_RISE_MASKS = 16384
MAX_RISE_GRID = 64
RISE_SCORES = ("probability", "logit")
GRID_BLOCK = 1024


# ---- Occlusion ----


def window_starts(size: int, window: int, stride: int) -> np.ndarray:
    """Start of each window along one axis: ceil((size - window) / stride) + 1 of them, the last may overhang (Captum)."""
    count = math.ceil((size - window) / stride) + 1
    return np.arange(count) * stride


def _covering(starts: np.ndarray, window: int, size: int) -> np.ndarray:
    """windows x size: True where a window along one axis covers the position (overhang cropped)."""
    positions = np.arange(size)
    return (positions[None, :] >= starts[:, None]) & (positions[None, :] < starts[:, None] + window)


def occlusion_fill(kind: str, x: torch.Tensor) -> torch.Tensor:
    """What an occluded window is set to, same shape and device as x (normalised space)."""
    if kind == "zero":
        return torch.zeros_like(x)
    if kind == "mean":
        return x.double().mean(dim=(2, 3), keepdim=True).to(x.dtype).expand_as(x)
    return gaussian_blur(x)


@METHODS.register("occlusion")
class Occlusion(SaliencyMethod):
    """Zeiler & Fergus (ECCV 2014) with Captum's semantics (METHODS.md §7.4).

    A window x window square (all channels) slides with step `stride`; window j starts at j * stride and
    the last one per axis may overhang the border and is cropped. For each window the objective's drop
    objective(x) - objective(x with the window filled) is recorded; a pixel's value is the mean drop over
    the windows covering it. Captum's attribution is the same value in every channel.
    """

    description = (
        "Occlusion (Zeiler & Fergus): slide a window x window patch with step stride, fill it, and give each pixel the mean "
        "drop of the objective over the windows covering it; signed, in logit units. One forward pass per window."
    )
    family = "perturbation"
    params = (
        ParamSpec(
            "window",
            "int",
            15,
            f"Side of the square occluding patch in model-input pixels, 1..{MAX_OCCLUSION_WINDOW} and at most the input's "
            "height and width.",
            minimum=1,
            maximum=MAX_OCCLUSION_WINDOW,
        ),
        ParamSpec(
            "stride",
            "int",
            8,
            f"Step between windows in pixels, 1..window (so every pixel is covered); at most {MAX_OCCLUSION_WINDOWS} windows per image.",
            minimum=1,
            maximum=MAX_OCCLUSION_WINDOW,
        ),
        ParamSpec(
            "fill",
            "string",
            "zero",
            "What the patch is set to: zero (0 in normalised space, the dataset mean colour), mean (the image's mean colour), "
            "blur (the image blurred with an 11x11 sigma=5 Gaussian).",
            choices=OCCLUSION_FILLS,
        ),
    )

    def maps(self, request: MethodInput) -> torch.Tensor:
        window, stride = int(request.params["window"]), int(request.params["stride"])
        x = request.input()
        height, width = x.shape[2], x.shape[3]
        _check_occlusion(window, stride, height, width)
        rows = torch.from_numpy(_covering(window_starts(height, window, stride), window, height)).to(x.device)
        cols = torch.from_numpy(_covering(window_starts(width, window, stride), window, width)).to(x.device)
        # Windows form a rows x cols grid, so the number covering a pixel is a product of per-axis counts.
        coverage = torch.outer(rows.sum(dim=0), cols.sum(dim=0)).double()
        # Window w is (row w // len(cols), column w % len(cols)).
        windows = len(rows) * len(cols)
        fill = occlusion_fill(str(request.params["fill"]), x)
        clean = request.objective_values(request.model.logits_tensor(x))
        chunk = request.model.max_batch
        total = torch.zeros((len(x), height, width), dtype=torch.float64, device=x.device)
        for start in range(0, windows, chunk):
            index = torch.arange(start, min(windows, start + chunk), device=x.device)
            masks = rows[index // len(cols)][:, :, None] & cols[index % len(cols)][:, None, :]
            for item in range(len(x)):
                occluded = torch.where(masks[:, None], fill[item][None], x[item][None])
                scores = request.objective_values(request.model.logits_tensor(occluded), torch.full_like(index, item))
                total[item] += torch.tensordot(clean[item] - scores, masks.double(), dims=1)
        return (total / coverage).float()


def _check_occlusion(window: int, stride: int, height: int, width: int) -> None:
    if window > min(height, width):
        raise InvalidArgument(
            "WINDOW_TOO_LARGE",
            f"occlusion window {window} does not fit the model input {height}x{width}; use window <= {min(height, width)}",
            {"parameter": "window", "maximum": min(height, width)},
        )
    if stride > window:
        raise InvalidArgument(
            "STRIDE_LARGER_THAN_WINDOW",
            f"occlusion stride {stride} is larger than the window {window}, so some pixels would never be occluded; use stride <= {window}",
            {"parameter": "stride", "maximum": window},
        )
    windows = len(window_starts(height, window, stride)) * len(window_starts(width, window, stride))
    if windows > MAX_OCCLUSION_WINDOWS:
        raise ResourceExhausted(
            "TOO_MANY_WINDOWS",
            f"window {window} with stride {stride} on a {height}x{width} input makes {windows} windows per image, more than "
            f"the {MAX_OCCLUSION_WINDOWS} allowed; raise stride or window",
            {"parameter": "stride", "windows": windows, "maximum": MAX_OCCLUSION_WINDOWS},
        )


# ---- RISE ----


def upsample_matrix(cells: int, size: int) -> np.ndarray:
    """size x cells: linear interpolation of `cells` samples to `size` outputs.

    Pixel centres are aligned (source coordinate (o + 0.5) * cells / size - 0.5) and coordinates outside
    the samples are mirrored about the edge samples, as scikit-image's resize(order=1, mode="reflect",
    anti_aliasing=False) that the RISE code uses.
    """
    coordinate = (np.arange(size) + 0.5) * cells / size - 0.5
    matrix = np.zeros((size, cells), dtype=np.float64)
    if cells == 1:
        matrix[:] = 1.0
        return matrix
    period = 2 * (cells - 1)
    coordinate = np.abs(coordinate) % period
    coordinate = np.where(coordinate > cells - 1, period - coordinate, coordinate)
    low = np.minimum(np.floor(coordinate).astype(np.int64), cells - 2)
    fraction = coordinate - low
    outputs = np.arange(size)
    matrix[outputs, low] += 1 - fraction
    matrix[outputs, low + 1] += fraction
    return matrix


class RiseMasks:
    """RISE's random masks (METHODS.md §7.3), drawn once per request from its seed and built a chunk at a time.

    Mask i: an s x s grid of Bernoulli(p) cells, upsampled bilinearly to (s + 1) * C with C = ceil(input / s)
    per axis, then cropped to the input size at a random integer shift in [0, C) per axis.
    """

    def __init__(self, seed: int, count: int, grid: int, p: float, height: int, width: int, device: torch.device | str = "cpu") -> None:
        rng = np.random.default_rng(seed)
        # Drawn a block at a time (the same stream as one draw) so no count x s x s float64 array is ever held.
        grids = np.concatenate([rng.random((min(GRID_BLOCK, count - start), grid, grid)) < p for start in range(0, count, GRID_BLOCK)])
        cell_h, cell_w = math.ceil(height / grid), math.ceil(width / grid)
        shift_y, shift_x = rng.integers(0, cell_h, count), rng.integers(0, cell_w, count)
        # The draws are made on the host (one seeded stream); the cells, shifts and interpolation matrices then
        # live on `device`, where every chunk of masks is built.
        self.grids = torch.from_numpy(grids).to(device)
        self.shift_y, self.shift_x = torch.from_numpy(shift_y).to(device), torch.from_numpy(shift_x).to(device)
        self.up_y = torch.from_numpy(upsample_matrix(grid, (grid + 1) * cell_h).astype(np.float32)).to(device)
        self.up_x = torch.from_numpy(upsample_matrix(grid, (grid + 1) * cell_w).astype(np.float32)).to(device)
        self.height, self.width = height, width

    def __len__(self) -> int:
        return len(self.grids)

    def chunk(self, start: int, stop: int) -> torch.Tensor:
        """Masks start..stop-1: (stop - start) x H x W float32 in [0, 1], on the masks' device."""
        # Cropping the upsampled grid is selecting rows of the interpolation matrices.
        rows = self.up_y[self.shift_y[start:stop, None] + torch.arange(self.height, device=self.up_y.device)]
        cols = self.up_x[self.shift_x[start:stop, None] + torch.arange(self.width, device=self.up_x.device)]
        return rows @ self.grids[start:stop].float() @ cols.transpose(1, 2)


@METHODS.register("rise")
class Rise(SaliencyMethod):
    """RISE (Petsiuk et al., BMVC 2018; METHODS.md §7.3): S = (1 / (N p)) sum_i f(x * M_i) M_i.

    x * M_i multiplies the normalised input, so masked pixels take the dataset mean colour. f is the
    softmax probability of the target (minus the foil's) as in the official code, or the raw logit.
    """

    description = (
        "RISE (Petsiuk et al.): the objective on N randomly masked copies, averaged with the masks as weights and divided "
        "by N p; masks are upsampled random s x s grids with random shifts, drawn from the request's seed. N forward passes."
    )
    family = "perturbation"
    params = (
        ParamSpec(
            "masks",
            "int",
            6000,
            f"Number of random masks N, 1..{MAX_RISE_MASKS}; each costs one forward pass per image (the paper uses 4000-8000).",
            minimum=1,
            maximum=MAX_RISE_MASKS,
        ),
        ParamSpec(
            "grid",
            "int",
            8,
            f"s: each mask is an s x s grid of random cells upsampled to the input, 2..{MAX_RISE_GRID}; larger s, finer detail.",
            minimum=2,
            maximum=MAX_RISE_GRID,
        ),
        ParamSpec("p", "float", 0.1, "Probability that a grid cell is kept (not masked), 0.01..1.", minimum=0.01, maximum=1.0),
        ParamSpec(
            "score",
            "string",
            "probability",
            "What f scores each masked copy by: probability (softmax, the paper's) or logit.",
            choices=RISE_SCORES,
        ),
    )

    def maps(self, request: MethodInput) -> torch.Tensor:
        x = request.input()
        count, p = int(request.params["masks"]), float(request.params["p"])
        by_probability = request.params["score"] == "probability"
        masks = RiseMasks(request.seed, count, int(request.params["grid"]), p, x.shape[2], x.shape[3], x.device)
        total = torch.zeros((len(x), x.shape[2], x.shape[3]), dtype=torch.float64, device=x.device)
        chunk = request.model.max_batch
        for start in range(0, count, chunk):
            batch = masks.chunk(start, min(count, start + chunk))
            items = torch.zeros(len(batch), dtype=torch.long, device=x.device)
            for item in range(len(x)):
                logits = request.model.logits_tensor(x[item][None] * batch[:, None])
                scores = request.objective_values(torch.softmax(logits.double(), dim=1) if by_probability else logits, items + item)
                total[item] += torch.tensordot(scores, batch.double(), dims=1)
        return (total / (count * p)).float()
