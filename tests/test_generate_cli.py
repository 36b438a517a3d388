"""`mupad generate`: any subset of text / reference image / RNA (scores, expression, ST spot)
on tiny models, sidecars that regenerate images bit-exactly, and bad inputs.

Real inputs: the bundled Kather 2016 tiles (reference images) and, for the RNA / ST paths,
the HER2ST section B4 from <repo>/../shared/data (skipped with a reason when absent).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import imagecodecs
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from PIL import Image
from typer.testing import CliRunner

from mupad.applications.batch_generate import regenerate
from mupad.applications.prompts import PromptError, parse_modalities, read_prompt_file
from mupad.applications.provenance import file_sha256
from mupad.applications.reference_images import (
    ReferenceImageError,
    inspect_reference_image,
    load_reference_image,
)
from mupad.cli import app
from mupad.config import model_preset
from mupad.data.tiles import bundled_kather_dir
from mupad.models import SiT
from mupad.training.checkpoint import CheckpointContents, save_checkpoint

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HER2ST = SHARED_DATA / "her2st_he_spatial_expression_6sections"
PATHWAYS = 12
FAST = ["--steps", "3", "--device", "cpu", "--no-progress"]
runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(**streams) -> SiT:
    config = model_preset("tiny", in_channels=3, sample_size=16, **streams)
    torch.manual_seed(0)
    model = SiT(config)
    with torch.no_grad():  # "trained-looking": the zero-initialised gates open
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


FULL = {"text_dim": 384, "image_dim": 2048, "rna_dim": 64, "rna_pathways": PATHWAYS}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A plain SiT.save_pretrained folder with text, image and RNA (12 pathways) streams."""
    return tiny_model(**FULL).save_pretrained(tmp_path_factory.mktemp("model") / "sit")


@pytest.fixture(scope="module")
def tiles() -> list[Path]:
    root = bundled_kather_dir()
    return [min((root / c).glob("*.png")) for c in ("01_TUMOR", "02_STROMA")]


def invoke(*args: str):
    return runner.invoke(app, ["generate", *map(str, args)])


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


# ------------------------------------------------------------ text + image, sidecars


def test_text_and_image_prompt_writes_pngs_with_sidecars_that_regenerate_exactly(
    tmp_path, model_dir, tiles
):
    out = tmp_path / "out"
    args = [
        "--checkpoint", model_dir, "--out", out, "--text", "H&E histology: tumor",
        "--image", tiles[0], "--num-images", 3, "--batch-size", 2, "--seed", 7, *FAST,
    ]  # fmt: skip
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"00001_{k}.{s}" for k in range(3) for s in ("json", "png")]
    images = [pixels(out / f"00001_{k}.png") for k in range(3)]
    assert all(i.shape == (16, 16, 3) and i.dtype == np.uint8 for i in images)
    assert not np.array_equal(images[0], images[1])  # different noise per image

    sidecar = json.loads((out / "00001_2.json").read_text())
    assert sidecar["seed"] == 7 and sidecar["index"] == 2
    assert sidecar["batch"] == {"chunk": 1, "size": 1, "index": 0}  # 3 images in chunks of 2
    assert sidecar["sample_config"]["num_steps"] == 3
    assert sidecar["sample_config"]["sampler"] == "sde"
    assert sidecar["sample_config"]["guidance"]["start"] == 2.5  # the paper's 2.5 -> 0 anneal
    assert sidecar["sample_config"]["guidance"]["end"] == 0.0
    assert sidecar["conditions"]["modalities"] == ["image", "text"]
    assert sidecar["record"]["text"] == "H&E histology: tumor"
    assert sidecar["inputs"]["image"]["sha256"] == file_sha256(tiles[0])
    assert sidecar["inputs"]["image"]["conversions"] == ["centre 16x16 px cut from 150x150"]
    assert sidecar["model"]["weights_sha256"] == file_sha256(model_dir / "model.safetensors")
    assert sidecar["image_sha256"] == file_sha256(out / "00001_2.png")
    first = json.loads((out / "00001_0.json").read_text())
    assert first["sample_config"]["seed"] == 7 and first["batch"]["size"] == 2

    # Exact regeneration from the sidecar, through the CLI, for an image of each chunk.
    for name in ("00001_1.json", "00001_2.json"):
        again = invoke("--from-sidecar", out / name, "--out", tmp_path / "again")
        assert again.exit_code == 0, again.output
        assert "identical" in again.output
        png = name.replace(".json", ".png")
        assert (tmp_path / "again" / png).read_bytes() == (out / png).read_bytes()

    # A rerun skips finished images; other settings into the same folder are refused.
    mtime = (out / "00001_0.png").stat().st_mtime_ns
    rerun = invoke(*args)
    assert rerun.exit_code == 0 and "3 already there" in rerun.output
    assert (out / "00001_0.png").stat().st_mtime_ns == mtime
    changed = invoke(*args[: -len(FAST)], "--steps", "4", "--device", "cpu", "--no-progress")
    assert changed.exit_code == 2 and "--overwrite" in changed.output


