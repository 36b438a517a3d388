"""`mupad demo`: the pretrained tile generator, then a short fine-tune on the bundled tiles.

The whole pipeline on real data in a few CPU minutes: 96 Kather 2016 colorectal tiles
(8 tissue classes), each class described by a caption encoded with MiniLM token states,
64 px crops. First the pretrained model that ships with mupad draws every class; then it
is fine-tuned on the bundled tiles (flow matching, EMA) and draws them again. Without a
packaged model (a source checkout that lacks it) the same model is trained from scratch.

Writes, under the run folder: pretrained_samples/<class>/<k>.png and samples/<class>/<k>.png
(every generated tile as its own PNG), overview grids, per-class grids (real crops, then each
model's samples), the loss curve, metrics.json (border ratio at the token period, colour
moments, RGB distance, class consistency, each beside real crops), the checkpoint and an
index.html that shows them.
"""

from __future__ import annotations

import html
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mupad.applications.default_model import packaged_model_dir, remember_demo_run
from mupad.applications.figures import loss_curve_png, save_grid
from mupad.applications.generate import generate
from mupad.applications.train_tiles import train_on_tile_folder
from mupad.config import (
    TILE_TIME_SAMPLING,
    DemoConfig,
    GuidanceConfig,
    ModelConfig,
    SampleConfig,
    TrainConfig,
    tile_model_config,
    to_dict,
)
from mupad.conditioning import get_encoder
from mupad.data.tiles import (
    TileSet,
    bundled_kather_dir,
    load_tile_folder,
    random_crops,
    to_uint8,
)
from mupad.evaluation.pixel_stats import class_consistency, sliced_wasserstein_rgb
from mupad.evaluation.stats import EvaluationError
from mupad.evaluation.tile_quality import border_ratio, colour_moments
from mupad.models import SiT
from mupad.precision import PrecisionChoice, resolve_precision
from mupad.training.captioned_tiles import CaptionBank, encode_captions
from mupad.training.checkpoint import latest_checkpoint
from mupad.training.loop import read_log

logger = logging.getLogger(__name__)

KATHER_CAPTIONS = {
    "01_TUMOR": "H&E stained colorectal adenocarcinoma: tumour epithelium with crowded atypical nuclei",
    "02_STROMA": "H&E stained simple stroma: pink collagen fibres with sparse spindle cells",
    "03_COMPLEX": "H&E stained complex stroma with mixed cells and scattered tumour cells",
    "04_LYMPHO": "H&E stained lymphocytes: dense sheets of small dark round nuclei",
    "05_DEBRIS": "H&E stained debris: necrosis, haemorrhage and mucus",
    "06_MUCOSA": "H&E stained normal colon mucosa with regular glands and goblet cells",
    "07_ADIPOSE": "H&E stained adipose tissue: large empty white fat cells with thin membranes",
    "08_EMPTY": "empty slide background without tissue",
}


def demo_model_config(crop: int) -> ModelConfig:
    """The tile generator (config.tile_model_config) with MiniLM's 384-wide text stream."""
    return tile_model_config(crop, text_dim=384)


def demo_train_config(settings: DemoConfig, *, fine_tune: bool) -> TrainConfig:
    return TrainConfig(
        steps=settings.steps,
        batch_size=settings.batch_size,
        # A fine-tune starts from trained weights: a lower rate, a short warm-up.
        learning_rate=2e-4 if fine_tune else 5e-4,
        warmup_steps=20 if fine_tune else 100,
        grad_clip=1.0,
        ema_decay=0.995 if fine_tune else 0.999,
        precision=resolve_precision(PrecisionChoice.AUTO),
        condition_dropout=0.1,
        time_sampling=TILE_TIME_SAMPLING,
        seed=settings.seed,
        log_every=10,
        checkpoint_every=500,
        keep_checkpoints=1,
    )


def demo_sample_config(settings: DemoConfig) -> SampleConfig:
    return SampleConfig(
        sampler=settings.sampler,
        num_steps=settings.sample_steps,
        guidance=GuidanceConfig(start=settings.guidance_start, end=0.0),
        seed=settings.seed,
    )


