"""Tiling speed (tiles per second) of mupad.data.wsi on the CC0 slide and a synthetic pyramid.

For each slide and target resolution it times, separately, planning (thumbnail + tissue
mask + grid) and reading every planned tile, and prints tiles/s for reading alone and end to
end. Runs on one thread (the readers are single-threaded; scale out with processes).

    python benchmarks/tiling.py                          # CC0 slide + 8k x 6k synthetic TIFF
    python benchmarks/tiling.py --synthetic-px 16384 --compression zlib
    python benchmarks/tiling.py --slide path/to/slide.svs --mpp 0.25

The synthetic slide is written once into a temporary folder: level 0 at 0.25 µm/px (40x),
three halvings, 256-px tiles, with an elliptical 'tissue' region of stained texture.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mupad.data.wsi import open_slide, plan_tiles, read_tile
from mupad.data.wsi.openslide_backend import openslide_available
from mupad.data.wsi.tiff_backend import TiffSlide
from mupad.data.wsi.write import write_pyramidal_tiff

CMU_SLIDE = (
    Path(__file__).resolve().parents[1].parent / "shared/data/package_samples/cmu_small_region.svs"
)


def synthetic_slide(side_px: int, seed: int = 0) -> np.ndarray:
    """uint8 (side*3/4, side, 3): white glass with an ellipse of pink/purple texture."""
    height, width = side_px * 3 // 4, side_px
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    inside = ((xx / width - 0.5) / 0.4) ** 2 + ((yy / height - 0.5) / 0.35) ** 2 < 1.0
    image = np.full((height, width, 3), 255, dtype=np.uint8)
    texture = rng.integers(0, 60, (height, width, 1), dtype=np.uint8)
    stain = np.array([170, 70, 150], dtype=np.uint8) - texture  # (h, w, 3)
    image[inside] = stain[inside]
    return image


def bench(label: str, slide, tile_size: int, target_mpp: float) -> None:
    start = time.perf_counter()
    coords = plan_tiles(slide, tile_size=tile_size, target_mpp=target_mpp)
    plan_s = time.perf_counter() - start
    start = time.perf_counter()
    for coord in coords:
        read_tile(slide, coord, tile_size)
    read_s = time.perf_counter() - start
    print(
        f"{label:<44} {target_mpp:>5.2f} µm/px  level {coords[0].level}  {len(coords):>6} tiles  "
        f"plan {plan_s:6.2f} s  read {read_s:6.2f} s  "
        f"{len(coords) / read_s:8.1f} tiles/s read  {len(coords) / (plan_s + read_s):8.1f} tiles/s total"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slide", type=Path, default=CMU_SLIDE)
    parser.add_argument("--mpp", type=float, default=None, help="µm/px if the slide lacks it")
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--synthetic-px", type=int, default=8192, help="0 to skip")
    parser.add_argument("--compression", default="jpeg", choices=["jpeg", "zlib", "none"])
    args = parser.parse_args()
    torch.set_num_threads(1)

    if args.slide.is_file():
        with open_slide(args.slide, mpp=args.mpp) as slide:
            print(f"{slide!r}")
            for target in (0.5, 1.0):
                bench(f"{args.slide.name} [{type(slide).__name__}]", slide, args.tile_size, target)
        if openslide_available() and args.slide.suffix.lower() == ".svs":
            with TiffSlide(args.slide, args.mpp) as slide:
                bench(f"{args.slide.name} [TiffSlide]", slide, args.tile_size, 0.5)
    else:
        print(f"skipping {args.slide}: not found")

    if args.synthetic_px:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "synthetic.tif"
            start = time.perf_counter()
            compression = None if args.compression == "none" else args.compression
            write_pyramidal_tiff(
                path,
                synthetic_slide(args.synthetic_px),
                mpp=0.25,
                num_levels=4,
                compression=compression,
            )
            print(
                f"wrote {path.name} ({path.stat().st_size / 2**20:.0f} MiB, {compression}) in "
                f"{time.perf_counter() - start:.1f} s"
            )
            with open_slide(path) as slide:
                print(f"{slide!r}")
                for target in (0.5, 0.375, 1.0):  # exact level 1, resampled from 0, exact level 2
                    bench(f"synthetic {slide.width}x{slide.height}", slide, args.tile_size, target)


if __name__ == "__main__":
    main()
