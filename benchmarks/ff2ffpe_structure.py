"""FF -> FFPE on a synthetic stand-in: how much structure injection keeps, and what it costs.

There are no real fresh-frozen tiles in this environment, so the bundled Kather 2016 H&E tiles
(FFPE sections) stand in for both domains:

* "FF" = FFPE tiles put through a SYNTHETIC frozen-section degradation (`degrade_ff`): a
  stain shift in HED space (hematoxylin x1.2-1.4, eosin x0.55-0.75), a Gaussian blur
  (sigma 0.8-1.2 px) and ice-crystal-like holes (many small soft white ellipses inside the
  tissue). It imitates some looks of frozen sections; it is not a model of real FF artefacts.
* "FFPE" = untouched tiles.

Split (stratified by class, fixed seed): 2 tiles per class held out; of the rest, half are
degraded (FF training domain) and the other half kept (FFPE training domain) — unpaired.
A small pixel-space SiT is trained with the two domain texts through `finetune_domains`
(the `mupad ffpe finetune` path; `--init` gets a freshly initialised small SiT, as no
pretrained MUPAD weights exist here). The held-out tiles are degraded and translated with
and without self-attention injection; reported per setting, mean ± std over the held-out
crops:

* H-SSIM(FF input, output): the structure kept (SSIM of the hematoxylin channel)
* H-SSIM(clean original, output): closeness to the synthetic ground truth
* mean hematoxylin / eosin optical density, against the FFPE training tiles'
* seconds per crop

    python benchmarks/ff2ffpe_structure.py --out /work/data_runs/ff2ffpe --steps 500
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from skimage.color import hed2rgb, rgb2hed

from mupad.applications.ff2ffpe import (
    DomainConditions,
    FFPESettings,
    domain_texts,
    finetune_domains,
    guidance_config,
    hematoxylin_ssim,
    load_ffpe_model,
    translate_images,
)
from mupad.config import ModelConfig, Precision, TrainConfig
from mupad.data.tiles import bundled_kather_dir
from mupad.models import SiT

# --------------------------------------------------------------------------------------
# The synthetic "frozen section" degradation
# --------------------------------------------------------------------------------------


def degrade_ff(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 (H, W, 3) FFPE tile -> uint8 (H, W, 3) synthetic FF-like tile."""
    rgb = image.astype(np.float64) / 255.0
    hed = rgb2hed(np.maximum(rgb, 1 / 255))
    hed[..., 0] *= rng.uniform(1.2, 1.4)  # stronger, bluer hematoxylin
    hed[..., 1] *= rng.uniform(0.55, 0.75)  # paler eosin
    out = np.clip(hed2rgb(hed), 0, 1)
    sigma = rng.uniform(0.8, 1.2)
    out = np.stack([ndimage.gaussian_filter(out[..., c], sigma) for c in range(3)], axis=-1)
    # Ice-crystal-like holes: small soft ellipses pushed towards white, inside tissue only.
    height, width = out.shape[:2]
    tissue = out.mean(axis=-1) < 0.8
    yy, xx = np.mgrid[0:height, 0:width]
    holes = np.zeros((height, width))
    candidates = np.argwhere(tissue)
    count = int(len(candidates) * rng.uniform(0.0015, 0.003))
    for y, x in candidates[rng.choice(len(candidates), size=count)] if count else []:
        ry, rx = rng.uniform(1.0, 3.5, size=2)
        angle = rng.uniform(0, np.pi)
        dy, dx = yy - y, xx - x
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / rx
        v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ry
        holes = np.maximum(holes, 0.85 * np.clip(1.3 - (u**2 + v**2), 0, 1))
    out = out * (1 - holes[..., None]) + 0.93 * holes[..., None]
    return np.clip(np.round(out * 255), 0, 255).astype(np.uint8)


