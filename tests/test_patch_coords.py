"""TRIDENT / CLAM patch layout: coords.h5 and features/<encoder>/<slide>.h5 round trips."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from mupad.data.patch_coords import (
    PatchCoords,
    PatchFormatError,
    coords_file_for,
    features_path,
    read_patch_coords,
    read_patch_features,
    write_patch_coords,
    write_patch_features,
)


def _patches() -> PatchCoords:
    coords = np.array([[0, 0], [512, 0], [512, 1024]])
    return PatchCoords(coords, patch_size=256, patch_size_level0=512, slide_id="s1")


def test_coords_round_trip_with_both_tools_attributes(tmp_path):
    path = write_patch_coords(tmp_path / "patches" / "s1_patches.h5", _patches())
    back = read_patch_coords(path)
    assert np.array_equal(back.coords, _patches().coords) and back.coords.dtype == np.int64
    assert (back.patch_size, back.size_level0(), back.patch_level, back.slide_id) == (
        256, 512, 0, "s1"
    )
    with h5py.File(path) as handle:  # what TRIDENT and CLAM read
        attrs = handle["coords"].attrs
        assert attrs["patch_size_level0"] == 512 and attrs["patch_level"] == 0
        assert float(attrs["patch_size"]) * attrs["downsample"][0] == 512


def test_clam_file_with_level_and_downsample(tmp_path):
    path = tmp_path / "slide.h5"
    with h5py.File(path, "w") as handle:  # as CLAM writes it: size at patch_level
        dataset = handle.create_dataset("coords", data=np.array([[0, 0], [1024, 0]]))
        dataset.attrs["patch_size"] = 256
        dataset.attrs["patch_level"] = 1
        dataset.attrs["downsample"] = np.array([4.0, 4.0])
    back = read_patch_coords(path)
    assert back.size_level0() == 1024 and back.patch_level == 1 and back.slide_id == "slide"
    with h5py.File(path, "a") as handle:
        del handle["coords"].attrs["downsample"]
    bare = read_patch_coords(path)
    assert bare.size_level0((1.0, 2.0)) == 512  # from the slide's own levels
    with pytest.raises(PatchFormatError, match="level 1"):
        bare.size_level0()


def test_features_round_trip(tmp_path):
    features = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    target = features_path(tmp_path / "features", "uni", "s1")
    path = write_patch_features(target, features, _patches())
    assert path == tmp_path / "features" / "uni" / "s1.h5"
    back = read_patch_features(path)
    assert np.array_equal(back.features, features)
    assert np.array_equal(back.patches.coords, _patches().coords)
    assert read_patch_coords(path).size_level0() == 512
    with pytest.raises(PatchFormatError, match="one row per patch"):
        write_patch_features(path, features[:2], _patches())


def test_finding_and_bad_files(tmp_path):
    write_patch_coords(tmp_path / "patches" / "s1_patches.h5", _patches())
    assert coords_file_for(tmp_path, "s1").name == "s1_patches.h5"
    with pytest.raises(PatchFormatError, match="no patches file for slide 's2'"):
        coords_file_for(tmp_path, "s2")
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    with pytest.raises(PatchFormatError, match="not a readable HDF5"):
        read_patch_coords(tmp_path / "bad.h5")
    with h5py.File(tmp_path / "empty.h5", "w") as handle:
        handle.create_dataset("other", data=np.zeros(2))
    with pytest.raises(PatchFormatError, match="no `coords` dataset"):
        read_patch_coords(tmp_path / "empty.h5")
    with pytest.raises(PatchFormatError, match=r"\(N, 2\)"):
        PatchCoords(np.zeros((3, 3)), patch_size=4)
