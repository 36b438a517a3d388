"""The paper's ablations: arms trained on the same data, seed and step budget, scored on
held-out data as training progresses, and written as a table and a plot.

Arm sets (`ArmSet`):

    objectives  sit, repa, mupad   (decoupled cross-attention; velocity loss / + MLP alignment
                                    to the frozen teacher / + CNN alignment + CLS denoising)
    attention   decoupled, shared  (objective sit; needs at least one condition stream)
    all         sit, repa, mupad, shared  (the sit arm IS the decoupled arm: trained once)

Every arm trains in its own run folder `out/<arm>/` with `train_on_shards`, in chunks of
`eval_every` steps (a run resumed with more `steps` under the constant learning-rate schedule
continues exactly as if it had never stopped). After each chunk the checkpoint's raw and EMA
weights are scored on one fixed held-out set:

- the first `eval_records` records of the validation shards, in file order;
- conditions exactly as stored (no condition dropout); latents = the cached posterior mean;
- t and the image noise drawn once from `eval_seed` (then the CLS noise, see below), shared
  by every arm and every evaluation, so differences between numbers are differences between
  models, never between draws;
- fp32, no gradients, in batches of `eval_batch_size`.

The CLS input of a MUPAD-objective model (cls_dim > 0). Such a model denoises the image
jointly with the teacher's global token, so its forward pass needs a noisy CLS state. The
evaluation feeds it exactly what training feeds it: c_t = (1 - t) c0 + t eps_c, where c0 is the
standardised teacher global token of the same held-out image (the validation shards'
teacher field, e.g. `image_tokens`, [global, patches]; or the online teacher on the held-out
pixels when the config uses one), t is the image's own time and eps_c is drawn once from
the evaluation generator after the image noise (so the image part of the set does not depend
on whether a MUPAD arm is present). The metric is the image velocity MSE only, the quantity
every arm is trained to minimise; the CLS velocity is not scored. Validation shards without
the teacher field are an error for a MUPAD arm rather than a silent change of the model's
input (pure-noise CLS would be a state the model never saw at that t).

Metrics live in a small registry (`METRICS`, name -> Metric(fn(model, eval_set) -> float));
each is computed for the raw and the EMA weights and recorded as "<name>_raw" / "<name>_ema".
Registered: velocity_mse (every condition the set holds), velocity_mse_<modality>_only (that
condition alone, the others marked absent) and velocity_mse_unconditional (none); a
sample-based metric (FID) registers the same way. Metrics added to a finished run are
computed on its checkpoints (an error names any the run has pruned).

Outputs in `out/`:

    ablation.jsonl  one line per (arm, evaluated step): arm, objective, cross_attention, step,
                    metrics {key: value}, train_s (cumulative training wall time of the arm),
                    eval_s, time (unix)
    ablation.csv    the same records, one column per metric key
    ablation.md     per metric key a markdown table: rows = arms, columns = value at each
                    evaluated step, last column = best (value and step); plus one note line
                    with the data, steps and seed
    ablation.png    held-out metric vs step, one line per arm: EMA weights (left), raw (right)
    ablation.json   the settings that define the held-out set (checked when re-run)

Re-running the same call skips every (arm, step) already recorded with all requested
metrics and continues unfinished runs; growing `steps` adds evaluations.
"""

from __future__ import annotations

import csv
import dataclasses
import enum
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mupad.applications.train_shards import (
    IMAGE_KEY,
    LATENT_KEY,
    condition_fields,
    teacher_for_shards,
    train_on_shards,
)
from mupad.conditions import Conditions, Modality
from mupad.config import (
    AlignmentConfig,
    CrossAttentionKind,
    LRScheduleKind,
    ModelConfig,
    Objective,
    TeacherSource,
    TrainConfig,
    parse_enum,
    to_dict,
)
from mupad.data.streaming import ShardBatches, ShardedDataset
from mupad.errors import MupadError
from mupad.models.sit import SiT
from mupad.training.checkpoint import checkpoint_dir, latest_checkpoint
from mupad.training.distributed import DistContext, resolve_device
from mupad.training.objectives import standardise
from mupad.training.teacher import online_teacher
from mupad.transport import paths
from mupad.transport.losses import make_noisy_batch, velocity_loss

