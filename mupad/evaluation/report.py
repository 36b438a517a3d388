"""What `mupad evaluate` leaves behind: metrics.json for programs, report.html for people.

Every evaluation command builds a list of `ReportSection`s — named numbers (plain values or
`Estimate`s with their intervals), figures saved in the output folder, an optional table and
free-text notes — and calls `write_evaluation`. Both files carry the exact configuration
that produced the numbers, the mupad version and the time, so a figure can always be traced
back to its command. The HTML is self-contained apart from the figure PNGs beside it (no
scripts, no network), so the folder can be zipped and opened anywhere.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mupad import __version__
from mupad.evaluation.stats import Estimate, EvaluationError
from mupad.fileio import atomic_write_text

METRICS_NAME = "metrics.json"
REPORT_NAME = "report.html"

MetricValue = Estimate | float | int | str | None


@dataclass(frozen=True)
class ReportSection:
    """One titled block of the report."""

    title: str
    metrics: Mapping[str, MetricValue] = field(default_factory=dict)
    figures: Sequence[Path] = ()
    notes: Sequence[str] = ()
    table: pd.DataFrame | None = None


def _jsonable(value: Any) -> Any:
    """Config values -> JSON (paths and enums as strings, NaN as null)."""
    if isinstance(value, Estimate):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if hasattr(value, "to_dict"):
        return _jsonable(value.to_dict())
    if hasattr(value, "item"):  # numpy / torch scalars
        return _jsonable(value.item())
    return str(getattr(value, "value", value))


def _relative_figure(out_dir: Path, figure: Path) -> str:
    figure = Path(figure)
    if not figure.is_absolute():
        figure = out_dir / figure
    if not figure.is_file():
        raise EvaluationError(f"report figure {figure} does not exist")
    try:
        return figure.resolve().relative_to(out_dir.resolve()).as_posix()
    except ValueError:
        raise EvaluationError(
            f"report figure {figure} is outside the report folder {out_dir}; save figures "
            "inside it so the folder stays self-contained"
        ) from None


def _section_json(out_dir: Path, section: ReportSection) -> dict[str, Any]:
    out: dict[str, Any] = {
        "metrics": {name: _jsonable(value) for name, value in section.metrics.items()},
        "figures": [_relative_figure(out_dir, f) for f in section.figures],
        "notes": list(section.notes),
    }
    if section.table is not None:
        out["table"] = json.loads(section.table.to_json(orient="records"))
    return out


def _format_number(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.4g}"


def _metric_row(name: str, value: MetricValue) -> str:
    if isinstance(value, Estimate):
        interval = (
            f"{_format_number(value.ci_low)} – {_format_number(value.ci_high)}"
            if not math.isnan(value.ci_low)
            else ""
        )
        level = f"{round(value.confidence * 100)} %" if interval else ""
        sizes = " × ".join(str(n) for n in value.n)
        cells = (_format_number(value.value), interval, level, value.method, sizes)
    elif isinstance(value, float):
        cells = (_format_number(value), "", "", "", "")
    else:
        cells = ("n/a" if value is None else str(value), "", "", "", "")
    return (
        "<tr>"
        + f"<th>{html.escape(name)}</th>"
        + "".join(f"<td>{html.escape(c)}</td>" for c in cells)
        + "</tr>"
    )


def _section_html(out_dir: Path, section: ReportSection) -> str:
    parts = [f"<h2>{html.escape(section.title)}</h2>"]
    if section.metrics:
        parts.append(
            "<table><tr><th>metric</th><th>value</th><th>interval</th><th>level</th>"
            "<th>interval method</th><th>n</th></tr>"
            + "".join(_metric_row(n, v) for n, v in section.metrics.items())
            + "</table>"
        )
    if section.table is not None:
        parts.append(section.table.to_html(index=False, float_format=lambda v: f"{v:.4g}"))
    parts.extend(f"<p class='note'>{html.escape(note)}</p>" for note in section.notes)
    for figure in section.figures:
        src = _relative_figure(out_dir, figure)
        parts.append(f"<figure><img src='{html.escape(src)}' alt='{html.escape(src)}'></figure>")
    return "\n".join(parts)


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 70rem; margin: 2rem auto; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; }
figure img { max-width: 100%; border: 1px solid #ddd; }
pre { background: #f6f6f6; padding: 0.8rem; overflow-x: auto; font-size: 0.85rem; }
.note { color: #555; }
"""


def write_evaluation(
    out_dir: str | Path,
    title: str,
    sections: Sequence[ReportSection],
    config: Mapping[str, Any],
) -> tuple[Path, Path]:
    """Write `out_dir/metrics.json` and `out_dir/report.html`; returns both paths.

    `config` must hold every setting that produced the numbers (inputs, extractor, seeds,
    iterations...). Section titles must be unique: they key the sections in metrics.json.
    """
    out_dir = Path(out_dir)
    titles = [s.title for s in sections]
    if len(set(titles)) != len(titles):
        raise EvaluationError(f"report section titles must be unique, got {titles}")
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    provenance = {
        "mupad_version": __version__,
        "python": platform.python_version(),
        "created_utc": created,
    }
    document = {
        "title": title,
        **provenance,
        "config": _jsonable(config),
        "sections": {s.title: _section_json(out_dir, s) for s in sections},
    }
    metrics_path = out_dir / METRICS_NAME
    atomic_write_text(metrics_path, json.dumps(document, indent=2, allow_nan=False) + "\n")

    body = "\n".join(_section_html(out_dir, s) for s in sections)
    config_text = json.dumps(document["config"], indent=2)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>mupad {html.escape(__version__)} · {html.escape(created)} · numbers as in
<a href="{METRICS_NAME}">{METRICS_NAME}</a></p>
{body}
<h2>Configuration</h2>
<pre>{html.escape(config_text)}</pre>
</body></html>
"""
    report_path = out_dir / REPORT_NAME
    atomic_write_text(report_path, page)
    return metrics_path, report_path
