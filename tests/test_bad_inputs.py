"""The bad-input matrix (issue 15): every command, given a bad file or option, ends with
exit code 2, no traceback, one `error:` line that names the offending file or option, and
nothing left under the output's final name.

Inputs are tiny and made here (a few 24 px tiles, a 1-step tiny model, a 512 px pyramidal
TIFF), so the whole matrix runs in seconds on a CPU.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from mupad.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()
FAST = ["--steps", "2", "--device", "cpu", "--no-progress"]
EXISTING = b"an earlier result that must survive"


def _tile_folder(root: Path, broken: bool = False) -> Path:
    rng = np.random.default_rng(0)
    for name in ("pink_stroma", "purple_nuclei"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    if broken:
        whole = (root / "pink_stroma" / "2.png").read_bytes()
        (root / "pink_stroma" / "2.png").write_bytes(whole[: len(whole) // 2])
    return root


def _tissue(side: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    image = np.full((side, side, 3), 255, dtype=np.uint8)
    quarter = side // 4
    block = rng.integers(0, 60, (2 * quarter, 2 * quarter, 3), dtype=np.uint8)
    image[quarter : 3 * quarter, quarter : 3 * quarter] = block + np.array(
        [170, 60, 130], dtype=np.uint8
    )
    return image


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Every input the rows refer to, by name (formatted into their arguments)."""
    from mupad.config import model_preset
    from mupad.data.wsi.write import write_pyramidal_tiff
    from mupad.models import SiT

    root = tmp_path_factory.mktemp("bad_inputs")
    paths: dict[str, Path] = {"missing": root / "does_not_exist"}
    paths["tiles"] = _tile_folder(root / "tiles")
    paths["bad_tiles"] = _tile_folder(root / "bad_tiles", broken=True)
    paths["broken_only"] = root / "broken_only"
    (paths["broken_only"] / "A").mkdir(parents=True)
    (paths["broken_only"] / "A" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 16)

    paths["run"] = root / "run"
    trained = runner.invoke(app, [
        "train", "--data", str(paths["tiles"]), "--out", str(paths["run"]), "--preset", "tiny",
        "--crop", "16", "--steps", "1", "--batch-size", "2", "--checkpoint-every", "1",
        "--device", "cpu",
    ])  # fmt: skip
    assert trained.exit_code == 0, trained.output
    paths["empty_run"] = root / "empty_run"
    (paths["empty_run"] / "checkpoints").mkdir(parents=True)
    config = model_preset(
        "tiny", in_channels=3, sample_size=16, image_dim=2048, rna_dim=32, rna_pathways=3
    )
    paths["rna_model"] = SiT(config).save_pretrained(root / "rna_model")
    np.save(root / "five_scores.npy", np.zeros(5))
    paths["five_scores"] = root / "five_scores.npy"
    paths["st_empty"] = root / "st_empty"
    paths["st_empty"].mkdir()

    made = runner.invoke(app, [
        "generate", "--checkpoint", str(paths["run"]), "--out", str(root / "made"),
        "--text", "pink stroma", "--seed", "3", *FAST,
    ])  # fmt: skip
    assert made.exit_code == 0, made.output
    sidecar = json.loads((root / "made" / "00001_0.json").read_text())
    sidecar["seed"] = 4
    paths["edited_sidecar"] = root / "edited.json"
    paths["edited_sidecar"].write_text(json.dumps(sidecar))
    paths["not_json"] = root / "not_json.json"
    paths["not_json"].write_text("{ this is not json")

    paths["slide"] = root / "slide.tif"
    write_pyramidal_tiff(paths["slide"], _tissue(512), mpp=0.5, num_levels=2, tile_size_px=128)
    paths["no_mpp_slides"] = root / "no_mpp_slides"
    paths["no_mpp_slides"].mkdir()
    paths["no_mpp_slide"] = paths["no_mpp_slides"] / "no_mpp.tif"
    tifffile.imwrite(paths["no_mpp_slide"], _tissue(512), tile=(128, 128), photometric="rgb")

    paths["notes"] = root / "notes.txt"
    paths["notes"].write_text("not an input\n")
    paths["no_image_csv"] = root / "pairs.csv"
    paths["no_image_csv"].write_text("path,caption\nx.png,hi\n")
    paths["rna_pairs"] = root / "rna_pairs.csv"
    tile = Path(paths["tiles"]) / "pink_stroma" / "0.png"
    paths["rna_pairs"].write_text(f"image,rna_apoptosis,rna_hypoxia\n{tile},0.5,1.5\n")
    paths["captions_list"] = root / "captions.json"
    paths["captions_list"].write_text('["not", "a", "mapping"]')
    paths["not_gmt"] = root / "sets.gmt"
    paths["not_gmt"].write_text("# nothing here\n")

    genes = ["TP53", "EGFR", "MYC", "KRAS", "CDK4", "PTEN", "BRCA1", "GPX1"]
    counts = pd.DataFrame(
        np.arange(3 * len(genes), dtype=float).reshape(3, -1), index=["S0", "S1", "S2"],
        columns=genes,
    )  # fmt: skip
    paths["expression"] = root / "expression.csv"
    counts.to_csv(paths["expression"])
    paths["dup_expression"] = root / "dup_expression.csv"
    counts.set_axis(["TP53", "EGFR", "MYC", "TP53", *genes[4:]], axis=1).to_csv(
        paths["dup_expression"]
    )
    paths["negative_expression"] = root / "negative.csv"
    (counts - 10).to_csv(paths["negative_expression"])

    paths["bad_info"] = root / "bad_info"
    paths["bad_info"].mkdir()
    (paths["bad_info"] / "config.json").write_text("{")
    paths["images"] = root / "images"
    paths["images"].mkdir()
    for i in range(2):
        Image.fromarray(_tissue(32)).save(paths["images"] / f"{i}.png")
    paths["empty_dir"] = root / "empty_dir"
    paths["empty_dir"].mkdir()
    return {name: str(path) for name, path in paths.items()}


