import json
import math

import matplotlib
import pandas as pd
import pytest

from mupad.evaluation.report import ReportSection, write_evaluation
from mupad.evaluation.stats import Estimate, EvaluationError, bootstrap

matplotlib.use("Agg")


def _figure(path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    fig.savefig(path)
    plt.close(fig)
    return path


def test_metrics_json_and_html_carry_values_intervals_and_config(tmp_path):
    estimate = Estimate(12.5, 10.0, 15.0, 0.95, "bootstrap percentile, 25 resamples", (100, 90))
    figure = _figure(tmp_path / "curve.png")
    table = pd.DataFrame({"class": ["a", "b"], "accuracy": [0.5, 0.75]})
    section = ReportSection(
        "FID",
        {"fid": estimate, "count": 3, "nan": math.nan, "label": "<b>"},
        figures=[figure],
        notes=["a note"],
        table=table,
    )
    metrics_path, report_path = write_evaluation(
        tmp_path, "Evaluation <run>", [section], {"real": tmp_path / "real", "seed": 0}
    )
    document = json.loads(metrics_path.read_text())
    fid = document["sections"]["FID"]["metrics"]["fid"]
    assert fid["value"] == 12.5 and fid["ci_low"] == 10.0 and fid["n"] == [100, 90]
    assert document["sections"]["FID"]["metrics"]["nan"] is None
    assert document["sections"]["FID"]["figures"] == ["curve.png"]
    assert document["sections"]["FID"]["table"][1] == {"class": "b", "accuracy": 0.75}
    assert document["config"] == {"real": str(tmp_path / "real"), "seed": 0}
    page = report_path.read_text()
    assert "Evaluation &lt;run&gt;" in page and "&lt;b&gt;" in page and "<b>" not in page
    assert "src='curve.png'" in page and "10 – 15" in page


def test_report_refuses_missing_or_outside_figures_and_duplicate_titles(tmp_path):
    outside = _figure(tmp_path / "outside.png")
    with pytest.raises(EvaluationError, match="outside the report folder"):
        write_evaluation(tmp_path / "out", "t", [ReportSection("a", figures=[outside])], {})
    with pytest.raises(EvaluationError, match="does not exist"):
        write_evaluation(tmp_path, "t", [ReportSection("a", figures=["nope.png"])], {})
    with pytest.raises(EvaluationError, match="unique"):
        write_evaluation(tmp_path, "t", [ReportSection("a"), ReportSection("a")], {})


def test_bootstrap_interval_brackets_the_value_and_is_deterministic():
    import numpy as np

    rng = np.random.default_rng(0)
    sample = rng.normal(3.0, 1.0, size=(200,))
    first = bootstrap(lambda x: float(x.mean()), sample, iterations=50, seed=1)
    second = bootstrap(lambda x: float(x.mean()), sample, iterations=50, seed=1)
    assert first == second
    assert first.ci_low < first.value < first.ci_high
    # The standard error of a mean of 200 unit-variance draws is 0.07: a 95 % interval is
    # about 0.28 wide.
    assert 0.15 < first.ci_high - first.ci_low < 0.45
    with pytest.raises(EvaluationError, match="equally many"):
        bootstrap(lambda a, b: 0.0, sample, sample[:10], paired=True)
    with pytest.raises(EvaluationError, match="not finite"):
        bootstrap(lambda x: float("nan") if len(set(x.tolist())) < 200 else 0.0, sample)


def test_normal_bootstrap_interval_is_centred_on_the_value():
    import numpy as np

    sample = np.random.default_rng(2).normal(size=(100,))
    normal = bootstrap(lambda x: float(x.mean()), sample, iterations=40, interval="normal")
    assert normal.value - normal.ci_low == pytest.approx(normal.ci_high - normal.value)
    # About the textbook standard error 1/sqrt(100) = 0.1: the 95 % half-width ~0.2.
    assert 0.12 < normal.ci_high - normal.value < 0.3
