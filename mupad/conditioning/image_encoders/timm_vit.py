"""Pathology ViTs in timm format: UNI, UNI2-h, Virchow, Virchow2, H-optimus-0/1, any timm ViT.

timm is imported only when an encoder is built (`pip install timm`, which needs
torchvision). Weights come from a local folder in the layout of a timm Hugging Face repo:

    <folder>/config.json                         architecture, model_args, pretrained_cfg
    <folder>/model.safetensors or pytorch_model.bin

(e.g. `huggingface-cli download paige-ai/Virchow2 --local-dir ~/.cache/mupad/virchow2` on a
machine with access). The named encoders carry their own architecture and constructor
arguments, so for them config.json is optional; "timm-vit" reads everything from config.json.
The model is built with `timm.create_model(architecture, pretrained=False, **args)` and the
state dict is loaded strictly (no hub access, no pickle execution: `.bin` files are read with
`torch.load(weights_only=True)`).

timm lays out `forward_features` as [CLS, register tokens..., patch tokens row-major] after
the final norm. We keep CLS as the global token, drop the registers, and reshape the patches:

    name         input (side, resize, mean/std)   tokens: global + grid   D     global_features
    uni          224 crop bilinear, ImageNet      CLS + 14x14             1024  CLS
    uni2-h       224 crop bilinear, ImageNet      CLS + 16x16 (-8 regs)   1536  CLS
    virchow      224 crop bicubic, ImageNet       CLS + 16x16             1280  CLS ++ mean (2560)
    virchow2     224 crop bicubic, ImageNet       CLS + 16x16 (-4 regs)   1280  CLS ++ mean (2560)
    h-optimus-0  224 crop bilinear, H-optimus     CLS + 16x16 (-4 regs)   1536  CLS
    h-optimus-1  224 crop bilinear, H-optimus     CLS + 16x16 (-4 regs)   1536  CLS
    timm-vit     config.json pretrained_cfg       CLS + grid (-regs)      embed CLS

"CLS ++ mean" (the class token concatenated with the mean patch token) is the tile embedding
the Virchow model cards recommend; pass `global_pool="cls"` for the class token alone. Models
without a class token use the mean patch token as the global token.
"""

from __future__ import annotations

import enum
import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mupad.conditioning.base import EncoderError
from mupad.conditioning.image_encoders.base import (
    ImageEncoder,
    ImageFeatures,
    require,
    split_tokens,
)
from mupad.conditioning.image_encoders.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Interpolation,
    Preprocessing,
    parse_interpolation,
)
from mupad.conditioning.image_encoders.weights import (
    locate_weights_file,
    mismatch_summary,
    read_json,
    read_state_dict,
)

logger = logging.getLogger(__name__)

TIMM_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TIMM_CONFIG = "config.json"
TIMM_INSTALL = "`pip install timm` (timm needs torchvision, installed with it)"
GENERIC_TIMM_NAME = "timm-vit"

H_OPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
H_OPTIMUS_STD = (0.211883, 0.230117, 0.177517)
_SWIGLU = {"mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU"}


class GlobalPool(str, enum.Enum):
    """What `global_features` returns for a ViT."""

    CLS = "cls"  # the class token (B, D)
    CLS_MEAN = "cls+mean"  # class token concatenated with the mean patch token (B, 2D)
    MEAN = "mean"  # mean patch token (B, D)


def parse_global_pool(value: str | GlobalPool) -> GlobalPool:
    try:
        return GlobalPool(str(getattr(value, "value", value)).lower())
    except ValueError:
        choices = ", ".join(pool.value for pool in GlobalPool)
        raise EncoderError(f"unknown global_pool {value!r}; choose one of: {choices}") from None


@dataclass(frozen=True)
class TimmViTSpec:
    """Everything needed to rebuild one published timm ViT without its hub config."""

    name: str
    architecture: str
    model_args: Mapping[str, Any]
    preprocessing: Preprocessing
    global_pool: GlobalPool = GlobalPool.CLS
    num_registers: int = 0
    source: str = ""  # where to download the weights (Hugging Face repo id)
    # Constructor arguments that are classes, as import paths resolved after importing timm.
    layer_args: Mapping[str, str] = field(default_factory=dict)

    @property
    def download_hint(self) -> str:
        return (
            f"{self.source} (gated: accept its terms on huggingface.co), e.g. "
            f"`huggingface-cli download {self.source} --local-dir <folder>` on a machine with "
            "access; the folder needs model.safetensors or pytorch_model.bin (config.json "
            "optional)"
        )


def _imagenet(size: int, interpolation: Interpolation) -> Preprocessing:
    return Preprocessing(
        size=size, interpolation=interpolation, mean=IMAGENET_MEAN, std=IMAGENET_STD
    )


_H_OPTIMUS = Preprocessing(
    size=224, interpolation=Interpolation.BILINEAR, mean=H_OPTIMUS_MEAN, std=H_OPTIMUS_STD
)
_H_OPTIMUS_ARGS = {
    "img_size": 224,
    "init_values": 1e-5,
    "num_classes": 0,
    "global_pool": "token",
    "dynamic_img_size": False,
}
_VIRCHOW_ARGS = {
    "img_size": 224,
    "init_values": 1e-5,
    "num_classes": 0,
    "mlp_ratio": 5.3375,
    "global_pool": "",
    "dynamic_img_size": True,
}

