"""Full training steps of SiT-S/2 and SiT-B/2 with and without alignment, against diffusers.

For each preset (32x32x4 latents, plus a text condition stream of 16 tokens x 384 so that
the decoupled cross-attention runs), one full optimizer step of the real trainer
(`mupad.training.loop.Trainer._step`: noise/time/dropout draws, bf16 autocast over fp32
master weights, forward + backward, gradient clipping, AdamW, EMA) is timed for each
objective:

    sit    velocity loss only
    repa   + alignment through REPA's MLP projector to cached teacher features
    mupad  + alignment through the CNN projector + CLS-token denoising

Teacher features are cached (random TeacherFeatures of the Inception teacher's shape:
D = 2048, 8x8 grid, a 2048-wide global token), as in training from prepared shards. The
cost of computing them online instead — `OnlineTeacher("inception")` on the batch's
256x256 pixel images, exactly as the trainer calls it — is timed as its own arm and shown
as ms/step and as a fraction of an online-teacher step (teacher / (teacher + step)).

Side by side, in the same run: diffusers' DiTTransformer2DModel of the same width, depth,
heads and patch (built as in benchmarks/train_step.py: class-conditional with dummy labels,
no text stream) trained with the same full step (MSE, clipping, AdamW, EMA), in fp32 and in
bf16 autocast; the faster of the two is "diffusers' fastest mode". Every arm of a preset is
run once per round, the order rotating from round to round, and medians are reported.

Reported per arm: ms/step, images/s, model FLOPs per step (counted with
torch.utils.flop_counter.FlopCounterMode over one whole step, which counts the forward and
backward matmuls, convolutions and attention; optimizer and EMA add none), and model FLOP
utilisation = FLOPs / step time / this machine's bf16 matmul peak, measured in the same run
(best of repeated large bf16 matmuls, at both ends of the run). Peak memory per preset comes
from a subprocess that runs a few steps of the mupad objective alone: on CPU the growth of
its peak RSS (resource.getrusage ru_maxrss) over the RSS before the model is built; on CUDA
torch.cuda.max_memory_allocated.

    python benchmarks/train_scale.py                          # S/2 and B/2, batch 8 on CPU
    python benchmarks/train_scale.py --quick                  # S/2, batch 4, 2 steps
    python benchmarks/train_scale.py --device cuda --batch 64 --json scale.json
    python benchmarks/train_scale.py --presets S/2 --profile  # + top ops of one mupad step
    python benchmarks/train_scale.py --fused-adamw            # + an AdamW(fused=True) arm

Targets (from the project issue), checked and printed: our step reaches >= 20 % of the bf16
matmul peak, and >= 3x the images/s of diffusers' fastest mode.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils import flop_counter

from mupad.conditions import Conditions, ConditionStream
from mupad.config import (
    AlignmentConfig,
    CrossAttentionKind,
    ModelConfig,
    Objective,
    TrainConfig,
    model_preset,
)
from mupad.models.sit import SiT
from mupad.training.ema import EMA
from mupad.training.loop import TrainBatch, Trainer
from mupad.training.objectives import objective_model_config
from mupad.training.teacher import TeacherFeatures, TeacherSpec

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from train_step import build_diffusers_dit, randomize_zero_params

OBJECTIVES = ("sit", "repa", "mupad")
DIFFUSERS_MODES = ("diffusers-fp32", "diffusers-bf16")
TEACHER_ARM = "teacher"
LATENT_CHANNELS, LATENT_SIZE = 4, 32
PIXEL_SIZE = 256  # the images behind 32x32 latents of an 8x-downsampling VAE
TEXT_TOKENS, TEXT_DIM = 16, 384
TEACHER = TeacherSpec(dim=2048, grid=(8, 8))  # the Inception teacher: Mixed_7c at 299 px
MFU_TARGET, SPEEDUP_TARGET = 0.20, 3.0


# --------------------------------------------------------------------------------------
# Machine
# --------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bf16_peak(device: torch.device, sizes: tuple[int, ...], repeats: int) -> dict:
    """Best FLOP/s of (n x n) @ (n x n) bf16 matmuls over `sizes` and `repeats`."""
    best: dict[str, Any] = {"flops_per_s": 0.0, "size": None}
    for size in sizes:
        a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
        b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
        inner = 10 if device.type == "cuda" else 1  # amortise launch latency on a GPU
        torch.mm(a, b)
        synchronize(device)
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(inner):
                torch.mm(a, b)
            synchronize(device)
            rate = inner * 2.0 * size**3 / (time.perf_counter() - start)
            if rate > best["flops_per_s"]:
                best = {"flops_per_s": rate, "size": size}
        del a, b
    return best


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    return info


# --------------------------------------------------------------------------------------
# FLOP counting
# --------------------------------------------------------------------------------------


def _cpu_flash_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward_flops(grad_shape, query_shape, key_shape, value_shape, *args, **kw) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)


def flop_counter_mode() -> flop_counter.FlopCounterMode:
    """FlopCounterMode that also counts the CPU flash-attention kernels, which torch's table
    lacks (without them every CPU attention would count as 0 FLOPs)."""
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_flops
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
            _cpu_flash_backward_flops
        )
    return flop_counter.FlopCounterMode(display=False, custom_mapping=mapping)


def count_flops(fn: Callable[[], Any]) -> int:
    """Total FLOPs of running `fn` once. (Per-module counts are not used: FlopCounterMode
    attributes backward ops to whichever module's backward hook fired last.)"""
    counter = flop_counter_mode()
    with counter:
        fn()
    return counter.get_total_flops()


# --------------------------------------------------------------------------------------
# Arms
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class SyntheticData:
    """One fixed batch: drawn once, so data loading is excluded from every arm."""

    x0: torch.Tensor  # (B, 4, 32, 32) latents
    text: torch.Tensor  # (B, 16, 384) text tokens
    teacher: TeacherFeatures  # cls (B, 2048), patches (B, 64, 2048), grid 8x8
    pixels: torch.Tensor  # (B, 3, 256, 256) in [-1, 1], for the online teacher

    @classmethod
    def draw(cls, batch: int, seed: int) -> SyntheticData:
        g = torch.Generator().manual_seed(seed)
        grid_cells = TEACHER.grid[0] * TEACHER.grid[1]
        return cls(
            x0=torch.randn(batch, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE, generator=g),
            text=torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=g),
            teacher=TeacherFeatures(
                cls=torch.randn(batch, TEACHER.dim, generator=g),
                patches=torch.randn(batch, grid_cells, TEACHER.dim, generator=g),
                grid=TEACHER.grid,
            ),
            pixels=torch.rand(batch, 3, PIXEL_SIZE, PIXEL_SIZE, generator=g) * 2 - 1,
        )

    def batch_fn(self, step: int, generator: torch.Generator) -> TrainBatch:
        cond = Conditions.build(text=ConditionStream.from_tokens(self.text))
        return TrainBatch(x0=self.x0, cond=cond, teacher=self.teacher)