@dataclass(frozen=True)
class Bad:
    """One bad input: the arguments, what the error line must name, and the output that
    must not appear (`existing`: it is there before and must stay untouched)."""

    id: str
    args: list[str]
    names: list[str]
    out: str | None = "{out}"
    existing: bool = False
    setup: Callable[[], tuple[dict[str, str], Callable[[], None]]] | None = field(default=None)


def _taken_port() -> tuple[dict[str, str], Callable[[], None]]:
    """A port some other socket is listening on."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return {"port": str(holder.getsockname()[1])}, holder.close


def _free_port() -> tuple[dict[str, str], Callable[[], None]]:
    """A port nothing listens on (the command binds it only after the checks)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return {"port": str(port)}, lambda: None


TRAIN = ["train", "--out", "{out}", "--preset", "tiny", "--crop", "16", "--steps", "1",
         "--batch-size", "2", "--device", "cpu"]  # fmt: skip
GEN = ["generate", "--checkpoint", "{run}", "--out", "{out}", *FAST]
SAMPLE = ["sample", "--checkpoint", "{run}", "--prompt", "pink stroma", "--out", "{out}/g.png",
          "--steps", "2"]  # fmt: skip
PREPARE = ["prepare", "--no-progress"]
TRANSLATE = ["wsi", "translate", "{slide}", "--no-progress"]
IMAGES = ["evaluate", "images", "{images}", "--real", "{images}", "--out", "{out}",
          "--no-progress"]  # fmt: skip