@dataclass
class SampleSet:
    """Generated tiles of one model, per class, with their measures."""

    title: str
    images: torch.Tensor  # (K * n, 3, S, S) uint8
    labels: torch.Tensor  # (K * n,)
    metrics: dict[str, Any]
    grid: str  # file name of the overview grid, relative to the run folder


def _sample_model(
    model: SiT,
    bank: CaptionBank,
    tiles: TileSet,
    settings: DemoConfig,
    folder: Path,
    title: str,
    real: tuple[torch.Tensor, torch.Tensor],
) -> SampleSet:
    """Sample `samples_per_class` tiles per class, write each as its own PNG under
    folder/<class>/<k>.png plus an overview grid, and measure them against real crops."""
    per_class = settings.samples_per_class
    labels = torch.arange(len(bank.captions)).repeat_interleave(per_class)  # (K * n,)
    images = generate(model, bank.conditions(labels), demo_sample_config(settings), progress=True)
    for k, name in enumerate(tiles.class_names):
        for i, image in enumerate(images[labels == k]):
            _save_png(image, folder / name / f"{i:02d}.png")
    grid = folder.with_name(folder.name + "_all.png")
    save_grid(images, grid, columns=per_class)
    real_u8, real_labels = real
    noise_u8 = to_uint8(torch.randn(images.shape, generator=torch.Generator().manual_seed(1)))
    period = model.config.patch_size
    metrics = {
        "border_ratio": {
            "generated": _border_ratio_or_none(images, period),
            "real": border_ratio(real_u8, period),
            "token_period_px": period,
        },
        "colour": {"generated": colour_moments(images), "real": colour_moments(real_u8)},
        "sliced_wasserstein_rgb": {
            "generated_vs_real": sliced_wasserstein_rgb(images, real_u8),
            "noise_vs_real": sliced_wasserstein_rgb(noise_u8, real_u8),
        },
        "class_consistency": {
            "generated": class_consistency(images, labels, real_u8, real_labels),
            "chance": 1.0 / len(bank.captions),
        },
    }
    return SampleSet(title, images, labels, metrics, grid.name)


def _border_ratio_or_none(images: torch.Tensor, period: int) -> float | None:
    """The border ratio, or None for tiles flat inside every token (an untrained model)."""
    try:
        return border_ratio(images, period)
    except EvaluationError:
        return None


def _save_png(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)