def base_model_config(preset: str) -> ModelConfig:
    return model_preset(
        preset, in_channels=LATENT_CHANNELS, sample_size=LATENT_SIZE, text_dim=TEXT_DIM
    )


def build_trainer(
    preset: str, objective: str, data: SyntheticData, device: torch.device, run_dir: Path, seed: int
) -> Trainer:
    alignment = AlignmentConfig(objective=objective, teacher="inception")
    config = objective_model_config(base_model_config(preset), alignment, TEACHER)
    torch.manual_seed(seed)
    model = SiT(config)
    randomize_zero_params(model, torch.Generator().manual_seed(seed))
    train_config = TrainConfig(
        steps=10**6, batch_size=data.x0.shape[0], precision="bf16", alignment=alignment, seed=seed
    )
    return Trainer(
        model,
        train_config,
        run_dir / objective,
        data.batch_fn,
        device=device,
        teacher=TEACHER,
        progress=False,
    )


class OursArm:
    """One objective, stepped through the real Trainer."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.next_step = 0
        self.params = sum(p.numel() for p in trainer.wrapped.parameters())
        self.backbone_params = trainer.model.num_parameters

    def step(self) -> None:
        self.trainer._step(self.next_step)
        self.next_step += 1


def fused_like(optimizer: torch.optim.AdamW) -> torch.optim.AdamW:
    """A fresh AdamW over the same parameters and hyperparameters, with fused=True."""
    group = optimizer.param_groups[0]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return torch.optim.AdamW(
        params,
        lr=group["lr"],
        betas=group["betas"],
        weight_decay=group["weight_decay"],
        fused=True,
    )


class DiffusersArm:
    """diffusers' DiT with the same full step as ours: MSE, clip, AdamW, EMA."""

    def __init__(self, preset: str, data: SyntheticData, device: torch.device, seed: int) -> None:
        config = dataclasses.replace(
            base_model_config(preset), cross_attention=CrossAttentionKind.NONE, text_dim=0
        )
        torch.manual_seed(seed)
        self.model = build_diffusers_dit(config, LATENT_SIZE)
        randomize_zero_params(self.model, torch.Generator().manual_seed(seed))
        self.model.to(device).train()
        self.params = sum(p.numel() for p in self.model.parameters())
        defaults = TrainConfig()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=defaults.learning_rate,
            betas=(defaults.beta1, defaults.beta2),
            weight_decay=defaults.weight_decay,
        )
        self.ema = EMA(self.model, defaults.ema_decay)
        self.grad_clip = defaults.grad_clip
        g = torch.Generator().manual_seed(seed + 1)
        batch = data.x0.shape[0]
        t = torch.rand(batch, generator=g)
        noise = torch.randn(data.x0.shape, generator=g)
        self.x_t = ((1 - t[:, None, None, None]) * data.x0 + t[:, None, None, None] * noise).to(
            device
        )
        self.target = (noise - data.x0).to(device)
        self.timesteps = (t * 999).round().long().to(device)  # DiT embeds integer timesteps
        self.labels = torch.zeros(batch, dtype=torch.long, device=device)  # dummy classes
        self.device = device

    def step(self, bf16: bool) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if bf16
            else contextlib.nullcontext()
        )
        with autocast:
            out = self.model(self.x_t, timestep=self.timesteps, class_labels=self.labels).sample
        F.mse_loss(out.float(), self.target).backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        float(norm)  # the trainer's finiteness check syncs here too
        self.optimizer.step()
        self.ema.update(self.model)