logger = logging.getLogger(__name__)

RECORDS_NAME = "ablation.jsonl"
CSV_NAME = "ablation.csv"
TABLE_NAME = "ablation.md"
PLOT_NAME = "ablation.png"
SETTINGS_NAME = "ablation.json"
WEIGHTS = ("ema", "raw")  # the weight sets every metric is computed for


class AblationError(MupadError, ValueError):
    """The ablation cannot run with these inputs; the message says how to fix them."""


# --------------------------------------------------------------------------------------
# Arms
# --------------------------------------------------------------------------------------


class ArmSet(str, enum.Enum):
    OBJECTIVES = "objectives"  # sit / repa / mupad, decoupled cross-attention
    ATTENTION = "attention"  # decoupled / shared cross-attention, objective sit
    ALL = "all"  # both; the sit + decoupled arm once


@dataclass(frozen=True)
class Arm:
    name: str  # run sub-folder and row label
    objective: Objective
    cross_attention: CrossAttentionKind

    def __post_init__(self) -> None:
        object.__setattr__(self, "objective", parse_enum(Objective, self.objective))
        object.__setattr__(
            self, "cross_attention", parse_enum(CrossAttentionKind, self.cross_attention)
        )
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise AblationError(f"arm name {self.name!r} must be a plain folder name")


_DCA, _SHARED = CrossAttentionKind.DECOUPLED, CrossAttentionKind.SHARED
ARM_SETS: dict[ArmSet, tuple[Arm, ...]] = {
    ArmSet.OBJECTIVES: (
        Arm("sit", Objective.SIT, _DCA),
        Arm("repa", Objective.REPA, _DCA),
        Arm("mupad", Objective.MUPAD, _DCA),
    ),
    ArmSet.ATTENTION: (
        Arm("decoupled", Objective.SIT, _DCA),
        Arm("shared", Objective.SIT, _SHARED),
    ),
    ArmSet.ALL: (
        Arm("sit", Objective.SIT, _DCA),  # also the attention ablation's decoupled arm
        Arm("repa", Objective.REPA, _DCA),
        Arm("mupad", Objective.MUPAD, _DCA),
        Arm("shared", Objective.SIT, _SHARED),
    ),
}


def resolve_arms(arms: ArmSet | str | Sequence[Arm]) -> tuple[Arm, ...]:
    """An arm set name ("objectives", "attention", "all") or explicit arms -> arms."""
    if isinstance(arms, (str, ArmSet)):
        return ARM_SETS[parse_enum(ArmSet, arms)]
    resolved = tuple(arms)
    if not resolved:
        raise AblationError("no arms to run; give an arm set or at least one Arm")
    names = [arm.name for arm in resolved]
    if len(set(names)) != len(names):
        raise AblationError(f"arm names must be unique, got {names}")
    configs = [(arm.objective, arm.cross_attention) for arm in resolved]
    if len(set(configs)) != len(configs):
        raise AblationError(f"two arms train the same configuration: {names}")
    return resolved


def arm_train_config(template: TrainConfig, arm: Arm, steps: int) -> TrainConfig:
    """The template with the arm's objective and the chunk's step target."""
    alignment = dataclasses.replace(template.alignment, objective=arm.objective)
    return dataclasses.replace(template, steps=steps, alignment=alignment)


def evaluation_steps(steps: int, eval_every: int) -> list[int]:
    """eval_every, 2*eval_every, ..., and `steps` itself when it is not a multiple."""
    if steps < 1 or eval_every < 1:
        raise AblationError(f"steps and eval_every must be >= 1, got {steps} and {eval_every}")
    found = list(range(eval_every, steps + 1, eval_every))
    if not found or found[-1] != steps:
        found.append(steps)
    return found


