"""The tensor fields `mupad prepare` computes per batch of tiles: latent moments, cached
text tokens and image tokens (encoders built once per rank)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from mupad.data.prepare import PrepareConfig

FEATURE_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}




class RecordEncoder:
    """uint8 tiles (B, S, S, 3) + captions -> the tensor fields of B records."""

    def __init__(self, config: PrepareConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.dtype = FEATURE_DTYPES[config.feature_dtype]
        self.codec = self.text = self.image = None
        if config.latents is not None:
            from mupad.latents import load_codec

            self.codec = load_codec(config.latents, device=device, batch_size=config.batch_size)
        if config.text_encoder is not None:
            from mupad.conditioning.registry import get_encoder

            self.text = get_encoder(
                config.text_encoder,
                max_length=config.text_max_length,
                fixed_length=True,
                device=device,
            )
        if config.image_encoder is not None:
            from mupad.conditioning.registry import get_encoder

            self.image = get_encoder(config.image_encoder, device=device)

    @torch.no_grad()
    def __call__(self, tiles: np.ndarray, captions: list[str]) -> dict[str, torch.Tensor]:
        """tiles uint8 (B, S, S, 3) -> {field: (B, ...)} on the CPU."""
        from mupad.latents import encode_moments, uint8_to_pixels

        images = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous()  # (B, 3, S, S)
        out: dict[str, torch.Tensor] = {}
        pixels = None
        if self.codec is None or self.config.keep_pixels:
            out["image"] = images
        if self.codec is not None or self.image is not None:
            pixels = uint8_to_pixels(images.to(self.device))  # (B, 3, S, S) in [-1, 1]
        if self.codec is not None:
            mean, logvar = encode_moments(self.codec, pixels)  # (B, C, s, s) each
            out["latent_moments"] = torch.cat([mean, logvar], dim=1).to("cpu", self.dtype)
        if self.image is not None:
            tokens, _ = self.image.encode(pixels)  # (B, 1 + h*w, D)
            out["image_tokens"] = tokens.to("cpu", self.dtype)
        if self.text is not None:
            out.update(self._text(captions))
        return out

    def _text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Fixed-length text states (B, T, D) + mask (B, T); empty captions -> zeros, all False."""
        assert self.text is not None
        length, dim = self.config.text_max_length, self.text.dim
        tokens = torch.zeros(len(captions), length, dim, dtype=self.dtype)
        mask = torch.zeros(len(captions), length, dtype=torch.bool)
        rows = [i for i, c in enumerate(captions) if c.strip()]
        if rows:
            sub_tokens, sub_mask = self.text.encode([captions[i] for i in rows])  # (P, T, D)
            index = torch.tensor(rows)
            tokens[index] = sub_tokens.to("cpu", self.dtype)
            mask[index] = sub_mask.to("cpu")
        return {"text_tokens": tokens, "text_mask": mask}
