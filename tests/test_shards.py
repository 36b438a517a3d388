"""Shards round-trip and are written atomically; the streaming loader covers every record
exactly once per epoch across ranks (also two real gloo processes) and DataLoader workers,
resumes mid-epoch, and feeds the Trainer from cached latents with exact resume."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import mupad.data.shards as shards_module
from mupad.config import ModelConfig, Precision, TrainConfig
from mupad.data.shards import (
    INDEX_NAME,
    ShardError,
    ShardWriter,
    pad_tokens,
    read_index,
    read_shard,
    read_shard_records,
    shard_paths,
    stack_records,
    write_manifest,
)
from mupad.data.streaming import INDEX_KEY, ShardedDataset, shard_batches
from mupad.models import SiT
from mupad.training.checkpoint import latest_checkpoint, list_checkpoints
from mupad.training.loop import Trainer, step_generator

torch.set_num_threads(1)

T, D, P = 5, 8, 6  # text tokens, text width, pathways


def make_record(i: int, latent_hw: int = 4) -> dict:
    g = torch.Generator().manual_seed(i)
    tokens, mask = pad_tokens(torch.randn(1 + i % T, D, generator=g), T)
    return {
        "image": torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=g),
        "latent_moments": torch.randn(8, latent_hw, latent_hw, generator=g),  # (2C, h, w)
        "teacher": torch.randn(4, 16, generator=g).to(torch.bfloat16),
        "text_tokens": tokens,
        "text_mask": mask,
        "rna_scores": np.random.default_rng(i).normal(size=P).astype(np.float32),
        "caption": f"tile {i}",
        "slide_id": f"slide{i % 3}",
        "x": 256 * i,
        "y": 512 * i,
        "label": i % 4,
    }


def write_dataset(root: Path, counts: dict[str, int], shard_size: int) -> int:
    """One writer per prefix; returns the number of records written."""
    i = 0
    for prefix, count in counts.items():
        with ShardWriter(root, prefix, shard_size) as writer:
            for _ in range(count):
                writer.add(make_record(i))
                i += 1
    write_manifest(root)
    return i


def small_dataset(root: Path, counts: dict[str, int], shard_size: int) -> int:
    """Cheap records (an id only) for order tests."""
    i = 0
    for prefix, count in counts.items():
        with ShardWriter(root, prefix, shard_size) as writer:
            for _ in range(count):
                writer.add({"value": torch.tensor([i], dtype=torch.int64), "tile": i})
                i += 1
    write_manifest(root)
    return i


def epoch_ids(dataset: ShardedDataset, epoch: int, start: int = 0) -> list[int]:
    return [r[INDEX_KEY] for r in dataset.iter_epoch(epoch, start)]


# ---------------------------------------------------------------------------- shards


def test_round_trip_is_bit_exact(tmp_path):
    with ShardWriter(tmp_path, "r0", shard_size=4) as writer:
        originals = [make_record(i) for i in range(10)]
        for record in originals:
            writer.add(record)
    paths = writer.paths
    assert [p.name for p in paths] == [
        "r0-000000.safetensors",
        "r0-000001.safetensors",
        "r0-000002.safetensors",
    ]
    seen = 0
    for path in paths:
        tensors, records = read_shard(path)
        n = len(records)
        assert n == (4 if path != paths[-1] else 2)
        for j in range(n):
            original = originals[seen + j]
            for name in ("image", "latent_moments", "teacher", "text_tokens", "text_mask"):
                assert tensors[name].dtype == original[name].dtype
                assert torch.equal(tensors[name][j], original[name]), name
            assert np.array_equal(tensors["rna_scores"][j].numpy(), original["rna_scores"])
            assert records[j] == {
                k: original[k] for k in ("caption", "slide_id", "x", "y", "label")
            }
        assert records == read_shard_records(path)
        seen += n
    assert seen == 10
    # The streaming reader returns the same rows (mmap-ed, one row at a time).
    write_manifest(tmp_path)
    dataset = ShardedDataset(tmp_path, shuffle=False)
    for i, original in enumerate(originals):
        record = dataset.record(0, i)
        for name in ("image", "latent_moments", "teacher", "text_tokens", "text_mask"):
            assert record[name].dtype == original[name].dtype
            assert torch.equal(record[name], original[name]), name
        assert record["caption"] == original["caption"] and record[INDEX_KEY] == i


def test_pad_tokens_masks_padding_and_truncates():
    padded, mask = pad_tokens(torch.ones(2, 3), 4)
    assert padded.shape == (4, 3) and mask.tolist() == [True, True, False, False]
    assert padded[2:].abs().sum() == 0
    padded, mask = pad_tokens(torch.ones(6, 3), 4)
    assert padded.shape == (4, 3) and mask.all()


def test_writer_rejects_inconsistent_or_unsupported_records(tmp_path):
    writer = ShardWriter(tmp_path, "a", shard_size=4)
    writer.add({"z": torch.zeros(2, 3)})
    with pytest.raises(ShardError, match="same tensor fields, shapes and dtypes"):
        writer.add({"z": torch.zeros(2, 4)})
    with pytest.raises(ShardError, match="has type dict"):
        writer.add({"z": torch.zeros(2, 3), "meta": {"a": 1}})
    with pytest.raises(ShardError, match="already holds"):
        with ShardWriter(tmp_path, "b", 1) as w:
            w.add({"z": torch.zeros(1)})
        ShardWriter(tmp_path, "b", 1)
    assert len(ShardWriter(tmp_path, "b", 1, overwrite=True).close()) == 0


def test_a_crash_mid_write_leaves_no_visible_shard(tmp_path, monkeypatch):
    real_save = shards_module.save_file
    calls = {"n": 0}

    def dies_on_second_shard(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(filename).write_bytes(b"half a shard")  # partial bytes, then the crash
            raise OSError("disk full")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(shards_module, "save_file", dies_on_second_shard)
    with (
        pytest.raises(OSError, match="disk full"),
        ShardWriter(tmp_path, "r0", shard_size=2) as writer,
    ):
        for i in range(5):
            writer.add(make_record(i))
    assert [p.name for p in shard_paths(tmp_path)] == ["r0-000000.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r0-000000.safetensors"]  # no temporaries
    read_shard(shard_paths(tmp_path)[0])  # the completed shard is intact

    # An exception inside the `with` drops buffered records instead of writing a short shard.
    monkeypatch.setattr(shards_module, "save_file", real_save)
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, "r1", shard_size=4) as writer:
        writer.add(make_record(0))
        raise RuntimeError("source failed")
    assert not shard_paths(tmp_path, "r1")


def test_manifest_lists_shards_and_records(tmp_path):
    n = write_dataset(tmp_path, {"rank0": 7, "rank1": 5}, shard_size=3)
    manifest = pd.read_parquet(tmp_path / "manifest.parquet")
    assert len(manifest) == n
    assert list(manifest.columns) == [
        "shard",
        "offset",
        "n_records",
        "fields",
        "slide_id",
        "x",
        "y",
        "label",
    ]
    assert manifest["shard"].nunique() == 3 + 2
    counts = manifest.groupby("shard")["n_records"].first().to_dict()
    assert counts == {
        "rank0-000000.safetensors": 3,
        "rank0-000001.safetensors": 3,
        "rank0-000002.safetensors": 1,
        "rank1-000000.safetensors": 3,
        "rank1-000001.safetensors": 2,
    }
    assert manifest["x"].tolist() == [256 * i for i in range(n)]
    assert manifest["label"].tolist() == [i % 4 for i in range(n)]
    assert manifest["slide_id"].tolist() == [f"slide{i % 3}" for i in range(n)]
    assert set(manifest["fields"][0].split(",")) == {
        "image",
        "latent_moments",
        "teacher",
        "text_tokens",
        "text_mask",
        "rna_scores",
    }
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert [s["n_records"] for s in index["shards"]] == [3, 3, 1, 3, 2]
    assert index["fields"]["latent_moments"] == {"shape": [8, 4, 4], "dtype": "float32"}
    assert index["fields"]["teacher"]["dtype"] == "bfloat16"
    # Without the index the headers are scanned, with the same result.
    (tmp_path / INDEX_NAME).unlink()
    assert read_index(tmp_path)["shards"] == index["shards"]


def test_manifest_falls_back_to_csv_without_pyarrow(tmp_path, monkeypatch):
    small_dataset(tmp_path, {"a": 5}, shard_size=2)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = write_manifest(tmp_path)
    assert path.name == "manifest.csv"
    assert pd.read_csv(path)["offset"].tolist() == [0, 1, 0, 1, 0]


def test_manifest_refuses_mixed_schemas(tmp_path):
    with ShardWriter(tmp_path, "a", 2) as writer:
        writer.add({"z": torch.zeros(3)})
    with ShardWriter(tmp_path, "b", 2) as writer:
        writer.add({"z": torch.zeros(4)})
    with pytest.raises(ShardError, match="share one schema"):
        write_manifest(tmp_path)


# ---------------------------------------------------------------------------- streaming


COUNTS = {"w0": 23, "w1": 17, "w2": 8}  # 48 records, shards of 5 with short last shards


def test_every_record_exactly_once_per_epoch_for_one_and_two_ranks(tmp_path):
    n = small_dataset(tmp_path, COUNTS, shard_size=5)
    single = ShardedDataset(tmp_path, seed=3, window_shards=3)
    assert len(single) == n
    for epoch in (0, 1):
        assert sorted(epoch_ids(single, epoch)) == list(range(n))
    parts = [
        ShardedDataset(tmp_path, seed=3, rank=r, world_size=2, window_shards=3) for r in (0, 1)
    ]
    assert len(parts[0]) == len(parts[1]) == n // 2
    for epoch in (0, 1):
        ids = epoch_ids(parts[0], epoch) + epoch_ids(parts[1], epoch)
        assert sorted(ids) == list(range(n))
    # Records carry their tensors and metadata: `value` and `tile` both equal the record id.
    record = single.record(0, 7)
    assert record["tile"] == record[INDEX_KEY] == int(record["value"][0])


def test_uneven_split_drops_or_pads_the_remainder(tmp_path):
    n = small_dataset(tmp_path, {"a": 11}, shard_size=4)  # 11 records over 3 ranks
    dropped = [ShardedDataset(tmp_path, rank=r, world_size=3) for r in range(3)]
    ids = [i for d in dropped for i in epoch_ids(d, 0)]
    assert all(len(d) == 3 for d in dropped) and len(ids) == len(set(ids)) == 9
    padded = [ShardedDataset(tmp_path, rank=r, world_size=3, drop_last=False) for r in range(3)]
    ids = [i for d in padded for i in epoch_ids(d, 0)]
    assert all(len(d) == 4 for d in padded) and set(ids) == set(range(n)) and len(ids) == 12


def test_orders_differ_between_epochs_and_are_reproducible(tmp_path):
    n = small_dataset(tmp_path, COUNTS, shard_size=5)
    a = ShardedDataset(tmp_path, seed=1)
    b = ShardedDataset(tmp_path, seed=1)
    assert epoch_ids(a, 0) == epoch_ids(b, 0)
    assert epoch_ids(a, 0) != epoch_ids(a, 1)
    assert epoch_ids(a, 0) != epoch_ids(ShardedDataset(tmp_path, seed=2), 0)
    assert epoch_ids(ShardedDataset(tmp_path, shuffle=False), 0) == list(range(n))
    # Shuffled within windows: records are mixed across shards, not only shards reordered.
    order = epoch_ids(a, 0)
    shard_of = [i // 5 for i in order[:10]]  # w0 shards hold ids 0-4, 5-9, ...
    assert len(set(shard_of)) > 2


def test_resume_mid_epoch_gives_the_remaining_records(tmp_path):
    small_dataset(tmp_path, COUNTS, shard_size=5)
    dataset = ShardedDataset(tmp_path, seed=5, rank=1, world_size=2)
    full = epoch_ids(dataset, 2)
    fresh = ShardedDataset(tmp_path, seed=5, rank=1, world_size=2)  # a restarted process
    assert epoch_ids(fresh, 2, start=9) == full[9:]
    assert [fresh.record(2, p)[INDEX_KEY] for p in (13, 3, 20)] == [full[13], full[3], full[20]]
    with pytest.raises(IndexError):
        fresh.record(2, len(fresh))


def test_dataloader_workers_split_the_epoch(tmp_path):
    small_dataset(tmp_path, COUNTS, shard_size=5)
    dataset = ShardedDataset(tmp_path, seed=4)
    dataset.set_epoch(1, start=6)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    ids = [r[INDEX_KEY] for r in loader]
    assert ids == epoch_ids(ShardedDataset(tmp_path, seed=4), 1)[6:]  # same order, no repeats
    dataset.set_epoch(0)
    batched = torch.utils.data.DataLoader(
        dataset, batch_size=4, num_workers=2, collate_fn=stack_records
    )
    ids = [i for batch in batched for i in batch[INDEX_KEY]]
    assert sorted(ids) == list(range(len(dataset)))


def test_state_does_not_grow_with_the_number_of_records(tmp_path):
    few, many = tmp_path / "few", tmp_path / "many"
    small_dataset(few, {"a": 40}, shard_size=1)  # 40 shards x 1 record
    small_dataset(many, {"a": 40 * 25}, shard_size=25)  # 40 shards x 25 records
    sizes = []
    for root in (few, many):
        dataset = ShardedDataset(root, seed=0)
        dataset.record(0, 0)
        arrays = [v for v in vars(dataset).values() if isinstance(v, (np.ndarray, list))]
        assert max(len(a) for a in arrays) <= 41  # O(shards), never O(records)
        sizes.append(len(pickle.dumps(dataset)))
    assert sizes[1] <= sizes[0] * 1.05


def test_missing_fields_raise_clear_errors(tmp_path):
    small_dataset(tmp_path, {"a": 3}, shard_size=2)
    with pytest.raises(ShardError, match="latent_moments"):
        shard_batches(ShardedDataset(tmp_path), 2)
    with pytest.raises(ShardError, match="not in"):
        ShardedDataset(tmp_path, fields=["nope"])
    with pytest.raises(ShardError, match="no shards"):
        ShardedDataset(tmp_path / "empty")


# ---------------------------------------------------------------------------- two processes

RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    from mupad.data.streaming import INDEX_KEY, ShardedDataset

    torch.set_num_threads(1)
    root, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dataset = ShardedDataset(root, seed=11, rank=rank, world_size=world, window_shards=2)
    epochs = {}
    for epoch in range(2):
        mine = [r[INDEX_KEY] for r in dataset.iter_epoch(epoch)]
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        epochs[epoch] = gathered
    if rank == 0:
        with open(out, "w") as handle:
            json.dump(epochs, handle)
    dist.barrier()
    dist.destroy_process_group()
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_ranks_see_every_tile_exactly_once(tmp_path):
    data = tmp_path / "data"
    n = small_dataset(data, COUNTS, shard_size=5)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / "gathered.json"
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": "2",
        "OMP_NUM_THREADS": "1",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(data), str(out)],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    gathered = json.loads(out.read_text())
    orders = []
    for epoch in ("0", "1"):
        rank0, rank1 = gathered[epoch]
        assert len(rank0) == len(rank1) == n // 2
        assert not set(rank0) & set(rank1)
        assert Counter(rank0 + rank1) == Counter(range(n))  # every tile exactly once
        orders.append(rank0 + rank1)
    assert orders[0] != orders[1]


# ---------------------------------------------------------------------------- training

MODEL = ModelConfig(
    in_channels=4,
    patch_size=2,
    hidden_size=32,
    depth=2,
    num_heads=2,
    text_dim=D,
    rna_dim=16,
    rna_pathways=P,
    sample_size=4,
)


def train_config(**overrides) -> TrainConfig:
    fields = {
        "steps": 6,
        "batch_size": 4,
        "learning_rate": 1e-3,
        "checkpoint_every": 3,
        "log_every": 1,
        "precision": Precision.FP32,
        "ema_decay": 0.99,
        "keep_checkpoints": 5,
    }
    fields.update(overrides)
    return TrainConfig(**fields)


def fresh_model() -> SiT:
    torch.manual_seed(0)
    return SiT(MODEL)


def test_shard_batches_draw_latents_from_cached_moments(tmp_path):
    write_dataset(tmp_path, {"r0": 10}, shard_size=4)
    dataset = ShardedDataset(tmp_path, seed=0)
    mean_fn = shard_batches(dataset, 4, sample_latents=False, latent_scale=0.5, latent_shift=0.1)
    batch = mean_fn(1, step_generator(0, 1))
    records = [dataset.record(0, p) for p in range(4, 8)]
    means = torch.stack([r["latent_moments"][:4] for r in records])
    assert torch.allclose(batch.x0, (means - 0.1) * 0.5)
    sampled = shard_batches(dataset, 4)
    a, b = sampled(1, step_generator(0, 1)), sampled(1, step_generator(0, 1))
    assert torch.equal(a.x0, b.x0) and not torch.allclose(a.x0, means)
    # Conditions: text with its padding mask, RNA pathway scores as (B, P, 1) tokens.
    text = batch.cond.streams[next(m for m in batch.cond.streams if m.value == "text")]
    assert text.tokens.shape == (4, T, D)
    assert torch.equal(text.mask, torch.stack([r["text_mask"] for r in records]))
    rna = batch.cond.streams[next(m for m in batch.cond.streams if m.value == "rna")]
    assert rna.tokens.shape == (4, P, 1)
    batch.cond.validate(4)
    # Steps past the end of the epoch continue into the next epoch's order.
    wrapped = shard_batches(dataset, 4, sample_latents=False)(2, step_generator(0, 2))
    expected = [
        dataset.record(0, 8),
        dataset.record(0, 9),
        dataset.record(1, 0),
        dataset.record(1, 1),
    ]
    assert torch.equal(wrapped.x0, torch.stack([r["latent_moments"][:4] for r in expected]))
    pixels = shard_batches(dataset, 2, latent_key=None)(0, step_generator(0, 0))
    assert pixels.x0.shape == (2, 3, 8, 8) and pixels.x0.abs().max() <= 1


def test_trainer_on_shards_resumes_exactly(tmp_path):
    data = tmp_path / "data"
    write_dataset(data, {"r0": 9, "r1": 5}, shard_size=4)  # 14 records: 6 steps x 4 wrap epochs

    def batches():
        return shard_batches(ShardedDataset(data, seed=7), 4)

    straight = tmp_path / "straight"
    Trainer(fresh_model(), train_config(), straight, batches(), progress=False).train()

    interrupted = tmp_path / "interrupted"
    first = batches()

    def dies_at_step_4(step, generator):
        if step == 4:
            raise KeyboardInterrupt
        return first(step, generator)

    with pytest.raises(KeyboardInterrupt):
        Trainer(fresh_model(), train_config(), interrupted, dies_at_step_4, progress=False).train()
    assert [s for s, _ in list_checkpoints(interrupted)] == [3]
    result = Trainer(fresh_model(), train_config(), interrupted, batches(), progress=False).train()
    assert result.resumed_from == 3
    a, b = latest_checkpoint(straight), latest_checkpoint(interrupted)
    for name in ("model.safetensors", "ema/model.safetensors", "optimizer.safetensors"):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta), name


def test_train_on_shards_reads_the_model_widths_from_the_schema(tmp_path):
    from mupad.applications.train_shards import train_on_shards

    data = tmp_path / "data"
    write_dataset(data, {"r0": 6}, shard_size=4)
    run = train_on_shards(
        data,
        tmp_path / "run",
        train_config=train_config(steps=2, checkpoint_every=2),
        preset="tiny",
        latents="vae-folder",
        text_encoder="minilm",
        progress=False,
    )
    config = run.model_config
    assert (config.in_channels, config.sample_size, config.text_dim) == (4, 4, D)
    assert config.rna_pathways == P and config.image_dim == 0
    state = json.loads((run.result.checkpoint / "train_state.json").read_text())
    assert state["extra"]["latents"] == "vae-folder" and state["extra"]["records_per_epoch"] == 6
    pixels = train_on_shards(
        data,
        tmp_path / "pixels",
        train_config=train_config(steps=1, checkpoint_every=1),
        preset="tiny",
        use_latents=False,
        progress=False,
    )
    assert (pixels.model_config.in_channels, pixels.model_config.sample_size) == (3, 8)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_shards_and_manifest_honour_the_umask(tmp_path, umask):
    """Issue 15: shards and manifest.parquet were 0600 whatever the umask (mkstemp)."""
    from mupad.data.shards import ShardWriter, write_manifest

    previous = os.umask(umask)
    try:
        with ShardWriter(tmp_path, prefix="tiles", shard_size=2) as writer:
            for i in range(3):
                writer.add({"image": torch.zeros(3, 4, 4, dtype=torch.uint8), "label": i})
        write_manifest(tmp_path)
    finally:
        os.umask(previous)
    written = sorted(p for p in tmp_path.iterdir() if p.is_file())
    assert {p.suffix for p in written} >= {".safetensors", ".parquet", ".json"}
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in written}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
