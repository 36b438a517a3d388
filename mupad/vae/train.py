"""Train a diffusers AutoencoderKL from scratch on H&E tiles; evaluate; save as a diffusers folder.

Run folder layout (`out/`):

    train_config.json                 the frozen VAETrainConfig + data description
    log.jsonl                         one JSON record per log / eval event
    checkpoints/step-0000250/         model/ (diffusers folder), ema.safetensors,
                                      optimizer.safetensors, train_state.json
    vae/                              the final AutoencoderKL (diffusers format), scale/shift fitted
    metrics.json                      held-out PSNR / SSIM of the final VAE and of a bicubic baseline

Every random choice of step `s` (crops, flips, the posterior sample) comes from
`step_generator(seed, s)`, so a run re-started from its last checkpoint ends identical to an
uninterrupted one. Re-running the same command resumes.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from mupad.config import Precision
from mupad.data.tiles import TileFolderError, TileSet, load_image_tiles, random_crops
from mupad.errors import MupadError
from mupad.fileio import atomic_directory, atomic_write_text
from mupad.training.checkpoint import list_checkpoints, optimizer_tensors, restore_optimizer
from mupad.training.ema import EMA
from mupad.training.loop import learning_rate, step_generator
from mupad.vae.config import VAEConfigError, VAETrainConfig
from mupad.vae.metrics import psnr, ssim
from mupad.vae.model import build_autoencoder, vae_preset

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

logger = logging.getLogger(__name__)

RUN_CONFIG = "train_config.json"
VAE_DIR = "vae"
METRICS = "metrics.json"
# Settings that may change when a run is resumed (they do not change the steps already taken).
_RESUMABLE_CHANGES = {
    "steps",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "eval_every",
    "eval_tiles",
}


class VAERunError(MupadError, RuntimeError):
    """A run folder cannot be used (holds something else, or another run's settings)."""


@dataclass(frozen=True)
class VAEData:
    train: TileSet  # (N, 3, S, S) uint8
    heldout: TileSet  # (M, 3, S', S') uint8, never used for training


@dataclass(frozen=True)
class VAETrainResult:
    vae_dir: Path
    metrics: dict[str, Any]
    resumed_from: int


# ------------------------------------------------------------------------------- data


def concat_tiles(sets: Sequence[TileSet]) -> TileSet:
    """One TileSet from several, centre-cropped to the smallest tile side."""
    side = min(s.images.shape[-1] for s in sets)
    images, labels, names, paths = [], [], [], []
    for tiles in sets:
        offset = (tiles.images.shape[-1] - side) // 2
        images.append(tiles.images[:, :, offset : offset + side, offset : offset + side])
        labels.append(tiles.labels + len(names))
        names.extend(tiles.class_names)
        paths.extend(tiles.paths)
    return TileSet(torch.cat(images), torch.cat(labels), tuple(names), tuple(paths))


def load_vae_data(
    data: Path | Sequence[Path],
    eval_data: Path | Sequence[Path] | None = None,
    holdout_fraction: float = 0.1,
) -> VAEData:
    """Tiles for training and evaluation. Without `eval_data`, a fixed `holdout_fraction` of
    the tiles (chosen by a fixed permutation of the sorted file list, whatever the training
    seed) is held out. Tiles of different sizes are centre-cropped to the smallest side."""
    folders = [Path(data)] if isinstance(data, (str, Path)) else [Path(d) for d in data]
    if not folders:
        raise TileFolderError("no training data folder given")
    train = concat_tiles([load_image_tiles(folder) for folder in folders])
    if eval_data is not None:
        eval_folders = (
            [Path(eval_data)]
            if isinstance(eval_data, (str, Path))
            else [Path(d) for d in eval_data]
        )
        overlap = {p.resolve() for p in train.paths} & {
            p.resolve() for f in eval_folders for p in load_image_tiles(f).paths
        }
        if overlap:
            raise TileFolderError(
                f"{len(overlap)} evaluation tiles are also training tiles (e.g. "
                f"{min(overlap)}); held-out tiles must be disjoint"
            )
        return VAEData(
            train=train, heldout=concat_tiles([load_image_tiles(f) for f in eval_folders])
        )
    n = len(train)
    if n < 2:
        raise TileFolderError(
            f"need at least 2 tiles to hold some out for evaluation, found {n} in {folders}"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    num_heldout = max(1, round(n * holdout_fraction))
    held, kept = order[:num_heldout].sort().values, order[num_heldout:].sort().values

    def subset(index: torch.Tensor) -> TileSet:
        return TileSet(
            train.images[index],
            train.labels[index],
            train.class_names,
            tuple(train.paths[i] for i in index.tolist()),
        )

    return VAEData(train=subset(kept), heldout=subset(held))


# ------------------------------------------------------------------------------- evaluation


def _eval_side(size: int, downsample: int) -> int:
    return size // downsample * downsample


def _centre(images: torch.Tensor, side: int) -> torch.Tensor:
    top = (images.shape[-2] - side) // 2
    left = (images.shape[-1] - side) // 2
    return images[..., top : top + side, left : left + side]


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> uint8 reconstructions via the posterior mean (N, 3, H, W)."""
    vae.eval()
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].float().div(127.5).sub(1.0)  # (b, 3, H, W)
        param = next(vae.parameters())
        z = vae.encode(x.to(param.device, param.dtype)).latent_dist.mode()
        x_hat = vae.decode(z).sample.float().cpu()
        out.append(x_hat.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def bicubic_baseline(images: torch.Tensor, factor: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> bicubic down-`factor`x (antialiased) then up, uint8."""
    x = images.float()
    small = F.interpolate(x, scale_factor=1 / factor, mode="bicubic", antialias=True)
    up = F.interpolate(small, size=images.shape[-2:], mode="bicubic", align_corners=False)
    return up.round().clamp(0, 255).to(torch.uint8)


def score(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Mean per-image PSNR (dB) and SSIM of uint8 images (N, 3, H, W)."""
    a, b = reference.float() / 255.0, candidate.float() / 255.0
    return {
        "psnr": float(psnr(a, b).mean()),
        "ssim": float(ssim(a, b).mean()),
        "num_images": int(reference.shape[0]),
        "size": int(reference.shape[-1]),
    }


def evaluate_vae(
    vae: AutoencoderKL, images: torch.Tensor, *, baseline: bool = True
) -> dict[str, Any]:
    """PSNR / SSIM of `vae` reconstructions of uint8 tiles (N, 3, H, W), centre-cropped to a
    multiple of the downsample factor; with `baseline`, also of bicubic down/up by that factor."""
    downsample = 2 ** (len(vae.config.block_out_channels) - 1)
    side = _eval_side(min(images.shape[-2:]), downsample)
    if side < 11:
        raise TileFolderError(
            f"evaluation tiles of {tuple(images.shape[-2:])} px are too small (need >= 11 px "
            f"after cropping to a multiple of {downsample})"
        )
    images = _centre(images, side)
    result: dict[str, Any] = {"vae": score(images, reconstruct(vae, images))}
    if baseline:
        result[f"bicubic_x{downsample}"] = score(images, bicubic_baseline(images, downsample))
    return result


# ------------------------------------------------------------------------------- checkpoints


def _save_checkpoint(
    run_dir: Path,
    step: int,
    vae: AutoencoderKL,
    ema: EMA | None,
    optimizer: torch.optim.Optimizer,
    keep: int,
) -> Path:
    final = run_dir / "checkpoints" / f"step-{step:07d}"
    with atomic_directory(final) as tmp:
        vae.save_pretrained(tmp / "model", safe_serialization=True)
        if ema is not None:
            save_file(ema.state_dict(), str(tmp / "ema.safetensors"))
        tensors, param_groups = optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        meta = {
            "step": step,
            "ema_updates": ema.num_updates if ema is not None else 0,
            "param_groups": param_groups,
        }
        (tmp / "train_state.json").write_text(json.dumps(meta, indent=2) + "\n")
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(
    folder: Path, vae: AutoencoderKL, ema: EMA | None, optimizer: torch.optim.Optimizer
) -> int:
    meta = json.loads((folder / "train_state.json").read_text())
    weights = load_file(str(folder / "model" / "diffusion_pytorch_model.safetensors"))
    vae.load_state_dict(weights, strict=True)
    if ema is not None:
        ema.load_state_dict(load_file(str(folder / "ema.safetensors")), meta["ema_updates"])
    restore_optimizer(
        optimizer, load_file(str(folder / "optimizer.safetensors")), meta["param_groups"]
    )
    return int(meta["step"])


def _prepare_run_dir(run_dir: Path, record: dict[str, Any]) -> None:
    """Create the run folder, or check that an existing one holds this same run."""
    marker = run_dir / RUN_CONFIG
    if run_dir.exists() and not run_dir.is_dir():
        raise VAERunError(f"output {run_dir} is a file; pass a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not marker.is_file():
        raise VAERunError(
            f"output folder {run_dir} is not empty and holds no VAE run ({RUN_CONFIG} missing); "
            "pass a new or empty folder"
        )
    if marker.is_file():
        saved = json.loads(marker.read_text())
        changed = sorted(
            key
            for key in set(saved["config"]) | set(record["config"])
            if saved["config"].get(key) != record["config"].get(key)
            and key not in _RESUMABLE_CHANGES
        )
        if saved.get("data") != record["data"]:
            changed.append("data")
        if changed:
            raise VAERunError(
                f"{run_dir} holds a VAE run with other settings ({', '.join(changed)} differ); "
                "re-run with the original settings to resume, or use another output folder"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps(record, indent=2) + "\n")


# ------------------------------------------------------------------------------- training


@torch.no_grad()
def fit_latent_scale(
    vae: AutoencoderKL, tiles: TileSet, crop: int, num_samples: int, seed: int
) -> tuple[float, float]:
    """(scaling_factor, shift_factor) = (1 / std, mean) of the posterior means of
    `num_samples` random training crops (as SD fits its scaling factor)."""
    generator = step_generator(seed, -1)  # a stream no training step uses
    vae.eval()
    latents = []
    for start in range(0, num_samples, 32):
        x, _ = random_crops(tiles, crop, min(32, num_samples - start), generator)  # (b, 3, c, c)
        latents.append(vae.encode(x).latent_dist.mode().float().flatten())
    z = torch.cat(latents).double()
    std = float(z.std())
    if not math.isfinite(std) or std <= 0:
        raise FloatingPointError(
            f"latent std is {std}; the VAE collapsed, train again with a lower lr"
        )
    return 1.0 / std, float(z.mean())


def train_vae(
    data: Path | Sequence[Path],
    out: str | Path,
    config: VAETrainConfig,
    *,
    eval_data: Path | Sequence[Path] | None = None,
    progress: bool = True,
) -> VAETrainResult:
    """Train (or resume) an AutoencoderKL and write `out/vae/` plus `out/metrics.json`."""
    run_dir = Path(out)
    preset = vae_preset(config.preset)
    if config.crop % preset.downsample:
        raise VAEConfigError(
            f"crop {config.crop} is not a multiple of the {config.preset!r} preset's downsample "
            f"factor {preset.downsample}; use e.g. {max(1, config.crop // preset.downsample) * preset.downsample}"
        )
    tiles = load_vae_data(data, eval_data, config.holdout_fraction)
    record = {
        "config": config.to_dict(),
        "data": {
            "train_tiles": len(tiles.train),
            "heldout_tiles": len(tiles.heldout),
            "groups": list(tiles.train.class_names),
        },
    }
    _prepare_run_dir(run_dir, record)
    torch.manual_seed(config.seed)  # the initial weights
    vae = build_autoencoder(config.preset, sample_size=config.crop)
    ema = EMA(vae, config.ema_decay) if config.ema_decay > 0 else None
    optimizer = torch.optim.AdamW(
        vae.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    start = 0
    saved = list_checkpoints(run_dir)
    if saved:
        start = _load_checkpoint(saved[-1][1], vae, ema, optimizer)
        if start > config.steps:
            raise VAERunError(
                f"{run_dir} is already trained to step {start}, beyond --steps {config.steps}; "
                f"pass --steps >= {start} (or another output folder)"
            )
        logger.info("resumed %s from step %d", run_dir, start)
    log_path = run_dir / "log.jsonl"
    if log_path.exists():  # drop records of steps after the checkpoint: they are redone
        kept = [
            line
            for line in log_path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= start
        ]
        log_path.write_text("".join(line + "\n" for line in kept))
    rng = torch.Generator().manual_seed(0)
    eval_index = torch.randperm(len(tiles.heldout), generator=rng)[: config.eval_tiles]
    eval_images = tiles.heldout.images[eval_index.sort().values]
    autocast = config.precision is Precision.BF16

    bar = tqdm(total=config.steps, initial=start, desc="vae", unit="step", disable=not progress)
    window_start, window_steps = time.perf_counter(), 0
    with log_path.open("a") as log:
        for step in range(start, config.steps):
            vae.train()
            generator = step_generator(config.seed, step)
            x, _ = random_crops(
                tiles.train, config.crop, config.batch_size, generator
            )  # (B, 3, c, c)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step)
            with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                posterior = vae.encode(x).latent_dist
                z = posterior.sample(generator=generator)  # (B, 4, c/8, c/8)
                x_hat = vae.decode(z).sample  # (B, 3, c, c)
            x_hat = x_hat.float()
            l1 = (x_hat - x).abs().mean()
            mse = (x_hat - x).pow(2).mean()
            kl = posterior.kl().float().mean() / z[0].numel()  # per latent element
            loss = config.l1_weight * l1 + config.mse_weight * mse + config.kl_weight * kl
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"VAE loss became {loss.item()} at step {step}; lower --lr or use --precision fp32"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip = config.grad_clip if config.grad_clip > 0 else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(vae.parameters(), clip))
            optimizer.step()
            if ema is not None:
                ema.update(vae)
            done = step + 1
            window_steps += 1
            bar.update(1)
            bar.set_postfix(l1=f"{l1.item():.4f}")
            if done % config.log_every == 0 or done == config.steps:
                elapsed = time.perf_counter() - window_start
                entry = {
                    "step": done,
                    "loss": loss.item(),
                    "l1": l1.item(),
                    "mse": mse.item(),
                    "kl": kl.item(),
                    "grad_norm": grad_norm,
                    "lr": learning_rate(config, step),
                    "seconds_per_step": elapsed / max(window_steps, 1),
                }
                log.write(json.dumps(entry) + "\n")
                log.flush()
                window_start, window_steps = time.perf_counter(), 0
            if config.eval_every and done % config.eval_every == 0 and done != config.steps:
                scores = evaluate_vae(_weights_for_saving(vae, ema), eval_images, baseline=False)
                log.write(json.dumps({"step": done, "eval": scores["vae"]}) + "\n")
                log.flush()
            if done % config.checkpoint_every == 0 or done == config.steps:
                _save_checkpoint(run_dir, done, vae, ema, optimizer, config.keep_checkpoints)
    bar.close()

    final = _weights_for_saving(vae, ema)
    scale, shift = fit_latent_scale(
        final, tiles.train, config.crop, config.scale_samples, config.seed
    )
    final.register_to_config(scaling_factor=scale, shift_factor=shift)
    with atomic_directory(run_dir / VAE_DIR) as tmp:
        final.save_pretrained(tmp, safe_serialization=True)
    metrics = evaluate_vae(final, tiles.heldout.images)
    metrics.update(
        {
            "steps": config.steps,
            "preset": config.preset,
            "scaling_factor": scale,
            "shift_factor": shift,
            "train_tiles": len(tiles.train),
            "heldout_tiles": len(tiles.heldout),
        }
    )
    atomic_write_text(run_dir / METRICS, json.dumps(metrics, indent=2) + "\n")
    return VAETrainResult(vae_dir=run_dir / VAE_DIR, metrics=metrics, resumed_from=start)


def _weights_for_saving(vae: AutoencoderKL, ema: EMA | None) -> AutoencoderKL:
    """The raw model, or a copy holding the EMA weights."""
    if ema is None:
        return vae
    import copy

    averaged = copy.deepcopy(vae)
    ema.copy_to(averaged)
    return averaged