TIMM_SPECS: dict[str, TimmViTSpec] = {
    spec.name: spec
    for spec in (
        TimmViTSpec(
            name="uni",
            architecture="vit_large_patch16_224",
            model_args={
                "img_size": 224,
                "patch_size": 16,
                "init_values": 1e-5,
                "num_classes": 0,
                "dynamic_img_size": True,
            },
            preprocessing=_imagenet(224, Interpolation.BILINEAR),
            source="MahmoodLab/UNI",
        ),
        TimmViTSpec(
            name="uni2-h",
            architecture="vit_giant_patch14_224",
            model_args={
                "img_size": 224,
                "patch_size": 14,
                "depth": 24,
                "num_heads": 24,
                "init_values": 1e-5,
                "embed_dim": 1536,
                "mlp_ratio": 2.66667 * 2,
                "num_classes": 0,
                "no_embed_class": True,
                "reg_tokens": 8,
                "dynamic_img_size": True,
            },
            layer_args=_SWIGLU,
            preprocessing=_imagenet(224, Interpolation.BILINEAR),
            num_registers=8,
            source="MahmoodLab/UNI2-h",
        ),
        TimmViTSpec(
            name="virchow",
            architecture="vit_huge_patch14_224",
            model_args=_VIRCHOW_ARGS,
            layer_args=_SWIGLU,
            preprocessing=_imagenet(224, Interpolation.BICUBIC),
            global_pool=GlobalPool.CLS_MEAN,
            source="paige-ai/Virchow",
        ),
        TimmViTSpec(
            name="virchow2",
            architecture="vit_huge_patch14_224",
            model_args={**_VIRCHOW_ARGS, "reg_tokens": 4},
            layer_args=_SWIGLU,
            preprocessing=_imagenet(224, Interpolation.BICUBIC),
            global_pool=GlobalPool.CLS_MEAN,
            num_registers=4,
            source="paige-ai/Virchow2",
        ),
        TimmViTSpec(
            name="h-optimus-0",
            architecture="vit_giant_patch14_reg4_dinov2",
            model_args=_H_OPTIMUS_ARGS,
            preprocessing=_H_OPTIMUS,
            num_registers=4,
            source="bioptimus/H-optimus-0",
        ),
        TimmViTSpec(
            name="h-optimus-1",
            architecture="vit_giant_patch14_reg4_dinov2",
            model_args=_H_OPTIMUS_ARGS,
            preprocessing=_H_OPTIMUS,
            num_registers=4,
            source="bioptimus/H-optimus-1",
        ),
    )
}

_GENERIC_HINT = (
    "a timm model folder (config.json with `architecture` and `model_args`, plus "
    "model.safetensors or pytorch_model.bin), e.g. `huggingface-cli download <timm repo> "
    "--local-dir <folder>` on a machine with access, and pass that folder as the weights"
)


def _import_symbol(path: str) -> Any:
    module, _, attribute = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as exc:
        raise EncoderError(
            f"cannot import {path!r} named in the model arguments ({exc}); is timm too old? "
            "`pip install -U timm`"
        ) from exc


def _preprocessing_from_config(config: Mapping[str, Any], source: Path) -> Preprocessing:
    """timm `pretrained_cfg` (input_size, interpolation, mean, std, crop_pct) -> Preprocessing."""
    cfg = config.get("pretrained_cfg") or {}
    input_size = cfg.get("input_size") or config.get("input_size")
    if not input_size or len(input_size) != 3 or input_size[1] != input_size[2]:
        raise EncoderError(
            f"{source}: pretrained_cfg.input_size must be [3, S, S] (a square input), got "
            f"{input_size!r}"
        )
    return Preprocessing(
        size=int(input_size[1]),
        interpolation=parse_interpolation(cfg.get("interpolation", "bicubic")),
        crop_pct=float(cfg.get("crop_pct", 1.0)),
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
    )