def optical_densities(images: torch.Tensor) -> np.ndarray:
    """uint8 (B, 3, H, W) -> (B, 2) mean hematoxylin and eosin densities (rgb2hed)."""
    array = images.permute(0, 2, 3, 1).numpy()
    rgb = np.maximum(array, 1).astype(np.float64) / 255.0
    return np.stack([rgb2hed(a)[..., :2].reshape(-1, 2).mean(axis=0) for a in rgb])


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def build_data(root: Path, seed: int) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    folders = {name: root / name for name in ("ff", "ffpe", "heldout_ff", "heldout_clean")}
    if all(f.is_dir() for f in folders.values()):
        return folders
    shutil.rmtree(root, ignore_errors=True)
    for folder in folders.values():
        folder.mkdir(parents=True)
    for class_dir in sorted(p for p in bundled_kather_dir().iterdir() if p.is_dir()):
        tiles = sorted(class_dir.glob("*.png"))
        order = rng.permutation(len(tiles))
        heldout, rest = order[:2], order[2:]
        for rank, index in enumerate(rest):
            array = np.asarray(Image.open(tiles[index]).convert("RGB"))
            name = f"{class_dir.name}__{tiles[index].stem}.png"
            if rank % 2 == 0:
                Image.fromarray(degrade_ff(array, rng)).save(folders["ff"] / name)
            else:
                Image.fromarray(array).save(folders["ffpe"] / name)
        for index in heldout:
            array = np.asarray(Image.open(tiles[index]).convert("RGB"))
            name = f"{class_dir.name}__{tiles[index].stem}.png"
            Image.fromarray(array).save(folders["heldout_clean"] / name)
            Image.fromarray(degrade_ff(array, rng)).save(folders["heldout_ff"] / name)
    shutil.copy(bundled_kather_dir() / "ATTRIBUTION.md", root / "ATTRIBUTION.md")
    return folders