def test_prompt_files_csv_and_jsonl_with_per_record_guidance_and_image_variation(
    tmp_path, model_dir, tiles
):
    (tmp_path / "tiles").mkdir()
    shutil.copy(tiles[1], tmp_path / "tiles" / "stroma.png")
    (tmp_path / "prompts.csv").write_text(
        "id,text,image,num_images,guidance_start,guidance_mode,text_scale\n"
        "tumor,H&E histology: tumor,,2,4.0,,\n"
        "variation,,tiles/stroma.png,1,,per_modality,0.5\n"
    )
    out = tmp_path / "csv"
    result = invoke(
        "--checkpoint", model_dir, "--prompts", tmp_path / "prompts.csv", "--out", out, *FAST
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.png")) == [
        "tumor_0.png",
        "tumor_1.png",
        "variation_0.png",
    ]
    tumor = json.loads((out / "tumor_1.json").read_text())
    assert tumor["conditions"]["modalities"] == ["text"]
    assert tumor["sample_config"]["guidance"]["start"] == 4.0
    assert tumor["seed"] == 0  # --seed 0 + row 0
    variation = json.loads((out / "variation_0.json").read_text())
    assert variation["conditions"]["modalities"] == ["image"]  # image -> image variation
    assert variation["seed"] == 1  # --seed 0 + row 1
    assert variation["sample_config"]["guidance"]["mode"] == "per_modality"
    assert variation["record"]["image"] == str((tmp_path / "tiles" / "stroma.png").resolve())

    lines = [
        {"id": "tumor", "text": "H&E histology: tumor", "num_images": 2, "guidance_start": 4.0, "seed": 0},
        {},  # blank line
        {"id": "variation", "image": "tiles/stroma.png", "seed": 1, "guidance_mode": "per_modality", "text_scale": 0.5},
    ]  # fmt: skip
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(x) if x else "" for x in lines))
    result = invoke(
        "--checkpoint",
        model_dir,
        "--prompts",
        tmp_path / "prompts.jsonl",
        "--out",
        tmp_path / "jsonl",
        *FAST,
    )
    assert result.exit_code == 0, result.output
    for name in ("tumor_1.png", "variation_0.png"):  # same records, same pixels
        assert (tmp_path / "jsonl" / name).read_bytes() == (out / name).read_bytes()