# --------------------------------------------------------------------------------------
# Peak memory, in a subprocess per preset
# --------------------------------------------------------------------------------------


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _current_rss_bytes() -> int:
    """Resident set size now (Linux /proc), else the peak so far.

    ru_maxrss alone cannot give the baseline: a child inherits its parent's peak across
    fork + exec, so the worker's ru_maxrss starts at the parent's high-water mark."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return _max_rss_bytes()
    return pages * os.sysconf("SC_PAGE_SIZE")


def memory_worker(preset: str, objective: str, batch: int, steps: int, device_name: str) -> dict:
    device = torch.device(device_name)
    data = SyntheticData.draw(batch, seed=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = _current_rss_bytes()
    inherited_peak = _max_rss_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        arm = OursArm(build_trainer(preset, objective, data, device, Path(tmp), seed=0))
        for _ in range(steps):
            arm.step()
        synchronize(device)
    result = {
        "preset": preset,
        "objective": objective,
        "batch": batch,
        "steps": steps,
        "params": arm.params,
        "rss_before_bytes": before,
        "rss_peak_bytes": _max_rss_bytes(),
        "rss_growth_bytes": _max_rss_bytes() - before,
        # True when ru_maxrss rose above the peak inherited from the parent, i.e. it is
        # this process's own peak (the parent runs these workers before growing).
        "rss_peak_is_own": _max_rss_bytes() > inherited_peak,
    }
    if device.type == "cuda":
        result["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return result


def measure_memory(
    preset: str, objective: str, batch: int, steps: int, device: torch.device
) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--memory-worker",
        preset,
        objective,
        str(batch),
        str(steps),
        str(device),
    ]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    )
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------
# One preset
# --------------------------------------------------------------------------------------


def run_preset(
    preset: str,
    args: argparse.Namespace,
    data: SyntheticData,
    device: torch.device,
    teacher_fn: Callable[[], Any] | None,
    peak_probe: Callable[[], None],
    log: Callable[[str], None],
) -> dict[str, Any]:
    config = base_model_config(preset)
    steps: dict[str, Callable[[], None]] = {}
    info: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ours = {}
        for objective in args.objectives:
            arm = OursArm(build_trainer(preset, objective, data, device, Path(tmp), args.seed))
            ours[objective] = arm
            steps[objective] = arm.step
            info[objective] = {"params": arm.params, "backbone_params": arm.backbone_params}
        if args.fused_adamw:
            # An experiment, not what the Trainer does: the same objective with torch's fused
            # AdamW (one kernel per parameter instead of a dozen) in place of its optimizer.
            objective = "mupad" if "mupad" in args.objectives else args.objectives[-1]
            name = f"{objective}+fused-adamw"
            arm = OursArm(build_trainer(preset, objective, data, device, Path(tmp), args.seed))
            arm.trainer.optimizer = fused_like(arm.trainer.optimizer)
            steps[name] = arm.step
            info[name] = {"params": arm.params, "backbone_params": arm.backbone_params}
        theirs = None
        if not args.no_diffusers:
            theirs = DiffusersArm(preset, data, device, args.seed)
            steps["diffusers-fp32"] = functools.partial(theirs.step, bf16=False)
            steps["diffusers-bf16"] = functools.partial(theirs.step, bf16=True)
            for mode in DIFFUSERS_MODES:
                info[mode] = {"params": theirs.params}
        if teacher_fn is not None:
            steps[TEACHER_ARM] = teacher_fn
            info[TEACHER_ARM] = {}

        # FLOPs: one whole step of each arm under the counter (also the first warm-up step).
        for name, fn in steps.items():
            total = count_flops(fn)
            synchronize(device)
            info[name]["flops_per_step"] = total
            log(f"  {preset} {name}: {total / 1e9:.1f} GFLOP/step counted")

        names = list(steps)
        times: dict[str, list[float]] = {name: [] for name in names}
        cpu_times: dict[str, list[float]] = {name: [] for name in names}  # process CPU s
        round_loads: list[float] = []  # 1-minute load average after each timed round
        for round_index in range(args.warmup + args.steps):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:  # rotate: no arm is always first
                synchronize(device)
                start, start_cpu = time.perf_counter(), time.process_time()
                steps[name]()
                synchronize(device)
                if round_index >= args.warmup:
                    times[name].append(time.perf_counter() - start)
                    cpu_times[name].append(time.process_time() - start_cpu)
            peak_probe()  # one more peak sample per round: catches the machine's quiet moments
            if round_index >= args.warmup:
                round_loads.append(os.getloadavg()[0])
                log(
                    f"  {preset} round {round_index - args.warmup + 1}/{args.steps}: "
                    + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in names)
                )

        profile = None
        if args.profile and "mupad" in ours:
            profile = profile_step(ours["mupad"].step, device, args.profile_rows)

    for name in names:
        info[name]["times_s"] = times[name]
        info[name]["median_s"] = statistics.median(times[name])
        info[name]["cpu_times_s"] = cpu_times[name]
        info[name]["median_cpu_s"] = statistics.median(cpu_times[name])
    return {
        "preset": preset,
        "model": {
            "hidden_size": config.hidden_size,
            "depth": config.depth,
            "num_heads": config.num_heads,
            "patch_size": config.patch_size,
        },
        "arms": info,
        "round_load_averages": round_loads,
        "profile": profile,
    }


def profile_step(step: Callable[[], None], device: torch.device, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    sort = "self_cpu_time_total"
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        sort = "self_device_time_total"
    step()
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def summarise(result: dict[str, Any], batch: int, peak: float) -> None:
    """Add images/s, FLOP/s, MFU, teacher fractions and ratios to one preset's result."""
    arms = result["arms"]
    for arm in arms.values():
        arm["images_per_s"] = batch / arm["median_s"]
        if arm.get("flops_per_step"):
            arm["flops_per_s"] = arm["flops_per_step"] / arm["median_s"]
            arm["mfu"] = arm["flops_per_s"] / peak
    modes = [m for m in DIFFUSERS_MODES if m in arms]
    if modes:
        fastest = min(modes, key=lambda m: arms[m]["median_s"])
        result["diffusers_fastest"] = fastest
    teacher = arms.get(TEACHER_ARM)
    for objective, arm in arms.items():
        if objective in DIFFUSERS_MODES or objective == TEACHER_ARM:
            continue
        if modes:
            arm["speedup_vs_diffusers"] = arm["images_per_s"] / arms[fastest]["images_per_s"]
            arm["meets_speedup_target"] = arm["speedup_vs_diffusers"] >= SPEEDUP_TARGET
        arm["meets_mfu_target"] = arm.get("mfu", 0.0) >= MFU_TARGET
        if teacher is not None and not objective.startswith("sit"):
            total = teacher["median_s"] + arm["median_s"]
            arm["online_teacher_fraction"] = teacher["median_s"] / total
            arm["online_teacher_images_per_s"] = batch / total


