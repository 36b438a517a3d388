"""`mupad evaluate retrieval`: fine-tune a dual encoder on image–caption pairs, report
Recall@K image->text and text->image on held-out pairs, before and after fine-tuning.

    mupad evaluate retrieval --train PAIRS --test PAIRS --out OUT
        [--train-captions JSON] [--test-captions JSON] [--k 10,50] [--steps 300]
        [--batch-size 256] [--lr 1e-3] [--weight-decay 0.01] [--embed-dim 256]
        [--hidden-dim 512] [--temperature 0.07] [--features inception] [--weights PATH]
        [--input-size N] [--text-encoder minilm] [--text-weights DIR] [--size N]
        [--cache-dir DIR] [--device cpu] [--seed 0] [--save-model/--no-save-model]

PAIRS: the --out folder of `mupad augment` (synthetic images + their captions, from its
index.csv), a tile folder `<class>/<image>` with a captions JSON {class: caption} (as for
`mupad train`; classes without one get the default caption), or a CSV with columns image,
caption. Train on synthetic pairs, test on real ones; a file in both sets is an error.
Recall and the model are defined in `mupad.evaluation.retrieval`.

Writes OUT/metrics.json, OUT/report.html, OUT/recall.png and (by default) the fine-tuned
heads in OUT/dual_encoder/ (config.json + heads.safetensors, `DualEncoder.from_pretrained`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mupad.data.prepare_sources import PrepareError, load_captions
from mupad.evaluation.cli_support import CacheDirOption, console, parse_int_list
from mupad.evaluation.features import DEFAULT_EXTRACTOR, default_cache_dir
from mupad.evaluation.report import ReportSection, write_evaluation
from mupad.evaluation.retrieval import (
    DIRECTIONS,
    DualEncoderConfig,
    FrozenTowers,
    PairSet,
    RetrievalResult,
    RetrievalTrainConfig,
    caption_ids,
    check_recall_ks,
    encode_pairs,
    new_dual_encoder,
    read_pairs,
    run_retrieval,
)
from mupad.evaluation.stats import EvaluationError

RECALL_FIGURE = "recall.png"
MODEL_FOLDER = "dual_encoder"


def _pairs(source: Path, captions: Path | None) -> PairSet:
    try:
        mapping = load_captions(captions)
    except PrepareError as error:
        raise EvaluationError(str(error)) from None
    return read_pairs(source, mapping)


def _check_disjoint(train: PairSet, test: PairSet) -> None:
    shared = sorted({p.resolve() for p in train.paths} & {p.resolve() for p in test.paths})
    if shared:
        raise EvaluationError(
            f"{len(shared)} image(s) are in both the training and the test pairs (e.g. "
            f"{', '.join(str(p) for p in shared[:3])}); the test set must be held out"
        )


def _recall_figure(result: RetrievalResult, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = list(result.chance[DIRECTIONS[0]])
    figure, (bars, curve) = plt.subplots(
        1, 2, figsize=(4.5 + 1.6 * len(ks), 3.6), gridspec_kw={"width_ratios": [2, 1]}
    )
    labels, before, after, chance = [], [], [], []
    for direction in DIRECTIONS:
        for k in ks:
            labels.append(f"{direction.replace('_to_', '→').replace('image', 'img')}\nR@{k}")
            before.append(result.before.recall[direction][k])
            after.append(result.after.recall[direction][k])
            chance.append(result.chance[direction][k])
    positions = range(len(labels))
    bars.bar([p - 0.2 for p in positions], before, 0.4, label="before fine-tuning")
    bars.bar([p + 0.2 for p in positions], after, 0.4, label="after fine-tuning")
    bars.scatter(positions, chance, marker="_", s=400, color="black", label="chance", zorder=3)
    bars.set_xticks(list(positions), labels, fontsize="small")
    bars.set_ylim(0, 1)
    bars.set_ylabel(f"recall ({result.after.num_pairs} held-out pairs)")
    bars.legend(loc="upper left", fontsize="small")
    curve.plot(range(1, len(result.losses) + 1), result.losses)
    curve.set_xlabel("step")
    curve.set_ylabel("symmetric InfoNCE (train)")
    figure.tight_layout()
    figure.savefig(out / RECALL_FIGURE, dpi=100)
    plt.close(figure)
    return Path(RECALL_FIGURE)


def _section(result: RetrievalResult, figure: Path) -> ReportSection:
    metrics: dict[str, object] = {}
    for direction in DIRECTIONS:
        for k, chance in result.chance[direction].items():
            metrics[f"{direction}_R@{k}_before"] = result.before.recall[direction][k]
            metrics[f"{direction}_R@{k}_after"] = result.after.recall[direction][k]
            metrics[f"{direction}_R@{k}_chance"] = chance
    metrics.update(
        num_train_pairs=result.num_train_pairs,
        num_test_pairs=result.after.num_pairs,
        num_test_captions=result.after.num_captions,
        final_train_loss=result.losses[-1],
        temperature=result.temperature,
    )
    model, train = result.model_config, result.train_config
    notes = [
        (
            f"Towers (frozen): {model.image_extractor} image features, {model.text_encoder} "
            f"sentence embeddings; trainable heads LayerNorm-Linear({model.hidden_dim})-GELU-"
            f"Linear({model.embed_dim}), L2-normalised; temperature initialised at "
            f"{model.init_temperature}, learned, clamped to [0.01, 1]."
        ),
        (
            f"Fine-tuning: symmetric InfoNCE (pairs with identical captions share the target), "
            f"AdamW lr {train.learning_rate}, weight decay {train.weight_decay}, batch "
            f"{train.batch_size}, {train.steps} steps, seed {train.seed}. 'Before' = the "
            "same heads at initialisation. With repeated captions the loss cannot fall below "
            "the entropy of the shared targets (log of the copies of a caption in a batch)."
        ),
        (
            "Recall@K: image->text hits when the image's caption is among its K nearest distinct "
            "captions of the test set; text->image hits when an image with an identical "
            "caption is among the K nearest of all test images; one query per pair. Chance = "
            "the expected recall of a random ranking given the repeated captions."
        ),
    ]
    return ReportSection("Retrieval", metrics, figures=[figure], notes=notes)


def evaluate_retrieval(
    train: Annotated[Path, typer.Option(help="Training pairs: augment folder, tiles or CSV")],
    test: Annotated[Path, typer.Option(help="Held-out (real) pairs: tiles or CSV")],
    out: Annotated[Path, typer.Option(help="Output folder: metrics.json, report.html, PNG")],
    train_captions: Annotated[
        Path | None, typer.Option(help="JSON {class: caption} for a training tile folder")
    ] = None,
    test_captions: Annotated[
        Path | None, typer.Option(help="JSON {class: caption} for a test tile folder")
    ] = None,
    k: Annotated[str, typer.Option(help="Comma-separated K of Recall@K")] = "10,50",
    steps: Annotated[int, typer.Option(help="Fine-tuning steps")] = 300,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    embed_dim: int = 256,
    hidden_dim: int = 512,
    temperature: Annotated[float, typer.Option(help="Initial softmax temperature")] = 0.07,
    features: Annotated[str, typer.Option(help="Frozen image extractor")] = DEFAULT_EXTRACTOR,
    weights: Annotated[Path | None, typer.Option(help="Weights of the image extractor")] = None,
    input_size: Annotated[
        int | None, typer.Option(help="Extractor input side (inception: default 299)")
    ] = None,
    text_encoder: Annotated[str, typer.Option(help="Frozen text encoder")] = "minilm",
    text_weights: Annotated[
        Path | None, typer.Option(help="Local folder of the text encoder")
    ] = None,
    size: Annotated[
        int | None, typer.Option(help="Centre-crop and resize images to N x N when read")
    ] = None,
    cache_dir: CacheDirOption = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N (feature extraction)")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of the head init and batch order")] = 0,
    save_model: Annotated[bool, typer.Option(help=f"Save the heads to OUT/{MODEL_FOLDER}")] = True,
    progress: bool = True,
) -> None:
    """Recall@K of a dual encoder fine-tuned on image–caption pairs (before vs after)."""
    ks = parse_int_list(k, "--k")
    model_config = DualEncoderConfig(
        image_extractor=features,
        image_weights=str(weights) if weights is not None else None,
        image_input_size=input_size,
        text_encoder=text_encoder,
        text_weights=str(text_weights) if text_weights is not None else None,
        embed_dim=embed_dim,
        hidden_dim=hidden_dim,
        init_temperature=temperature,
        seed=seed,
    )
    train_config = RetrievalTrainConfig(
        steps=steps, batch_size=batch_size, learning_rate=lr, weight_decay=weight_decay, seed=seed
    )
    train_pairs, test_pairs = _pairs(train, train_captions), _pairs(test, test_captions)
    _check_disjoint(train_pairs, test_pairs)
    check_recall_ks(ks, caption_ids(test_pairs.captions))  # before any feature is computed
    towers = FrozenTowers(model_config, device=device)
    cache = cache_dir or default_cache_dir()
    train_features, test_features = (
        encode_pairs(pairs, towers, size=size, cache_dir=cache, progress=progress)
        for pairs in (train_pairs, test_pairs)
    )
    model = new_dual_encoder(towers, model_config)
    result = run_retrieval(
        model, train_features, test_features, train_config, ks, progress=progress
    )
    out.mkdir(parents=True, exist_ok=True)
    if save_model:
        model.save(out / MODEL_FOLDER)
    settings = {
        "train": train.resolve(),
        "test": test.resolve(),
        "train_captions": train_captions.resolve() if train_captions else None,
        "test_captions": test_captions.resolve() if test_captions else None,
        "ks": list(ks),
        "size": size,
        "cache_dir": Path(cache).resolve(),
        "device": device,
        "model": model.config.to_dict(),
        "training": train_config.to_dict(),
        "image_extractor_identity": dict(towers.image.identity),
    }
    metrics_path, report_path = write_evaluation(
        out,
        "Image–text retrieval",
        [_section(result, _recall_figure(result, out))],
        settings,
    )
    for direction in DIRECTIONS:
        for value in ks:
            console.print(
                f"{direction} R@{value}: {result.before.recall[direction][value]:.3f} -> "
                f"{result.after.recall[direction][value]:.3f} (chance {result.chance[direction][value]:.3f})"
            )
    console.print(f"[green]wrote[/green] {metrics_path} and {report_path}")
    typer.echo(json.dumps({"out": str(out), **result.to_dict()}))


def register(app: typer.Typer) -> None:
    """Add `retrieval` to the `mupad evaluate` group."""
    app.command("retrieval")(evaluate_retrieval)


__all__ = ["evaluate_retrieval", "register"]
