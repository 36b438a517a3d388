"""`mupad serve`: the FastAPI app on tiny checkpoints (real encoders, real engine).

Generation returns tiles with seeds that regenerate them, sidecars download, and every bad
request (oversize, non-image, bad RNA file, unknown or absent condition, too many images or
steps, other hosts/origins) gets a 4xx with a clear message. Bundled Kather tiles serve as
the reference images.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra (fastapi, python-multipart) is absent")
pytest.importorskip("multipart", reason="the serve extra (python-multipart) is absent")

from fastapi.testclient import TestClient
from typer.testing import CliRunner

from mupad.applications.generation_model import GenerationSettings
from mupad.cli import app as mupad_cli
from mupad.config import model_preset
from mupad.models import SiT
from mupad.omics.genesets import default_gene_sets
from mupad.serve.app import create_app
from mupad.serve.cli import DEFAULT_HOST, build_server, is_local, serve
from mupad.serve.service import BusyError, GenerationService, ServeLimits

PATHWAYS = 12
LIMITS = ServeLimits(max_upload_bytes=2**20, max_images=3, max_steps=20)
BASE = "http://127.0.0.1"
TUMOR_TILE = "01_TUMOR/zeeshan_1A11_CRC-Prim-HE-07_022_Row_601_Col_151.png"


def tiny_checkpoint(folder: Path, **streams: int) -> Path:
    """A SiT.save_pretrained folder: 16 px pixel-space tiles with the given streams."""
    config = model_preset("tiny", in_channels=3, sample_size=16, **streams)
    generator = torch.Generator().manual_seed(0)
    model = SiT(config)
    with torch.no_grad():  # "trained-looking": the zero-initialised gates open
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.save_pretrained(folder)


@pytest.fixture(scope="module")
def pathway_names(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("names") / "pathways.txt"
    path.write_text("\n".join(default_gene_sets().names[:PATHWAYS]) + "\n")
    return path


@pytest.fixture(scope="module")
def client(tmp_path_factory, pathway_names):
    """An app on a text + image + RNA (12 pathways) checkpoint, uploads capped at 1 MB."""
    root = tmp_path_factory.mktemp("serve")
    checkpoint = tiny_checkpoint(
        root / "sit", text_dim=384, image_dim=2048, rna_dim=64, rna_pathways=PATHWAYS
    )
    app = create_app(
        checkpoint, limits=LIMITS, out=root / "out", device="cpu", rna_pathways=pathway_names
    )
    with TestClient(app, base_url=BASE) as test_client:
        yield test_client


def post(client: TestClient, files=None, **fields):
    return client.post("/api/generate", data={"steps": "3", **fields}, files=files)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def detail(response) -> str:
    return response.json()["detail"]


# ------------------------------------------------------------ generation


def test_generation_returns_tiles_whose_seeds_regenerate_them(client, tmp_path):
    first = post(client, text="H&E histology: tumor", num_images="2", seed="5")
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["seed"] == 5 and not body["random_seed"] and body["modalities"] == ["text"]
    seeds = [image["seed"] for image in body["images"]]
    assert seeds == [5, 6]  # image k: its own record seeded 5 + k
    tiles = [client.get(image["png_url"]) for image in body["images"]]
    assert all(t.status_code == 200 and t.headers["content-type"] == "image/png" for t in tiles)
    pixels = [np.asarray(Image.open(io.BytesIO(t.content))) for t in tiles]
    assert all(p.shape == (16, 16, 3) for p in pixels)
    assert not np.array_equal(pixels[0], pixels[1])

    sidecar = client.get(body["images"][1]["sidecar_url"]).json()
    assert sidecar["format"] == "mupad.generated_image"
    assert sidecar["sample_config"]["seed"] == seeds[1]
    assert sidecar["sample_config"]["num_steps"] == 3
    assert sidecar["record"]["text"] == "H&E histology: tumor"

    # The same request gives the same bytes; image 1's seed alone gives image 1 again.
    again = post(client, text="H&E histology: tumor", num_images="2", seed="5").json()
    assert [client.get(i["png_url"]).content for i in again["images"]] == [t.content for t in tiles]
    alone = post(client, text="H&E histology: tumor", seed="6").json()
    assert client.get(alone["images"][0]["png_url"]).content == tiles[1].content
    # ... and so does `mupad generate` with that seed: the page runs the same engine.
    checkpoint = client.app.state.service.model.settings.checkpoint
    args = ["generate", "--checkpoint", checkpoint, "--text", "H&E histology: tumor", "--seed",
            "6", "--steps", "3", "--device", "cpu", "--no-progress", "--out", str(tmp_path)]  # fmt: skip
    assert CliRunner().invoke(mupad_cli, args).exit_code == 0
    assert (tmp_path / "00001_0.png").read_bytes() == tiles[1].content

    # A blank seed is drawn at random and returned; it reproduces the tile.
    drawn = post(client, text="H&E histology: tumor", seed="").json()
    assert drawn["random_seed"] and 0 <= drawn["seed"] < 2**31
    redo = post(client, text="H&E histology: tumor", seed=str(drawn["seed"])).json()
    assert (
        client.get(redo["images"][0]["png_url"]).content
        == client.get(drawn["images"][0]["png_url"]).content
    )


def test_reference_tile_upload_bundled_tile_and_rna_files(client, pathway_names):
    tile = client.get(f"/api/tiles/{TUMOR_TILE}")
    assert tile.status_code == 200
    upload = post(client, files={"image": ("tumor.png", tile.content)}, seed="1")
    bundled = post(client, tile=TUMOR_TILE, seed="1")
    assert upload.status_code == 200 and bundled.status_code == 200, (upload.text, bundled.text)
    assert upload.json()["modalities"] == bundled.json()["modalities"] == ["image"]
    same = [client.get(r.json()["images"][0]["png_url"]).content for r in (upload, bundled)]
    assert same[0] == same[1]  # the same pixels as reference -> the same tile
    sidecar = client.get(upload.json()["images"][0]["sidecar_url"]).json()
    assert sidecar["inputs"]["image"]["conversions"] == ["centre 16x16 px cut from 150x150"]

    scores = " ".join(f"{v:.2f}" for v in np.linspace(-1, 1, PATHWAYS)).encode()
    result = post(client, files={"rna": ("scores.txt", scores)}, text="tumor", tile=TUMOR_TILE)
    assert result.status_code == 200, result.text
    assert result.json()["modalities"] == ["image", "text", "rna"]

    # An expression profile over the model's 12 gene sets is scored like training.
    gene_sets = default_gene_sets()
    genes = sorted(
        {gene for name in pathway_names.read_text().splitlines() for gene in gene_sets[name]}
    )
    counts = np.random.default_rng(0).poisson(5, (1, len(genes)))
    table = pd.DataFrame(counts, index=["spot"], columns=genes).to_csv(sep="\t").encode()
    scored = post(client, files={"rna": ("spot.tsv", table)}, rna_kind="expression")
    assert scored.status_code == 200, scored.text
    rna = client.get(scored.json()["images"][0]["sidecar_url"]).json()["inputs"]["rna"]
    assert rna["source"] == "expression" and rna["pathways_scored"] == PATHWAYS


# ------------------------------------------------------------ bad requests


def test_bad_uploads_are_refused_with_a_clear_message(client):
    out = client.app.state.service.root
    jobs = set(out.iterdir())
    big = post(client, files={"image": ("big.png", b"\0" * (LIMITS.max_upload_bytes + 1))})
    assert big.status_code == 413 and "upload limit of 1 MB" in detail(big)

    fake = post(client, files={"image": ("tile.png", b"this is not an image")})
    assert fake.status_code == 400 and "cannot read reference image tile.png" in detail(fake)
    assert "/tmp" not in detail(fake)  # server paths are not shown
    pdf = post(client, files={"image": ("tile.pdf", b"%PDF-1.4")})
    assert pdf.status_code == 400 and "must be one of .bmp" in detail(pdf)
    small = post(client, files={"image": ("small.png", png_bytes(np.zeros((8, 8, 3), np.uint8)))})
    assert small.status_code == 400 and "8x8 px, smaller than the model's 16x16" in detail(small)
    side = 5001  # just over the 25 MP limit; zeros compress to ~25 kB
    bomb = post(client, files={"image": ("bomb.png", png_bytes(np.zeros((side, side), np.uint8)))})
    assert bomb.status_code == 400
    assert "has 25,010,001 pixels; the limit is 25,000,000" in detail(bomb)

    wrong = post(client, files={"rna": ("scores.txt", b"1 2 3")})
    assert wrong.status_code == 400 and "holds 3 scores but the model takes 12" in detail(wrong)
    garbage = post(
        client, files={"rna": ("spot.tsv", b"gene\tA\nspot\tx\n")}, rna_kind="expression"
    )
    assert garbage.status_code == 400 and "cannot score spot.tsv" in detail(garbage)
    empty = post(client, files={"rna": ("scores.csv", b"")})
    assert empty.status_code == 400 and "is empty" in detail(empty)
    assert set(out.iterdir()) == jobs  # nothing of a refused request stays on disk


def test_unknown_fields_and_limits_are_refused(client):
    cases = {
        "unknown field 'protein'; the conditions of this checkpoint are image, text, rna": {
            "protein": "CD3"
        },
        "num_images must be between 1 and 3, got 4": {"num_images": "4"},
        "steps must be between 1 and 20, got 21": {"steps": "21"},
        "steps must be a whole number, got '2.5'": {"steps": "2.5"},
        "guidance must be between 0.0 and 20.0, got nan": {"guidance": "nan"},
        "seed must be between 0 and": {"seed": "-1"},
        "seed must be between 0 and 9007199254740991, got 9007199254740992": {"seed": str(2**53)},
        "'warp' is not a valid SamplerKind; choose one of: euler, heun, sde": {"sampler": "warp"},
        "'01_TUMOR/nope.png' is not a bundled tile": {"tile": "01_TUMOR/nope.png"},
        "give a reference image upload or a bundled tile, not both": {"tile": TUMOR_TILE},
    }
    image = {"image": ("t.png", client.get(f"/api/tiles/{TUMOR_TILE}").content)}
    for message, fields in cases.items():
        files = image if "not both" in message else None
        response = post(client, files=files, **fields)
        assert response.status_code == 400 and message in detail(response), (fields, response.text)

    assert client.get("/", headers={"host": "evil.example"}).status_code == 400
    assert client.get("/", headers={"host": "evil.example:80"}).status_code == 400
    assert client.get("/", headers={"host": "[::1]:8000"}).status_code == 200
    assert client.get("/", headers={"host": "localhost:8000"}).status_code == 200
    foreign = client.post("/api/generate", data={"text": "x"}, headers={"origin": "http://e.vil"})
    assert foreign.status_code == 403
    assert client.get(f"/api/jobs/{'0' * 32}/model.safetensors").status_code == 404
    assert client.get(f"/api/jobs/{'0' * 32}/seed0_0.png").status_code == 404


def test_a_streamed_body_is_cut_off_at_the_limit_before_it_is_read(client):
    """No Content-Length: the body limit stops reading as soon as it is passed."""
    chunk, total_chunks, pulled = 64 * 1024, 200, 0  # 12.5 MB offered, 1 MB allowed
    head = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'

    async def receive():
        nonlocal pulled
        pulled += 1
        body = head if pulled == 1 else b"\0" * chunk
        return {"type": "http.request", "body": body, "more_body": pulled < total_chunks}

    sent = []

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/api/generate", "raw_path": b"/api/generate",
        "query_string": b"", "root_path": "", "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 5000),
        "headers": [(b"host", b"127.0.0.1"),
                    (b"content-type", b"multipart/form-data; boundary=b")],
    }  # fmt: skip
    asyncio.run(client.app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 413
    assert pulled <= LIMITS.max_upload_bytes // chunk + 2 < total_chunks


def test_conditions_the_checkpoint_lacks_are_neither_shown_nor_accepted(tmp_path, client):
    page = client.get("/").text
    assert all(f'id="{s}-section"' in page for s in ("text", "image", "rna"))
    assert "http://" not in page and "https://" not in page  # nothing from the network

    text_only = tiny_checkpoint(tmp_path / "text_only", text_dim=384)
    app = create_app(text_only, limits=LIMITS, out=tmp_path / "out", device="cpu")
    with TestClient(app, base_url=BASE) as text_client:
        page = text_client.get("/").text
        assert 'id="text-section"' in page
        assert 'id="image-section"' not in page and 'id="rna-section"' not in page
        assert text_client.get("/api/info").json()["streams"] == ["text"]
        refused = post(text_client, tile=TUMOR_TILE, text="x")
        assert refused.status_code == 400
        assert "has no image condition (field 'tile'); its conditions are text" in detail(refused)
        refused = post(text_client, files={"rna": ("s.txt", b"1 2")})
        assert refused.status_code == 400 and "has no rna condition" in detail(refused)
        assert post(text_client, text="x").status_code == 200


def test_one_generation_at_a_time_a_full_queue_is_refused_old_jobs_go(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "sit", text_dim=384)
    settings = GenerationSettings(checkpoint=str(checkpoint), device="cpu")
    (tmp_path / "out" / "notes").mkdir(parents=True)  # not a job: never removed
    service = GenerationService(settings, tmp_path / "out", ServeLimits(max_queue=0, keep_jobs=2))
    try:
        slow = service.prepare({"text": "x", "steps": "50"}, {})
        running = service.submit(service.new_job(), slow)
        with pytest.raises(BusyError, match="1 generations are running or waiting"):
            service.submit(service.new_job(), slow)
        result = running.result(timeout=120)
        assert len(result.images) == 1
        quick = service.prepare({"text": "x", "steps": "2"}, {})
        jobs = [service.submit(service.new_job(), quick).result(timeout=60).job for _ in "ab"]
        kept = sorted(p.name for p in (tmp_path / "out").iterdir())
        assert kept == sorted([*jobs, "notes"])  # the newest 2 jobs
    finally:
        service.close()


# ------------------------------------------------------------ command line


def test_binds_to_localhost_by_default_and_warns_otherwise(tmp_path):
    assert inspect.signature(serve).parameters["host"].default == DEFAULT_HOST == "127.0.0.1"
    assert build_server(object()).config.host == "127.0.0.1"
    assert is_local("127.0.0.1") and is_local("::1") and is_local("localhost")
    assert not is_local("0.0.0.0") and not is_local("192.168.1.4")

    missing = tmp_path / "missing"
    result = CliRunner().invoke(
        mupad_cli, ["serve", "--checkpoint", str(missing), "--host", "0.0.0.0", "--device", "cpu"]
    )
    output = " ".join(result.output.split())
    assert "warning: binding to 0.0.0.0" in output
    assert result.exit_code == 2 and "error" in output  # the missing checkpoint, no traceback


def test_import_mupad_does_not_import_fastapi():
    code = (
        "import sys, mupad, mupad.serve, mupad.serve.cli; "
        "print(json.dumps(sorted(m for m in ('fastapi', 'uvicorn', 'starlette') "
        "if m in sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True
    )
    assert json.loads(result.stdout) == []
