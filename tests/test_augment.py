"""`mupad augment`: class-consistent variations of real few-shot images (bundled Kather 2016
tiles) on a tiny image + text model, written as an ImageFolder with an index; resumable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from mupad.applications.augment import scan_fewshot
from mupad.applications.batch_generate import FlatLayout, generate_records
from mupad.applications.generation_model import GenerationModel, GenerationSettings
from mupad.applications.prompts import PromptRecord
from mupad.cli import app
from mupad.config import SampleConfig, model_preset
from mupad.data.tiles import TileFolderError, bundled_kather_dir, load_tile_folder
from mupad.models import SiT

FAST = ["--steps", "3", "--device", "cpu", "--no-progress"]
runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(**streams) -> SiT:
    torch.manual_seed(0)
    model = SiT(model_preset("tiny", in_channels=3, sample_size=16, **streams))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "sit"
    return tiny_model(text_dim=384, image_dim=2048).save_pretrained(folder)


def fewshot(root: Path, per_class: int = 2) -> Path:
    """A few real Kather tiles per class, in an ImageFolder layout."""
    source = bundled_kather_dir()
    for name in ("01_TUMOR", "04_LYMPHO"):
        (root / name).mkdir(parents=True)
        for path in sorted((source / name).glob("*.png"))[:per_class]:
            shutil.copy(path, root / name / path.name)
    return root


def augment(*args) -> object:
    return runner.invoke(app, ["augment", *map(str, args)])


def test_augment_writes_a_class_consistent_imagefolder_with_an_index_and_resumes(
    tmp_path, model_dir
):
    data, out = fewshot(tmp_path / "fewshot"), tmp_path / "aug"
    (tmp_path / "captions.json").write_text(json.dumps({"01_TUMOR": "H&E: colorectal tumour"}))
    args = [
        "--data", data, "--checkpoint", model_dir, "--out", out, "--per-image", 2,
        "--captions", tmp_path / "captions.json", "--include-real", *FAST,
    ]  # fmt: skip
    result = augment(*args)
    assert result.exit_code == 0, result.output
    assert "wrote 8 synthetic image(s) for 4 real image(s)" in result.output

    index = pd.read_csv(out / "index.csv")
    assert len(index) == 4 + 8 and set(index["kind"]) == {"real", "synthetic"}
    for row in index.itertuples():
        assert (out / row.path).is_file() and row.path.split("/")[0] == row._2  # class folder
    synthetic = index[index["kind"] == "synthetic"]
    assert set(synthetic[synthetic["class"] == "01_TUMOR"]["caption"]) == {"H&E: colorectal tumour"}
    assert set(synthetic[synthetic["class"] == "04_LYMPHO"]["caption"]) == {"H&E histology: lympho"}
    assert synthetic["path"].str.fullmatch(r"0[14]_\w+/.+_aug[01]\.png").all()
    assert synthetic.groupby("source")["seed"].nunique().eq(1).all()  # one seed per real image
    assert synthetic["seed"].nunique() == 4
    # Ready for a classifier: the same classes, each with its real and synthetic images.
    tiles = load_tile_folder(out, size=16)
    assert tiles.class_names == ("01_TUMOR", "04_LYMPHO") and len(tiles) == 12
    config = json.loads((out / "augment.json").read_text())
    assert config["per_image"] == 2 and config["conditions"] == ["image", "text"]

    # Resumable: nothing is redone; a lost image (or a new real one) is all that is made.
    first = out / synthetic["path"].iloc[0]
    kept = (out / synthetic["path"].iloc[1]).read_bytes()
    lost = first.read_bytes()
    first.unlink()
    again = augment(*args)
    assert (
        again.exit_code == 0
        and "wrote 1 synthetic" in again.output
        and "7 already there" in again.output
    )
    assert first.read_bytes() == lost and (out / synthetic["path"].iloc[1]).read_bytes() == kept
    extra = sorted((bundled_kather_dir() / "04_LYMPHO").glob("*.png"))[2]
    shutil.copy(extra, data / "04_LYMPHO" / extra.name)
    grown = augment(*args)
    assert grown.exit_code == 0 and "wrote 2 synthetic" in grown.output  # the others keep seeds
    assert len(pd.read_csv(out / "index.csv")) == 5 + 10

    # Other settings into the same folder are refused unless --overwrite.
    other = augment(*args[: -len(FAST)], "--steps", "4", "--device", "cpu", "--no-progress")
    assert other.exit_code == 2 and "--overwrite" in other.output


def test_an_augmented_image_is_the_generate_record_of_its_source(tmp_path, model_dir):
    data, out = fewshot(tmp_path / "fewshot", per_class=1), tmp_path / "aug"
    result = augment(
        "--data", data, "--checkpoint", model_dir, "--out", out, "--per-image", 2, *FAST
    )
    assert result.exit_code == 0, result.output
    row = pd.read_csv(out / "index.csv").iloc[1]  # the second variation of the first image
    record = PromptRecord(
        id="x", seed=int(row["seed"]), num_images=2, text=row["caption"], image=Path(row["source"])
    )
    model = GenerationModel(GenerationSettings(checkpoint=str(model_dir)))
    config = SampleConfig(num_steps=3)
    report = generate_records(model, [record], config, FlatLayout(tmp_path / "gen"), progress=False)
    assert report.written[1].read_bytes() == (out / row["path"]).read_bytes()


def test_augment_input_errors_are_clear(tmp_path, model_dir):
    with pytest.raises(TileFolderError, match="no class subfolders"):
        scan_fewshot(tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(TileFolderError, match="no images"):
        scan_fewshot(tmp_path)
    data = fewshot(tmp_path / "fewshot", per_class=1)
    (tmp_path / "captions.json").write_text(json.dumps({"03_COMPLEX": "complex stroma"}))
    result = augment(
        "--data",
        data,
        "--checkpoint",
        model_dir,
        "--out",
        tmp_path / "o",
        "--captions",
        tmp_path / "captions.json",
        *FAST,
    )
    assert (
        result.exit_code == 2
        and "class(es) ['03_COMPLEX'] that the folder does not have" in result.output
    )
    image_only = tiny_model(image_dim=2048).save_pretrained(tmp_path / "image_only")
    result = augment("--data", data, "--checkpoint", image_only, "--out", tmp_path / "o", *FAST)
    assert result.exit_code == 2
    assert (
        "asks for text but the model has no stream for it; its condition streams are: image"
        in result.output
    )
    assert not (tmp_path / "o").exists()
    result = augment(
        "--data",
        data,
        "--checkpoint",
        image_only,
        "--out",
        tmp_path / "o",
        "--conditions",
        "image",
        *FAST,
    )
    assert result.exit_code == 0, result.output
    assert set(pd.read_csv(tmp_path / "o" / "index.csv")["caption"].fillna("")) == {""}