ROWS = [
    # ---------------------------------------------------------------- train
    Bad("train: missing tile folder", [*TRAIN, "--data", "{missing}"], ["{missing}"]),
    Bad("train: truncated tile", [*TRAIN, "--data", "{bad_tiles}"], ["2.png", "--skip-bad-tiles"]),
    Bad("train: no class folders", [*TRAIN, "--data", "{empty_dir}"], ["{empty_dir}"]),
    Bad("train: --data and --shards", [*TRAIN, "--data", "{tiles}", "--shards", "{tiles}"],
        ["--data", "--shards"]),  # fmt: skip
    Bad("train: missing shards", [*TRAIN, "--shards", "{missing}"], ["{missing}"]),
    Bad("train: unknown preset", [*TRAIN, "--data", "{tiles}", "--preset", "Q/9"], ["Q/9"]),
    Bad("train: crop larger than tiles", [*TRAIN, "--data", "{tiles}", "--crop", "64"], ["crop"]),
    Bad("train: zero steps", [*TRAIN, "--data", "{tiles}", "--steps", "0"], ["steps"]),
    Bad("train: zero batch", [*TRAIN, "--data", "{tiles}", "--batch-size", "0"], ["batch"]),
    Bad("train: negative learning rate", [*TRAIN, "--data", "{tiles}", "--lr", "-1"], ["--lr"]),
    Bad("train: bad objective", [*TRAIN, "--data", "{tiles}", "--objective", "magic"],
        ["--objective", "magic"]),  # fmt: skip
    # ---------------------------------------------------------------- prepare
    Bad("prepare: missing input", [*PREPARE, "{missing}", "{out}"], ["{missing}"]),
    Bad("prepare: a text file", [*PREPARE, "{notes}", "{out}"], ["{notes}"]),
    Bad("prepare: only broken tiles", [*PREPARE, "{broken_only}", "{out}"],
        ["nothing was prepared", "x.png"], out="{out}/manifest.parquet"),  # fmt: skip
    Bad("prepare: slide without mpp", [*PREPARE, "{no_mpp_slides}", "{out}"],
        ["{no_mpp_slide}", "--slide-mpp"], out="{out}/manifest.parquet"),  # fmt: skip
    Bad("prepare: manifest without image", [*PREPARE, "{no_image_csv}", "{out}"],
        ["{no_image_csv}", "image"]),  # fmt: skip
    Bad("prepare: captions not a mapping", [*PREPARE, "{tiles}", "{out}", "--captions",
        "{captions_list}"], ["{captions_list}"]),  # fmt: skip
    Bad("prepare: zero tile size", [*PREPARE, "{tiles}", "{out}", "--tile-size", "0"],
        ["--tile-size"]),  # fmt: skip
    Bad("prepare: tissue fraction above 1", [*PREPARE, "{tiles}", "{out}", "--min-tissue", "2"],
        ["--min-tissue"]),  # fmt: skip
    Bad("prepare: unknown feature dtype", [*PREPARE, "{tiles}", "{out}", "--feature-dtype",
        "int8"], ["--feature-dtype", "int8"]),  # fmt: skip
    Bad("prepare: gene sets without RNA", [*PREPARE, "{tiles}", "{out}", "--rna-gene-sets",
        "bundled"], ["--rna-gene-sets"]),  # fmt: skip
    Bad("prepare: missing gene sets", [*PREPARE, "{rna_pairs}", "{out}", "--rna-gene-sets",
        "{missing}"], ["--rna-gene-sets", "{missing}"]),  # fmt: skip
    # ---------------------------------------------------------------- generate
    Bad("generate: missing checkpoint", ["generate", "--checkpoint", "{missing}", "--out",
        "{out}", "--text", "x", *FAST], ["{missing}"]),  # fmt: skip
    Bad("generate: missing reference image", ["generate", "--checkpoint", "{rna_model}",
        "--out", "{out}", "--image", "{missing}", *FAST], ["{missing}"]),  # fmt: skip
    Bad("generate: negative guidance", [*GEN, "--text", "x", "--guidance-start", "-3"],
        ["--guidance-start"]),  # fmt: skip
    Bad("generate: edited sidecar", ["generate", "--from-sidecar", "{edited_sidecar}", "--out",
        "{out}"], ["{edited_sidecar}"]),  # fmt: skip
    Bad("generate: sidecar not JSON", ["generate", "--from-sidecar", "{not_json}", "--out",
        "{out}"], ["{not_json}"]),  # fmt: skip
    Bad("generate: RNA on a text-only model", [*GEN, "--rna", "{five_scores}"], ["rna"]),
    Bad("generate: wrong number of scores", ["generate", "--checkpoint", "{rna_model}",
        "--out", "{out}", "--rna", "{five_scores}", *FAST], ["{five_scores}"]),  # fmt: skip
    Bad("generate: ST folder without scores", ["generate", "--checkpoint", "{rna_model}",
        "--out", "{out}", "--st-folder", "{st_empty}", "--st-spot", "A1", *FAST],
        ["{st_empty}"]),  # fmt: skip
    Bad("generate: zero images", [*GEN, "--text", "x", "--num-images", "0"], ["--num-images"]),
    # ---------------------------------------------------------------- sample
    Bad("sample: zero images", [*SAMPLE, "--num", "0"], ["--num"]),
    Bad("sample: negative guidance", [*SAMPLE, "--guidance-start", "-3"], ["--guidance-start"]),
    Bad("sample: zero steps", [*SAMPLE, "--steps", "0"], ["--steps"]),
    Bad("sample: missing checkpoint", ["sample", "--checkpoint", "{missing}", "--prompt", "x",
        "--out", "{out}/g.png"], ["{missing}"]),  # fmt: skip
    Bad("sample: run without checkpoints", ["sample", "--checkpoint", "{empty_run}", "--prompt",
        "x", "--out", "{out}/g.png"], ["{empty_run}"]),  # fmt: skip
    # ---------------------------------------------------------------- omics
    Bad("omics: repeated gene column", ["omics", "score", "{dup_expression}", "-o",
        "{out}/s.csv"], ["{dup_expression}", "TP53"], out="{out}/s.csv"),  # fmt: skip
    Bad("omics: negative counts", ["omics", "score", "{negative_expression}", "-o",
        "{out}/s.csv"], ["{negative_expression}"], out="{out}/s.csv"),  # fmt: skip
    Bad("omics: missing expression", ["omics", "score", "{missing}", "-o", "{out}/s.csv"],
        ["{missing}"], out="{out}/s.csv"),  # fmt: skip
    Bad("omics: not a GMT", ["omics", "score", "{expression}", "--gene-sets", "{not_gmt}", "-o",
        "{out}/s.csv"], ["{not_gmt}"], out="{out}/s.csv"),  # fmt: skip
    Bad("omics: unknown output type", ["omics", "score", "{expression}", "-o", "{out}/s.xlsx"],
        ["s.xlsx"], out="{out}/s.xlsx"),  # fmt: skip
    # ---------------------------------------------------------------- st
    Bad("st: missing folder", ["st", "extract", "{missing}", "--out", "{out}", "--no-progress"],
        ["{missing}"]),  # fmt: skip
    Bad("st: not a spatial folder", ["st", "extract", "{empty_dir}", "--out", "{out}",
        "--no-progress"], ["{empty_dir}"]),  # fmt: skip
    Bad("st: zero patch size", ["st", "extract", "{empty_dir}", "--out", "{out}", "--size", "0",
        "--no-progress"], ["--size"]),  # fmt: skip
    # ---------------------------------------------------------------- wsi
    Bad("wsi: existing output", [*TRANSLATE, "--out", "{out}"], ["{out}", "--overwrite"],
        existing=True),  # fmt: skip
    Bad("wsi: zero tile size", [*TRANSLATE, "--out", "{out}.tif", "--tile-size", "0"],
        ["--tile-size"], out="{out}.tif"),  # fmt: skip
    Bad("wsi: missing slide", ["wsi", "translate", "{missing}", "--out", "{out}.tif"],
        ["{missing}"], out="{out}.tif"),  # fmt: skip
    Bad("wsi: unknown translator", [*TRANSLATE, "--out", "{out}.tif", "--translator", "magic"],
        ["magic"], out="{out}.tif"),  # fmt: skip
    Bad("wsi: output not a TIFF", [*TRANSLATE, "--out", "{out}.png"], ["{out}.png"],
        out="{out}.png"),  # fmt: skip
    Bad("wsi: slide without mpp", ["wsi", "translate", "{no_mpp_slide}", "--out", "{out}.tif",
        "--no-progress"], ["{no_mpp_slide}", "--slide-mpp"], out="{out}.tif"),  # fmt: skip
    Bad("wsi: option without value", [*TRANSLATE, "--out", "{out}.tif", "--option", "steps"],
        ["--option"], out="{out}.tif"),  # fmt: skip
    # ---------------------------------------------------------------- evaluate
    Bad("evaluate: missing generated folder", ["evaluate", "images", "{missing}", "--real",
        "{images}", "--out", "{out}", "--no-progress"], ["{missing}"]),  # fmt: skip
    Bad("evaluate: empty real folder", ["evaluate", "images", "{images}", "--real",
        "{empty_dir}", "--out", "{out}", "--no-progress"], ["{empty_dir}"]),  # fmt: skip
    Bad("evaluate: zero bootstrap", [*IMAGES, "--bootstrap", "0"], ["--bootstrap"]),
    Bad("evaluate: celltypes without mpp", ["evaluate", "celltypes", "{images}", "--real",
        "{images}", "--out", "{out}", "--mpp", "-1"], ["--mpp"]),  # fmt: skip
    # ---------------------------------------------------------------- serve
    Bad("serve: port out of range", ["serve", "--checkpoint", "{run}", "--port", "99999"],
        ["--port"], out=None),  # fmt: skip
    Bad("serve: port taken", ["serve", "--checkpoint", "{run}", "--port", "{port}"],
        ["{port}", "--port"], out=None, setup=_taken_port),  # fmt: skip
    Bad("serve: missing checkpoint", ["serve", "--checkpoint", "{missing}", "--port", "{port}"],
        ["{missing}"], out=None, setup=_free_port),  # fmt: skip
    # ---------------------------------------------------------------- info
    Bad("info: missing folder", ["info", "{missing}"], ["{missing}"], out=None),
    Bad("info: not a checkpoint", ["info", "{empty_dir}"], ["{empty_dir}"], out=None),
    Bad("info: damaged config", ["info", "{bad_info}"], ["config.json"], out=None),
]


