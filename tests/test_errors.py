"""One error path: every project exception is a MupadError; the command line prints one red
line and exits 2 (130 when interrupted); --debug / MUPAD_DEBUG=1 keep the traceback; OS
errors on outputs name the path and leave nothing half-written under the final name."""

import errno
import importlib
import inspect
import os
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import mupad
from mupad.cli import app
from mupad.config import model_preset
from mupad.errors import MupadError
from mupad.fileio import OutputError, atomic_directory, atomic_file, atomic_write_text
from mupad.models import CheckpointError, SiT

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()

# Exceptions that are control flow inside one module, never shown to a user.
INTERNAL_SIGNALS = {
    # raised by the request-size middleware's `receive` and caught by the same middleware;
    # as a MupadError the route's "unusable input" handler would turn a 413 into a 400
    "mupad.serve.app._BodyTooLarge",
}


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_every_exception_class_in_mupad_derives_from_mupad_error():
    defined = {}
    for info in pkgutil.walk_packages(mupad.__path__, "mupad."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, Exception)
                and value.__module__ == module.__name__
            ):
                defined[f"{module.__name__}.{name}"] = value
    assert len(defined) > 50  # the walk found the project's exceptions
    strays = sorted(
        name
        for name, cls in defined.items()
        if not issubclass(cls, MupadError) and name not in INTERNAL_SIGNALS
    )
    assert strays == []


def test_builtin_bases_are_kept_for_callers_that_catch_them():
    from mupad.config import ConfigError
    from mupad.data.wsi.errors import SlideBackendMissingError
    from mupad.omics.spatial.errors import MissingSpatialFileError
    from mupad.training.checkpoint import ResumeError

    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, MupadError)
    assert issubclass(ResumeError, RuntimeError)
    assert issubclass(SlideBackendMissingError, ImportError)
    assert issubclass(MissingSpatialFileError, FileNotFoundError)


# ------------------------------------------------------------ the command line's one line


def test_a_library_error_is_one_red_line_and_exit_code_2(tmp_path):
    missing = tmp_path / "nowhere"
    result = runner.invoke(app, ["sample", "--checkpoint", str(missing), "--prompt", "x"])
    assert result.exit_code == 2
    assert lines(result.output) == [f"error: no model folder at {missing}"]
    assert "Traceback" not in result.output


@pytest.mark.parametrize("how", ["option", "environment"])
def test_debug_shows_the_traceback_instead(tmp_path, how):
    args = ["sample", "--checkpoint", str(tmp_path / "nowhere"), "--prompt", "x"]
    if how == "option":
        result = runner.invoke(app, ["--debug", *args])
    else:
        result = runner.invoke(app, args, env={"MUPAD_DEBUG": "1"})
    assert isinstance(result.exception, CheckpointError)  # not turned into an exit code
    assert result.exit_code == 1


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train"], "error: Missing option '--out'. (see 'mupad train --help')"),
        (["trian"], "error: No such command 'trian'."),
        (["--nope"], "error: No such option: --nope"),
        (["omics", "score", "x.csv", "--bogus"], "error: No such option: --bogus"),
        (["sample", "--checkpoint", "c", "--prompt", "x", "--sampler", "ddim"], "'ddim'"),
    ],
)
def test_usage_errors_are_one_line_too(args, expected):
    result = runner.invoke(app, args, prog_name="mupad")
    assert result.exit_code == 2
    assert len(lines(result.output)) == 1 and expected in result.output, result.output


def test_an_unwritable_output_path_is_one_line_naming_it(tmp_path):
    import numpy as np
    import pandas as pd

    from mupad.omics.genesets import default_gene_sets, write_gmt

    sets = default_gene_sets()
    gmt = tmp_path / "sets.gmt"
    write_gmt(sets.subset([n for n, s in sets.sizes.items() if s >= 40][:5]), gmt)
    genes = sorted(sets.genes)[:1500]
    values = np.random.default_rng(0).negative_binomial(5, 0.1, size=(3, len(genes)))
    expression = tmp_path / "expr.csv"
    pd.DataFrame(values, index=["a", "b", "c"], columns=genes).to_csv(expression)
    blocker = tmp_path / "results"
    blocker.write_text("a file where the output folder should be")
    output = blocker / "scores.csv"
    result = runner.invoke(
        app, ["omics", "score", str(expression), "--gene-sets", str(gmt), "--output", str(output)]
    )
    assert result.exit_code == 2, result.output
    (line,) = [line for line in lines(result.output) if line.startswith("error:")]
    assert f"cannot write {output}" in line and str(blocker) in line
    assert "a file stands where a folder is expected" in line
    assert blocker.read_text() == "a file where the output folder should be"


