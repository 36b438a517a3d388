"""Streaming, shuffled, rank- and worker-aware reading of a shard folder (see shards.py).

Memory is O(number of shards) plus a few open shards, never O(number of records): no list
of record indices is ever materialised.

The epoch order (exact scheme; a pure function of seed, epoch, rank, world_size, position)
------------------------------------------------------------------------------------------
Let the shards (sorted by file name) have sizes n_0..n_{S-1}, N = sum n_k.

1. Shard permutation: pi = permutation(S) drawn with numpy PCG64 seeded by
   SeedSequence([seed, epoch, 0]). The epoch "stream" is the shards in order pi, their
   records concatenated: stream positions [0, N). C[j] = n_pi[0] + ... + n_pi[j-1].
2. Windows: consecutive groups of K = `window_shards` permuted shards, window w covering
   stream positions [C[wK], C[min((w+1)K, S)]) of size M_w. Inside a window the records are
   permuted by sigma_w = permutation(M_w) from SeedSequence([seed, epoch, 1, w]): stream
   position C[wK] + i holds the window's (sigma_w[i])-th record, which lives in shard
   pi[j] at offset C[wK] + sigma_w[i] - C[j] (j found by binary search in C).
   Only the current window's permutation is held (O(K * shard_size)).
3. Ranks: rank r sees the contiguous block of stream positions [r*L, (r+1)*L) with
   L = N // world_size (drop_last=True: the last N mod world_size stream positions, a
   different set of records every epoch, are skipped), or L = ceil(N / world_size)
   (drop_last=False: positions past N wrap to the start of the stream, so a few records are
   seen twice). Blocks keep each rank reading its own shards.
4. Position p of rank r's epoch is stream position r*L + p. With shuffle=False pi and
   sigma_w are the identity (records in file order).

DataLoader workers (IterableDataset): worker w of W reads positions start+w, start+w+W, ...
With `batch_size=None` a DataLoader interleaves them back into exactly the epoch order; for
batches pass `collate_fn=stack_records` (metadata may hold None, which default_collate
refuses).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from mupad.conditions import Conditions, ConditionStream
from mupad.data.dihedral import apply_dihedral, draw_dihedral
from mupad.data.shards import ShardError, read_index, read_shard_records, stack_records
from mupad.training.loop import TrainBatch
from mupad.training.teacher import split_tokens

logger = logging.getLogger(__name__)

SHARD_KEY = "_shard"  # file name of the record's shard
OFFSET_KEY = "_offset"  # the record's row within its shard
INDEX_KEY = "_index"  # stable global id: records before its shard (sorted by name) + offset


class _OpenShard:
    """An mmap-ed shard: rows are read on demand; per-record metadata parsed once."""

    def __init__(self, path: Path, fields: Sequence[str] | None) -> None:
        if not path.is_file():
            raise ShardError(
                f"{path} is listed in the shard index but missing; re-run "
                f"write_manifest({str(path.parent)!r}) after changing the shards"
            )
        self.handle = safe_open(str(path), framework="pt")
        names = list(self.handle.keys())
        if fields is not None:
            missing = sorted(set(fields) - set(names))
            if missing:
                raise ShardError(f"{path.name} has no tensor field(s) {missing}; it has {names}")
            names = [n for n in names if n in set(fields)]
        self.names = names
        self.slices = {n: self.handle.get_slice(n) for n in names}
        self.records = read_shard_records(path)

    def row(self, offset: int) -> dict[str, Any]:
        out: dict[str, Any] = {n: s[offset : offset + 1][0] for n, s in self.slices.items()}
        out.update(self.records[offset])
        return out


class ShardedDataset(torch.utils.data.IterableDataset):
    """Records of a shard folder in a shuffled, rank-disjoint, resumable epoch order.

    `fields`: tensor fields to read (default: all); metadata fields always come along, plus
    `_shard`, `_offset` and `_index` (a stable global record id).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        fields: Sequence[str] | None = None,
        shard_cache: int = 4,
        window_shards: int = 4,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ShardError(
                f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        if window_shards < 1 or shard_cache < 1:
            raise ShardError("window_shards and shard_cache must be >= 1")
        self.root = Path(root)
        index = read_index(self.root)
        self.schema: dict[str, Any] = index["fields"] or {}
        self.files: list[str] = [s["file"] for s in index["shards"]]
        self.sizes = np.asarray([s["n_records"] for s in index["shards"]], dtype=np.int64)  # (S,)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)])  # (S+1,) global id offsets
        self.total = int(self.starts[-1])
        if self.total == 0:
            raise ShardError(f"{self.root} holds no records")
        if fields is not None:
            missing = sorted(set(fields) - set(self.schema))
            if missing:
                raise ShardError(
                    f"fields {missing} are not in {self.root}; it has {sorted(self.schema)}"
                )
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.fields = list(fields) if fields is not None else None
        self.window_shards = window_shards
        self.shard_cache = max(shard_cache, window_shards)
        self.per_rank = self.total // world_size if drop_last else -(-self.total // world_size)
        if self.per_rank == 0:
            raise ShardError(
                f"{self.total} records cannot be split over {world_size} ranks with drop_last"
            )
        self._reset_caches()

    # ------------------------------------------------------------------ caches
    def _reset_caches(self) -> None:
        self._pid = os.getpid()
        self._open: collections.OrderedDict[int, _OpenShard] = collections.OrderedDict()
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self._window_cache: collections.OrderedDict[tuple[int, int], np.ndarray] = (
            collections.OrderedDict()
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_open", "_epoch_cache", "_window_cache", "_pid"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_caches()

    def _shard(self, k: int) -> _OpenShard:
        if self._pid != os.getpid():  # forked into a worker: do not share mmaps / handles
            self._reset_caches()
        shard = self._open.get(k)
        if shard is None:
            shard = _OpenShard(self.root / self.files[k], self.fields)
            self._open[k] = shard
            while len(self._open) > self.shard_cache:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(k)
        return shard

    # ------------------------------------------------------------------ order
    def __len__(self) -> int:
        """Records this rank sees per epoch (equal on every rank; see module docstring)."""
        return self.per_rank

    def _rng(self, *words: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, *words])))

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(pi (S,), C (S+1,)) for `epoch`."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            count = len(self.files)
            order = self._rng(epoch, 0).permutation(count) if self.shuffle else np.arange(count)
            cum = np.concatenate([[0], np.cumsum(self.sizes[order])])
            self._epoch_cache = (epoch, order, cum)
            self._window_cache.clear()
        return self._epoch_cache[1], self._epoch_cache[2]

    def _window(self, epoch: int, w: int, size: int) -> np.ndarray:
        key = (epoch, w)
        perm = self._window_cache.get(key)
        if perm is None:
            perm = self._rng(epoch, 1, w).permutation(size) if self.shuffle else np.arange(size)
            self._window_cache[key] = perm
            while len(self._window_cache) > 2:
                self._window_cache.popitem(last=False)
        return perm

    def locate(self, epoch: int, position: int) -> tuple[int, int]:
        """(shard index, offset) of the position-th record of this rank's epoch order."""
        if not 0 <= position < self.per_rank:
            raise IndexError(f"position {position} outside this rank's epoch [0, {self.per_rank})")
        stream = (self.rank * self.per_rank + position) % self.total
        order, cum = self._epoch(epoch)
        window_size = self.window_shards
        w = int(np.searchsorted(cum[::window_size], stream, side="right")) - 1
        first = w * window_size
        last = min(first + window_size, len(order))
        lo, hi = int(cum[first]), int(cum[last])
        inside = lo + int(self._window(epoch, w, hi - lo)[stream - lo])
        j = int(np.searchsorted(cum, inside, side="right")) - 1
        return int(order[j]), inside - int(cum[j])

    def record(self, epoch: int, position: int) -> dict[str, Any]:
        """The position-th record of this rank's epoch order."""
        k, offset = self.locate(epoch, position)
        out = self._shard(k).row(offset)
        out[SHARD_KEY] = self.files[k]
        out[OFFSET_KEY] = offset
        out[INDEX_KEY] = int(self.starts[k]) + offset
        return out

    def iter_epoch(self, epoch: int, start: int = 0) -> Iterator[dict[str, Any]]:
        """Records of positions start, start+1, ... (this worker's stride under a DataLoader)."""
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for position in range(start + worker, self.per_rank, workers):
            yield self.record(epoch, position)

    # IterableDataset protocol: iterate `self.epoch` from `self.start` (set with set_epoch).
    epoch: int = 0
    start: int = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.iter_epoch(self.epoch, self.start)