# --------------------------------------------------------------------------------------
# The held-out set
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSet:
    """A fixed held-out batch with its noise drawn once; everything on the CPU in fp32."""

    x_t: torch.Tensor  # (N, C, H, W)
    t: torch.Tensor  # (N,)
    target: torch.Tensor  # (N, C, H, W) velocity target eps - x0
    cond: Conditions | None  # no dropout
    cls_t: torch.Tensor | None  # (N, K) noisy standardised teacher CLS on the image's path
    batch_size: int
    device: torch.device

    @property
    def num_records(self) -> int:
        return self.x_t.shape[0]

    def batches(self) -> Iterator[slice]:
        for start in range(0, self.num_records, self.batch_size):
            yield slice(start, min(start + self.batch_size, self.num_records))


def _active_modalities(schema: Mapping[str, Any], modalities: Sequence[str] | None) -> list[str]:
    return [m for m, f in condition_fields(schema, modalities).items() if f]


def build_eval_set(
    val_shards: str | Path,
    train_schema: Mapping[str, Any],
    *,
    eval_records: int,
    modalities: Sequence[str] | None,
    use_latents: bool,
    cls_alignment: AlignmentConfig | None,
    seed: int,
    batch_size: int,
    device: torch.device,
) -> EvalSet:
    """The first `eval_records` records of `val_shards` with t, noise (and CLS noise when
    `cls_alignment` is given) drawn once from `seed`; conditions as the training run uses
    them (the streams the train shards give for `modalities`)."""
    if eval_records < 1 or batch_size < 1:
        raise AblationError(
            f"eval_records and eval_batch_size must be >= 1, got {eval_records}, {batch_size}"
        )
    dataset = ShardedDataset(val_shards, seed=0, shuffle=False)
    schema = dataset.schema
    latent_key = LATENT_KEY if use_latents and LATENT_KEY in train_schema else None
    wanted = LATENT_KEY if latent_key else IMAGE_KEY
    if wanted not in schema:
        raise AblationError(
            f"the training shards give the model {wanted!r} but the validation shards "
            f"{dataset.root} hold no such field (fields: {sorted(schema)}); prepare both "
            "folders the same way"
        )
    active = _active_modalities(train_schema, modalities)
    try:
        fields = condition_fields(schema, active)
    except ValueError as error:
        raise AblationError(
            f"the validation shards {dataset.root} lack a condition the model trains with: {error}"
        ) from None
    teacher_key = pixels_key = None
    if cls_alignment is not None:
        if cls_alignment.teacher_source is TeacherSource.ONLINE:
            if IMAGE_KEY not in schema:
                raise AblationError(
                    f"the mupad arm is scored with its CLS input on the training path, which "
                    f"needs the teacher's embedding of each held-out image; the validation "
                    f"shards {dataset.root} hold no {IMAGE_KEY!r} pixels for the online teacher"
                )
            pixels_key = IMAGE_KEY
        else:
            teacher_key = cls_alignment.teacher_field
            if teacher_key not in schema:
                raise AblationError(
                    f"the mupad arm is scored with its CLS input on the training path "
                    f"(c_t = (1-t) c0 + t eps with c0 the teacher's global token), but the "
                    f"validation shards {dataset.root} hold no {teacher_key!r} teacher field "
                    f"(fields: {sorted(schema)}); re-run `mupad prepare --image-encoder "
                    f"{cls_alignment.teacher}` on the validation data"
                )
    count = min(eval_records, len(dataset))
    if count < eval_records:
        logger.warning(
            "the validation shards hold %d records; scoring on all of them (asked for %d)",
            count,
            eval_records,
        )
    reader = ShardBatches(
        dataset,
        count,
        latent_key=latent_key,
        sample_latents=False,  # the posterior mean: no draw, same x0 for every arm
        text_key=fields["text"],
        image_cond_key=fields["image"],
        rna_key=fields["rna"],
        teacher_key=teacher_key,
        pixels_key=pixels_key,
        prefetch=False,
    )
    try:
        batch = reader(0, torch.Generator().manual_seed(seed))
    finally:
        reader.close()
    generator = torch.Generator().manual_seed(seed)
    noisy = make_noisy_batch(batch.x0.float(), generator=generator)  # t, then image noise
    cls_t = None
    if cls_alignment is not None:
        teacher = batch.teacher
        if pixels_key is not None:
            encoder = online_teacher(cls_alignment, device)
            teacher = encoder(batch.pixels.to(device)).to("cpu")
        c0 = standardise(teacher.cls)  # (N, K)
        cls_noise = torch.randn(c0.shape, generator=generator)  # after the image noise
        cls_t = paths.interpolate(c0, cls_noise, noisy.t.float())
    return EvalSet(
        x_t=noisy.x_t,
        t=noisy.t.float(),
        target=noisy.target,
        cond=batch.cond,
        cls_t=cls_t,
        batch_size=batch_size,
        device=device,
    )


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------

