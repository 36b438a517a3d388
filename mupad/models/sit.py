"""The SiT backbone: DiT blocks with adaLN-Zero, plus decoupled or shared cross-attention.

Per block: self-attention -> cross-attention (DCA or shared, if the model has conditions)
-> MLP, each as a residual branch. Self-attention and MLP are modulated (shift, scale, gate)
by the timestep embedding; the gates start at zero (adaLN-Zero), as do the final layer and
the cross-attention output projections, so a freshly built model's last layer outputs
exactly 0 (velocity 0, or clean image 0) and ignores its conditions until training moves it.

Time follows `mupad.transport.paths`: t = 0 is data, t = 1 is noise, and the network
returns the velocity eps - x0 at (x_t, t). Its last layer predicts either that velocity or
the clean image (`ModelConfig.prediction`), which `paths` turns into the velocity; either
way the output goes through a linear unpatchify or a small convolutional head
(`ModelConfig.refine_channels`).
"""

from __future__ import annotations

import dataclasses
import numbers
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mupad.conditions import Conditions
from mupad.config import (
    ConfigError,
    CrossAttentionKind,
    ModelConfig,
    Prediction,
    from_dict,
    save_json,
)
from mupad.fileio import atomic_directory
from mupad.models.attention import (
    DecoupledCrossAttention,
    PreparedStream,
    SelfAttention,
    SharedConditionEncoder,
    SharedContext,
    SharedCrossAttention,
    prepare_streams,
)
from mupad.models.embeddings import PositionEmbedding2D, TimestepEmbedder
from mupad.models.errors import CheckpointError, ModelInputError
from mupad.models.pathway_tokens import PathwayTokenizer
from mupad.models.refine import RefineHead
from mupad.transport import paths

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_MODULATIONS_PER_BLOCK = 6  # shift, scale, gate for attention and for the MLP
_LN_EPS = 1e-6


@dataclasses.dataclass
class SiTOutput:
    velocity: torch.Tensor  # (B, C_out, H, W), in the dtype of x
    cls_velocity: torch.Tensor | None  # (B, cls_dim) when the model has a CLS token
    hidden: torch.Tensor | None  # (B, N_patches, D) patch tokens after block `hidden_from_block`