# ------------------------------------------------------------ generate: disk full, Ctrl-C


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> Path:
    config = model_preset("tiny", in_channels=3, sample_size=16, text_dim=384)
    torch.manual_seed(0)
    model = SiT(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.save_pretrained(tmp_path_factory.mktemp("model") / "sit")


def generate(model: Path, out: Path):
    return runner.invoke(
        app,
        [
            "generate", "--checkpoint", str(model), "--out", str(out), "--text", "tumor",
            "--num-images", "3", "--batch-size", "1", "--steps", "2", "--device", "cpu",
            "--no-progress",
        ],
    )  # fmt: skip


def test_a_full_disk_while_generating_is_one_line_and_leaves_no_partial_png(
    text_model, tmp_path, monkeypatch
):
    def disk_full(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write(2) reports it

    monkeypatch.setattr(Image.Image, "save", disk_full)
    out = tmp_path / "out"
    result = generate(text_model, out)
    assert result.exit_code == 2, result.output
    (line,) = [line for line in lines(result.output) if line.startswith("error:")]
    assert f"cannot write {out / '00001_0.png'}" in line and "the disk is full" in line
    assert not out.exists() or list(out.iterdir()) == []  # no PNG, no temporary file


def test_ctrl_c_while_generating_exits_130_and_the_same_command_continues(
    text_model, tmp_path, monkeypatch
):
    import mupad.applications.batch_generate as batch_generate

    real_save = batch_generate.save_png_atomic
    calls = []

    def interrupted_on_the_second_image(image, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_save(image, path)

    monkeypatch.setattr(batch_generate, "save_png_atomic", interrupted_on_the_second_image)
    out = tmp_path / "out"
    result = generate(text_model, out)
    assert result.exit_code == 130, result.output
    (line,) = lines(result.output)[-1:]
    assert line.startswith("interrupted:") and "run the same command again" in line
    assert sorted(p.name for p in out.iterdir()) == ["00001_0.json", "00001_0.png"]

    monkeypatch.setattr(batch_generate, "save_png_atomic", real_save)
    again = generate(text_model, out)
    assert again.exit_code == 0, again.output
    assert "1 already there" in " ".join(again.output.split())
    assert len(list(out.glob("*.png"))) == 3


# ------------------------------------------------------------ fileio


def test_atomic_file_turns_a_full_disk_into_an_output_error_and_removes_the_temporary(tmp_path):
    final = tmp_path / "out.bin"
    with pytest.raises(OutputError, match=f"cannot write {final}: .*disk is full"):
        with atomic_file(final) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []


def test_atomic_writers_name_the_output_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="a file stands where a folder is expected"):
        atomic_write_text(tmp_path / "file" / "out.txt", "hello")
    with pytest.raises(OutputError, match=f"cannot write {tmp_path / 'file' / 'dir'}"):
        with atomic_directory(tmp_path / "file" / "dir"):
            pass


def test_an_input_error_inside_an_atomic_write_is_not_blamed_on_the_output(tmp_path):
    missing_input = tmp_path / "input.png"
    with pytest.raises(FileNotFoundError) as raised:
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "part").write_text("partial")
            missing_input.read_bytes()
    assert not isinstance(raised.value, OutputError)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the partial folder is gone


def test_atomic_file_keeps_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "a.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


# ------------------------------------------------------------ optional extras


def test_serve_without_its_extra_is_one_line_naming_the_extra(tmp_path):
    script = textwrap.dedent(
        """
        import importlib.abc, sys

        class NotInstalled(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in {"fastapi", "starlette", "uvicorn", "python_multipart"}:
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        sys.meta_path.insert(0, NotInstalled())
        from mupad.cli import app
        app(["serve", "--checkpoint", sys.argv[1]], prog_name="mupad")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "model")],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert lines(result.stderr) == [
        "error: mupad serve needs the package 'fastapi' of the 'serve' extra, which is not "
        'installed: pip install "mupad[serve]"'
    ]


def test_a_safetensors_write_failure_is_an_output_error_and_a_read_failure_is_not(tmp_path):
    from safetensors import SafetensorError

    final = tmp_path / "checkpoint"
    with pytest.raises(OutputError, match=f"cannot write {final}: Error while serializing"):
        with atomic_directory(final):
            raise SafetensorError("Error while serializing: I/O error: No space left on device")
    with pytest.raises(SafetensorError):
        with atomic_directory(final):
            raise SafetensorError("Error while deserializing header: HeaderTooLarge")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------ real file systems (root only)


@pytest.fixture
def mounted(tmp_path):
    """mounted(options) -> a fresh tmpfs folder mounted with `options` ("ro", "size=64k");
    skips where mounting is not allowed (not root, or no mount permission)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    points = []

    def mount(options: str) -> Path:
        point = tmp_path / f"fs{len(points)}"
        point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        points.append(point)
        return point

    yield mount
    for point in points:
        subprocess.run(["umount", str(point)], check=False)


def test_prepare_on_a_full_disk_is_one_line_naming_the_shard(mounted):
    from mupad.data.tiles import bundled_kather_dir

    out = mounted("size=64k") / "shards"
    result = runner.invoke(app, ["prepare", str(bundled_kather_dir()), str(out), "--no-progress"])
    assert result.exit_code == 2, result.output
    (line,) = [line for line in lines(result.output) if line.startswith("error:")]
    assert f"cannot write {out}" in line and "No space left on device" in line
    assert "Traceback" not in result.output
    assert not any(p.suffix == ".safetensors" for p in out.rglob("*"))  # no partial shard


def test_translating_onto_a_read_only_disk_is_one_line_naming_the_output(mounted, tmp_path):
    import numpy as np
    import tifffile

    slide = tmp_path / "slide.tif"
    pixels = np.random.default_rng(0).integers(0, 255, (300, 340, 3), dtype=np.uint8)
    tifffile.imwrite(slide, pixels, tile=(64, 64), resolution=(40000, 40000), resolutionunit=3)
    out = mounted("ro,size=64k") / "slide.ome.tif"
    result = runner.invoke(
        app,
        [
            "wsi", "translate", str(slide), "--translator", "identity", "--out", str(out),
            "--mpp", "0.5", "--tile-size", "64", "--overlap", "16", "--all-tiles",
            "--no-progress",
        ],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert lines(result.output) == [
        f"error: cannot write {out}: Read-only file system (the file system is read-only; "
        "choose another location)"
    ]
