"""Training-step speed of our SiT against diffusers' DiTTransformer2DModel, in the same run.

Times forward + backward (no optimizer step) of the unconditional backbone on random
latents, interleaving the two models iteration by iteration so that clock drift and thermal
state hit both equally, and reports the median step time, the ratio ours / diffusers,
images per second and the fraction of this machine's matmul peak (measured in the same
run with one large matmul) that each step reaches.

    python benchmarks/train_step.py                       # SiT-S/2, batch 16, bf16 autocast
    python benchmarks/train_step.py --batch 8 --iters 20 --dtype fp32
    python benchmarks/train_step.py --compile             # torch.compile both models

diffusers' DiT is class-conditional (adaLN on timestep + class label embeddings), so it is
built with `num_embeds_ada_norm=1000` and given dummy class labels; ours gets no conditions
(cross_attention=none). Width, depth, heads, patch, channels and MLP ratio match. The MLP
activation differs by design: diffusers' DiT uses the tanh-approximated GELU, ours the exact
(erf) GELU, whose CPU kernel is several times faster.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mupad.config import ModelConfig, model_preset
from mupad.models import SiT


def matmul_flops_per_step(config: ModelConfig, batch: int, height: int, width: int) -> float:
    """Analytic FLOPs of one forward + backward (3x forward) counting matrix multiplies only.

    Forward: 2 * (weights of every per-token Linear) * tokens, plus self-attention's
    QK^T and AV, 2 * 2 * N^2 * D per block. Backward costs two forwards.
    """
    d, p = config.hidden_size, config.patch_size
    tokens = (height // p) * (width // p)
    inner = int(d * config.mlp_ratio)
    per_block = 3 * d * d + d * d + 2 * d * inner  # qkv, out proj, fc1, fc2
    per_token = config.depth * per_block + (config.in_channels + config.out_channels) * p * p * d
    forward = 2.0 * per_token * tokens + config.depth * 4.0 * tokens * tokens * d
    return 3.0 * batch * forward


def measure_matmul_peak(dtype: torch.dtype, size: int = 4096, repeats: int = 3) -> float:
    """FLOP/s of the best of `repeats` (size x size) @ (size x size) matmuls in `dtype`."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)  # warm-up (kernel selection, page faults)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def build_diffusers_dit(config: ModelConfig, sample_size: int) -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=config.num_heads,
        attention_head_dim=config.hidden_size // config.num_heads,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        num_layers=config.depth,
        sample_size=sample_size,
        patch_size=config.patch_size,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,  # DiT needs class labels; dummy labels below
    )