def crops(folder: Path, side: int, per_axis: int) -> torch.Tensor:
    """uint8 (N * per_axis^2, 3, side, side): a per_axis x per_axis grid of crops from the
    centre of every tile."""
    out = []
    for path in sorted(folder.glob("*.png")):
        array = np.asarray(Image.open(path).convert("RGB"))
        top = (array.shape[0] - per_axis * side) // 2
        left = (array.shape[1] - per_axis * side) // 2
        for i in range(per_axis):
            for j in range(per_axis):
                y, x = top + i * side, left + j * side
                out.append(array[y : y + side, x : x + side])
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def mean_std(values: np.ndarray) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/work/data_runs/ff2ffpe"))
    parser.add_argument("--steps", type=int, default=500, help="fine-tuning steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--crop", type=int, default=48)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=0.0)
    parser.add_argument("--strength", type=float, default=1.0, help="invert up to this t")
    parser.add_argument("--tag", default="", help="suffix of results/figure names")
    parser.add_argument(
        "--configs", default="maps50,kv50,maps100,maps50early", help="besides 'none'"
    )
    parser.add_argument("--timing-crops", type=int, default=8)
    parser.add_argument("--timing-rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    data = build_data(out / "data", args.seed)

    # The --init path: a freshly initialised small SiT (no pretrained weights exist here).
    init = out / "init"
    if not (init / "model.safetensors").exists():
        torch.manual_seed(args.seed)
        config = ModelConfig(
            in_channels=3, patch_size=4, hidden_size=args.hidden, depth=args.depth,
            num_heads=args.heads, text_dim=384, sample_size=args.crop // 4,
        )  # fmt: skip
        SiT(config).save_pretrained(init)
    train_config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, learning_rate=3e-4, warmup_steps=20,
        ema_decay=0.99, precision=Precision.BF16, checkpoint_every=100, log_every=10,
        seed=args.seed,
    )  # fmt: skip
    started = time.perf_counter()
    run = finetune_domains(
        data["ff"], data["ffpe"], out / "run", train_config=train_config, init_from=init,
        crop=args.crop, latents="identity", text_encoder="minilm",
    )  # fmt: skip
    train_seconds = time.perf_counter() - started

    model, metadata, _ = load_ffpe_model(out / "run")
    source_text, target_text = domain_texts(metadata)
    domains = DomainConditions.encode("minilm", source_text, target_text)
    ff = crops(data["heldout_ff"], args.crop, 2)
    clean = crops(data["heldout_clean"], args.crop, 2)
    ffpe_train = crops(data["ffpe"], args.crop, 2)
    depth = model.config.depth
    guidance = guidance_config(args.guidance)
    base = FFPESettings(
        source_text=source_text, target_text=target_text, num_steps=args.sample_steps,
        strength=args.strength, guidance=guidance, inject_mode="maps",
    )  # fmt: skip
    every = {
        "none": ("no injection", base.without_injection()),
        "maps50": ("maps, all blocks, 50% steps", base),
        "kv50": ("kv, all blocks, 50% steps", dataclasses.replace(base, inject_mode="kv")),
        "maps100": (
            "maps, all blocks, 100% steps",
            dataclasses.replace(base, inject_fraction=1.0),
        ),
        "maps50early": (
            f"maps, blocks 0-{depth // 2 - 1}, 50% steps",
            dataclasses.replace(base, inject_blocks=tuple(range(depth // 2))),
        ),
    }
    keys = ["none"] + [k for k in args.configs.split(",") if k != "none"]
    settings = dict(every[k] for k in keys)
    results: dict[str, dict] = {}
    images: dict[str, torch.Tensor] = {}
    reference = {
        "H-SSIM(FF input, clean original)": mean_std(hematoxylin_ssim(ff, clean)),
        "OD H/E FF input": optical_densities(ff).mean(axis=0).round(4).tolist(),
        "OD H/E clean original": optical_densities(clean).mean(axis=0).round(4).tolist(),
        "OD H/E FFPE training crops": optical_densities(ffpe_train).mean(axis=0).round(4).tolist(),
    }
    for name, setting in settings.items():
        start = time.perf_counter()
        result = translate_images(
            model, ff, domains, setting, batch_size=16, reconstruct=True, progress=True
        )
        seconds = time.perf_counter() - start
        keep = hematoxylin_ssim(ff, result.images)
        truth = hematoxylin_ssim(clean, result.images)
        recon = hematoxylin_ssim(ff, result.reconstruction)
        results[name] = {
            "H-SSIM(FF input, output)": mean_std(keep),
            "H-SSIM(clean original, output)": mean_std(truth),
            "H-SSIM(FF input, source reconstruction)": mean_std(recon),
            "OD H/E output": optical_densities(result.images).mean(axis=0).round(4).tolist(),
            "seconds per crop": round(seconds / len(ff), 3),
            "raw": {"keep": keep.tolist(), "truth": truth.tolist()},
        }
        if name != "no injection":  # paired with the same crops without injection
            gain = keep - np.array(results["no injection"]["raw"]["keep"])
            results[name]["H-SSIM(FF input, output) gain over no injection"] = (
                f"{gain.mean():+.4f} ± {gain.std():.4f} (s.e.m. {gain.std() / np.sqrt(len(gain)):.4f}"
                f", higher on {np.mean(gain > 0):.0%} of crops)"
            )
        images[name] = result.images
        print(name, {k: v for k, v in results[name].items() if k != "raw"}, flush=True)

    # Timing of the production path (no reconstruction), settings interleaved round by round.
    timing: dict[str, list[float]] = {name: [] for name in settings}
    subset = ff[: args.timing_crops]
    for round_index in range(args.timing_rounds):
        names = list(settings) if round_index % 2 == 0 else list(settings)[::-1]
        for name in names:
            start = time.perf_counter()
            translate_images(model, subset, domains, settings[name], batch_size=len(subset))
            timing[name].append((time.perf_counter() - start) / len(subset))
    seconds_per_crop = {name: float(np.median(v)) for name, v in timing.items()}
    for name, value in seconds_per_crop.items():
        results[name]["median seconds per crop (no reconstruction, interleaved)"] = round(value, 4)
        results[name]["time relative to no injection"] = round(
            value / seconds_per_crop["no injection"], 3
        )

    # Figure: rows = held-out crops; columns = FF input, outputs per setting, clean original.
    from mupad.applications.figures import save_grid

    rows = list(range(0, len(ff), max(1, len(ff) // 8)))[:8]
    columns = [ff] + [images[name] for name in settings] + [clean]
    grid = torch.stack([column[r] for r in rows for column in columns])
    figure = save_grid(grid, out / f"ff2ffpe_grid{args.tag}.png", columns=len(columns))
    summary = {
        "what": "FF -> FFPE on a SYNTHETIC FF stand-in (degraded Kather 2016 FFPE tiles)",
        "columns of the figure": ["FF input (synthetic)", *settings, "clean original"],
        "texts": [source_text, target_text],
        "train": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "crop": args.crop,
            "model": {"hidden": args.hidden, "depth": args.depth, "heads": args.heads},
            "seconds_this_invocation": round(train_seconds, 1),
            "last_loss": run.result.last_loss,
        },
        "sampling": {
            "steps": args.sample_steps,
            "method": "euler",
            "guidance": args.guidance,
            "strength": args.strength,
        },
        "heldout_crops": len(ff),
        "threads": torch.get_num_threads(),
        "reference": reference,
        "results": results,
        "figure": str(figure),
    }
    (out / f"results{args.tag}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}, indent=2))


if __name__ == "__main__":
    main()
