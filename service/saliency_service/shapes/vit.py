"""ShapesViT: a small vision transformer for the procedural shapes dataset, served as `vit_shapes`.

A pre-norm ViT (Dosovitskiy et al., ICLR 2021) in its hybrid form. The patch embedding is the `shapes`
CNN's first stages (started from the shipped CNN) plus a 2x2 projection: one token per 16x16 patch, an
8x8 grid on 128x128 inputs. Then a class token, a learned positional embedding, `depth` blocks of
LayerNorm -> multi-head self-attention -> residual, LayerNorm -> GELU MLP -> residual, a final LayerNorm
and a linear head on the class token. Built from export-friendly ops only (our own attention with
matmul and softmax), so `torch.export` and the dynamo ONNX exporter need no special cases.

Its declared layers are token layers (N x (1 + h*w) x D); the model repository infers the grid and
the class token at export and shows them to CAM methods as D x h x w (METHODS.md §9). Because the head
reads only the class token, the last block's patch-token *outputs* never reach the logits (their
gradient is 0), so the declared layers are the outputs of the earlier blocks and the last block's
`norm1` (its input, before attention), which is the default layer.

Train and export (CPU, seeded; 2000 steps of 32 images, about 6 minutes on two free cores)::

    PYTHONPATH=service python -m saliency_service.shapes.vit --out service/saliency_service/model_repository
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from saliency_service.config import EMBEDDED_REPOSITORY
from saliency_service.core.models.export import export_model
from saliency_service.core.models.model import LoadedModel, RuntimeOptions
from saliency_service.core.models.torch_runner import vet_pt2_archive
from saliency_service.shapes.evaluate import heldout_accuracy, torch_predictor
from saliency_service.shapes.generator import IMAGE_SIZE, LABELS, generate_batch, heldout_seeds
from saliency_service.shapes.network import MEAN, SERVING_BATCHING, STD, ShapesNet, preprocess
from saliency_service.shapes.train import TrainConfig, training_data

MODEL_NAME = "vit_shapes"
_CNN_LAYER2_WIDTH = 48  # ShapesNet's layer2 channels (network._WIDTHS[2])
DESCRIPTION = "Vision transformer (patch 16, 8x8 tokens + class token) trained by saliency-service on its shapes dataset (128x128 RGB)."


@dataclass(frozen=True)
class VitConfig:
    """Architecture; defaults are the shipped model's."""

    height: int = IMAGE_SIZE
    width: int = IMAGE_SIZE
    patch: int = 16
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 2
    classes: int = len(LABELS)
    stem: str = "cnn"
    """How patches are embedded: "patch" (one patch x patch convolution) or "cnn" (the `shapes` CNN's stem, layer1
    and layer2, then a patch/8 convolution: a hybrid ViT, Dosovitskiy et al. 2021 §3.1; training starts them from
    the shipped CNN)."""
    registers: int = 0
    """Extra learned prefix tokens after the class token (Darcet et al., ICLR 2024); the tests use them."""

    @property
    def grid(self) -> tuple[int, int]:
        return self.height // self.patch, self.width // self.patch


class Attention(nn.Module):
    """Multi-head scaled dot-product self-attention (Vaswani et al. 2017) over all tokens."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(-1, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attention = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
        out = (attention @ v).transpose(1, 2).reshape(-1, tokens, dim)
        projected: torch.Tensor = self.proj(out)
        return projected


class Block(nn.Module):
    """Pre-norm transformer block: x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        out: torch.Tensor = x + self.mlp(self.norm2(x))
        return out


