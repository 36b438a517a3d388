"""`mupad study quality`: the generator quality study (see mupad.experiments.quality)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mupad.commands.errors import MupadGroup
from mupad.config import SamplerKind

study_app = typer.Typer(
    cls=MupadGroup,
    help="Studies that decide the defaults: the generator quality study (equal CPU budget per "
    "arm; border ratio, KID, class accuracy, colour, memorisation).",
    no_args_is_help=True,
)

_ARMS_HELP = (
    "Comma-separated arms: p8, p8_refine, p8_x, p8_x_refine, p8_x_refine_ln, p4, p4_x_refine"
)


@study_app.command("quality")
def quality(
    heldout: Annotated[
        Path, typer.Option(help="Held-out real tiles <class>/<tile>, never used in training")
    ],
    out: Annotated[Path, typer.Option(help="Study folder (resumes when re-run)")] = Path(
        "runs/study_quality"
    ),
    data: Annotated[
        Path | None,
        typer.Option(help="Training tiles <class>/<tile> (default: the bundled Kather tiles)"),
    ] = None,
    arms: Annotated[str, typer.Option(help=_ARMS_HELP)] = (
        "p8,p8_refine,p8_x,p8_x_refine,p8_x_refine_ln,p4,p4_x_refine"
    ),
    budget_s: Annotated[
        float, typer.Option(help="Training wall-clock seconds per arm")
    ] = 600.0,
    per_class: Annotated[int, typer.Option(help="Generated tiles per class")] = 16,
    sample_steps: Annotated[int, typer.Option(help="Sampler steps")] = 50,
    sampler: Annotated[SamplerKind, typer.Option(help="Sampler")] = SamplerKind.EULER,
    guidance: Annotated[
        str, typer.Option(help="Guidance the arms are compared at (a study GUIDANCE name)")
    ] = "linear_2.5",
    guidance_sweep: Annotated[
        bool, typer.Option(help="Also sample the best arm at every guidance setting")
    ] = True,
    seed: int = 0,
) -> None:
    """Train every arm for the same wall-clock budget on the same tiles; score border ratio,
    KID, class accuracy, colour and memorisation against held-out tiles; sweep guidance."""
    from mupad.experiments.quality import (
        STUDY_TABLE,
        StudySettings,
        resolve_arms,
        run_quality_study,
    )

    settings = StudySettings(
        budget_s=budget_s, per_class=per_class, sample_steps=sample_steps, sampler=sampler,
        guidance=guidance, seed=seed,
    )  # fmt: skip
    chosen = resolve_arms([a.strip() for a in arms.split(",") if a.strip()])
    run_quality_study(
        out, chosen, heldout, data=data, settings=settings, guidance_sweep=guidance_sweep
    )
    typer.echo((out / STUDY_TABLE).read_text())
