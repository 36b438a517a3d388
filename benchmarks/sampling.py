"""Sampling speed: annealed vs naive classifier-free guidance, absent modalities, ODE vs SDE.

All timings come from the same run, on the same model, from the same noise:

1. Guidance. 250-step Euler-Maruyama SDE with guidance linearly annealed 2.5 -> 0 (the
   paper's sampler; `mupad.transport.guidance.GuidedVelocity` makes one plain forward
   wherever w(t) = 0) against naive CFG, which runs the conditional and the unconditional
   pass at every step whatever w(t) (a wrapper in this file, not a library mode), and the
   anneal with `GuidanceConfig.skip_below` (`--skip-below`): scales below it count as 0, so
   the tail makes one pass. The bare linear anneal reaches 0 only at t = 0, which the SDE
   never evaluates (its last evaluation is at t = last_step_size = 0.04, where w = 0.1), so
   without the cut-off the annealed sampler makes exactly the naive number of passes; the
   run checks that both give the same samples.
2. Absent modalities. An image + text model sampled with text only (the image stream is
   skipped: `attention.prepare_streams` drops a stream no sample has) against all streams
   present, both with the paper's sampler.
3. ODE samplers. Euler / Heun at 25, 50, 100 steps against the 250-step SDE: wall time and
   velocity evaluations.
4. Quality (if the demo run exists, `mupad demo` -> runs/demo): samples of the demo model
   (text-conditioned, pixel space, trained on the bundled Kather tiles) from each sampler,
   scored against real crops (`--quality-real`: held-out tiles never seen in training) by
   KID and FID of Inception features (`--quality-features`; KID is unbiased at these sample
   sizes, FID is computed under the `allow` small-sample policy and only compares arms of
   one run) and by the sliced Wasserstein distance of their RGB pixels
   (`mupad.evaluation.pixel_stats.sliced_wasserstein_rgb`), with the distance of a second
   real set of the same size (the floor) and of Gaussian noise. (The squared distance of
   ODE samples to an SDE sample from the same noise is not a quality measure: the SDE adds
   fresh noise.) The SDE is also sampled with each `--quality-skip` cut-off from the same
   noise: the mean absolute pixel difference to the exact sampler's images says what the
   skipped unconditional passes change.

    python benchmarks/sampling.py                          # SiT-S/2, 32x32x4 latents
    python benchmarks/sampling.py --quick                  # tiny model, < 2 min on a CPU
    python benchmarks/sampling.py --preset tiny --batch 4 --json out.json
    python benchmarks/sampling.py --quick --threads 1      # a shared, oversubscribed CPU

The random model has its zero-initialised weights (adaLN-Zero gates, output layers,
cross-attention outputs) given small random values, so every branch does real work and the
outputs are nontrivial. Before the timed runs, one guided step is timed and the whole run is
projected; beyond `--max-minutes` the script stops and says what to shrink.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mupad.conditions import Conditions, ConditionStream
from mupad.config import GuidanceConfig, SampleConfig, model_preset, to_dict
from mupad.models import SiT
from mupad.models.kv_cache import condition_kv_cache
from mupad.transport.guidance import GuidanceSchedule
from mupad.transport.samplers import sample

GUIDANCE = GuidanceConfig(schedule="linear", start=2.5, end=0.0, skip_below=0.0)  # exact anneal
NO_GUIDANCE = GuidanceConfig(schedule="linear", start=0.0, end=0.0)  # guided() is a no-op


# --------------------------------------------------------------------------------------
# Velocity wrappers (benchmark-only)
# --------------------------------------------------------------------------------------


class Counting:
    """Counts calls and rows of a velocity function (rows = samples x passes)."""

    def __init__(self, fn: Callable) -> None:
        self.fn, self.calls, self.rows = fn, 0, 0

    def __call__(self, x, t, cond):
        self.calls += 1
        self.rows += x.shape[0]
        return self.fn(x, t, cond)


class NaiveCFG:
    """v = v_c + w(t) (v_c - v_u) with BOTH passes at every step, even where w(t) = 0."""

    def __init__(self, fn: Callable, schedule: GuidanceSchedule) -> None:
        self.fn, self.schedule = fn, schedule

    def __call__(self, x, t, cond):
        batch = x.shape[0]
        both = Conditions.concat([cond, cond.without(list(cond.streams))])
        out = self.fn(torch.cat([x, x]), torch.cat([t, t]), both)  # one call, 2B rows
        v_cond, v_uncond = out[:batch], out[batch:]
        return v_cond + self.schedule(float(t[0])) * (v_cond - v_uncond)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def randomize_zero_params(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Small random values for the zero-initialised weights, so no branch is trivially 0."""
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    """(wall seconds, output)."""
    wall, _, out = timed_cpu(device, fn)
    return wall, out