class TimmViTEncoder(ImageEncoder):
    """A timm VisionTransformer from a local folder -> [CLS, patch grid] tokens (registers dropped).

    Args:
        weights: explicit folder (or weights file inside it); None looks in
            `$MUPAD_CACHE/<model_name>`.
        model_name: a key of `TIMM_SPECS` ("uni", "virchow2", ...) or "timm-vit" (everything
            from the folder's config.json).
        global_pool: "cls", "cls+mean" or "mean"; None = the model's documented default.
        model_overrides: extra `timm.create_model` arguments, applied last (e.g. tiny test models).
        device, dtype, batch_size: where, in which precision and how many images per pass.
    """

    def __init__(
        self,
        weights: str | Path | None = None,
        *,
        model_name: str = GENERIC_TIMM_NAME,
        global_pool: str | GlobalPool | None = None,
        model_overrides: Mapping[str, Any] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        batch_size: int = 32,
    ) -> None:
        self.name = model_name
        self._set_runtime(device, dtype, batch_size)
        spec = TIMM_SPECS.get(model_name)
        if spec is None and model_name != GENERIC_TIMM_NAME:
            choices = ", ".join([*TIMM_SPECS, GENERIC_TIMM_NAME])
            raise EncoderError(f"unknown timm ViT {model_name!r}; choose one of: {choices}")
        self.spec = spec
        self.path = locate_weights_file(
            model_name,
            weights,
            TIMM_WEIGHT_FILES,
            spec.download_hint if spec else _GENERIC_HINT,
            also_required=() if spec else (TIMM_CONFIG,),
        )
        timm = require("timm", TIMM_INSTALL, f"the {model_name} image encoder")

        config_path = self.path.parent / TIMM_CONFIG
        config = read_json(config_path) if config_path.is_file() else {}
        architecture, args = self._model_args(config, config_path, model_overrides)
        self.preprocessing = (
            spec.preprocessing if spec else _preprocessing_from_config(config, config_path)
        )
        self.global_pool = parse_global_pool(
            global_pool if global_pool is not None else (spec.global_pool if spec else "cls")
        )
        try:
            model = timm.create_model(architecture, pretrained=False, **args)
        except (RuntimeError, TypeError, ValueError, KeyError) as exc:
            raise EncoderError(
                f"timm could not build {architecture!r} with {sorted(args)} for {model_name}: "
                f"{exc}. Check config.json (or upgrade timm: `pip install -U timm`)"
            ) from exc
        self._load(model, read_state_dict(self.path))
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self._init_layout()
        logger.info("image encoder %s: %s, %s", self.name, self.path, self.describe())

    def _model_args(
        self,
        config: Mapping[str, Any],
        config_path: Path,
        overrides: Mapping[str, Any] | None,
    ) -> tuple[str, dict[str, Any]]:
        """Architecture and create_model arguments: config.json < spec < overrides."""
        spec = self.spec
        architecture = spec.architecture if spec else config.get("architecture")
        if not architecture:
            raise EncoderError(f"{config_path} does not name an `architecture`")
        if spec and config.get("architecture") not in (None, spec.architecture):
            logger.warning(
                "%s: config.json names architecture %r; using %r as documented for %s",
                self.name, config.get("architecture"), spec.architecture, spec.name,
            )  # fmt: skip
        args: dict[str, Any] = dict(config.get("model_args") or {})
        if spec:
            args.update(spec.model_args)
            args.update({key: _import_symbol(path) for key, path in spec.layer_args.items()})
        args.update(overrides or {})
        for key, value in list(args.items()):
            if key.endswith("_layer") and isinstance(value, str) and "." in value:
                args[key] = _import_symbol(value)  # e.g. "timm.layers.SwiGLUPacked" in a config
        args["num_classes"] = 0  # features only, no classifier head
        return architecture, args

    def _load(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        own = model.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        resized = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                   if k in state and state[k].shape != v.shape]  # fmt: skip
        if missing or unexpected or resized:
            detail = mismatch_summary(missing, unexpected)
            if resized:
                detail = "; ".join(filter(None, [detail, f"shape mismatch: {resized[:4]}"]))
            raise EncoderError(
                f"the weights in {self.path} do not fit the {self.name} architecture ({detail}). "
                "Are they this model's weights? For 'timm-vit', check config.json"
            )
        model.load_state_dict(state, strict=True)

    def _init_layout(self) -> None:
        model = self.model
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        self.has_class_token = getattr(model, "cls_token", None) is not None
        self.num_registers = int(
            getattr(model, "num_reg_tokens", self.num_prefix_tokens - int(self.has_class_token))
        )
        if self.spec and self.num_registers != self.spec.num_registers:
            raise EncoderError(
                f"{self.name}: the model has {self.num_registers} register tokens, the "
                f"documented layout has {self.spec.num_registers}"
            )
        patch = model.patch_embed.patch_size
        patch_h, patch_w = (patch, patch) if isinstance(patch, int) else tuple(patch)
        size = self.preprocessing.size
        if size % patch_h or size % patch_w:
            raise EncoderError(
                f"{self.name}: input size {size} is not a multiple of the patch size {patch}"
            )
        self.grid_size = (size // patch_h, size // patch_w)
        self.dim = int(getattr(model, "embed_dim", getattr(model, "num_features", 0)))
        self.embedding_dim = 2 * self.dim if self.global_pool is GlobalPool.CLS_MEAN else self.dim

    def _forward(self, inputs: torch.Tensor) -> ImageFeatures:
        states = self.model.forward_features(inputs)  # (b, prefix + h*w, D), final norm applied
        first, patches = split_tokens(states, self.num_prefix_tokens, self.grid_size, self.name)
        patch_mean = patches.mean(dim=(1, 2))  # (b, D)
        cls = first if self.has_class_token else patch_mean  # (b, D)
        if self.global_pool is GlobalPool.CLS_MEAN:
            embedding = torch.cat([cls, patch_mean], dim=-1)  # (b, 2D)
        elif self.global_pool is GlobalPool.MEAN:
            embedding = patch_mean
        else:
            embedding = cls
        return ImageFeatures(global_token=cls, patches=patches, embedding=embedding)
