"""GGUF sources without a real model: header reading, and every bad GGUF input as one line.

The files are written here with the ``gguf`` package's own writer (a few float tensors), so the
header reader is checked against an independent writer, and each broken variant differs from a
good file in exactly one way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest

from blasphemer import gguf_source
from blasphemer.app import preflight
from blasphemer.errors import ModelLoadError
from blasphemer.loading import load_model
from test_cli import _assert_one_line_error, blasphemer  # noqa: F401 (a fixture)


def write_gguf(
    path: Path,
    architecture: str = "llama",
    *,
    fields: dict[str, int] | None = None,
    tensors: dict[str, np.ndarray] | None = None,
) -> Path:
    writer = gguf.GGUFWriter(str(path), architecture)
    for key, value in (fields or {}).items():
        writer.add_uint32(key, value)
    writer.add_string("tokenizer.chat_template", "{{ messages }}")
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    default = {
        "token_embd.weight": np.arange(24, dtype=np.float32).reshape(6, 4),
        "output_norm.weight": np.ones(4, dtype=np.float16),
    }
    for name, tensor in (tensors if tensors is not None else default).items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_header_reader_agrees_with_the_writer(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", fields={"llama.block_count": 3})
    header = gguf_source.read_header(path)
    assert header.architecture == "llama"
    assert header.metadata["llama.block_count"] == 3
    assert header.metadata["tokenizer.ggml.tokens"] == 3  # arrays are summarised by length
    assert header.has_chat_template
    assert {t.name: t.shape for t in header.tensors} == {
        "token_embd.weight": (4, 6),  # GGUF lists dimensions fastest first
        "output_norm.weight": (4,),
    }
    assert header.tensor_types == ["F16", "F32"]
    assert header.n_parameters == 28
    # The last tensor ends exactly where gguf-py's own reader says the data ends.
    reader = gguf.GGUFReader(str(path))
    last = max(reader.tensors, key=lambda t: t.data_offset)
    ours = next(t for t in header.tensors if t.name == last.name)
    assert header.data_start + ours.offset == last.data_offset
    assert ours.n_bytes == last.n_bytes
    gguf_source.check_loadable(header)  # a well-formed llama GGUF passes


def _truncated(tmp_path: Path, keep: int | None) -> Path:
    """A good file cut after ``keep`` bytes (None: one byte into the last tensor's data)."""
    good = write_gguf(tmp_path / "good.gguf")
    if keep is None:
        keep = max(t.data_offset for t in gguf.GGUFReader(str(good)).tensors) + 1
    path = tmp_path / "cut.gguf"
    path.write_bytes(good.read_bytes()[:keep])
    return path


@pytest.mark.parametrize(
    ("make", "needles"),
    [
        (lambda d: _text(d / "notes.gguf"), ["not a valid GGUF", "magic"]),
        (lambda d: _truncated(d, None), ["truncated"]),
        (lambda d: _truncated(d, 60), ["not a valid GGUF", "ends early"]),
        (lambda d: write_gguf(d / "m.gguf", "mamba"), ["mamba", "not supported", "qwen2"]),
        (lambda d: write_gguf(d / "m.gguf", fields={"split.count": 3}), ["split", "merge"]),
        (lambda d: _unknown_type(d / "m.gguf"), ["Q8_1", "cannot be dequantised"]),
    ],
    ids=["text-file", "truncated-data", "truncated-header", "architecture", "split", "type"],
)
def test_bad_gguf_is_one_line_before_any_loading(
    tmp_path: Path, make: Callable[[Path], Path], needles: list[str]
) -> None:
    path = make(tmp_path)
    before = sha256(path)
    with pytest.raises(ModelLoadError) as caught:
        load_model(str(path))
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    for needle in needles:
        assert needle.lower() in message.lower(), (needle, message)
    assert sha256(path) == before


def _text(path: Path) -> Path:
    path.write_text("this is a text file, not a model\n" * 10)
    return path


def _unknown_type(path: Path) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    raw = np.zeros(40, dtype=np.uint8)  # one Q8_1 block: 32 weights in 40 bytes
    writer.add_tensor("blk.0.w", raw, raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("command", ["run", "inspect", "chat"])
def test_cli_bad_gguf_inputs_are_one_line(
    blasphemer: Callable[..., SimpleNamespace],  # noqa: F811 (the imported fixture)
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    command: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    text = _text(tmp_path / "fake.gguf")
    _assert_one_line_error(blasphemer(command, text), "not a valid GGUF")
    good = write_gguf(tmp_path / "good.gguf")
    _assert_one_line_error(
        blasphemer(command, tmp_path, "--gguf-file", "missing.gguf"),
        "missing.gguf",
        "good.gguf",  # the files that are there
    )
    _assert_one_line_error(
        blasphemer(command, good, "--gguf-file", "good.gguf"), "already a GGUF file"
    )
    _assert_one_line_error(blasphemer(command, tmp_path / "absent.gguf"), "does not exist")


def test_evaluate_checks_a_gguf_base(
    blasphemer: Callable[..., SimpleNamespace],  # noqa: F811 (the imported fixture)
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    base = write_gguf(tmp_path / "base.gguf", "mamba")
    result = blasphemer("evaluate", tmp_path / "model", "--base", base)
    _assert_one_line_error(result, "mamba", "not supported")
    result = blasphemer("evaluate", tmp_path / "m", "--base", tmp_path, "--base-gguf-file", "x")
    _assert_one_line_error(result, "--gguf-file x is not in")


def test_a_folder_with_gguf_file_names_the_file(tmp_path: Path) -> None:
    write_gguf(tmp_path / "model-q4.gguf")
    source = gguf_source.resolve_source(str(tmp_path), "model-q4.gguf")
    assert source is not None and source.local_path == tmp_path / "model-q4.gguf"
    assert gguf_source.resolve_source(str(tmp_path), None) is None
    assert gguf_source.resolve_source("owner/repo", "model.gguf") == gguf_source.GgufSource(
        "owner/repo", "model.gguf"
    )
    with pytest.raises(ModelLoadError, match="not a path"):
        gguf_source.resolve_source(str(tmp_path), "../model-q4.gguf")


def test_preflight_estimates_memory_from_the_header(tmp_path: Path) -> None:
    path = write_gguf(
        tmp_path / "m.gguf", tensors={"token_embd.weight": np.zeros((1000, 256), np.float32)}
    )
    header = preflight.check_gguf(str(path), None)
    assert header is not None
    in_float32 = preflight.estimate_gguf(header, ["float32"], "cpu", "none")
    in_bfloat16 = preflight.estimate_gguf(header, ["bfloat16", "float32"], "cpu", "none")
    automatic = preflight.estimate_gguf(header, ["auto"], "cpu", "none")
    assert in_float32.weights_on_disk == 256_000 * 4
    assert in_bfloat16.weights_on_disk == 256_000 * 2
    assert automatic.weights_on_disk == in_float32.weights_on_disk  # GGUF loads as float32
    assert in_float32.weights_in_memory > in_float32.weights_on_disk


def test_the_gguf_loaders_bar_obeys_the_progress_bar_switch(
    capfd: pytest.CaptureFixture[str],
) -> None:
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    from blasphemer.loading import gguf_bar_follows_the_switch

    def bar() -> str:
        for _ in gguf_utils.tqdm(range(3), desc="dequantising"):
            pass
        return capfd.readouterr().err

    was_enabled = hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.disable_progress_bar()
        with gguf_bar_follows_the_switch():
            assert bar() == ""
        assert "dequantising" in bar()  # the loader's own tqdm is back afterwards
        hf_logging.enable_progress_bar()
        with gguf_bar_follows_the_switch():
            assert "dequantising" in bar()  # enabled: left alone
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()