def test_a_run_folder_supplies_encoders_and_scale_from_its_metadata(tmp_path, tiles):
    model = tiny_model(image_dim=2048)
    state = model.state_dict()
    metadata = {"image_encoder": "inception", "latents": "identity", "target_mpp": 0.25}
    contents = CheckpointContents(
        step=5, model=state, ema=state, optimizer={"state": {}, "param_groups": []},
        modules={}, rng={}, state={"extra": metadata},
    )  # fmt: skip
    save_checkpoint(tmp_path / "run", contents, model.config)
    out = tmp_path / "out"
    # Kather tiles are ~0.5 µm/px: 150 px -> 300 px at the model's 0.25 µm/px, then cut.
    result = invoke(
        "--checkpoint",
        tmp_path / "run",
        "--image",
        tiles[0],
        "--image-mpp",
        0.5,
        "--out",
        out,
        *FAST,
    )
    assert result.exit_code == 0, result.output
    sidecar = json.loads((out / "00001_0.json").read_text())
    assert sidecar["model"]["model_dir"].endswith("step-0000005/ema")
    assert sidecar["inputs"]["image"]["conversions"][0].startswith("resampled 150x150 -> 300x300")
    # A model trained at 0.25 µm/px needs >= 8 px of a 0.5 µm/px image: 4x4 px is too small.
    Image.fromarray(pixels(tiles[0])[:4, :4]).save(tmp_path / "small.png")
    small = invoke(
        "--checkpoint",
        tmp_path / "run",
        "--image",
        tmp_path / "small.png",
        "--image-mpp",
        0.5,
        "--out",
        out,
        *FAST,
    )
    assert small.exit_code == 2 and "needs at least 8x8 px" in small.output


# ------------------------------------------------------------ bad input


def test_reference_images_of_any_mode_become_8bit_rgb(tmp_path, tiles):
    rgb = pixels(tiles[0]).copy()  # (150, 150, 3) uint8
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    cases = {
        "gray.png": (Image.fromarray(gray), np.repeat(gray[..., None], 3, axis=2), "grayscale"),
        "rgba.png": (Image.fromarray(np.dstack([rgb, np.full_like(gray, 255)])), rgb, "alpha"),
        "gray16.png": (Image.fromarray(gray.astype(np.uint16) * 257), np.repeat(gray[..., None], 3, axis=2), "16-bit"),
    }  # fmt: skip
    for name, (image, expected, note) in cases.items():
        image.save(tmp_path / name)
        loaded = load_reference_image(tmp_path / name, 150)
        assert torch.equal(loaded.pixels, torch.from_numpy(expected).permute(2, 0, 1)), name
        assert any(note in c for c in loaded.conversions), (name, loaded.conversions)
    # 16-bit RGB (PNG and TIFF) keeps its full depth until the round(v / 257) scaling
    deep = rgb.astype(np.uint16) * 257 + 100  # v / 257 = rgb + 0.39 -> rgb
    (tmp_path / "rgb16.png").write_bytes(imagecodecs.png_encode(deep))
    tifffile.imwrite(tmp_path / "rgb16.tif", deep)
    for name in ("rgb16.png", "rgb16.tif"):
        loaded = load_reference_image(tmp_path / name, 150)
        assert torch.equal(loaded.pixels, torch.from_numpy(rgb).permute(2, 0, 1)), name
    # half-transparent white-background composite
    half = np.dstack([np.zeros_like(rgb), np.full_like(gray, 128)])
    Image.fromarray(half).save(tmp_path / "half.png")
    assert int(load_reference_image(tmp_path / "half.png", 150).pixels.max()) == 127
    # float images and tiny images are refused with the reason
    tifffile.imwrite(tmp_path / "float.tif", rgb.astype(np.float32) / 255, photometric="rgb")
    with pytest.raises(ReferenceImageError, match="floating-point image.*8-bit RGB"):
        load_reference_image(tmp_path / "float.tif", 16)
    with pytest.raises(ReferenceImageError, match="floating-point image"):
        inspect_reference_image(tmp_path / "float.tif", 16)
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    assert load_reference_image(tmp_path / "palette.png", 150).conversions == ()
    with pytest.raises(ReferenceImageError, match="smaller than the model's 200x200 px tile"):
        load_reference_image(tiles[0], 200)
    with pytest.raises(ReferenceImageError, match="--model-mpp"):
        load_reference_image(tiles[0], 16, mpp=0.5, model_mpp=None)