def run_demo(out: str | Path = "runs/demo", settings: DemoConfig | None = None) -> Path:
    """Sample the packaged model, fine-tune it (or train from scratch without one) on the
    bundled tiles, sample again and write the report; returns the index.html path."""
    settings = settings or DemoConfig()
    out = Path(out)
    packaged = packaged_model_dir()
    fine_tune = packaged is not None
    tiles = load_tile_folder(bundled_kather_dir())
    bank = encode_captions([KATHER_CAPTIONS[n] for n in tiles.class_names], get_encoder("minilm"))
    # Real crops for comparison (a fixed generator, independent of training).
    real, real_index = random_crops(tiles, settings.crop, 512, torch.Generator().manual_seed(12345))
    real_set = (to_uint8(real), tiles.labels[real_index])

    sets = []
    if packaged is not None:  # what a fresh install draws, before any training
        pretrained = SiT.from_pretrained(packaged).float()
        sets.append(_sample_model(pretrained, bank, tiles, settings, out / "pretrained_samples",
                                  "Pretrained model (ships with mupad)", real_set))  # fmt: skip
        logger.info("samples of the pretrained model: %s", out / sets[0].grid)
    train_on_tile_folder(
        bundled_kather_dir(),
        out,
        train_config=demo_train_config(settings, fine_tune=fine_tune),
        model_config=None if fine_tune else demo_model_config(settings.crop),
        init_from=packaged,
        crop=settings.crop,
        captions=KATHER_CAPTIONS,
    )
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None  # train() always writes a final checkpoint
    tuned = SiT.from_pretrained(checkpoint / "ema")
    title = "After fine-tuning on the bundled tiles" if fine_tune else "Trained from scratch"
    sets.append(_sample_model(tuned, bank, tiles, settings, out / "samples", title, real_set))

    final = sets[-1]
    figures = []
    real_u8, real_labels = real_set
    per_class = settings.samples_per_class
    for k, name in enumerate(tiles.class_names):
        path = out / f"samples_{name}.png"
        rows = [real_u8[real_labels == k][:per_class]] + [s.images[s.labels == k] for s in sets]
        save_grid(torch.cat(rows), path, columns=per_class)
        figures.append((name, bank.captions[k], path.name))
    loss_curve_png(read_log(out), out / "loss_curve.png")

    metrics = {
        **final.metrics,
        "models": {s.title: s.metrics for s in sets},
        "pretrained_model": str(packaged) if packaged is not None else None,
        "train_config": to_dict(demo_train_config(settings, fine_tune=fine_tune)),
        "sample_config": to_dict(demo_sample_config(settings)),
        "checkpoint": str(checkpoint),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    index = out / "index.html"
    index.write_text(_index_html(figures, sets, checkpoint, out, fine_tune))
    remember_demo_run(out)  # the default model of `mupad generate` / `augment` / `serve`
    return index


def _metrics_rows(metrics: dict[str, Any]) -> str:
    border, colour = metrics["border_ratio"], metrics["colour"]
    swd, consistency = metrics["sliced_wasserstein_rgb"], metrics["class_consistency"]

    def rgb(values: list[float]) -> str:
        return " / ".join(f"{v:.0f}" for v in values)

    return f"""<tr><td>Border ratio at the {border["token_period_px"]}&nbsp;px token period
(1.0 = no grid)</td><td>generated {_number(border["generated"])} &middot; real
{border["real"]:.2f}</td></tr>
<tr><td>RGB mean (R / G / B, 0-255)</td><td>generated {rgb(colour["generated"]["mean"])}
&middot; real {rgb(colour["real"]["mean"])}</td></tr>
<tr><td>RGB std</td><td>generated {rgb(colour["generated"]["std"])} &middot; real
{rgb(colour["real"]["std"])}</td></tr>
<tr><td>Sliced Wasserstein distance of RGB pixels to real crops (lower is better)</td>
<td>generated {swd["generated_vs_real"]:.4f} &middot; Gaussian noise {swd["noise_vs_real"]:.4f}</td></tr>
<tr><td>Class consistency (nearest real-class centroid of colour statistics)</td>
<td>generated {consistency["generated"]:.3f} &middot; chance {consistency["chance"]:.3f}</td></tr>"""


def _number(value: float | None) -> str:
    return "undefined (flat tiles)" if value is None else f"{value:.2f}"


def _index_html(figures, sets: list[SampleSet], checkpoint: Path, out: Path, fine_tune: bool) -> str:
    measured = "\n".join(
        f'<h3>{html.escape(s.title)}</h3><table border="1" cellpadding="4">'
        f"{_metrics_rows(s.metrics)}</table>"
        f'<p><img src="{s.grid}" alt="{html.escape(s.title)}"></p>'
        for s in sets
    )
    order = ", ".join(html.escape(s.title.lower()) for s in sets)
    rows = "\n".join(
        f"<h3>{html.escape(name)}</h3><p><i>{html.escape(caption)}</i></p>"
        f'<img src="{png}" alt="{html.escape(name)}">'
        for name, caption, png in figures
    )
    what = (
        "the pretrained model that ships with mupad, fine-tuned" if fine_tune else "a model trained"
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>mupad demo</title>
<style>body{{font-family:sans-serif;max-width:980px;margin:2em auto}}img{{image-rendering:pixelated;max-width:100%}}</style>
</head><body>
<h1>mupad demo: text-conditioned H&amp;E generation</h1>
<p>A small SiT with decoupled cross-attention in pixel space ({what} on 64&nbsp;px crops of the
96 bundled Kather 2016 colorectal cancer tiles, CC&nbsp;BY&nbsp;4.0), each tissue class described by
a caption (MiniLM token states). Every generated tile is also a PNG of its own under
<code>samples/</code>{" and <code>pretrained_samples/</code>" if fine_tune else ""}.</p>
<h2>Measured</h2>
{measured}
<h2>Training loss</h2><img src="loss_curve.png" alt="loss curve">
<h2>Samples per class</h2>
<p>In each grid the <b>first row holds real crops</b>, the rows below: {order}.</p>
{rows}
<p>Checkpoint: <code>{html.escape(str(checkpoint.relative_to(out)))}</code>
(<code>ema/</code> loads with <code>SiT.from_pretrained</code>).</p>
</body></html>
"""