# --------------------------------------------------------------------------------------
# Trainer batches
# --------------------------------------------------------------------------------------


def _factor(value: float | Sequence[float], channels: int) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=torch.float32).flatten()
    if tensor.numel() not in (1, channels):
        raise ShardError(f"latent scale/shift has {tensor.numel()} values for {channels} channels")
    return tensor.expand(channels)[None, :, None, None]  # (1, C, 1, 1)


class ShardBatches:
    """`batch_fn(step, generator) -> TrainBatch` reading a ShardedDataset; see shard_batches."""

    def __init__(
        self,
        dataset: ShardedDataset,
        batch_size: int,
        *,
        latent_key: str | None = "latent_moments",
        image_key: str = "image",
        sample_latents: bool = True,
        latent_scale: float | Sequence[float] = 1.0,
        latent_shift: float | Sequence[float] = 0.0,
        text_key: str | None = "text_tokens",
        text_mask_key: str = "text_mask",
        image_cond_key: str | None = "image_tokens",
        rna_key: str | None = "rna_scores",
        rna_as_pathway_tokens: bool = True,
        teacher_key: str | None = None,
        pixels_key: str | None = None,
        dihedral: bool = False,
        prefetch: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ShardError(f"batch_size must be >= 1, got {batch_size}")
        schema = dataset.schema
        if latent_key is not None and latent_key not in schema:
            raise ShardError(
                f"{dataset.root} has no {latent_key!r} field (it has {sorted(schema)}); cache VAE "
                "latent moments with `mupad prepare`, or pass latent_key=None to train on "
                f"the {image_key!r} pixels"
            )
        if latent_key is None and image_key not in schema:
            raise ShardError(f"{dataset.root} has neither latents nor an {image_key!r} field")
        self.dataset, self.batch_size = dataset, batch_size
        self.latent_key, self.image_key = latent_key, image_key
        self.sample_latents = sample_latents
        self.latent_scale, self.latent_shift = latent_scale, latent_shift
        self.text_key = text_key if text_key in schema else None
        self.text_mask_key = text_mask_key
        self.image_cond_key = image_cond_key if image_cond_key in schema else None
        self.rna_key = rna_key if rna_key in schema else None
        self.rna_as_pathway_tokens = rna_as_pathway_tokens
        for role, key in (("teacher", teacher_key), ("pixels", pixels_key)):
            if key is not None and key not in schema:
                raise ShardError(
                    f"{dataset.root} has no {key!r} field for the {role} (it has "
                    f"{sorted(schema)}); re-run `mupad prepare` with "
                    + ("--image-encoder NAME" if role == "teacher" else "--keep-pixels")
                )
        self.teacher_key, self.pixels_key = teacher_key, pixels_key
        self.dihedral = dihedral
        self.prefetch = prefetch
        self._pending: tuple[int, Future[list[dict[str, Any]]]] | None = None
        self._executor: ThreadPoolExecutor | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pending"] = state["_executor"] = None
        return state

    def records(self, step: int) -> list[dict[str, Any]]:
        """Records of step `step`: global positions [step*B, (step+1)*B), epochs wrapping."""
        length = len(self.dataset)
        first = step * self.batch_size
        return [
            self.dataset.record(g // length, g % length)
            for g in range(first, first + self.batch_size)
        ]

    @staticmethod
    def _pixels(images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) or (B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
        if images.dtype == torch.uint8:
            if images.shape[1] != 3 and images.shape[-1] == 3:
                images = images.permute(0, 3, 1, 2)
            return images.float().div(127.5).sub(1.0).contiguous()
        return images.float()

    def _x0(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        if self.latent_key is None:
            return self._pixels(batch[self.image_key])
        moments = batch[self.latent_key].float()  # (B, 2C, h, w)
        mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        z = mean
        if self.sample_latents:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            z = mean + std * torch.randn(mean.shape, generator=generator)
        channels = z.shape[1]
        return (z - _factor(self.latent_shift, channels)) * _factor(self.latent_scale, channels)

    def _conditions(self, batch: dict[str, Any]) -> Conditions | None:
        streams: dict[str, ConditionStream] = {}
        if self.text_key is not None:
            tokens = batch[self.text_key].float()  # (B, T, D)
            mask = batch.get(self.text_mask_key)
            mask = (
                mask.bool() if mask is not None else torch.ones(tokens.shape[:2], dtype=torch.bool)
            )
            streams["text"] = ConditionStream.from_tokens(tokens, mask, present=mask.any(dim=1))
        if self.image_cond_key is not None:
            streams["image"] = ConditionStream.from_tokens(batch[self.image_cond_key].float())
        if self.rna_key is not None:
            scores = batch[self.rna_key].float()  # (B, P)
            present = torch.isfinite(scores).all(dim=1)
            scores = torch.nan_to_num(scores)
            tokens = scores[:, :, None] if self.rna_as_pathway_tokens else scores[:, None, :]
            streams["rna"] = ConditionStream.from_tokens(tokens, present=present)
        return Conditions.build(**streams) if streams else None

    def _fetch(self, step: int) -> list[dict[str, Any]]:
        """Records of `step`, read ahead in one background thread while the step trains.

        Only one thread touches the dataset at a time: a pending read is always awaited
        before anything else is read. Records are a pure function of the step, so reading
        ahead never changes what a step sees.
        """
        records = None
        if self._pending is not None:
            pending_step, future = self._pending
            self._pending = None
            ready = future.result()
            if pending_step == step:
                records = ready
        if records is None:
            records = self.records(step)
        if self.prefetch:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="shard-prefetch")
            self._pending = (step + 1, self._executor.submit(self.records, step + 1))
        return records

    def close(self) -> None:
        """Stop the read-ahead thread (it is restarted by the next call)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        self._executor, self._pending = None, None

    def __call__(self, step: int, generator: torch.Generator) -> TrainBatch:
        batch = stack_records(self._fetch(step))
        x0 = self._x0(batch, generator)
        teacher = split_tokens(batch[self.teacher_key]) if self.teacher_key else None
        pixels = self._pixels(batch[self.pixels_key]) if self.pixels_key else None
        if self.dihedral:
            # One flip/turn per sample for the target, its pixels and the teacher's grid, so
            # the alignment loss still matches co-located patches. Conditions stay as they
            # are: they describe the tile, not its orientation.
            draw = draw_dihedral(x0.shape[0], generator)
            x0 = apply_dihedral(x0, draw)
            pixels = apply_dihedral(pixels, draw) if pixels is not None else None
            if teacher is not None:
                (gh, gw), dim = teacher.grid, teacher.patches.shape[-1]
                grid = teacher.patches.view(-1, gh, gw, dim)  # (B, h, w, D)
                patches = apply_dihedral(grid, draw, dims=(1, 2)).reshape(-1, gh * gw, dim)
                teacher = dataclasses.replace(teacher, patches=patches)
        return TrainBatch(x0=x0, cond=self._conditions(batch), teacher=teacher, pixels=pixels)


def shard_batches(
    dataset: ShardedDataset,
    batch_size: int,
    *,
    latent_key: str | None = "latent_moments",
    **options: Any,
) -> Callable[[int, torch.Generator], TrainBatch]:
    """A Trainer `batch_fn` reading cached shards.

    Step s takes positions [s*B, (s+1)*B) of the concatenated epoch orders (record of global
    position g: epoch g // len(dataset), position g % len(dataset)), so a run resumed at step
    s reads exactly the batches of the uninterrupted run. Latents are drawn from the cached
    posterior moments `latent_key` (B, 2C, h, w) = (mean, logvar) with the step's generator
    (`sample_latents=False`: the mean), then mapped (z - latent_shift) * latent_scale.
    Shards written by `mupad prepare` already hold moments in the codec's scaled space, so
    keep the defaults (1, 0) for them; the factors exist for moments cached unscaled by other
    tools. `latent_key=None` trains on the `image` field
    (uint8 -> [-1, 1]). Conditions: `text_tokens` + `text_mask` (text present where any token
    is real), `image_tokens`, `rna_scores` (B, P) -> (B, P, 1) pathway tokens (present where
    finite); each only if the shards hold it. `teacher_key` (e.g. "image_tokens") also
    gives the cached alignment-teacher features [global, patches], `pixels_key` (e.g.
    "image") the clean pixels an online teacher encodes. `dihedral=True` gives each sample one
    of the 8 flips/quarter turns (drawn from the step's generator, applied alike to the target,
    its pixels and the teacher's patch grid; meant for pixel space or rotation-trained VAEs). `prefetch` (default True) reads the next
    step's records in a background thread. See ShardBatches for the option names.
    """
    return ShardBatches(dataset, batch_size, latent_key=latent_key, **options)