def randomize_zero_params(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Give zero-initialised weights (adaLN-Zero, output layers) small random values, so no
    branch of either model is trivially zero while timing."""
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="S/2", help="model preset, e.g. S/2, B/2 (default S/2)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32, help="latent height = width (default 32)")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per model")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--dtype",
        choices=("bf16", "fp32", "bf16-weights"),
        default="bf16",
        help="bf16: bf16 autocast with fp32 weights, as in training (default); fp32: no "
        "autocast; bf16-weights: both models' parameters cast to bf16, no autocast",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    config = model_preset(args.preset, in_channels=4, cross_attention="none", sample_size=args.size)

    ours = SiT(config)
    theirs = build_diffusers_dit(config, args.size)
    randomize_zero_params(ours, generator)
    randomize_zero_params(theirs, generator)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    if args.dtype == "bf16-weights":
        ours.to(torch.bfloat16)
        theirs.to(torch.bfloat16)
    ours.train()
    theirs.train()

    batch, size, channels = args.batch, args.size, config.in_channels
    input_dtype = torch.bfloat16 if args.dtype == "bf16-weights" else torch.float32
    x = torch.randn(batch, channels, size, size, generator=generator).to(input_dtype)
    target = torch.randn(batch, config.out_channels, size, size, generator=generator)
    t = torch.rand(batch, generator=generator)
    timesteps = (t * 999).round().long()  # diffusers' DiT embeds integer timesteps
    labels = torch.zeros(batch, dtype=torch.long)  # dummy class labels for diffusers' DiT

    run_ours = torch.compile(ours) if args.compile else ours
    run_theirs = torch.compile(theirs) if args.compile else theirs
    forwards: dict[str, Callable[[], torch.Tensor]] = {
        "ours": lambda: run_ours(x, t).velocity,
        "diffusers": lambda: run_theirs(x, timestep=timesteps, class_labels=labels).sample,
    }
    models = {"ours": ours, "diffusers": theirs}
    autocast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        if args.dtype == "bf16"
        else contextlib.nullcontext
    )

    def step(name: str) -> tuple[float, float]:
        """One forward + backward; (wall seconds, process CPU seconds)."""
        models[name].zero_grad(set_to_none=True)
        wall, cpu = time.perf_counter(), time.process_time()
        with autocast():
            out = forwards[name]()
        F.mse_loss(out.float(), target).backward()
        return time.perf_counter() - wall, time.process_time() - cpu

    peak_dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    peak = measure_matmul_peak(peak_dtype)
    for _ in range(args.warmup):
        step("ours")
        step("diffusers")
    timings: dict[str, list[tuple[float, float]]] = {"ours": [], "diffusers": []}
    for i in range(args.iters):
        # Alternate which model goes first, so slow phases of a shared machine hit both.
        for name in ("ours", "diffusers") if i % 2 == 0 else ("diffusers", "ours"):
            timings[name].append(step(name))
    peak = max(peak, measure_matmul_peak(peak_dtype))  # best of both ends of the run

    flops = matmul_flops_per_step(config, batch, size, size)
    wall = {name: statistics.median(w for w, _ in v) for name, v in timings.items()}
    cpu = {name: statistics.median(c for _, c in v) for name, v in timings.items()}
    precision = {
        "bf16": "bf16 autocast, fp32 weights",
        "fp32": "fp32",
        "bf16-weights": "bf16 weights, no autocast",
    }[args.dtype]
    print(f"device: cpu, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(
        f"model: SiT-{args.preset} (hidden {config.hidden_size}, depth {config.depth}, heads "
        f"{config.num_heads}, patch {config.patch_size}), in/out channels {channels}, "
        f"{size}x{size} latents, batch {batch}, {precision}"
        f"{', torch.compile' if args.compile else ''}"
    )
    print(
        f"params: ours {n_ours / 1e6:.2f} M, diffusers {n_theirs / 1e6:.2f} M "
        "(diffusers' DiT has a timestep+class embedder in every block)"
    )
    print(
        "note: diffusers' DiTTransformer2DModel is class-conditional: built with "
        "num_embeds_ada_norm=1000 and fed dummy class labels (all 0); ours has no conditions"
    )
    print(
        f"step = forward + backward, no optimizer; median of {args.iters} interleaved "
        f"iterations after {args.warmup} warm-up"
    )
    for name in ("ours", "diffusers"):
        walls = [w for w, _ in timings[name]]
        print(
            f"  {name:<10} {wall[name] * 1e3:8.1f} ms/step (min {min(walls) * 1e3:.1f}, max "
            f"{max(walls) * 1e3:.1f}; cpu {cpu[name] * 1e3:.1f} ms)  "
            f"{batch / wall[name]:6.2f} images/s  {flops / wall[name] / 1e9:6.1f} GFLOP/s = "
            f"{flops / wall[name] / peak:.1%} of peak (best step {flops / min(walls) / peak:.1%})"
        )
    print(
        f"ratio ours/diffusers: {wall['ours'] / wall['diffusers']:.3f} (wall-clock medians; "
        f"cpu-time medians {cpu['ours'] / cpu['diffusers']:.3f})"
    )
    print(
        f"matmul peak ({peak_dtype}, 4096^3, best of 6): {peak / 1e9:.1f} GFLOP/s; analytic "
        f"matmul FLOPs per step (fwd+bwd = 3x fwd): {flops / 1e9:.1f} GFLOP"
    )


if __name__ == "__main__":
    main()