MetricFn = Callable[[SiT, EvalSet], float]


@dataclass(frozen=True)
class Metric:
    name: str
    fn: MetricFn  # (model in eval mode, fp32, on eval_set.device; held-out set) -> value
    lower_is_better: bool = True
    description: str = ""
    requires: Modality | None = None  # a condition the held-out set must hold


METRICS: dict[str, Metric] = {}


def register_metric(
    name: str,
    fn: MetricFn,
    *,
    lower_is_better: bool = True,
    description: str = "",
    requires: Modality | None = None,
) -> Metric:
    """Add a held-out metric (e.g. FID of samples) under `name`; returns it."""
    metric = Metric(name, fn, lower_is_better, description, requires)
    METRICS[name] = metric
    return metric


def _require_condition(modality: Modality, metric_name: str, eval_set: EvalSet) -> None:
    have = set() if eval_set.cond is None else set(eval_set.cond.streams)
    if modality not in have:
        names = ", ".join(sorted(m.value for m in have)) or "none"
        raise AblationError(
            f"metric {metric_name} needs the {modality.value} condition, but the held-out "
            f"set's condition streams are: {names} (see --conditions)"
        )


def check_metric_inputs(metrics: Sequence[Metric], eval_set: EvalSet) -> None:
    """Refuse, before any training, a metric whose condition the held-out set lacks."""
    for metric in metrics:
        if metric.requires is not None:
            _require_condition(metric.requires, metric.name, eval_set)


def resolve_metrics(names: Sequence[str]) -> tuple[Metric, ...]:
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise AblationError(
            f"unknown metric(s) {unknown}; choose from: {', '.join(sorted(METRICS))}"
        )
    return tuple(METRICS[n] for n in names)


def metric_key(name: str, weights: str) -> str:
    return f"{name}_{weights}"


@torch.no_grad()
def heldout_velocity_mse(model: SiT, eval_set: EvalSet) -> float:
    """Mean over held-out records of the per-record image velocity MSE (fp32, fp64 sum)."""
    cls_dim = model.config.cls_dim
    if cls_dim and (eval_set.cls_t is None or eval_set.cls_t.shape[-1] != cls_dim):
        have = None if eval_set.cls_t is None else eval_set.cls_t.shape[-1]
        raise AblationError(
            f"the model denoises a {cls_dim}-wide CLS token but the held-out set carries "
            f"{'no' if have is None else f'{have}-wide'} teacher CLS tokens"
        )
    device = eval_set.device
    total = 0.0
    for rows in eval_set.batches():
        cond = None if eval_set.cond is None else eval_set.cond.index(rows).to(device)
        cls_t = eval_set.cls_t[rows].to(device) if cls_dim else None
        out = model(
            eval_set.x_t[rows].to(device), eval_set.t[rows].to(device), cond, cls_token=cls_t
        )
        target = eval_set.target[rows].to(device)
        total += velocity_loss(out.velocity.float(), target).double().sum().item()
    return total / eval_set.num_records


register_metric(
    "velocity_mse",
    heldout_velocity_mse,
    description="held-out image velocity MSE at fixed t and noise",
)


def _velocity_mse_keeping(kept: Modality | None, name: str) -> MetricFn:
    """The held-out velocity MSE with every condition stream but `kept` marked absent (None:
    all absent, the unconditional model): how each arm copes when modalities go missing at
    inference, the situation decoupled streams are built for."""

    def metric(model: SiT, eval_set: EvalSet) -> float:
        if kept is not None:
            _require_condition(kept, name, eval_set)
        cond = eval_set.cond
        if cond is None:
            return heldout_velocity_mse(model, eval_set)
        dropped = [m for m in cond.streams if m is not kept]
        return heldout_velocity_mse(
            model, dataclasses.replace(eval_set, cond=cond.without(dropped))
        )

    return metric


