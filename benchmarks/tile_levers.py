"""What each quality lever of the tile generator costs per training step, in the same run.

Times one optimizer step (forward, backward, AdamW) of the text-conditioned tile generator
(hidden 256, depth 6, 64 px RGB crops, a MiniLM-wide text stream of 20 tokens) for each arm
of `mupad study quality`, interleaving the arms iteration by iteration so that clock drift
hits them equally, and prints the median step time and its ratio to the plain 8 px arm.
The study trains every arm for the same wall-clock budget, so these ratios are how many
fewer steps an arm gets.

    python benchmarks/tile_levers.py                        # bf16 autocast where native
    python benchmarks/tile_levers.py --precision fp32 --iters 10 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from mupad.conditions import Conditions, ConditionStream
from mupad.config import Precision
from mupad.experiments.quality import ARMS, base_model_config
from mupad.models import SiT
from mupad.precision import PrecisionChoice, resolve_precision

TEXT_DIM, TEXT_TOKENS = 384, 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--arms", default=",".join(ARMS))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = resolve_precision(PrecisionChoice(args.precision))
    names = [n.strip() for n in args.arms.split(",")]
    torch.manual_seed(0)
    batch = args.batch
    cond = Conditions.build(
        text=ConditionStream.from_tokens(
            torch.randn(batch, TEXT_TOKENS, TEXT_DIM),
            torch.ones(batch, TEXT_TOKENS, dtype=torch.bool),
        )
    )
    x, t = torch.randn(batch, 3, 64, 64), torch.rand(batch)
    models = {n: SiT(base_model_config(64, TEXT_DIM, **ARMS[n].model)) for n in names}
    optimizers = {n: torch.optim.AdamW(m.parameters(), lr=1e-4) for n, m in models.items()}

    def step(name: str) -> float:
        model, optimizer = models[name], optimizers[name]
        autocast = (
            torch.autocast("cpu", dtype=torch.bfloat16)
            if precision is Precision.BF16
            else contextlib.nullcontext()
        )
        start = time.perf_counter()
        with autocast:
            velocity = model(x, t, cond).velocity
        loss = (velocity.float() - x).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for name in names:  # warm-up: allocator, kernels
        step(name)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.iters):
        for name in names:
            times[name].append(step(name))
    reference = statistics.median(times[names[0]])
    print(f"precision {precision.value}, batch {batch}, {torch.get_num_threads()} threads")
    print(f"{'arm':<16} {'params (M)':>10} {'step (s)':>9} {'images/s':>9} {'x ' + names[0]:>9}")
    for name in names:
        median = statistics.median(times[name])
        params = models[name].num_parameters / 1e6
        print(
            f"{name:<16} {params:>10.2f} {median:>9.3f} {batch / median:>9.1f} "
            f"{median / reference:>9.2f}"
        )


if __name__ == "__main__":
    main()
