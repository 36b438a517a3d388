"""Paired-files CSVs for `mupad prepare` from `mupad st extract` outputs: one row per spot
(its patch and its pathway scores), restricted to the pathways scored in every section so
all rows share one RNA vector layout. Sections listed under --val go to the held-out CSV.
With --max-pathways N only the N pathways whose scores vary most across the training spots
are kept (chosen without looking at the held-out sections): the RNA stream carries one token
per pathway, so its cost grows with their number."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "root", type=Path, help="folder holding one `st extract` output per section"
    )
    parser.add_argument("--sections", required=True, help="comma-separated, e.g. B4,C2,C3")
    parser.add_argument("--val", required=True, help="held-out sections, e.g. C6")
    parser.add_argument(
        "--max-pathways", type=int, default=0, help="keep the N most variable (0: all)"
    )
    args = parser.parse_args()
    sections = [s for s in args.sections.split(",") if s]
    val = {s for s in args.val.split(",") if s}
    scores = {s: pd.read_csv(args.root / s / "scores.csv", index_col=0) for s in sections}
    common = sorted(set.intersection(*(set(frame.columns) for frame in scores.values())))
    if args.max_pathways:
        training = pd.concat([scores[s][common] for s in sections if s not in val])
        variance = training.var(axis=0).sort_values(ascending=False, kind="stable")
        common = sorted(variance.index[: args.max_pathways])
    pd.Series(common, name="pathway").to_csv(args.root / "pathways.csv", index=False)
    for split in ("train", "val"):
        frames = []
        for section in sections:
            if (section in val) != (split == "val"):
                continue
            manifest = pd.read_csv(args.root / section / "manifest.csv")
            values = scores[section].loc[manifest["barcode"].astype(str), common].to_numpy()
            # rna_<pathway name>: prepare records the names, so the model carries them.
            columns = {f"rna_{name}": values[:, i] for i, name in enumerate(common)}
            images = [f"{section}/{patch}" for patch in manifest["patch"]]
            frames.append(pd.DataFrame({"image": images, **columns}))
        pd.concat(frames).to_csv(args.root / f"pairs_{split}.csv", index=False)


if __name__ == "__main__":
    main()