for _modality in Modality:
    _name = f"velocity_mse_{_modality.value}_only"
    register_metric(
        _name,
        _velocity_mse_keeping(_modality, _name),
        description=f"held-out velocity MSE with the {_modality.value} condition alone",
        requires=_modality,
    )
register_metric(
    "velocity_mse_unconditional",
    _velocity_mse_keeping(None, "velocity_mse_unconditional"),
    description="held-out velocity MSE with every condition marked absent",
)


def load_weights(checkpoint: Path, weights: str, device: torch.device) -> SiT:
    folder = checkpoint / "ema" if weights == "ema" else checkpoint
    return SiT.from_pretrained(folder, map_location=device).float().eval()


def evaluate_checkpoint(
    checkpoint: Path, eval_set: EvalSet, metrics: Sequence[Metric]
) -> dict[str, float]:
    """{"<metric>_<ema|raw>": value} for a checkpoint folder."""
    values: dict[str, float] = {}
    for weights in WEIGHTS:
        model = load_weights(checkpoint, weights, eval_set.device)
        for metric in metrics:
            values[metric_key(metric.name, weights)] = float(metric.fn(model, eval_set))
        del model
    return values


# --------------------------------------------------------------------------------------
# Records, table, plot
# --------------------------------------------------------------------------------------


def read_records(out: str | Path) -> list[dict[str, Any]]:
    """Records of out/ablation.jsonl; the last one wins per (arm, step); a torn last line
    (a run killed mid-write) is skipped."""
    path = Path(out) / RECORDS_NAME
    if not path.is_file():
        return []
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s line %d is not JSON; ignored", path, number)
            continue
        latest[(record["arm"], int(record["step"]))] = record
    return sorted(latest.values(), key=lambda r: (r["arm"], r["step"]))


def _append_record(out: Path, record: dict[str, Any]) -> None:
    with (out / RECORDS_NAME).open("a") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()


@dataclass
class AblationTable:
    """metric key -> arm -> step -> value, over the evaluated steps."""

    arms: list[str]
    steps: list[int]
    metric_keys: list[str]
    values: dict[str, dict[str, dict[int, float]]]
    lower_is_better: dict[str, bool]

    @classmethod
    def from_records(
        cls, records: Sequence[Mapping[str, Any]], arms: Sequence[str], metrics: Sequence[Metric]
    ) -> AblationTable:
        keys = [metric_key(m.name, w) for m in metrics for w in WEIGHTS]
        values: dict[str, dict[str, dict[int, float]]] = {k: {a: {} for a in arms} for k in keys}
        steps: set[int] = set()
        for record in records:
            if record["arm"] not in arms:
                continue
            for key in keys:
                if key in record["metrics"]:
                    values[key][record["arm"]][int(record["step"])] = record["metrics"][key]
                    steps.add(int(record["step"]))
        lower = {metric_key(m.name, w): m.lower_is_better for m in metrics for w in WEIGHTS}
        return cls(list(arms), sorted(steps), keys, values, lower)

    def best(self, key: str, arm: str) -> tuple[int, float] | None:
        """(step, value) of the arm's best evaluation under `key`."""
        found = [(s, v) for s, v in self.values[key][arm].items() if math.isfinite(v)]
        if not found:
            return None
        pick = min if self.lower_is_better[key] else max
        return pick(found, key=lambda sv: sv[1])

    def to_markdown(self, note: str = "") -> str:
        lines = ["# Ablation", ""]
        if note:
            lines += [note, ""]
        for key in self.metric_keys:
            direction = "lower" if self.lower_is_better[key] else "higher"
            lines += [f"## {key} ({direction} is better)", ""]
            header = ["arm", *(f"step {s}" for s in self.steps), "best"]
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
            winners = {s: self._winner(key, s) for s in self.steps}
            for arm in self.arms:
                cells = [arm]
                for step in self.steps:
                    value = self.values[key][arm].get(step)
                    text = "" if value is None else f"{value:.5f}"
                    cells.append(
                        f"**{text}**" if value is not None and winners[step] == arm else text
                    )
                best = self.best(key, arm)
                cells.append("" if best is None else f"{best[1]:.5f} (step {best[0]})")
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        return "\n".join(lines)

    def _winner(self, key: str, step: int) -> str | None:
        scored = [
            (self.values[key][a][step], a)
            for a in self.arms
            if step in self.values[key][a] and math.isfinite(self.values[key][a][step])
        ]
        if len(scored) < 2:
            return None
        pick = min if self.lower_is_better[key] else max
        return pick(scored)[1]