def print_report(report: dict[str, Any]) -> None:
    machine, peak = report["machine"], report["bf16_peak"]
    batch = report["batch"]
    print()
    where = machine.get("gpu") or f"cpu ({machine['threads']} threads, {machine['cpu_capability']})"
    print(
        f"device: {where}, torch {machine['torch']}, diffusers {machine['diffusers']}; "
        f"load average {report['load_average_start'][0]:.2f} -> {report['load_average_end'][0]:.2f}"
    )
    print(
        f"bf16 matmul peak: {peak['flops_per_s'] / 1e9:.1f} GFLOP/s (best over sizes "
        f"{report['peak_sizes']}^3, {report['peak_repeats']} repeats at start and end and one "
        f"per round; best at {peak['size']}^3)"
    )
    # This run's own threads add about `threads` to the load average while it runs.
    cpus, threads = machine["cpu_count"] or 1, machine["threads"]
    others = max(
        report["load_average_start"][0],
        max(report["round_load_averages"], default=0.0) - threads,
    )
    if machine["device"] == "cpu" and others > 0.5 * cpus:
        print(
            f"WARNING: other processes kept about {others:.1f} of {cpus} CPUs busy (load "
            "average, less this run's threads): step times (and the peak) are inflated and "
            "noisy; re-run when the machine is idle (see `uptime`)"
        )
    print(
        f"batch {batch}, 32x32x4 latents, text stream {TEXT_TOKENS} tokens x {TEXT_DIM}, "
        f"teacher features cached ({TEACHER.dim}-d, {TEACHER.grid[0]}x{TEACHER.grid[1]} grid); "
        f"median of {report['steps']} interleaved rounds after {report['warmup']} warm-up "
        "(+1 FLOP-counting step)"
    )
    print(
        "step = Trainer._step: draws, bf16 autocast fwd+bwd, grad clip, AdamW, EMA; "
        "diffusers: same step, no text stream (class-conditional DiT, dummy labels); "
        "cpu ms = process CPU time per step (all threads)"
    )
    header = (
        f"{'preset':<6} {'arm':<20} {'ms/step':>9} {'img/s':>8} {'GFLOP/step':>11} "
        f"{'GFLOP/s':>9} {'MFU':>6} {'vs diff.':>9} {'params':>8} {'cpu ms':>9}"
    )
    for result in report["presets"]:
        print()
        print(header)
        print("-" * len(header))
        arms = result["arms"]
        for name, arm in arms.items():
            flops = arm.get("flops_per_step", 0)
            ratio = arm.get("speedup_vs_diffusers")
            label = name + (" *" if name == result.get("diffusers_fastest") else "")
            params = arm.get("params")
            print(
                f"{result['preset']:<6} {label:<20} {arm['median_s'] * 1e3:9.1f} "
                f"{arm['images_per_s']:8.2f} {flops / 1e9:11.1f} "
                f"{arm.get('flops_per_s', 0) / 1e9:9.1f} {arm.get('mfu', 0):6.1%} "
                f"{(f'{ratio:.2f}x' if ratio is not None else ''):>9} "
                f"{(f'{params / 1e6:.1f}M' if params else ''):>8} "
                f"{arm['median_cpu_s'] * 1e3:9.0f}"
            )
        if result.get("diffusers_fastest"):
            print(f"  * diffusers' fastest mode here: {result['diffusers_fastest']}")
        if "sit" in arms:
            for objective in ("repa", "mupad"):
                arm = arms.get(objective)
                if arm and arm.get("flops_per_step"):
                    extra = arm["flops_per_step"] - arms["sit"]["flops_per_step"]
                    slower = arm["median_s"] / arms["sit"]["median_s"] - 1
                    print(
                        f"  {objective} vs sit: +{extra / 1e9:.1f} GFLOP/step "
                        f"(+{extra / arms['sit']['flops_per_step']:.1%} FLOPs, "
                        f"{slower:+.1%} step time): projector"
                        + (" + CLS token" if objective == "mupad" else "")
                    )
        teacher = arms.get(TEACHER_ARM)
        if teacher is not None:
            parts = [
                f"{o} {arms[o]['online_teacher_fraction']:.1%} of an online-teacher step "
                f"({arms[o]['online_teacher_images_per_s']:.2f} img/s)"
                for o in ("repa", "mupad")
                if o in arms
            ]
            print(
                f"  online Inception teacher on {PIXEL_SIZE}px images: "
                f"{teacher['median_s'] * 1e3:.1f} ms/step; " + "; ".join(parts)
            )
        memory = result.get("memory")
        if memory:
            if "error" in memory:
                print(f"  peak memory: failed ({memory['error']})")
            else:
                text = (
                    f"  peak memory ({memory['objective']} objective, batch {memory['batch']}, "
                    f"{memory['steps']} steps, own process): peak RSS growth "
                    f"{memory['rss_growth_bytes'] / 2**30:.2f} GiB (peak RSS "
                    f"{memory['rss_peak_bytes'] / 2**30:.2f} GiB)"
                )
                if "cuda_max_allocated_bytes" in memory:
                    text += (
                        f"; cuda max allocated {memory['cuda_max_allocated_bytes'] / 2**30:.2f} GiB"
                    )
                print(text)
    print()
    print(
        f"targets: MFU >= {MFU_TARGET:.0%} of the bf16 matmul peak, >= {SPEEDUP_TARGET:.0f}x "
        "diffusers' fastest mode (images/s)"
    )
    for result in report["presets"]:
        for objective, arm in result["arms"].items():
            if "meets_mfu_target" not in arm:
                continue
            mfu = "met" if arm["meets_mfu_target"] else "NOT met"
            line = f"  {result['preset']} {objective:<6} MFU {arm.get('mfu', 0):6.1%}: {mfu}"
            if "speedup_vs_diffusers" in arm:
                speed = "met" if arm["meets_speedup_target"] else "NOT met"
                line += f"; speed-up {arm['speedup_vs_diffusers']:.2f}x: {speed}"
            print(line)


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="S/2,B/2", help="comma-separated (default S/2,B/2)")
    parser.add_argument("--batch", type=int, default=0, help="default: 8 on CPU, 64 on CUDA")
    parser.add_argument("--steps", type=int, default=0, help="timed rounds (default 4; 2 quick)")
    parser.add_argument("--warmup", type=int, default=-1, help="untimed rounds (default 1)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    parser.add_argument("--quick", action="store_true", help="S/2 only, batch 4, 2 steps")
    parser.add_argument(
        "--objectives",
        default=",".join(OBJECTIVES),
        help="comma-separated subset of sit,repa,mupad",
    )
    parser.add_argument("--no-diffusers", action="store_true", help="skip diffusers' DiT")
    parser.add_argument("--no-teacher", action="store_true", help="skip the online teacher arm")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--peak-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument(
        "--fused-adamw",
        action="store_true",
        help="experiment: add an arm whose Trainer uses AdamW(fused=True)",
    )
    parser.add_argument("--profile", action="store_true", help="print top ops of a mupad step")
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-worker", nargs=5, metavar="X", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.presets = "S/2" if args.presets == "S/2,B/2" else args.presets
        args.batch = args.batch or 4
        args.steps = args.steps or 2
    args.presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    args.objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    for objective in args.objectives:
        Objective(objective)  # raises on a typo
    args.steps = args.steps or 4
    args.warmup = 1 if args.warmup < 0 else args.warmup
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        preset, objective, batch, steps, device = args.memory_worker
        print(json.dumps(memory_worker(preset, objective, int(batch), int(steps), device)))
        return

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    args.batch = args.batch or (64 if device.type == "cuda" else 8)
    peak_sizes = (4096, 8192) if device.type == "cuda" else (2048, 4096)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    load_start = os.getloadavg()
    log(f"device {device}, presets {args.presets}, batch {args.batch}, load {load_start[0]:.2f}")
    # Memory first, while this process is still small (a child inherits its ru_maxrss).
    memory: dict[str, dict] = {}
    if not args.no_memory:
        objective = "mupad" if "mupad" in args.objectives else args.objectives[-1]
        for preset in args.presets:
            log(f"  {preset}: peak memory subprocess ({objective}, {args.memory_steps} steps)")
            memory[preset] = measure_memory(
                preset, objective, args.batch, args.memory_steps, device
            )
    peaks = [measure_bf16_peak(device, peak_sizes, args.peak_repeats)]

    def peak_probe() -> None:
        peaks.append(measure_bf16_peak(device, peak_sizes, 1))

    data = SyntheticData.draw(args.batch, args.seed)

    teacher_fn = None
    if not args.no_teacher:
        from mupad.training.teacher import OnlineTeacher

        online = OnlineTeacher("inception", device=device)
        pixels = data.pixels.to(device)
        teacher_fn = functools.partial(online, pixels)  # as Trainer._local_batch calls it

    results = []
    for preset in args.presets:
        result = run_preset(preset, args, data, device, teacher_fn, peak_probe, log)
        result["memory"] = memory.get(preset)
        results.append(result)
        if result["profile"]:
            print(f"\ntorch.profiler, one mupad step of {preset} (batch {args.batch}):")
            print(result["profile"])

    peaks.append(measure_bf16_peak(device, peak_sizes, args.peak_repeats))
    peak = max(peaks, key=lambda p: p["flops_per_s"])
    peak["samples"] = len(peaks)
    for result in results:
        summarise(result, args.batch, peak["flops_per_s"])

    report = {
        "benchmark": "train_scale",
        "machine": machine_info(device),
        "bf16_peak": peak,
        "peak_sizes": list(peak_sizes),
        "peak_repeats": args.peak_repeats,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "latents": [LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE],
        "text_stream": [TEXT_TOKENS, TEXT_DIM],
        "teacher": {"dim": TEACHER.dim, "grid": list(TEACHER.grid), "online": "inception"},
        "targets": {"mfu": MFU_TARGET, "speedup_vs_diffusers": SPEEDUP_TARGET},
        "load_average_start": list(load_start),
        "load_average_end": list(os.getloadavg()),
        "round_load_averages": [x for r in results for x in r["round_load_averages"]],
        "wall_s": time.perf_counter() - started,
        "presets": results,
    }
    print_report(report)
    print(f"\nwall time {report['wall_s']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
