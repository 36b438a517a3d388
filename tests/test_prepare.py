"""`mupad prepare`: tile folders, slides and paired CSVs -> shards; resumable, distributed,
bad inputs skipped and counted."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import tifffile
from PIL import Image

from mupad.data import prepare as prepare_module
from mupad.data.prepare import PrepareConfig, PrepareError, PrepareSummary, prepare_dataset
from mupad.data.shards import read_shard, read_shard_records, shard_paths

REPO = Path(__file__).resolve().parents[1]
SHARED_SLIDE = REPO.parent / "shared" / "data" / "package_samples" / "cmu_small_region.svs"
CLASSES = ("ADIPOSE", "STROMA", "TUMOR")
TILES_PER_CLASS = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tile_dir(tmp_path) -> Path:
    """3 classes x 4 random 32x32 PNG tiles."""
    root = tmp_path / "tiles"
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(TILES_PER_CLASS):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"tile_{i}.png")
    return root


def _config(**overrides) -> PrepareConfig:
    base = {"tile_size": 32, "shard_size": 3, "tiles_per_source": 5, "progress": False}
    return PrepareConfig(**{**base, **overrides})


def _records(out: Path) -> list[dict]:
    return [r for path in shard_paths(out) for r in read_shard_records(path)]


def _all_tensors(out: Path) -> dict[str, torch.Tensor]:
    parts: dict[str, list[torch.Tensor]] = {}
    for path in shard_paths(out):
        tensors, _ = read_shard(path)
        for name, value in tensors.items():
            parts.setdefault(name, []).append(value)
    return {name: torch.cat(values) for name, values in parts.items()}


def test_tile_folder_to_shards(tile_dir, tmp_path):
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"TUMOR": "H&E, adenocarcinoma", "STROMA/tile_0.png": "one"}))
    out = tmp_path / "out"
    summary = prepare_dataset(tile_dir, out, _config(captions=captions))

    records = _records(out)
    assert len(records) == len(CLASSES) * TILES_PER_CLASS == summary.tiles_total
    assert summary.written == ["tiles_00000", "tiles_00001", "tiles_00002"]
    assert summary.failed == [] and summary.corrupt_count == 0
    assert (out / "summary.json").is_file() and (out / summary.manifest).is_file()
    by_key = {r["key"]: r for r in records}
    assert len(by_key) == len(records)
    for key, record in by_key.items():
        class_name = key.split("/")[0]
        assert record["label"] == CLASSES.index(class_name)
        assert record["class_name"] == class_name
    assert by_key["TUMOR/tile_1.png"]["caption"] == "H&E, adenocarcinoma"
    assert by_key["STROMA/tile_0.png"]["caption"] == "one"
    assert by_key["STROMA/tile_1.png"]["caption"] == "STROMA"

    tensors, metadata = read_shard(shard_paths(out)[0])
    assert set(tensors) == {"image"}
    assert tensors["image"].dtype == torch.uint8 and tensors["image"].shape[1:] == (3, 32, 32)
    first = metadata[0]
    expected = np.array(Image.open(tile_dir / first["key"]).convert("RGB"))
    assert torch.equal(tensors["image"][0], torch.from_numpy(expected).permute(2, 0, 1))


def test_tiles_resized_to_tile_size(tile_dir, tmp_path):
    out = tmp_path / "out"
    prepare_dataset(tile_dir, out, _config(tile_size=16))
    assert _all_tensors(out)["image"].shape == (12, 3, 16, 16)


def test_corrupt_tiles_are_skipped_and_counted(tile_dir, tmp_path):
    good = (tile_dir / "TUMOR" / "tile_0.png").read_bytes()
    (tile_dir / "TUMOR" / "truncated.png").write_bytes(good[: len(good) // 2])
    (tile_dir / "STROMA" / "garbage.png").write_bytes(b"not a png at all")
    out = tmp_path / "out"
    summary = prepare_dataset(tile_dir, out, _config())

    assert summary.tiles_total == 12 and len(_records(out)) == 12
    assert summary.corrupt_count == 2
    bad = {Path(c["path"]).name: c["error"] for c in summary.corrupt}
    assert set(bad) == {"truncated.png", "garbage.png"}
    assert all(error for error in bad.values())
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["corrupt_count"] == 2


def test_interrupted_run_resumes_without_loss_or_duplicates(tile_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    finish = prepare_module._finish_source
    calls = []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the 2nd source's shards are closed but it is not marked done
            raise RuntimeError("simulated crash")
        finish(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "_finish_source", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_dataset(tile_dir, out, _config())
    assert shard_paths(out, "tiles_00001")  # partial output of the interrupted source
    # A half-written temporary shard from a crash mid-write is also cleaned up.
    (out / ".tiles_00001-000009.safetensors.tmp-abc").write_bytes(b"partial")
    monkeypatch.setattr(prepare_module, "_finish_source", finish)

    summary = prepare_dataset(tile_dir, out, _config())
    assert summary.already_done == ["tiles_00000"]
    assert summary.written == ["tiles_00001", "tiles_00002"]
    keys = Counter(r["key"] for r in _records(out))
    assert len(keys) == 12 and set(keys.values()) == {1}
    assert summary.tiles_total == 12
    assert not list(out.glob(".tiles_00001-*"))

    again = prepare_dataset(tile_dir, out, _config())  # nothing left to do
    assert again.already_done == ["tiles_00000", "tiles_00001", "tiles_00002"]
    assert again.tiles_written == 0 and again.tiles_total == 12
    assert Counter(r["key"] for r in _records(out)) == keys


def test_changed_settings_redo_sources(tile_dir, tmp_path):
    out = tmp_path / "out"
    prepare_dataset(tile_dir, out, _config())
    summary = prepare_dataset(tile_dir, out, _config(tile_size=16))
    assert summary.written == ["tiles_00000", "tiles_00001", "tiles_00002"]
    assert _all_tensors(out)["image"].shape == (12, 3, 16, 16)


def test_paired_manifest(tile_dir, tmp_path):
    rna = tmp_path / "rna.npy"
    np.save(rna, np.array([0.5, -1.0], dtype=np.float32))
    rows = [
        "image,caption,label,rna_file,rna_HYPOXIA",
        f"{tile_dir}/TUMOR/tile_0.png,tumour cells,tumor,rna.npy,1.5",
        "tiles/STROMA/tile_0.png,,stroma,rna.npy,2.5",
        "tiles/ADIPOSE/tile_0.png,fat,adipose,,",  # no RNA -> NaN scores (absent)
    ]
    manifest = tmp_path / "pairs.csv"
    manifest.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    summary = prepare_dataset(manifest, out, _config())
    assert summary.written == ["paired_00000"]
    tensors = _all_tensors(out)
    records = _records(out)
    assert [r["label"] for r in records] == [2, 1, 0]  # sorted names: adipose, stroma, tumor
    assert [r["class_name"] for r in records] == ["tumor", "stroma", "adipose"]
    assert [r["caption"] for r in records] == ["tumour cells", "", "fat"]
    torch.testing.assert_close(
        tensors["rna_scores"][:2], torch.tensor([[1.5, 0.5, -1.0], [2.5, 0.5, -1.0]])
    )
    assert tensors["rna_scores"][2].isnan().all()
    bad = tmp_path / "bad.csv"
    bad.write_text("path,caption\nx.png,hi\n")
    with pytest.raises(PrepareError, match="no 'image' column"):
        prepare_dataset(bad, tmp_path / "bad_out", _config())


@pytest.fixture
def slide_dir(tmp_path) -> Path:
    if not SHARED_SLIDE.is_file():
        pytest.skip(f"shared test slide not available: {SHARED_SLIDE} (needs <repo>/../shared/data)")
    pytest.importorskip("tifffile")
    root = tmp_path / "slides"
    root.mkdir()
    (root / "cmu_small_region.svs").symlink_to(SHARED_SLIDE)
    return root


def test_slide_to_tiles_and_corrupt_slide(slide_dir, tmp_path):
    (slide_dir / "broken.svs").write_bytes(b"II*\x00" + b"\x00" * 64)  # a fake, truncated TIFF
    Image.new("RGB", (64, 64), (200, 100, 150)).save(slide_dir / "no_mpp.png")  # no µm/px
    out = tmp_path / "out"
    summary = prepare_dataset(
        slide_dir, out, _config(tile_size=64, target_mpp=4.0, shard_size=64)
    )
    assert summary.written == ["cmu_small_region"]
    assert [f["source_id"] for f in summary.failed] == ["broken", "no_mpp"]
    assert "MissingMppError" in summary.failed[1]["reason"]
    assert summary.corrupt_count == 1  # a missing resolution is a setting, not corruption and summary.corrupt[0]["path"].endswith("broken.svs")
    records = _records(out)
    assert len(records) == summary.tiles_total > 0
    side_level0 = round(64 * 4.0 / 0.499)
    for record in records:
        assert record["slide_id"] == "cmu_small_region"
        assert record["mpp"] == 4.0 and record["tissue_fraction"] >= 0.5
        assert record["x"] % side_level0 == 0 and record["y"] % side_level0 == 0
        assert 0 <= record["x"] <= 2220 - side_level0 and 0 <= record["y"] <= 2967 - side_level0
    assert len({(r["x"], r["y"]) for r in records}) == len(records)
    image = _all_tensors(out)["image"]  # (N, 3, 64, 64)
    assert image.shape == (len(records), 3, 64, 64)
    assert image.float().mean() < 235  # tissue, not white glass

    rerun = prepare_dataset(slide_dir, out, _config(tile_size=64, target_mpp=4.0, shard_size=64))
    assert rerun.already_done == ["cmu_small_region"]
    assert [f["source_id"] for f in rerun.failed] == ["broken", "no_mpp"]  # retried
    assert len(_records(out)) == len(records)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_gloo_run(tile_dir, tmp_path):
    out = tmp_path / "out"
    code = (
        "import torch; torch.set_num_threads(1)\n"
        "from mupad.data.prepare import PrepareConfig, prepare_dataset\n"
        f"prepare_dataset({str(tile_dir)!r}, {str(out)!r}, PrepareConfig(tile_size=32, "
        "shard_size=3, tiles_per_source=4, progress=False, device='cpu'))\n"
    )
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO))
    for proc in procs:
        assert proc.wait(timeout=120) == 0

    summary = PrepareSummary.read(out)
    assert summary.world_size == 2 and summary.tiles_total == 12
    per_rank = [
        {r["source_id"] for r in json.loads((out / "prepare" / f"rank-{k:05d}.json").read_text())}
        for k in range(2)
    ]
    assert per_rank == [{"tiles_00000", "tiles_00002"}, {"tiles_00001"}]
    keys = Counter(r["key"] for r in _records(out))
    assert len(keys) == 12 and set(keys.values()) == {1}
    index = json.loads((out / "shards.json").read_text())
    assert sum(s["n_records"] for s in index["shards"]) == 12


def test_latent_moments_and_text_tokens(tile_dir, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from mupad.latents import encode_moments, load_codec, uint8_to_pixels

    vae_dir = tmp_path / "vae"
    torch.manual_seed(0)
    diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    ).save_pretrained(vae_dir)
    out = tmp_path / "out"
    config = _config(
        latents=str(vae_dir), keep_pixels=True, text_encoder="minilm", text_max_length=12
    )
    summary = prepare_dataset(tile_dir, out, config)
    assert summary.tiles_total == 12
    tensors = _all_tensors(out)
    moments = tensors["latent_moments"]
    assert moments.shape == (12, 8, 16, 16) and moments.dtype == torch.float16
    assert tensors["text_tokens"].shape == (12, 12, 384)
    assert tensors["text_mask"].dtype == torch.bool and tensors["text_mask"].any(1).all()

    codec = load_codec(vae_dir)
    pixels = uint8_to_pixels(tensors["image"][:2])
    torch.testing.assert_close(
        moments[:2, :4].float(), codec.encode(pixels), atol=2e-3, rtol=2e-3
    )
    mean, logvar = encode_moments(codec, pixels)
    torch.testing.assert_close(moments[:2, 4:].float(), logvar, atol=1e-2, rtol=1e-3)
    # logvar is in the scaled space: a sample mean + std * eps matches encode(sample=True)
    noise_seed = torch.Generator().manual_seed(5)
    sampled = codec.encode(pixels, sample=True, generator=noise_seed)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(sampled, mean + (0.5 * logvar).exp() * eps, atol=1e-5, rtol=1e-4)


def test_cli_command(tile_dir, tmp_path):
    import typer
    from typer.testing import CliRunner

    from mupad.data.prepare_cli import prepare

    app = typer.Typer()
    app.command("prepare")(prepare)
    app.command("noop")(lambda: None)  # a group, so "prepare" is a subcommand name
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["prepare", str(tile_dir), str(out), "--tile-size", "32", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert PrepareSummary.read(out).tiles_total == 12


# ---------------------------------------------------------------- issue 15: slides as TIFFs
def _tissue_level0(height: int = 768, width: int = 896) -> np.ndarray:
    """White glass around a pink textured 'tissue' block -> uint8 (h, w, 3)."""
    rng = np.random.default_rng(1)
    image = np.full((height, width, 3), 255, dtype=np.uint8)
    block = rng.integers(0, 60, (height // 2, width // 2, 3), dtype=np.uint8)
    image[height // 4 : height // 4 + height // 2, width // 4 : width // 4 + width // 2] = (
        block + np.array([170, 60, 130], dtype=np.uint8)
    )
    return image


@pytest.fixture
def translated_slides(tmp_path) -> Path:
    """A folder with the project's own `wsi translate` outputs: an OME-TIFF and a generic
    tiled TIFF pyramid (both 0.5 µm/px)."""
    from mupad.applications.wsi import IdentityTranslator, translate_slide
    from mupad.data.wsi.write import write_pyramidal_tiff

    source = tmp_path / "source.tif"
    write_pyramidal_tiff(source, _tissue_level0(), mpp=0.5, num_levels=2, tile_size_px=128)
    root = tmp_path / "slides"
    root.mkdir()
    translator = IdentityTranslator(tile_size=128, batch_size=4)
    for name in ("a.ome.tif", "b.tif"):
        translate_slide(source, translator, root / name, overlap=16, progress=False)
    return root


def test_tiff_slides_are_tiled_not_squashed(translated_slides, tmp_path):
    """Issue 15: a folder of (OME-)TIFF pyramids was read as a tile folder, one squashed
    tile per slide."""
    from mupad.data.prepare_sources import SourceKind, detect_kind

    assert detect_kind(translated_slides) is SourceKind.SLIDES
    out = tmp_path / "out"
    summary = prepare_dataset(translated_slides, out, _config(tile_size=64, target_mpp=1.0))
    assert summary.written == ["a.ome", "b"]
    records = _records(out)
    # 384 x 448 px of tissue at 0.5 µm/px = 192 x 224 µm -> 3 x 3 tiles of 64 µm per slide.
    per_slide = Counter(r["slide_id"] for r in records)
    assert len(per_slide) == 2 and all(n >= 4 for n in per_slide.values()), per_slide
    assert all(r["mpp"] == 1.0 and r["x"] is not None for r in records)


def test_single_slide_file_as_input(translated_slides, tmp_path):
    out = tmp_path / "one"
    summary = prepare_dataset(
        translated_slides / "a.ome.tif", out, _config(tile_size=64, target_mpp=1.0)
    )
    assert summary.written == ["a.ome"] and summary.tiles_total >= 4  # as in a folder
    assert len({r["slide_id"] for r in _records(out)}) == 1


@pytest.mark.skipif(not SHARED_SLIDE.is_file(), reason=f"shared CC0 slide missing: {SHARED_SLIDE}")
def test_single_svs_file_as_input(tmp_path):
    summary = prepare_dataset(SHARED_SLIDE, tmp_path / "out", _config(tile_size=64, target_mpp=4.0))
    assert summary.written == ["cmu_small_region"] and summary.tiles_total > 1


def test_small_tiff_tiles_stay_tiles(tmp_path):
    """Stripped TIFF tiles (Kather-style) are not mistaken for slides."""
    from mupad.data.prepare_sources import SourceKind, detect_kind

    root = tmp_path / "tifs" / "TUMOR"
    root.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(_tissue_level0(150, 150)).save(root / f"t{i}.tif")
    assert detect_kind(root.parent) is SourceKind.TILES


def test_nothing_prepared_is_an_error_naming_slide_mpp(tmp_path):
    """Issue 15: every source failing exited 0; the missing-mpp hint named --mpp."""
    from mupad.data.prepare import NothingPreparedError

    root = tmp_path / "slides"
    root.mkdir()
    source = root / "no_mpp.tif"
    tifffile.imwrite(source, _tissue_level0(), tile=(128, 128), photometric="rgb")
    with pytest.raises(NothingPreparedError, match="--slide-mpp") as caught:
        prepare_dataset(root, tmp_path / "out", _config(tile_size=64))
    message = str(caught.value)
    assert "nothing was prepared" in message and str(source) in message
    assert "--mpp " not in message
    assert (tmp_path / "out" / "summary.json").is_file()
    # With the setting given, the same input works.
    summary = prepare_dataset(root, tmp_path / "out", _config(tile_size=64, slide_mpp=0.5))
    assert summary.tiles_total > 0


def test_cli_exits_nonzero_when_nothing_prepared(tmp_path):
    from typer.testing import CliRunner

    from mupad.cli import app

    root = tmp_path / "tiles" / "A"
    root.mkdir(parents=True)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    result = CliRunner().invoke(
        app, ["prepare", str(root.parent), str(tmp_path / "out"), "--no-progress"]
    )
    assert result.exit_code == 2, result.output
    assert "nothing was prepared" in result.output and "broken.png" in result.output
    assert not (tmp_path / "out" / "manifest.parquet").exists()