class Mlp(nn.Module):
    def __init__(self, hidden_size: int, mlp_ratio: float) -> None:
        super().__init__()
        inner = int(hidden_size * mlp_ratio)
        self.fc1 = nn.Linear(hidden_size, inner)
        self.fc2 = nn.Linear(inner, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Exact (erf) GELU rather than DiT's tanh approximation: the two differ by < 1e-3, but
        # on CPU the tanh kernel measured 5.7x slower forward + backward (about 15 % of an
        # SiT-S/2 training step).
        return self.fc2(F.gelu(self.fc1(x)))  # (B, N, D)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift, broadcast over tokens: x (B, N, D), shift/scale (B, 1, D).

    addcmul does it in one pass over x instead of three.
    """
    return torch.addcmul(shift, x, scale + 1.0)


class SiTBlock(nn.Module):
    """One transformer block; the modulation vectors come from the model's fused adaLN Linear."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.attn = SelfAttention(dim, config.num_heads)
        self.cross: DecoupledCrossAttention | SharedCrossAttention | None = None
        if config.condition_dims:
            if config.cross_attention is CrossAttentionKind.DECOUPLED:
                self.cross = DecoupledCrossAttention(dim, config.num_heads, config.condition_dims)
            else:
                self.cross = SharedCrossAttention(dim, config.num_heads)
        self.mlp = Mlp(dim, config.mlp_ratio)
        self.hidden_size = dim

    def forward(
        self,
        x: torch.Tensor,  # (B, L, D) residual stream
        modulation: torch.Tensor,  # (B, 6, D)
        streams: list[PreparedStream],
        shared: SharedContext | None,
    ) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = modulation[:, :, None].unbind(1)
        dim = (self.hidden_size,)
        # No affine LayerNorm: the per-sample shift/scale replace it.
        h = _modulate(F.layer_norm(x, dim, eps=_LN_EPS), shift_a, scale_a)
        x = torch.addcmul(x, gate_a, self.attn(h))  # x + gate * attn(h)
        if self.cross is not None and (streams or shared is not None):
            # The query side is normalised (not modulated): conditions are time-independent,
            # and the gate-free residual keeps "absent" exactly equal to "no stream".
            query = F.layer_norm(x, dim, eps=_LN_EPS)
            if isinstance(self.cross, DecoupledCrossAttention):
                extra = self.cross(query, streams)
            else:
                extra = self.cross(query, shared)
            if extra is not None:
                x = x + extra
        h = _modulate(F.layer_norm(x, dim, eps=_LN_EPS), shift_m, scale_m)
        return torch.addcmul(x, gate_m, self.mlp(h))  # x + gate * mlp(h)


def write_model_files(
    folder: Path, config: ModelConfig, state: dict[str, torch.Tensor]
) -> None:
    """The `from_pretrained` format: config.json + model.safetensors (not atomic by itself;
    callers write into a temporary folder that is renamed when complete)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: value.detach().cpu().contiguous() for name, value in state.items()}
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "library": "mupad"})
    save_json(config, folder / CONFIG_NAME)


class SiT(nn.Module):
    """Scalable interpolant transformer with MUPAD's cross-attention and optional CLS token."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise ConfigError(f"SiT needs a ModelConfig, got {type(config).__name__}")
        self.config = config
        dim, patch = config.hidden_size, config.patch_size
        embed_width = config.bottleneck_dim or dim
        self.patch_embed = nn.Conv2d(
            config.in_channels, embed_width, kernel_size=patch, stride=patch
        )
        # (C*p*p -> r -> D) when a bottleneck is configured; the two Linears compose to a
        # rank-r patch embedding.
        self.patch_expand = nn.Linear(embed_width, dim) if config.bottleneck_dim else None
        self.pos_embed = PositionEmbedding2D(dim)
        self.t_embed = TimestepEmbedder(dim)
        self.cls_embed = nn.Linear(config.cls_dim, dim) if config.cls_dim else None

        self.condition_names = list(config.condition_dims)  # image, text, rna order
        self.pathway_tokenizer = None
        if config.rna_pathways and "rna" in self.condition_names:
            self.pathway_tokenizer = PathwayTokenizer(config.rna_pathways, config.rna_dim)
        self.shared_encoder = None
        if self.condition_names and config.cross_attention is CrossAttentionKind.SHARED:
            self.shared_encoder = SharedConditionEncoder(dim, config.condition_dims)

        self.blocks = nn.ModuleList(SiTBlock(config) for _ in range(config.depth))
        # Every block's adaLN Linear and the final layer's read the same SiLU(c), so they are
        # one Linear: one GEMM per forward instead of depth + 1 small ones.
        self.modulation = nn.Linear(dim, (_MODULATIONS_PER_BLOCK * config.depth + 2) * dim)
        head_channels = config.refine_channels or config.out_channels
        self.final_proj = nn.Linear(dim, patch * patch * head_channels)
        self.refine = (
            RefineHead(config.refine_channels, config.out_channels)
            if config.refine_channels
            else None
        )
        self.cls_head = nn.Linear(dim, config.cls_dim) if config.cls_dim else None
        # A runtime switch, not part of the config: it changes memory, not the maths.
        self.gradient_checkpointing = False
        self._init_weights()

    # ----------------------------------------------------------------------------------
    # Initialisation
    # ----------------------------------------------------------------------------------

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # Patch embedding as the Linear it is (C*p*p -> D).
        weight = self.patch_embed.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for layer in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        if self.shared_encoder is not None:
            for embedding in self.shared_encoder.modality_embedding.values():
                nn.init.normal_(embedding, std=0.02)
        if self.pathway_tokenizer is not None:
            self.pathway_tokenizer.reset_parameters()
        # adaLN-Zero: zero gates, shifts and scales; zero output layers. The model starts as
        # the identity on its residual stream and outputs exactly 0.
        zero = [self.modulation, self.final_proj]
        if self.cls_head is not None:
            zero.append(self.cls_head)
        for block in self.blocks:
            if isinstance(block.cross, DecoupledCrossAttention):
                zero.extend(block.cross.out.values())
            elif isinstance(block.cross, SharedCrossAttention):
                zero.append(block.cross.out)
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.refine is not None:
            # Zero biases keep the output exactly 0 while final_proj is zero; the weights stay
            # random, or no gradient would ever reach final_proj through the head.
            for conv in (self.refine.mix, self.refine.out, self.refine.skip):
                nn.init.zeros_(conv.bias)

    # ----------------------------------------------------------------------------------
    # Input checks
    # ----------------------------------------------------------------------------------

    def _check_inputs(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        cond: Conditions | None,
        cls_token: torch.Tensor | None,
        hidden_from_block: int | None,
    ) -> torch.Tensor:
        """Validate everything that needs no device sync; return t as a (B,) float tensor."""
        cfg = self.config
        if not isinstance(x, torch.Tensor):
            raise ModelInputError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ModelInputError(
                f"x must be (batch, channels, height, width), got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ModelInputError(f"x must be floating point, got {x.dtype}")
        batch, channels, height, width = x.shape
        if channels != cfg.in_channels:
            raise ModelInputError(
                f"x has {channels} channels but the model expects in_channels={cfg.in_channels}"
            )
        p = cfg.patch_size
        if height % p or width % p:
            raise ModelInputError(
                f"x height and width ({height}, {width}) must be multiples of the patch size {p}; "
                "crop or pad the input"
            )

        if isinstance(t, bool) or not isinstance(t, (torch.Tensor, numbers.Real)):
            raise ModelInputError(f"t must be a float or a tensor, got {type(t).__name__}")
        if isinstance(t, numbers.Real):
            if not 0.0 <= float(t) <= 1.0:
                raise ModelInputError(f"t must lie in [0, 1] (0 = data, 1 = noise), got {t}")
            t = torch.full((batch,), float(t), device=x.device)
        else:
            if not t.is_floating_point():
                raise ModelInputError(
                    f"t must be a float tensor in [0, 1] (0 = data, 1 = noise), got {t.dtype}; "
                    "integer step indices are not times — divide by the number of steps"
                )
            if t.dim() == 0:
                t = t.expand(batch)
            elif tuple(t.shape) != (batch,):
                raise ModelInputError(
                    f"t must be a scalar or have shape (batch,) = ({batch},), got {tuple(t.shape)}"
                )
            t = t.to(device=x.device, dtype=torch.float32)

        if cfg.cls_dim:
            if cls_token is None:
                raise ModelInputError(
                    f"this model has a CLS token (cls_dim={cfg.cls_dim}); pass "
                    f"cls_token of shape (batch, {cfg.cls_dim})"
                )
            if tuple(cls_token.shape) != (batch, cfg.cls_dim):
                raise ModelInputError(
                    f"cls_token must have shape (batch, cls_dim) = ({batch}, {cfg.cls_dim}), "
                    f"got {tuple(cls_token.shape)}"
                )
            if not cls_token.is_floating_point():
                raise ModelInputError(f"cls_token must be floating point, got {cls_token.dtype}")
        elif cls_token is not None:
            raise ModelInputError(
                "cls_token was given but this model has no CLS token (cls_dim=0); drop it or "
                "build the model with cls_dim > 0"
            )

        if hidden_from_block is not None and not 1 <= hidden_from_block <= cfg.depth:
            raise ModelInputError(
                f"hidden_from_block must be in [1, depth={cfg.depth}] (1-based), "
                f"got {hidden_from_block}"
            )

        if cond is not None:
            if not isinstance(cond, Conditions):
                raise ModelInputError(
                    f"cond must be a mupad.conditions.Conditions, got {type(cond).__name__}"
                )
            dims = cfg.condition_input_dims  # RNA: 1 when the model embeds pathway scores
            for modality, stream in cond.streams.items():
                if modality.value not in dims:
                    have = ", ".join(dims) or "none (cross_attention is off or no widths set)"
                    raise ModelInputError(
                        f"got a {modality.value!r} condition but the model has no stream for it; "
                        f"its condition streams are: {have}"
                    )
                if stream.tokens.dim() == 3 and stream.tokens.shape[-1] != dims[modality.value]:
                    expected = (
                        f"(batch, rna_pathways={cfg.rna_pathways}, 1) pathway scores"
                        if modality.value == "rna" and cfg.rna_pathways
                        else f"{modality.value}_dim={dims[modality.value]}"
                    )
                    raise ModelInputError(
                        f"{modality.value} tokens are {stream.tokens.shape[-1]} wide but the model "
                        f"expects {expected}"
                    )
                if (
                    modality.value == "rna"
                    and cfg.rna_pathways
                    and stream.tokens.dim() == 3
                    and stream.tokens.shape[1] != cfg.rna_pathways
                ):
                    raise ModelInputError(
                        f"rna conditions carry {stream.tokens.shape[1]} pathway tokens but the "
                        f"model was built for rna_pathways={cfg.rna_pathways}; score the same "
                        "gene sets the model was trained on"
                    )
                if stream.tokens.device != x.device:
                    raise ModelInputError(
                        f"{modality.value} conditions are on {stream.tokens.device} but x is on "
                        f"{x.device}; move them with cond.to(x.device)"
                    )
            cond.validate(batch)  # shapes, NaN/Inf in used tokens, present-but-empty samples
        return t

    # ----------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        cond: Conditions | None = None,
        *,
        cls_token: torch.Tensor | None = None,
        hidden_from_block: int | None = None,
    ) -> SiTOutput:
        """Velocity at (x_t, t) given conditions.

        x: (B, C_in, H, W) with H, W multiples of the patch size; t: scalar or (B,) in [0, 1];
        cls_token: (B, cls_dim) noisy CLS state, required iff cls_dim > 0;
        hidden_from_block: also return the patch tokens after this block (1-based).
        """
        t = self._check_inputs(x, t, cond, cls_token, hidden_from_block)
        cfg = self.config
        param_dtype = self.final_proj.weight.dtype
        # One host sync for the time range check and the stream presence flags together.
        streams, (t_min, t_max) = prepare_streams(
            cond, self.condition_names, param_dtype, sync_also=(t.min(), t.max())
        )
        if not (0.0 <= t_min and t_max <= 1.0):  # also false for NaN
            raise ModelInputError(
                f"t must lie in [0, 1] (0 = data, 1 = noise), got values in [{t_min}, {t_max}]"
            )
        if self.pathway_tokenizer is not None:
            streams = [self._embed_pathways(s) if s.name == "rna" else s for s in streams]
        shared = self.shared_encoder(streams) if self.shared_encoder is not None else None

        batch, _, height, width = x.shape
        grid_h, grid_w = height // cfg.patch_size, width // cfg.patch_size
        tokens = self._embed_patches(x.to(param_dtype), grid_h, grid_w)  # (B, N, D)
        # The residual stream stays in the dtype the patch embedding produces: the parameter
        # dtype, or the autocast dtype under autocast (as diffusers' DiT does). An fp32 stream
        # under bf16 autocast costs a cast before and after every matmul, fwd and bwd, which
        # on CPU made the step ~15% slower; run without autocast for an fp32 stream.
        tokens = tokens + self.pos_embed(grid_h, grid_w, x.device, tokens.dtype)
        num_prefix = 0
        if self.cls_embed is not None:
            cls = self.cls_embed(cls_token.to(param_dtype))[:, None, :]  # (B, 1, D)
            tokens = torch.cat([cls.to(tokens.dtype), tokens], dim=1)  # (B, 1 + N, D)
            num_prefix = 1

        c = F.silu(self.t_embed(t))  # (B, D)
        modulation = self.modulation(c).view(batch, -1, cfg.hidden_size)  # (B, 6*depth + 2, D)

        hidden = None
        for index, block in enumerate(self.blocks):
            start = _MODULATIONS_PER_BLOCK * index
            block_modulation = modulation[:, start : start + _MODULATIONS_PER_BLOCK]
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Keep only the block inputs; recompute the block in the backward pass.
                tokens = checkpoint(
                    block, tokens, block_modulation, streams, shared, use_reentrant=False
                )
            else:
                tokens = block(tokens, block_modulation, streams, shared)
            if hidden_from_block == index + 1:
                hidden = tokens[:, num_prefix:]  # (B, N, D)

        shift, scale = modulation[:, -2:, None].unbind(1)  # each (B, 1, D)
        tokens = _modulate(F.layer_norm(tokens, (cfg.hidden_size,), eps=_LN_EPS), shift, scale)
        patches = self.final_proj(tokens[:, num_prefix:])  # (B, N, p*p*C_head)
        output = self._unpatchify(patches, grid_h, grid_w)  # (B, C_head, H, W)
        if self.refine is not None:
            output = self.refine(output)  # (B, C_out, H, W)
        if cfg.prediction is Prediction.DATA:
            # The first C_out input channels are the noisy state (any others are context).
            noisy = x[:, : cfg.out_channels].float()
            output = paths.velocity_from_denoised(noisy, output.float(), t)
        velocity = output.to(x.dtype)
        cls_velocity = None
        if self.cls_head is not None:
            cls_velocity = self.cls_head(tokens[:, 0]).to(cls_token.dtype)  # (B, cls_dim)
        return SiTOutput(velocity=velocity, cls_velocity=cls_velocity, hidden=hidden)

    def _embed_pathways(self, stream: PreparedStream) -> PreparedStream:
        """RNA pathway scores (B, P, 1) -> tokens (B, P, rna_dim), once per forward.

        The prepared scores are already 0 wherever unused (padding, absent samples), so no
        NaN reaches the tokenizer; its output is zeroed there again to keep the prepared-
        stream contract (unused tokens exactly 0). Presence gating is unchanged.
        """
        tokens = self.pathway_tokenizer(stream.tokens)  # (B, P, rna_dim)
        if not stream.all_used:
            tokens = torch.where(stream.used[..., None], tokens, 0.0)
        return dataclasses.replace(stream, tokens=tokens)

    def _embed_patches(self, x: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """(B, C, H, W) -> (B, h*w, D) contiguous, row-major over the token grid.

        The p x p / stride p convolution written as the Linear it is. Unlike
        conv(x).flatten(2).transpose(1, 2), the result is contiguous in (B, N, D), so the
        residual stream is too and no LayerNorm downstream has to copy it (fwd and bwd).
        """
        p = self.config.patch_size
        batch, channels = x.shape[:2]
        patches = x.reshape(batch, channels, grid_h, p, grid_w, p)  # a view if contiguous
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(
            batch, grid_h * grid_w, channels * p * p
        )
        weight = self.patch_embed.weight  # (D, C, p, p): flattened in the same (C, p, p) order
        tokens = F.linear(patches, weight.view(weight.shape[0], -1), self.patch_embed.bias)
        if self.patch_expand is not None:
            tokens = self.patch_expand(tokens)  # (B, N, r) -> (B, N, D)
        return tokens

    def _unpatchify(self, patches: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """(B, h*w, p*p*C) -> (B, C, h*p, w*p); each token's features are ordered (p, p, C)."""
        p = self.config.patch_size
        batch = patches.shape[0]
        channels = patches.shape[-1] // (p * p)
        x = patches.view(batch, grid_h, grid_w, p, p, channels)
        x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
        return x.reshape(batch, channels, grid_h * p, grid_w * p)

    def velocity(
        self, x: torch.Tensor, t: torch.Tensor | float, cond: Conditions | None = None
    ) -> torch.Tensor:
        """The plain callable v(x, t, cond) -> (B, C_out, H, W) that samplers integrate."""
        if self.config.cls_dim:
            raise ModelInputError(
                "this model carries a CLS token (cls_dim > 0), whose state must be integrated "
                "together with x; sample with mupad.models.cls_joint.velocity_fn(model, "
                "(C, H, W)) on a state packed by mupad.models.cls_joint.pack_state(x, cls), or "
                "call forward(x, t, cond, cls_token=...) directly"
            )
        return self.forward(x, t, cond).velocity

    def self_attention_layers(self) -> list[SelfAttention]:
        """Every block's self-attention, in block order (for `mupad.models.attention_control`)."""
        return [block.attn for block in self.blocks]

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ----------------------------------------------------------------------------------
    # Checkpoints: model.safetensors + config.json, written atomically
    # ----------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `model.safetensors` and `config.json` into `directory` (replaced atomically)."""
        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            write_model_files(tmp, self.config, self.state_dict())
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, map_location: str | torch.device = "cpu"
    ) -> SiT:
        """Load a folder written by `save_pretrained` (safetensors only; nothing is unpickled)."""
        import json

        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(f"no model folder at {directory}")
        missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (directory / n).is_file()]
        if missing:
            raise CheckpointError(
                f"model folder {directory} lacks {', '.join(missing)}; it was not written by "
                "SiT.save_pretrained or the write was interrupted"
            )
        try:
            config = from_dict(ModelConfig, json.loads((directory / CONFIG_NAME).read_text()))
        except (ConfigError, json.JSONDecodeError, TypeError) as error:
            raise CheckpointError(
                f"{directory / CONFIG_NAME} is not a valid ModelConfig: {error}"
            ) from None
        try:
            state = load_file(str(directory / WEIGHTS_NAME), device="cpu")
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"cannot read {directory / WEIGHTS_NAME}: {error}") from None

        model = cls(config)
        expected = {name: tuple(v.shape) for name, v in model.state_dict().items()}
        found = {name: tuple(v.shape) for name, v in state.items()}
        problems = []
        absent = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        wrong = sorted(n for n in set(expected) & set(found) if expected[n] != found[n])
        if absent:
            problems.append(f"missing tensors {_short_list(absent)}")
        if extra:
            problems.append(f"unexpected tensors {_short_list(extra)}")
        if wrong:
            shapes = [f"{n}: file {found[n]} vs config {expected[n]}" for n in wrong]
            problems.append(f"shape mismatches {_short_list(shapes)}")
        if problems:
            raise CheckpointError(
                f"{directory / WEIGHTS_NAME} does not match {directory / CONFIG_NAME}: "
                + "; ".join(problems)
                + ". The weights were written for another model config; keep each weights file "
                "with the config.json it was saved with."
            )
        dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
        if len(dtypes) == 1:
            model = model.to(dtype=dtypes.pop())  # load bit-exactly in the stored precision
        model.load_state_dict(state, strict=True)
        return model.to(map_location)


def _short_list(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def build_model(config: ModelConfig) -> SiT:
    """The network for a config (the one place that maps a ModelConfig to a module)."""
    return SiT(config)