def test_bad_prompts_and_modalities_give_clear_errors(tmp_path, model_dir, tiles):
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("id,text\n")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    for name in ("empty.csv", "header.csv", "empty.jsonl"):
        with pytest.raises(PromptError, match="holds no records"):
            read_prompt_file(tmp_path / name)
    (tmp_path / "unknown.jsonl").write_text(json.dumps({"text": "x", "protein": "CD3.csv"}))
    with pytest.raises(
        PromptError, match=r"unknown field\(s\) \['protein'\].*conditions are image, text, rna"
    ):
        read_prompt_file(tmp_path / "unknown.jsonl")
    with pytest.raises(
        PromptError, match="unknown modality 'protein'; choose from image, text, rna"
    ):
        parse_modalities("text,protein")

    result = invoke(
        "--checkpoint",
        model_dir,
        "--prompts",
        tmp_path / "empty.csv",
        "--out",
        tmp_path / "o",
        *FAST,
    )
    assert result.exit_code == 2 and "holds no records" in result.output
    result = invoke(
        "--checkpoint",
        model_dir,
        "--text",
        "x",
        "--conditions",
        "text,protein",
        "--out",
        tmp_path / "o",
        *FAST,
    )
    assert result.exit_code == 2 and "unknown modality 'protein'" in result.output

    text_only = tiny_model(text_dim=384).save_pretrained(tmp_path / "text_only")
    result = invoke(
        "--checkpoint",
        text_only,
        "--image",
        tiles[0],
        "--text",
        "x",
        "--out",
        tmp_path / "o",
        *FAST,
    )
    assert result.exit_code == 2
    assert "no stream for it; its condition streams are: text" in result.output.replace("\n", " ")
    assert not (tmp_path / "o").exists()