def write_csv(path: Path, records: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> None:
    columns = ["arm", "objective", "cross_attention", "step", *keys, "train_s", "eval_s"]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for record in records:
            row = [record.get(c) for c in columns[:4]]
            row += [record["metrics"].get(k, "") for k in keys]
            row += [record.get("train_s"), record.get("eval_s")]
            writer.writerow(row)


def write_plot(path: Path, table: AblationTable, metrics: Sequence[Metric]) -> None:
    """One row per metric: EMA weights (left), raw weights (right); one line per arm."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(10, 3.6 * len(metrics)))
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(metrics), len(WEIGHTS), squeeze=False)
    for row, metric in enumerate(metrics):
        for col, weights in enumerate(WEIGHTS):
            ax = axes[row][col]
            key = metric_key(metric.name, weights)
            for arm in table.arms:
                points = sorted(table.values[key][arm].items())
                if points:
                    ax.plot(*zip(*points), marker="o", label=arm)
            ax.set_title(f"held-out {metric.name} ({weights} weights)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("training step")
            ax.set_ylabel(metric.name)
            ax.grid(alpha=0.3)
            ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


# --------------------------------------------------------------------------------------
# The ablation
# --------------------------------------------------------------------------------------


@dataclass
class AblationResult:
    out: Path
    arms: tuple[Arm, ...]
    records: list[dict[str, Any]]  # of these arms, steps <= the budget
    table: AblationTable
    note: str
    files: dict[str, Path] = field(default_factory=dict)  # jsonl, csv, md, png, json


# Settings whose change would make recorded numbers incomparable with new ones.
_FIXED_SETTINGS = (
    "train_shards",
    "val_shards",
    "eval_records",
    "eval_seed",
    "use_latents",
    "modalities",
    "model",
)
# Train-config fields that may change between calls (the maths of the steps is the same).
_FREE_TRAIN_FIELDS = {
    "steps",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "sample_every",
    "gradient_checkpointing",
    "max_nonfinite_steps",
    "compile",
}


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Recorded numbers must come from the held-out set, data, model and training settings
    this call would use; then store the current settings."""
    path = out / SETTINGS_NAME
    if path.is_file():
        saved = json.loads(path.read_text())
        changed = [k for k in _FIXED_SETTINGS if saved.get(k) != settings.get(k)]
        saved_train, train = saved.get("train_config", {}), settings["train_config"]
        changed += [
            f"train_config.{k}"
            for k in sorted(set(saved_train) | set(train))
            if k not in _FREE_TRAIN_FIELDS and saved_train.get(k) != train.get(k)
        ]
        if changed:
            raise AblationError(
                f"{out} holds an ablation run with other settings ({', '.join(changed)} "
                "differ); its recorded numbers would not compare with new ones. Use the "
                "original settings or another output folder"
            )
    path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def run_ablation(
    train_shards: str | Path,
    val_shards: str | Path,
    out: str | Path,
    *,
    arms: ArmSet | str | Sequence[Arm] = ArmSet.OBJECTIVES,
    preset: str = "S/4",
    backbone: Mapping[str, int] | None = None,
    train_config: TrainConfig,
    eval_every: int,
    eval_records: int = 256,
    eval_batch_size: int = 64,
    eval_seed: int = 0,
    metrics: Sequence[str] = ("velocity_mse",),
    modalities: Sequence[str] | None = None,
    model_config: ModelConfig | None = None,
    use_latents: bool = True,
    latents: str | None = None,
    text_encoder: str | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> AblationResult:
    """Train every arm to `train_config.steps` in chunks of `eval_every` steps, scoring each
    chunk's checkpoint on the held-out set (see the module docstring); resumable.

    `train_config` is the template shared by the arms: an arm overrides only the objective
    and the cross-attention kind. `model_config` (optional) replaces the preset and the
    widths read from the shards (the arm still sets its cross-attention; the CLS width is
    set from the objective by train_on_shards). `modalities` picks the condition streams as
    in train_on_shards (None: every condition the training shards hold; [] unconditional).
    """
    out = Path(out)
    arm_list = resolve_arms(arms)
    chosen = resolve_metrics(list(metrics))
    if train_config.lr_schedule is not LRScheduleKind.CONSTANT:
        raise AblationError(
            "the ablation trains in chunks of eval_every steps and resumes each with more "
            "steps, which only the constant learning-rate schedule allows (a cosine schedule "
            "depends on the total); use lr_schedule=constant"
        )
    schedule = evaluation_steps(train_config.steps, eval_every)
    train_schema = ShardedDataset(train_shards, seed=train_config.seed).schema
    active = _active_modalities(train_schema, modalities)
    no_streams = not active or (model_config is not None and not model_config.condition_dims)
    shared = [a.name for a in arm_list if a.cross_attention is CrossAttentionKind.SHARED]
    if no_streams and shared:
        raise AblationError(
            f"the attention ablation (arm(s) {shared}) compares how condition tokens reach the "
            f"image, but the run has no condition stream (training shards {train_shards} "
            f"hold fields {sorted(train_schema)}; conditions={modalities}); use shards with "
            "text / image / RNA conditions, or the 'objectives' arm set"
        )
    cls_alignment = None
    for arm in arm_list:
        alignment = arm_train_config(train_config, arm, train_config.steps).alignment
        try:
            teacher_for_shards(train_schema, alignment)  # fail now, not after other arms
        except ValueError as error:
            raise AblationError(f"arm {arm.name!r}: {error}") from None
        if alignment.uses_cls:
            cls_alignment = alignment
    run_device = resolve_device(device)
    eval_set = build_eval_set(
        val_shards,
        train_schema,
        eval_records=eval_records,
        modalities=modalities,
        use_latents=use_latents,
        cls_alignment=cls_alignment,
        seed=eval_seed,
        batch_size=eval_batch_size,
        device=run_device,
    )
    check_metric_inputs(chosen, eval_set)
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "train_shards": str(train_shards),
        "val_shards": str(val_shards),
        "eval_records": eval_set.num_records,
        "eval_seed": eval_seed,
        "use_latents": use_latents,
        "modalities": None if modalities is None else sorted(modalities),
        "model": preset if model_config is None else to_dict(model_config),
        "backbone": dict(backbone or {}),
        "eval_every": eval_every,
        "arms": [
            {
                "name": a.name,
                "objective": a.objective.value,
                "cross_attention": a.cross_attention.value,
            }
            for a in arm_list
        ],
        # The template's objective is the arms' to set: not part of the settings.
        "train_config": {
            **to_dict(train_config),
            "alignment": {
                k: v for k, v in to_dict(train_config.alignment).items() if k != "objective"
            },
        },
    }
    _check_settings(out, settings)
    keys = [metric_key(m.name, w) for m in chosen for w in WEIGHTS]
    dist = DistContext(device=run_device)

    for arm in arm_list:
        run_dir = out / arm.name
        for step in schedule:
            recorded = {(r["arm"], r["step"]): r for r in read_records(out)}
            previous = recorded.get((arm.name, step))
            if previous is not None and all(k in previous["metrics"] for k in keys):
                continue
            checkpoint = checkpoint_dir(run_dir, step)
            latest = latest_checkpoint(run_dir)
            start = time.perf_counter()
            if not checkpoint.is_dir():
                if latest is not None and int(latest.name.split("-")[1]) > step:
                    raise AblationError(
                        f"{run_dir} was trained past step {step} but holds no checkpoint of "
                        f"it to score (older checkpoints are pruned); use the original "
                        "eval_every, or another output folder"
                    )
                logger.info("arm %s: training to step %d", arm.name, step)
                train_on_shards(
                    train_shards,
                    run_dir,
                    train_config=arm_train_config(train_config, arm, step),
                    preset=preset,
                    backbone=backbone,
                    model_config=(
                        None
                        if model_config is None
                        else dataclasses.replace(model_config, cross_attention=arm.cross_attention)
                    ),
                    cross_attention=arm.cross_attention,
                    use_latents=use_latents,
                    latents=latents,
                    text_encoder=text_encoder,
                    modalities=modalities,
                    dist=dist,
                    progress=progress,
                )
            chunk_s = time.perf_counter() - start
            earlier = [r for (a, s), r in recorded.items() if a == arm.name and s < step]
            train_s = max((r.get("train_s", 0.0) for r in earlier), default=0.0) + chunk_s
            if previous is not None:  # only new metrics to add: the training time stands
                train_s = previous.get("train_s", train_s)
            start = time.perf_counter()
            values = evaluate_checkpoint(checkpoint, eval_set, chosen)
            record = {
                "arm": arm.name,
                "objective": arm.objective.value,
                "cross_attention": arm.cross_attention.value,
                "step": step,
                "metrics": {**(previous or {}).get("metrics", {}), **values},
                "train_s": round(train_s, 3),
                "eval_s": round(time.perf_counter() - start, 3),
                "time": time.time(),
            }
            _append_record(out, record)
            logger.info(
                "arm %s step %d: %s",
                arm.name,
                step,
                ", ".join(f"{k}={v:.5f}" for k, v in values.items()),
            )
    return write_outputs(
        out,
        arm_list,
        chosen,
        max_step=train_config.steps,
        note=_note(
            train_shards,
            val_shards,
            eval_set,
            train_config,
            eval_every,
            preset + "".join(f", {k} {v}" for k, v in (backbone or {}).items()),
            model_config,
            eval_seed,
        ),
    )


def _note(
    train_shards: str | Path,
    val_shards: str | Path,
    eval_set: EvalSet,
    config: TrainConfig,
    eval_every: int,
    preset: str,
    model_config: ModelConfig | None,
    eval_seed: int,
) -> str:
    model = (
        preset
        if model_config is None
        else (
            f"hidden {model_config.hidden_size}, depth {model_config.depth}, "
            f"patch {model_config.patch_size}"
        )
    )
    return (
        f"Trained on `{train_shards}` for {config.steps} steps (batch {config.batch_size}, "
        f"lr {config.learning_rate:g}, {config.precision.value}, EMA {config.ema_decay:g}, "
        f"seed {config.seed}, model {model}), scored every {eval_every} steps on the first "
        f"{eval_set.num_records} records of `{val_shards}` (noise seed {eval_seed})."
    )


def write_outputs(
    out: Path,
    arms: Sequence[Arm],
    metrics: Sequence[Metric],
    *,
    max_step: int,
    note: str,
) -> AblationResult:
    """(Re)write ablation.csv / .md / .png from ablation.jsonl for these arms."""
    names = [a.name for a in arms]
    records = [r for r in read_records(out) if r["arm"] in names and r["step"] <= max_step]
    records.sort(key=lambda r: (names.index(r["arm"]), r["step"]))
    table = AblationTable.from_records(records, names, metrics)
    files = {
        "jsonl": out / RECORDS_NAME,
        "csv": out / CSV_NAME,
        "md": out / TABLE_NAME,
        "png": out / PLOT_NAME,
        "json": out / SETTINGS_NAME,
    }
    write_csv(files["csv"], records, table.metric_keys)
    legend = "Arms: " + "; ".join(
        f"{a.name} = {a.objective.value} objective, {a.cross_attention.value} cross-attention"
        for a in arms
    )
    files["md"].write_text(table.to_markdown(f"{note}\n{legend}.") + "\n")
    write_plot(files["png"], table, metrics)
    return AblationResult(
        out=out, arms=tuple(arms), records=records, table=table, note=note, files=files
    )


__all__ = [
    "ARM_SETS",
    "METRICS",
    "AblationError",
    "AblationResult",
    "AblationTable",
    "Arm",
    "ArmSet",
    "EvalSet",
    "Metric",
    "build_eval_set",
    "evaluate_checkpoint",
    "heldout_velocity_mse",
    "read_records",
    "register_metric",
    "resolve_arms",
    "run_ablation",
]