def timed_cpu(
    device: torch.device, fn: Callable[[], torch.Tensor]
) -> tuple[float, float, torch.Tensor]:
    """(wall seconds, process CPU seconds, output). On a shared CPU the process CPU time is
    the steadier measure of the work done (other processes' load inflates only the wall)."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu, out


def random_conditions(
    batch: int, args: argparse.Namespace, generator: torch.Generator, device: torch.device
) -> tuple[Conditions, Conditions]:
    """(image + text, text only) conditions of random tokens."""
    text = torch.randn(batch, args.text_tokens, args.text_dim, generator=generator)
    image = torch.randn(batch, args.image_tokens, args.image_dim, generator=generator)
    both = Conditions.build(
        text=ConditionStream.from_tokens(text), image=ConditionStream.from_tokens(image)
    ).to(device)
    return both, Conditions.build(text=ConditionStream.from_tokens(text)).to(device)


def sde_config(guidance: GuidanceConfig, steps: int, seed: int) -> SampleConfig:
    return SampleConfig(sampler="sde", num_steps=steps, guidance=guidance, seed=seed)


def fmt_s(seconds: float) -> str:
    return f"{seconds:8.2f} s"


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


def guidance_and_modalities(
    model: SiT, args: argparse.Namespace, device: torch.device, autocast
) -> dict:
    generator = torch.Generator().manual_seed(args.seed)
    cond, text_only = random_conditions(args.batch, args, generator, device)
    shape = (args.batch, args.channels, args.size, args.size)
    noise = torch.randn(shape, generator=generator).to(device)
    schedule = GuidanceSchedule.from_config(GUIDANCE)
    velocity = model.velocity

    arms: dict[str, Callable[[Counting], torch.Tensor]] = {
        "naive_cfg": lambda fn: sample(
            NaiveCFG(fn, schedule), noise, cond, sde_config(NO_GUIDANCE, args.steps, args.seed)
        ),
        "annealed_cfg": lambda fn: sample(
            fn, noise, cond, sde_config(GUIDANCE, args.steps, args.seed)
        ),
        "text_only_annealed": lambda fn: sample(
            fn, noise, text_only, sde_config(GUIDANCE, args.steps, args.seed)
        ),
    }
    if args.skip_below > 0:
        cut = dataclasses.replace(GUIDANCE, skip_below=args.skip_below)
        arms["annealed_cut"] = lambda fn: sample(
            fn, noise, cond, sde_config(cut, args.steps, args.seed)
        )
    else:
        cut = GUIDANCE

    def cached(fn: Counting) -> torch.Tensor:
        with condition_kv_cache(model):
            return sample(fn, noise, cond, sde_config(cut, args.steps, args.seed))

    arms["annealed_cut_kv_cached"] = cached  # what `mupad generate` runs
    names = list(arms)
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu_times: dict[str, list[float]] = {name: [] for name in names}
    counts: dict[str, Counting] = {}
    outputs: dict[str, torch.Tensor] = {}
    for repeat in range(args.repeats):
        # Alternate the order so slow phases of a shared machine hit every arm.
        for name in names if repeat % 2 == 0 else names[::-1]:
            counter = Counting(velocity)
            with autocast():
                seconds, cpu, out = timed_cpu(device, lambda: arms[name](counter))  # noqa: B023
            times[name].append(seconds)
            cpu_times[name].append(cpu)
            counts[name], outputs[name] = counter, out.float().cpu()
            print(
                f"  {name:<20} {fmt_s(seconds)} wall, {fmt_s(cpu)} cpu  ({counter.calls} calls, "
                f"{counter.rows} rows)"
            )
    wall = {name: statistics.median(values) for name, values in times.items()}
    cpu = {name: statistics.median(values) for name, values in cpu_times.items()}
    result = {
        name: {
            "wall_s": wall[name],
            "cpu_s": cpu[name],
            "all_wall_s": times[name],
            "all_cpu_s": cpu_times[name],
            "calls": counts[name].calls,
            "rows": counts[name].rows,
        }
        for name in names
    }
    diff = float((outputs["naive_cfg"] - outputs["annealed_cfg"]).abs().max())

    def ratio(a: str, b: str) -> dict[str, float]:
        return {
            "wall": wall[a] / wall[b],
            "cpu": cpu[a] / cpu[b],
            "rows": counts[a].rows / counts[b].rows,
        }

    result["ratios"] = {
        "naive_over_annealed": ratio("naive_cfg", "annealed_cfg"),
        "all_streams_over_text_only": ratio("annealed_cfg", "text_only_annealed"),
    }
    result["ratios"]["naive_over_cut_kv_cached"] = ratio("naive_cfg", "annealed_cut_kv_cached")
    if "annealed_cut" in wall:
        result["ratios"]["naive_over_annealed_cut"] = ratio("naive_cfg", "annealed_cut")
        result["ratios"]["cut_over_cut_kv_cached"] = ratio("annealed_cut", "annealed_cut_kv_cached")
        result["annealed_cut_t_below"] = args.skip_below / GUIDANCE.start
    result["max_abs_diff_naive_vs_annealed"] = diff
    result["sample_std"] = {name: float(out.std()) for name, out in outputs.items()}
    return result


def ode_vs_sde(
    model: SiT, args: argparse.Namespace, device: torch.device, autocast, sde: dict
) -> dict:
    generator = torch.Generator().manual_seed(args.seed)
    cond, _ = random_conditions(args.batch, args, generator, device)
    shape = (args.batch, args.channels, args.size, args.size)
    noise = torch.randn(shape, generator=generator).to(device)
    result = {}
    for sampler in ("euler", "heun"):
        for steps in args.ode_steps:
            counter = Counting(model.velocity)
            config = SampleConfig(sampler=sampler, num_steps=steps, guidance=GUIDANCE)
            with autocast():
                seconds, cpu, _ = timed_cpu(
                    device,
                    lambda: sample(counter, noise, cond, config),  # noqa: B023
                )
            key = f"{sampler}_{steps}"
            result[key] = {
                "wall_s": seconds,
                "cpu_s": cpu,
                "evaluations": counter.calls,
                "over_sde": {
                    "wall": seconds / sde["wall_s"],
                    "cpu": cpu / sde["cpu_s"],
                    "evaluations": counter.calls / sde["calls"],
                },
            }
            print(
                f"  {key:<20} {fmt_s(seconds)} wall, {fmt_s(cpu)} cpu  ({counter.calls} "
                f"evaluations; {seconds / sde['wall_s']:.3f} x the {args.steps}-step SDE's wall)"
            )
    return result


def feature_distances(
    args: argparse.Namespace, real_u8: torch.Tensor
) -> Callable[[torch.Tensor], dict] | None:
    """images -> {"kid": ..., "fid": ...} against the real crops in `--quality-features`
    space (KID unbiased at small N; FID under the `allow` small-sample policy, so only
    comparable between arms of this run), or None when the extractor is unavailable."""
    if args.quality_features == "none":
        return None
    from mupad.conditioning.base import EncoderError
    from mupad.evaluation.features import extract_features, feature_extractor
    from mupad.evaluation.fid import fid_with_ci, kid_with_ci

    try:
        extractor = feature_extractor(args.quality_features)
    except EncoderError as error:
        print(f"  no {args.quality_features} features ({error}); SWD only")
        return None
    real = extract_features(real_u8, extractor, progress=False)

    def distances(images: torch.Tensor) -> dict:
        generated = extract_features(images, extractor, progress=False)
        kid = kid_with_ci(generated, real, seed=args.seed)
        fid = fid_with_ci(generated, real, small_sample="allow", seed=args.seed)
        return {"kid": kid.to_dict(), "fid": fid.to_dict()}

    return distances


def quality(args: argparse.Namespace, device: torch.device, budget_s: float) -> dict:
    """Samples of the demo model from each sampler, SWD of RGB pixels to real crops.

    Skipped (with the projection as the reason) when it would take longer than `budget_s`.
    """
    from mupad.applications.generate import generate
    from mupad.applications.train_tiles import _resolve_checkpoint
    from mupad.conditioning import get_encoder
    from mupad.data.tiles import load_tile_folder, random_crops, to_uint8
    from mupad.evaluation.pixel_stats import sliced_wasserstein_rgb
    from mupad.training.captioned_tiles import encode_captions

    model_dir, metadata = _resolve_checkpoint(Path(args.demo_run))
    model = SiT.from_pretrained(model_dir).to(device).eval()
    captions = metadata["captions"]
    bank = encode_captions(captions, get_encoder(metadata.get("text_encoder", "minilm")))
    per_class = math.ceil(args.quality_samples / len(captions))
    labels = torch.arange(len(captions)).repeat_interleave(per_class)[: args.quality_samples]
    cond = bank.conditions(labels)

    # Real crops: held-out tiles when given (never seen in training), else the training tiles.
    tiles = load_tile_folder(args.quality_real or metadata["data"])
    crop = int(metadata.get("crop", model.config.sample_size))
    real_generator = torch.Generator().manual_seed(12345)  # as `mupad demo`
    real, _ = random_crops(tiles, crop, 512, real_generator)
    real_u8 = to_uint8(real)
    other, _ = random_crops(tiles, crop, len(labels), torch.Generator().manual_seed(999))
    noise_u8 = to_uint8(torch.randn(len(labels), 3, crop, crop).clamp(-1, 1))
    embed = feature_distances(args, real_u8)
    result: dict = {
        "checkpoint": str(model_dir),
        "real": str(args.quality_real or metadata["data"]),
        "num_samples": len(labels),
        "floor_real_vs_real": sliced_wasserstein_rgb(to_uint8(other), real_u8),
        "noise_vs_real": sliced_wasserstein_rgb(noise_u8, real_u8),
        "samplers": {},
    }
    probe = SampleConfig(sampler="sde", num_steps=2, guidance=GUIDANCE, seed=args.seed)
    generate(model, cond, probe)  # warm-up
    step_s = timed(device, lambda: generate(model, cond, probe))[0] / 2
    evaluations = args.steps * (1 + len(args.quality_skip)) + 3 * sum(args.quality_ode_steps)
    projected = step_s * evaluations
    if budget_s and projected > budget_s:
        reason = (
            f"projected {projected / 60:.1f} min ({step_s * 1e3:.0f} ms per guided step of "
            f"{len(labels)} samples x {evaluations} evaluations) exceeds the remaining "
            f"{budget_s / 60:.1f} min of --max-minutes"
        )
        print(f"  skipped: {reason}")
        return {**result, "skipped": reason}
    configs = [("sde", args.steps, 0.0)]
    configs += [("sde", args.steps, skip) for skip in args.quality_skip]
    configs += [
        (sampler, steps, 0.0) for sampler in ("euler", "heun") for steps in args.quality_ode_steps
    ]
    sde_wall, exact = None, None
    for sampler, steps, skip in configs:
        guidance = dataclasses.replace(GUIDANCE, skip_below=skip)
        config = SampleConfig(sampler=sampler, num_steps=steps, guidance=guidance, seed=args.seed)
        seconds, images = timed(device, lambda: generate(model, cond, config))  # noqa: B023
        swd = sliced_wasserstein_rgb(images, real_u8)
        sde_wall = sde_wall or seconds
        exact = images if exact is None else exact
        key = f"{sampler}_{steps}" + (f"_skip{skip:g}" if skip else "")
        entry = {"wall_s": seconds, "swd_to_real": swd, "wall_over_sde": seconds / sde_wall}
        if embed is not None:
            entry.update(embed(images))
        if skip:
            entry["mean_abs_diff_to_exact_sde"] = float(
                (images.float() - exact.float()).abs().mean()
            )
        result["samplers"][key] = entry
        extra = f", |diff| to exact {entry['mean_abs_diff_to_exact_sde']:.2f}/255" if skip else ""
        if embed is not None:
            extra += f", KID {entry['kid']['value']:.4f} [{entry['kid']['ci_low']:.4f}, {entry['kid']['ci_high']:.4f}]"
            extra += f", FID {entry['fid']['value']:.1f}"
        print(f"  {key:<20} {fmt_s(seconds)}  SWD to real {swd:.4f}{extra}")
    return result


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=None, help="model preset (default S/2; --quick: tiny)")
    parser.add_argument("--batch", type=int, default=None, help="samples (default 4; quick 2)")
    parser.add_argument("--size", type=int, default=32, help="latent side (default 32)")
    parser.add_argument("--channels", type=int, default=4, help="latent channels (default 4)")
    parser.add_argument("--steps", type=int, default=250, help="SDE steps (default 250)")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--text-dim", type=int, default=384, help="MiniLM width")
    parser.add_argument("--image-tokens", type=int, default=65, help="inception: 1 + 8x8")
    parser.add_argument("--image-dim", type=int, default=2048, help="inception width")
    parser.add_argument(
        "--ode-steps", default=None, help="comma-separated ODE step counts (default 25,50,100)"
    )
    parser.add_argument(
        "--skip-below",
        type=float,
        default=0.5,
        help="arm with GuidanceConfig.skip_below: guidance below this scale counts as 0 (0: no arm)",
    )
    parser.add_argument(
        "--quality-skip",
        default="0.25,0.5,1.0",
        help="quality: skip_below values sampled from the same noise as the exact SDE",
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per arm (median)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument(
        "--dtype", choices=("auto", "fp32", "bf16"), default="auto",
        help="bf16 = bf16 autocast; auto: bf16 on CUDA, fp32 on CPU",
    )  # fmt: skip
    parser.add_argument("--quality", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--demo-run", default="runs/demo", help="the `mupad demo` run folder")
    parser.add_argument("--quality-samples", type=int, default=16)
    parser.add_argument(
        "--quality-real",
        default=None,
        help="held-out real tiles (<class>/<tile>) for the quality section (default: the "
        "demo's training tiles)",
    )
    parser.add_argument(
        "--quality-features",
        default="inception",
        help="feature extractor for KID/FID in the quality section ('none': SWD only)",
    )
    parser.add_argument(
        "--quality-ode-steps", default=None, help="ODE steps for quality (default = --ode-steps)"
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=8.0,
        help="stop before the timed runs if the projected time exceeds this (0: no limit)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, < 2 min on a CPU")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    args.preset = args.preset or ("tiny" if args.quick else "S/2")
    args.batch = args.batch or (2 if args.quick else 4)
    args.ode_steps = [int(v) for v in (args.ode_steps or "25,50,100").split(",")]
    args.quality_ode_steps = (
        [int(v) for v in args.quality_ode_steps.split(",")]
        if args.quality_ode_steps
        else args.ode_steps
    )
    args.quality_skip = [float(v) for v in args.quality_skip.split(",") if v.strip()]
    if args.quality is None:
        args.quality = not args.quick
    return args


def main(argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")

    def autocast():
        if dtype == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    torch.manual_seed(args.seed)
    config = model_preset(
        args.preset, in_channels=args.channels, text_dim=args.text_dim,
        image_dim=args.image_dim, sample_size=args.size,
    )  # fmt: skip
    model = SiT(config)
    randomize_zero_params(model, torch.Generator().manual_seed(args.seed))
    model = model.to(device).eval()

    threads = torch.get_num_threads() if device.type == "cpu" else None
    name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {threads} threads"
    )
    print(f"device: {name}; torch {torch.__version__}; {dtype}")
    print(
        f"model: SiT-{args.preset} (hidden {config.hidden_size}, depth {config.depth}, patch "
        f"{config.patch_size}, {model.num_parameters / 1e6:.1f} M params), latents "
        f"{args.channels}x{args.size}x{args.size}, batch {args.batch}; streams: text "
        f"{args.text_tokens}x{args.text_dim}, image {args.image_tokens}x{args.image_dim}"
    )

    # Warm-up and projection: one guided SDE step (2B rows) and one text-only step.
    generator = torch.Generator().manual_seed(args.seed)
    cond, _ = random_conditions(args.batch, args, generator, device)
    noise = torch.randn(args.batch, args.channels, args.size, args.size).to(device)
    warm = sde_config(GUIDANCE, 3, args.seed)
    with autocast():
        sample(model.velocity, noise, cond, warm)
        step_s, _ = timed(device, lambda: sample(model.velocity, noise, cond, warm))
    step_s /= 3
    passes = 4 + (1 if args.skip_below > 0 else 0)  # SDE arms (text-only counted as full)
    ode_evals = sum(args.ode_steps) * 3  # Euler k + Heun 2k
    projected = step_s * (passes * args.steps + ode_evals) * args.repeats
    print(
        f"one guided step: {step_s * 1e3:.1f} ms; sections 1-3 projected {projected / 60:.1f} min"
    )
    if args.max_minutes and projected > 60 * args.max_minutes:
        print(
            f"stopping: the projection exceeds --max-minutes {args.max_minutes}. Use a GPU, "
            "a smaller --preset (e.g. tiny, S/8), a smaller --batch, or --quick",
            file=sys.stderr,
        )
        raise SystemExit(2)

    results: dict = {
        "device": name,
        "dtype": dtype,
        "torch": torch.__version__,
        "model": to_dict(config),
        "batch": args.batch,
        "sde_steps": args.steps,
        "guidance": to_dict(GUIDANCE),
    }
    print(f"\n1-2. {args.steps}-step SDE, guidance linear 2.5 -> 0 (rows = samples x passes)")
    results["guidance_and_modalities"] = section = guidance_and_modalities(
        model, args, device, autocast
    )
    print(f"\n3. ODE samplers vs the {args.steps}-step SDE (same guidance)")
    results["ode_vs_sde"] = ode_vs_sde(model, args, device, autocast, section["annealed_cfg"])

    if args.quality and Path(args.demo_run).is_dir():
        print(f"\n4. quality on the demo model ({args.demo_run}), {args.quality_samples} samples")
        budget = 60 * args.max_minutes - (time.perf_counter() - started) if args.max_minutes else 0
        results["quality"] = quality(args, device, max(budget, 1e-9) if args.max_minutes else 0)
    else:
        reason = "--no-quality/--quick" if not args.quality else f"no demo run at {args.demo_run}"
        print(f"\n4. quality: skipped ({reason})")
        results["quality"] = {"skipped": reason}

    ratios = section["ratios"]
    print("\nratios (same run; wall | process cpu | forward rows):")

    def show(label: str, value: dict[str, float], note: str = "") -> None:
        print(
            f"  {label:<34} {value['wall']:6.3f} | {value['cpu']:6.3f} | "
            f"{value.get('rows', value.get('evaluations', math.nan)):6.3f}{note}"
        )

    show(
        "naive CFG / annealed CFG",
        ratios["naive_over_annealed"],
        f"  (max |sample diff| {section['max_abs_diff_naive_vs_annealed']:.1e})",
    )
    if "naive_over_annealed_cut" in ratios:
        show(
            f"naive CFG / anneal cut at w<{args.skip_below:g}",
            ratios["naive_over_annealed_cut"],
            f"  (no uncond pass for t < {section['annealed_cut_t_below']:.2f})",
        )
        show("anneal cut / + condition K/V cache", ratios["cut_over_cut_kv_cached"])
    show("naive CFG / cut + K/V cache (generate)", ratios["naive_over_cut_kv_cached"])
    show("all streams / text only", ratios["all_streams_over_text_only"])
    for key, value in results["ode_vs_sde"].items():
        show(f"{key} / SDE-{args.steps}", value["over_sde"], "  (evaluations)")
    quality_result = results["quality"]
    if quality_result.get("samplers"):
        print(
            f"  quality (SWD to real, lower is better; real-vs-real floor "
            f"{quality_result['floor_real_vs_real']:.4f}, noise {quality_result['noise_vs_real']:.4f}):"
        )
        for key, value in quality_result["samplers"].items():
            print(
                f"    {key:<10} SWD {value['swd_to_real']:.4f}  wall {value['wall_over_sde']:.3f}"
                " x SDE"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