def test_a_failing_run_leaves_no_partial_png(tmp_path, model_dir, tiles, monkeypatch):
    # A bad record anywhere in the file stops the run before the first image.
    Image.fromarray(pixels(tiles[0])[:8, :8]).save(tmp_path / "small.png")
    (tmp_path / "prompts.jsonl").write_text(
        json.dumps({"text": "H&E histology: tumor"}) + "\n" + json.dumps({"image": "small.png"})
    )
    out = tmp_path / "out"
    result = invoke(
        "--checkpoint", model_dir, "--prompts", tmp_path / "prompts.jsonl", "--out", out, *FAST
    )
    assert (
        result.exit_code == 2
        and "small.png is 8x8 px, smaller than the model's 16x16" in result.output
    )
    assert not out.exists()

    # A crash while a PNG is being written leaves neither the PNG, its temp file nor a sidecar.
    original = Image.Image.save

    def crash(self, fp, *args, **kwargs):
        original(self, fp, *args, **kwargs)  # bytes reach the temporary file ...
        raise OSError("disk full")  # ... then the write fails

    monkeypatch.setattr(Image.Image, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        runner.invoke(
            app, ["generate", "--checkpoint", str(model_dir), "--text", "x", "--out", str(out), *FAST],
            catch_exceptions=False,
        )  # fmt: skip
    assert list(out.iterdir()) == []


# ------------------------------------------------------------ RNA / ST -> image (HER2ST)


@pytest.fixture(scope="module")
def st_spots(tmp_path_factory):
    """Two HER2ST B4 spots through `mupad st extract` (12 gene sets), plus one spot's raw
    counts as a single-sample expression file."""
    if not HER2ST.is_dir():
        pytest.skip(f"real-data folder {HER2ST} is absent (expected at <repo>/../shared/data)")
    from mupad.omics.genesets import default_gene_sets
    from mupad.omics.spatial import extract_spots, read_her2st

    sample = read_her2st("B4", HER2ST)
    full = default_gene_sets()
    spots = list(sample.spots.barcodes[:2])
    root = tmp_path_factory.mktemp("st")
    extract_spots(
        sample, root / "b4", patch_um=100.0, size=32, gene_sets=full.subset(full.names[:PATHWAYS]),
        barcodes=spots, progress=False,
    )  # fmt: skip
    sample.counts.loc[[spots[0]]].to_csv(root / "spot.tsv", sep="\t")
    return root, spots


def test_st_spot_expression_and_score_table_give_the_same_rna_condition(
    tmp_path, model_dir, st_spots
):
    root, spots = st_spots
    st, scores = root / "b4", root / "b4" / "scores.csv"
    common = ["--checkpoint", model_dir, "--rna-pathways", scores, "--seed", 3, *FAST]
    runs = {
        "st": ["--st-folder", st, "--st-spot", spots[0]],
        "table": ["--rna", scores, "--rna-row", spots[0]],
        "expression": ["--rna-expression", root / "spot.tsv"],
    }
    sidecars = {}
    for name, args in runs.items():
        result = invoke(*common, *args, "--out", tmp_path / name)
        assert result.exit_code == 0, (name, result.output)
        sidecars[name] = json.loads((tmp_path / name / "00001_0.json").read_text())
        assert sidecars[name]["inputs"]["rna"]["pathways_scored"] == PATHWAYS
    # Scoring the spot's counts reproduces `mupad st extract`'s scores -> same condition, image.
    assert len({s["conditions"]["sha256"] for s in sidecars.values()}) == 1
    assert len({s["image_sha256"] for s in sidecars.values()}) == 1
    assert sidecars["st"]["inputs"]["rna"]["spot"] == spots[0]
    other = invoke(*common, "--st-folder", st, "--st-spot", spots[1], "--out", tmp_path / "other")
    assert other.exit_code == 0, other.output
    assert (
        json.loads((tmp_path / "other" / "00001_0.json").read_text())["image_sha256"]
        != sidecars["st"]["image_sha256"]
    )

    again = regenerate(tmp_path / "st" / "00001_0.json", tmp_path / "again")
    assert again.identical and again.conditions_match

    # Errors name the problem: unknown spot, several rows without a choice, missing names.
    bad = invoke(*common, "--st-folder", st, "--st-spot", "99x99", "--out", tmp_path / "bad")
    assert bad.exit_code == 2 and "no row '99x99'" in bad.output
    bad = invoke(*common, "--rna", scores, "--out", tmp_path / "bad")
    assert bad.exit_code == 2 and "has 2 rows; say which with rna_row" in bad.output
    (tmp_path / "wrong.txt").write_text("\n".join(f"pathway {i}" for i in range(PATHWAYS)))
    bad = invoke(
        *common[:2],
        "--rna-pathways",
        tmp_path / "wrong.txt",
        "--rna",
        scores,
        "--rna-row",
        spots[0],
        "--out",
        tmp_path / "bad",
        *FAST,
    )
    assert (
        bad.exit_code == 2 and f"lacks {PATHWAYS} of the model's {PATHWAYS} pathways" in bad.output
    )
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------- issue 15: an RNA model needs no hand work
def test_rna_model_from_prepared_pairs_generates_from_its_checkpoint_alone(tmp_path):
    """Issue 15: a model trained on `prepare`d pairs (rna_<name> columns, as the HER2ST recipe
    writes them) carries its pathway names, standardiser and gene-set digest, so
    `generate --st-folder --st-spot` needs only --checkpoint."""
    from mupad.applications.rna_inputs import read_pathway_names
    from mupad.data.prepare import PrepareConfig, prepare_dataset
    from mupad.omics.genesets import default_gene_sets

    digest = default_gene_sets().sha256
    st = tmp_path / "st"
    st.mkdir()
    everything = [f"pathway {c}" for c in "abcdef"]
    rng = np.random.default_rng(0)
    scores = pd.DataFrame(
        rng.normal(size=(3, 6)), index=pd.Index(["s1", "s2", "s3"], name="barcode"),
        columns=everything,
    )  # fmt: skip
    scores.to_csv(st / "scores.csv")
    (st / "summary.json").write_text(json.dumps({"scoring": {"gene_sets_sha256": digest}}))
    chosen = ["pathway e", "pathway b", "pathway c"]  # the model's order, not the table's
    pd.Series(chosen, name="pathway").to_csv(tmp_path / "pathways.csv", index=False)
    assert read_pathway_names(tmp_path / "pathways.csv") == tuple(chosen)  # header accepted
    rows = []
    for i, spot in enumerate(scores.index):
        pixels_i = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels_i).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", **{f"rna_{n}": scores.loc[spot, n] for n in chosen}})
    pd.DataFrame(rows).to_csv(tmp_path / "pairs.csv", index=False)
    config = PrepareConfig(tile_size=16, rna_gene_sets="bundled", progress=False)
    summary = prepare_dataset(tmp_path / "pairs.csv", tmp_path / "shards", config)
    assert summary.rna["pathways"] == chosen and summary.rna["gene_sets_sha256"] == digest

    run = tmp_path / "run"
    trained = runner.invoke(app, [
        "train", "--shards", str(tmp_path / "shards"), "--out", str(run), "--preset", "tiny",
        "--steps", "1", "--batch-size", "2", "--checkpoint-every", "1", "--conditions", "rna",
        "--device", "cpu",
    ])  # fmt: skip
    assert trained.exit_code == 0, trained.output
    state = json.loads((run / "checkpoints" / "step-0000001" / "train_state.json").read_text())
    assert state["extra"]["rna_pathways"] == chosen
    assert state["extra"]["rna_gene_sets_sha256"] == digest
    assert state["extra"]["rna_standardiser"] is None  # trained on the scores as stored

    made = invoke("--checkpoint", run, "--st-folder", st, "--st-spot", "s2", "--out",
                  tmp_path / "st_out", *FAST)  # fmt: skip
    assert made.exit_code == 0, made.output
    # The same scores given as a vector in the model's order give the same condition.
    np.save(tmp_path / "s2.npy", scores.loc["s2", chosen].to_numpy())
    vector = invoke("--checkpoint", run, "--rna", tmp_path / "s2.npy", "--out",
                    tmp_path / "vec_out", *FAST)  # fmt: skip
    assert vector.exit_code == 0, vector.output
    sidecar, other = (
        json.loads((tmp_path / name / "00001_0.json").read_text())
        for name in ("st_out", "vec_out")
    )
    assert sidecar["conditions"]["sha256"] == other["conditions"]["sha256"]

    # Scores made from other gene sets are refused, naming the folder.
    (st / "summary.json").write_text(json.dumps({"scoring": {"gene_sets_sha256": "0" * 64}}))
    refused = invoke("--checkpoint", run, "--st-folder", st, "--st-spot", "s2", "--out",
                     tmp_path / "refused", *FAST)  # fmt: skip
    assert refused.exit_code == 2 and "other gene sets" in refused.output
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: s.update(seed=8),
        lambda s: s["record"].update(seed=8),
        lambda s: s["sample_config"].update(seed=8),
        lambda s: s["sample_config"].update(num_steps=5),
    ],
    ids=["seed", "record seed", "sampler seed", "steps"],
)
def test_an_edited_sidecar_is_refused_not_misreported(tmp_path, model_dir, edit):
    """Issue 15: --from-sidecar on an edited sidecar sampled the recorded seed but wrote a
    sidecar claiming the edited one."""
    out = tmp_path / "out"
    made = invoke("--checkpoint", model_dir, "--out", out, "--text", "tumor", "--seed", 7, *FAST)
    assert made.exit_code == 0, made.output
    sidecar = json.loads((out / "00001_0.json").read_text())
    edit(sidecar)
    (tmp_path / "edited.json").write_text(json.dumps(sidecar))
    again = invoke("--from-sidecar", tmp_path / "edited.json", "--out", tmp_path / "again")
    assert again.exit_code == 2, again.output
    assert "edited.json was edited" in " ".join(again.output.split())
    assert not (tmp_path / "again").exists()