def test_the_matrix_is_large_and_its_rows_distinct() -> None:
    assert len(ROWS) >= 40
    assert len({row.id for row in ROWS}) == len(ROWS)
    assert len({tuple(row.args) for row in ROWS}) == len(ROWS)
    commands = {row.args[0] for row in ROWS}
    assert commands >= {"train", "prepare", "generate", "sample", "omics", "st", "wsi",
                        "evaluate", "serve", "info"}  # fmt: skip


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(
    row: Bad, world: dict[str, str], tmp_path: Path
) -> None:
    values = {**world, "out": str(tmp_path / "out")}
    cleanup = None
    if row.setup is not None:
        extra, cleanup = row.setup()
        values.update(extra)
    output = Path(row.out.format(**values)) if row.out else None
    if row.existing:
        output.write_bytes(EXISTING)
    try:
        result = runner.invoke(app, [arg.format(**values) for arg in row.args])
    finally:
        if cleanup is not None:
            cleanup()
    said = result.output
    assert result.exit_code == 2, said
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in said
    errors = [line for line in said.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, said
    for name in row.names:
        assert name.format(**values) in errors[0], (name, errors[0])
    if output is not None:
        if row.existing:
            assert output.read_bytes() == EXISTING
        else:
            assert not output.exists(), sorted(output.parent.rglob("*"))
