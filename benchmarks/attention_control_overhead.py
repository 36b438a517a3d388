"""Cost of the attention-control hook on the default path, measured in one run.

Times SiT forward passes (no grad) with three SelfAttention variants, interleaved round by
round so that machine load affects them alike:

  before   the forward as it was without the hook (fused QKV + SDPA, no `control` check)
  absent   the current forward, no controller bound (the default path)
  inactive the current forward with a bound but inactive RowInjection

and prints the median time per forward and the ratios absent/before and inactive/before.

    python benchmarks/attention_control_overhead.py --preset S/2 --batch 8 --size 32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mupad.config import model_preset
from mupad.models import SiT
from mupad.models.attention import SelfAttention
from mupad.models.attention_control import RowInjection, attention_control


def _forward_before(self: SelfAttention, x: torch.Tensor) -> torch.Tensor:
    """SelfAttention.forward without the control hook (the code before it was added)."""
    batch, length, dim = x.shape
    head_dim = dim // self.num_heads
    qkv = self.qkv(x).view(batch, length, 3, self.num_heads, head_dim)
    q, k, v = (part.transpose(1, 2) for part in qkv.unbind(2))
    out = F.scaled_dot_product_attention(q, k, v)
    batch, heads, length, head_dim = out.shape
    return self.proj(out.transpose(1, 2).reshape(batch, length, heads * head_dim))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="S/2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="latent side")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = SiT(model_preset(args.preset, in_channels=4, sample_size=args.size)).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # nonzero outputs (adaLN-Zero starts at 0)
            parameter.add_(0.02 * torch.randn_like(parameter))
    x = torch.randn(args.batch, 4, args.size, args.size)
    t = torch.full((args.batch,), 0.5)
    current = SelfAttention.forward
    inactive = RowInjection(torch.arange(args.batch), active=False)

    def run(variant: str) -> tuple[float, torch.Tensor]:
        SelfAttention.forward = _forward_before if variant == "before" else current
        try:
            start = time.perf_counter()
            with torch.no_grad():
                if variant == "inactive":
                    with attention_control(model, inactive):
                        out = model(x, t).velocity
                else:
                    out = model(x, t).velocity
            return time.perf_counter() - start, out
        finally:
            SelfAttention.forward = current

    variants = ("before", "absent", "inactive")
    for variant in variants:  # warm-up
        run(variant)
    times: dict[str, list[float]] = {v: [] for v in variants}
    outputs = {}
    for round_index in range(args.rounds):
        order = variants if round_index % 2 == 0 else variants[::-1]
        for variant in order:
            seconds, outputs[variant] = run(variant)
            times[variant].append(seconds)
    median = {v: statistics.median(times[v]) for v in variants}
    print(
        f"SiT-{args.preset} forward, batch {args.batch}, {args.size}x{args.size} latents, "
        f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds"
    )
    for variant in variants:
        spread = statistics.pstdev(times[variant]) * 1e3
        print(f"  {variant:9s} median {median[variant] * 1e3:8.2f} ms  (sd {spread:.2f} ms)")
    print(f"  absent / before   = {median['absent'] / median['before']:.3f}")
    print(f"  inactive / before = {median['inactive'] / median['before']:.3f}")
    same = all(torch.equal(outputs["before"], outputs[v]) for v in variants)
    print(f"  outputs bit-identical across variants: {same}")


if __name__ == "__main__":
    main()
