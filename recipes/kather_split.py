"""Held-out Kather tiles for the recipes: every tile of the full folder that is not among the
training tiles, linked into an ImageFolder, plus the class captions used in training."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from mupad.applications.demo import KATHER_CAPTIONS
from mupad.data.tiles import IMAGE_SUFFIXES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--all", type=Path, required=True, help="every tile, <class>/<tile>")
    parser.add_argument("--train", type=Path, required=True, help="the training tiles")
    parser.add_argument("--heldout", type=Path, required=True, help="output ImageFolder")
    parser.add_argument("--captions", type=Path, required=True, help="output captions JSON")
    args = parser.parse_args()

    def tiles(root: Path) -> set[str]:
        return {
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES
        }

    train = tiles(args.train)
    for relative in sorted(tiles(args.all) - train):
        link = args.heldout / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            os.symlink((args.all / relative).resolve(), link)
    args.captions.write_text(json.dumps(KATHER_CAPTIONS, indent=1) + "\n")


if __name__ == "__main__":
    main()