class ShapesViT(nn.Module):
    """Normalised N x 3 x H x W images -> N x classes logits, through N x (1 + h*w) x D tokens."""

    def __init__(self, config: VitConfig = VitConfig()) -> None:
        super().__init__()
        if config.height % config.patch or config.width % config.patch:
            raise ValueError(f"input {config.height}x{config.width} is not a multiple of the patch size {config.patch}")
        self.config = config
        h, w = config.grid
        self.patch_embed: nn.Module
        if config.stem == "patch":
            self.patch_embed = nn.Conv2d(3, config.dim, config.patch, stride=config.patch)
        elif config.stem == "cnn" and config.patch % 8 == 0:
            # The shapes CNN reaches 1/8 of the input with 3x3 convolutions; a patch/8 x patch/8 projection then gives
            # the same token grid as a patch x patch convolution. On a small data set and a few thousand steps a
            # plain patch embedding stayed at chance in our runs; early convolutions fix that (Xiao et al., NeurIPS 2021).
            cnn = ShapesNet(config.classes)
            last = config.patch // 8
            self.patch_embed = nn.Sequential(cnn.stem, cnn.layer1, cnn.layer2, nn.Conv2d(_CNN_LAYER2_WIDTH, config.dim, last, stride=last))
        else:
            raise ValueError(f"stem '{config.stem}' with patch {config.patch}: use 'patch', or 'cnn' with a multiple of 8")
        # The class token, then any register tokens: the layers' prefix.
        self.cls_token = nn.Parameter(torch.zeros(1, 1 + config.registers, config.dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 1 + config.registers + h * w, config.dim))
        self.blocks = nn.Sequential(*[Block(config.dim, config.heads, config.mlp_ratio) for _ in range(config.depth)])
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.classes)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the final, normalised tokens (N x (1 + registers + h*w) x D)."""
        # As ShapesNet does: remove each image's mean colour (shapes and backgrounds have random colours).
        x = x - x.mean(dim=(2, 3), keepdim=True)
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)  # N x h*w x D, row-major over the grid
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        out: torch.Tensor = self.norm(self.blocks(torch.cat([cls, patches], dim=1) + self.pos_embed))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.tokens(x)[:, 0])
        return logits


def declared_layers(depth: int) -> tuple[str, ...]:
    """Every block's norm1: the normalised tokens entering its attention (METHODS.md §9's ViT target layer).

    The raw residual stream (a block's output) is dominated by components shared by all tokens: Grad-CAM on
    `blocks.0`..`blocks.2` of the shipped model pointed at the shape for only 30-38% of 200 held-out images,
    on `blocks.1.norm1` for 83%.
    """
    return tuple(f"blocks.{i}.norm1" for i in range(depth))


# Grad-CAM peak on the shape's mask, shipped model, held-out seeds 0..199: blocks.0.norm1 0.80, blocks.1.norm1 0.83
# (0.75 on seeds 0..999), blocks.2.norm1 0.56, blocks.3.norm1 0.32.
DEFAULT_LAYER = "blocks.1.norm1"


# ---- training ----

_CNN_STAGES = {"model.stem.": "0.", "model.layer1.": "1.", "model.layer2.": "2."}


def load_cnn_stem(model: ShapesViT, cnn_program: Path = EMBEDDED_REPOSITORY / "shapes" / "model.pt2") -> None:
    """Start a "cnn" stem from the shipped `shapes` model's stem, layer1 and layer2 (read from its vetted torch program)."""
    if model.config.stem != "cnn":
        raise ValueError("only a 'cnn' stem can start from the shapes CNN")
    vet_pt2_archive(cnn_program)
    state = torch.export.load(str(cnn_program)).module().state_dict()
    stem = {}
    for key, value in state.items():
        for prefix, index in _CNN_STAGES.items():
            if key.startswith(prefix):
                stem[index + key[len(prefix) :]] = value.detach().clone()
    missing, unexpected = model.patch_embed.load_state_dict(stem, strict=False)
    if unexpected or any(not key.startswith("3.") for key in missing):
        raise ValueError(f"the shapes CNN does not fit the stem: missing {missing}, unexpected {unexpected}")


@dataclass(frozen=True)
class VitTrainConfig:
    """Hyper-parameters; defaults are the settings of the shipped model."""

    epochs: int = 4
    train_images: int = 16_000
    pair_fraction: float = 0.2
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    token_weight: float = 1.0
    seed: int = 0
    eval_images: int = 500
    threads: int = 2


def _cell_targets(cover: np.ndarray, classes: np.ndarray, factor: int) -> np.ndarray:
    """Per-patch class targets: N x (classes + 1) x h x w, the share of each patch covered by each object, rest background.

    `cover` is N x 2 x H/8 x W/8 (train.py's CAM cells); `factor` pools it to the patch grid.
    """
    n, objects, h, w = cover.shape
    pooled = cover.reshape(n, objects, h // factor, factor, w // factor, factor).mean(axis=(3, 5))
    target = np.zeros((n, len(LABELS) + 1, h // factor, w // factor), dtype=np.float32)
    for j in range(objects):
        valid = classes[:, j] >= 0
        target[np.flatnonzero(valid), classes[valid, j]] += pooled[valid, j]
    target[:, -1] = np.clip(1.0 - target[:, :-1].sum(axis=1), 0.0, None)
    return target


def _augment(x: torch.Tensor, cells: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random dihedral transform of images and patch targets (every class is invariant under it)."""
    k = int(rng.integers(4))
    if k:
        x, cells = torch.rot90(x, k, dims=(2, 3)), torch.rot90(cells, k, dims=(2, 3))
    if rng.random() < 0.5:
        x, cells = torch.flip(x, dims=(3,)), torch.flip(cells, dims=(3,))
    return x.contiguous(), cells.contiguous()


def train_vit(config: VitTrainConfig = VitTrainConfig(), architecture: VitConfig = VitConfig(), log: bool = True) -> ShapesViT:
    """Train a ShapesViT from scratch, seeded and reproducible.

    Loss: cross-entropy of the class-token logits against the (soft, for two-shape images) labels, plus
    `token_weight` times a token-labelling term (Jiang et al., "All Tokens Matter", NeurIPS 2021): the
    head applied to every final patch token, trained towards the share of that patch covered by each
    object or background (from the generator's exact masks). The dense term speeds up training on a
    few thousand steps.
    """
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    rng = np.random.default_rng(config.seed)
    start = time.monotonic()
    pool = training_data(
        TrainConfig(train_images=config.train_images, pair_fraction=config.pair_fraction, seed=config.seed, threads=config.threads)
    )
    if (architecture.height, architecture.width) != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"the shapes generator makes {IMAGE_SIZE}x{IMAGE_SIZE} images")
    cells = _cell_targets(pool.cover, pool.classes, pool.cover.shape[-1] // architecture.grid[0])
    if log:
        print(f"generated {len(pool.images)} training images ({time.monotonic() - start:.0f}s)", flush=True)
    model = ShapesViT(architecture)
    if architecture.stem == "cnn":
        load_cnn_stem(model)
    decay = [p for name, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in name]
    no_decay = [p for name, p in model.named_parameters() if p.ndim < 2 or "pos_embed" in name]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=config.lr
    )
    steps_per_epoch = math.ceil(config.train_images / config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.1)
    for epoch in range(config.epochs):
        order = rng.permutation(len(pool.images))
        model.train()
        sum_ce = sum_tok = 0.0
        for step in range(steps_per_epoch):
            idx = np.sort(order[step * config.batch_size : (step + 1) * config.batch_size])
            x, target_cells = _augment(preprocess(pool.images[idx]), torch.from_numpy(cells[idx]), rng)
            tokens = model.tokens(x)
            ce = F.cross_entropy(model.head(tokens[:, 0]), torch.from_numpy(pool.targets[idx]))
            loss = ce
            if config.token_weight > 0:
                patch_logits = model.head(tokens[:, 1 + architecture.registers :])  # N x h*w x classes
                patch_logits = torch.cat([patch_logits, torch.zeros_like(patch_logits[..., :1])], dim=-1)
                flat_target = target_cells.flatten(2).transpose(1, 2)  # N x h*w x (classes + 1), row-major like the tokens
                tok = -(flat_target * F.log_softmax(patch_logits, dim=-1)).sum(dim=-1).mean()
                loss = ce + config.token_weight * tok
                sum_tok += tok.item() * len(idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            sum_ce += ce.item() * len(idx)
            if log and step % 50 == 49:
                print(
                    f"  step {step + 1}: ce {sum_ce / ((step + 1) * config.batch_size):.4f} ({time.monotonic() - start:.0f}s)", flush=True
                )
        if log:
            model.eval()
            acc = heldout_accuracy(torch_predictor(model), n=config.eval_images)
            n = len(pool.images)
            print(
                f"epoch {epoch + 1}/{config.epochs}  ce {sum_ce / n:.4f}  tok {sum_tok / n:.4f}  held-out acc {acc:.4f}  "
                f"({time.monotonic() - start:.0f}s)",
                flush=True,
            )
    model.eval()
    return model


# ---- export and evaluation ----


def export_vit(
    model: ShapesViT,
    repository: Path,
    name: str = MODEL_NAME,
    *,
    labels: Sequence[str] = LABELS,
    version: str = "1",
    description: str = DESCRIPTION,
) -> Path:
    """Export a ShapesViT as a repository entry; the token grid and class token are inferred from the patch size."""
    config = model.config
    return export_model(
        model.eval(),
        torch.zeros(1, 3, config.height, config.width),
        repository,
        name,
        labels=labels,
        layers=declared_layers(config.depth),
        mean=MEAN,
        std=STD,
        version=version,
        description=description,
        overwrite=True,
        patch_size=config.patch,
        default_layer=DEFAULT_LAYER if config.depth > 1 else None,        dynamic_batching=SERVING_BATCHING,
    )


def grad_cam_pointing(model: LoadedModel, n: int = 200, layer: str | None = None, start: int = 0) -> tuple[float, float]:
    """(accuracy, share of images whose Grad-CAM peak lies on the shape's mask) on `n` held-out single-shape images.

    Grad-CAM explains the true class at `layer` (default: the model's default layer), through the
    same LoadedModel seam the server uses.
    """
    from saliency_service.core.methods import METHODS, MethodInput
    from saliency_service.core.params import resolve_params

    cls = METHODS.get("grad_cam")
    correct = hits = 0
    for offset in range(0, n, 50):
        images, labels, masks = generate_batch(heldout_seeds(min(50, n - offset), start=start + offset))
        x = preprocess(images).numpy()
        correct += int((model.logits(x).argmax(axis=1) == labels).sum())
        request = MethodInput(
            model=model,
            x=x,
            targets=labels.astype(np.int64),
            params=resolve_params(cls.params, {}, "grad_cam"),
            layer=layer or model.config.default_layer,
            seed=0,
        )
        maps = cls().attribute(request)
        peaks = maps.reshape(len(maps), -1).argmax(axis=1)
        hits += int(masks.reshape(len(masks), -1)[np.arange(len(masks)), peaks].sum())
    return correct / n, hits / n


def main(argv: Sequence[str] | None = None) -> int:
    """Train, export into `--out/vit_shapes`, then report held-out accuracy and Grad-CAM pointing."""
    defaults = VitTrainConfig()
    parser = argparse.ArgumentParser(description="Train the vit_shapes model and export it into a model repository.")
    parser.add_argument("--out", type=Path, required=True, help="model repository folder; the model is written to OUT/vit_shapes")
    parser.add_argument("--weights", type=Path, help="also save the state dict here (plain tensors)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--train-images", type=int, default=defaults.train_images)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument(
        "--token-weight", type=float, default=defaults.token_weight, help="weight of the token-labelling term (0 disables it)"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--eval-images", type=int, default=1000, help="held-out images for the final report")
    args = parser.parse_args(argv)

    start = time.monotonic()
    config = VitTrainConfig(
        epochs=args.epochs, train_images=args.train_images, lr=args.lr, token_weight=args.token_weight, seed=args.seed, threads=args.threads
    )
    model = train_vit(config)
    if args.weights is not None:
        args.weights.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, args.weights)
    folder = export_vit(model, args.out)
    print(f"exported to {folder} ({time.monotonic() - start:.0f}s)", flush=True)
    loaded = LoadedModel.load(folder, RuntimeOptions(threads=args.threads, prefer_cuda=False))
    accuracy, pointing = grad_cam_pointing(loaded, n=args.eval_images)
    layer = loaded.config.default_layer
    print(f"held-out accuracy {accuracy:.4f}; Grad-CAM ({layer}) peak on the shape's mask {pointing:.4f} (n={args.eval_images})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
