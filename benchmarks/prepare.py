"""Latent caching speed of `mupad prepare`, and what caching buys in training, in one run.

1. Tiles per second of `prepare_dataset` on a tile folder: pixels only, and with VAE
   latent moments cached (`--latents`, pixels kept for step 2).
2. Training throughput (images/s of SiT forward + backward + AdamW step) when latents come
   (a) from the cache: z = mean + exp(logvar / 2) * eps from `latent_moments`, versus
   (b) on the fly: the VAE encodes the uint8 tiles every step (posterior sample).
   Both read the same shards, held in memory; steps are interleaved so that a shared
   machine's slow phases hit both. The ratio (a) / (b) is the speed-up of caching.

    python benchmarks/prepare.py                        # bundled Kather tiles x2, 128 px
    python benchmarks/prepare.py --vae ~/.cache/mupad/sd-vae-ft-ema --size 256 --repeat 4
    python benchmarks/prepare.py --tiles my_tiles/ --preset B/2 --device cuda

Without --vae a small randomly initialised AutoencoderKL (8x down, 4 latent channels,
channels 32/64/128/128) is built here; its cost per tile is far below the SD VAE's, so the
caching speed-up measured with it is a lower bound.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mupad.config import model_preset
from mupad.data.prepare import PrepareConfig, prepare_dataset
from mupad.data.shards import read_shard, shard_paths
from mupad.data.tiles import IMAGE_SUFFIXES, bundled_kather_dir
from mupad.latents import load_codec, uint8_to_pixels
from mupad.models import SiT
from mupad.transport.paths import interpolate, velocity_target


def replicate_tiles(source: Path, target: Path, repeat: int) -> int:
    """Symlink every tile of `source/<class>/` `repeat` times into `target/<class>/`."""
    count = 0
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        (target / class_dir.name).mkdir(parents=True, exist_ok=True)
        for tile in sorted(class_dir.iterdir()):
            if tile.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            for k in range(repeat):
                (target / class_dir.name / f"{tile.stem}_r{k}{tile.suffix}").symlink_to(
                    tile.resolve()
                )
                count += 1
    return count


def build_small_vae(folder: Path, seed: int) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 64, 128, 128),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=256,
    ).save_pretrained(folder)
    return folder


def timed_prepare(tiles: Path, out: Path, config: PrepareConfig) -> tuple[float, int]:
    start = time.perf_counter()
    summary = prepare_dataset(tiles, out, config)
    return time.perf_counter() - start, summary.tiles_written


def load_all(out: Path) -> dict[str, torch.Tensor]:
    parts: dict[str, list[torch.Tensor]] = {}
    for path in shard_paths(out):
        tensors, _ = read_shard(path)
        for name, value in tensors.items():
            parts.setdefault(name, []).append(value)
    return {name: torch.cat(values) for name, values in parts.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=Path, default=None, help="tile folder [bundled Kather]")
    parser.add_argument("--repeat", type=int, default=2, help="use every tile this many times")
    parser.add_argument("--vae", type=Path, default=None, help="AutoencoderKL folder [small one]")
    parser.add_argument("--size", type=int, default=128, help="tile side in px (default 128)")
    parser.add_argument("--batch", type=int, default=16, help="prepare and training batch")
    parser.add_argument("--preset", default="S/2", help="SiT preset for the training steps")
    parser.add_argument("--iters", type=int, default=8, help="timed training steps per mode")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory(prefix="mupad-bench-prepare-") as tmp_name:
        tmp = Path(tmp_name)
        n_tiles = replicate_tiles(args.tiles or bundled_kather_dir(), tmp / "tiles", args.repeat)
        vae = args.vae or build_small_vae(tmp / "vae", args.seed)
        common = {
            "tile_size": args.size,
            "batch_size": args.batch,
            "shard_size": 256,
            "tiles_per_source": 1024,
            "progress": False,
            "device": args.device,
        }
        load_codec(vae, device=device)  # first load (imports, file cache) outside the timing
        pixel_s, n_pixel = timed_prepare(tmp / "tiles", tmp / "pixels", PrepareConfig(**common))
        latent_s, n_latent = timed_prepare(
            tmp / "tiles",
            tmp / "latents",
            PrepareConfig(**common, latents=str(vae), keep_pixels=True),
        )
        data = load_all(tmp / "latents")
        codec = load_codec(vae, device=device, batch_size=args.batch)  # before tmp goes
    moments = data["latent_moments"]  # (N, 2C, h, w) float16
    images = data["image"]  # (N, 3, S, S) uint8
    channels, latent_side = codec.latent_channels, moments.shape[-1]
    config = model_preset(
        args.preset, in_channels=channels, cross_attention="none", sample_size=latent_side
    )
    model = SiT(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(args.seed)
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if device.type == "cuda"
        else contextlib.nullcontext
    )

    def batch_latents(mode: str) -> torch.Tensor:
        index = torch.randint(moments.shape[0], (args.batch,), generator=generator)
        if mode == "cached":
            mean, logvar = moments[index].to(device).float().chunk(2, dim=1)  # (B, C, h, w)
            return mean + (0.5 * logvar).exp() * torch.randn_like(mean)
        pixels = uint8_to_pixels(images[index].to(device))  # (B, 3, S, S)
        return codec.encode(pixels, sample=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(mode: str) -> tuple[float, float]:
        """One training step; (seconds to get the latents, seconds for the whole step)."""
        sync()
        start = time.perf_counter()
        x0 = batch_latents(mode)  # (B, C, h, w)
        sync()
        data_s = time.perf_counter() - start
        noise = torch.randn_like(x0)
        t = torch.rand(x0.shape[0], device=device)
        with autocast():
            velocity = model(interpolate(x0, noise, t), t).velocity
        loss = F.mse_loss(velocity.float(), velocity_target(x0, noise))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync()
        return data_s, time.perf_counter() - start

    for _ in range(args.warmup):
        step("cached")
        step("on_the_fly")
    times: dict[str, list[tuple[float, float]]] = {"cached": [], "on_the_fly": []}
    for i in range(args.iters):
        for mode in ("cached", "on_the_fly") if i % 2 == 0 else ("on_the_fly", "cached"):
            times[mode].append(step(mode))
    median = {mode: statistics.median(s for _, s in v) for mode, v in times.items()}
    data_median = {mode: statistics.median(d for d, _ in v) for mode, v in times.items()}

    print(f"device: {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(
        f"VAE: {'small random AutoencoderKL (built here)' if args.vae is None else vae}, "
        f"{codec.downsample}x down, {channels} latent channels; tiles {args.size} px -> "
        f"latents {latent_side}x{latent_side}; {n_tiles} tiles"
    )
    print("prepare (tiles/s, whole run incl. reading PNGs and writing shards):")
    print(f"  pixels only          {n_pixel / pixel_s:8.1f} tiles/s  ({pixel_s:.2f} s)")
    print(f"  + latent moments     {n_latent / latent_s:8.1f} tiles/s  ({latent_s:.2f} s)")
    print(
        f"training SiT-{args.preset}, batch {args.batch}, fwd+bwd+AdamW, median of "
        f"{args.iters} interleaved steps after {args.warmup} warm-up:"
    )
    for mode in ("cached", "on_the_fly"):
        label = "cached latents" if mode == "cached" else "VAE on the fly"
        print(
            f"  {label:<20} {median[mode] * 1e3:8.1f} ms/step  "
            f"{args.batch / median[mode]:7.1f} images/s  (latents {data_median[mode] * 1e3:.1f} "
            "ms of it)"
        )
    print(
        f"  throughput ratio cached / on-the-fly: {median['on_the_fly'] / median['cached']:.2f}x"
    )


if __name__ == "__main__":
    main()
