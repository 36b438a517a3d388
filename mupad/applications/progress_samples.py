"""Sample grids written while a model trains: the same conditions and seed at every step.

Fixed conditions (the first rows of a training batch, as the model sees them) and a fixed
seed make the grids of successive steps directly comparable: only the weights change.
"""

from __future__ import annotations

from pathlib import Path

from mupad.applications.figures import save_grid
from mupad.applications.generate import generate
from mupad.conditions import Conditions
from mupad.config import GuidanceConfig, SampleConfig, SamplerKind
from mupad.latents import LatentCodec
from mupad.models.sit import SiT

# A cheap deterministic preview: 24 Euler steps with the paper's annealed guidance, in bf16
# (about 2 x 24 forward passes of the preview batch; a 250-step SDE would cost 20x more).
PREVIEW_SAMPLING = SampleConfig(
    sampler=SamplerKind.EULER, num_steps=24, guidance=GuidanceConfig(), seed=0
)


class ProgressSamples:
    """`Trainer(sample_hook=...)`: writes `<out_dir>/step-XXXXXXX.png` from the EMA model."""

    def __init__(
        self,
        out_dir: str | Path,
        cond: Conditions | None,
        num_images: int,
        codec: LatentCodec,
        sample_config: SampleConfig = PREVIEW_SAMPLING,
        columns: int = 8,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.cond = None if cond is None else cond.index(slice(0, num_images))
        self.num_images = num_images
        self.codec = codec
        self.sample_config = sample_config
        self.columns = columns

    def __call__(self, step: int, model: SiT) -> Path:
        images = generate(
            model,
            self.cond,
            self.sample_config,
            batch_size=self.num_images,
            codec=self.codec,
            bf16=True,
        )  # (N, 3, H, W) uint8
        return save_grid(images, self.out_dir / f"step-{step:07d}.png", columns=self.columns)
