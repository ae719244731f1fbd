"""GGUF export: the demo model round-trips through transformers' GGUF reader, bad input fails
cleanly, and a model loaded from a GGUF keeps the source's untouched tensors byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from blasphemer.errors import ExportError
from blasphemer.gguf_export import GgufExportResult, export_gguf
from blasphemer.gguf_tensors import deinterleave_rotary, interleave_rotary, rewrite_type, unchanged

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "src" / "blasphemer" / "data" / "demo-model"
HARMLESS = REPO.parent / "shared" / "datasets" / "refusal_direction" / "harmless_test.json"
Q = gguf.GGMLQuantizationType


def _prompts(n: int) -> list[str]:
    if not HARMLESS.is_file():
        pytest.skip(f"{HARMLESS} is not available")
    rows = json.loads(HARMLESS.read_text(encoding="utf-8"))
    return [row["instruction"] for row in rows[:n]]


def _render(tokenizer: Any, prompts: list[str]) -> list[str]:
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in prompts
    ]


@torch.no_grad()
def _first_token_kl(reference: Any, exported: Any, tokenizer: Any, texts: list[str]) -> list[float]:
    """KL(reference || exported) of the next-token distribution after each prompt."""
    kls = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids
        p = torch.log_softmax(reference(ids).logits[0, -1].double(), -1)
        q = torch.log_softmax(exported(ids).logits[0, -1].double(), -1)
        kls.append(float((p.exp() * (p - q)).sum()))
    return kls


def _load_gguf(path: Path) -> tuple[Any, Any]:
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


def _fetch(key: str) -> Path:
    """A pinned real model from bench/models.py (a fetch failure fails the test, no skip)."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import models  # type: ignore[import-not-found]

        return Path(models.fetch(key, log=False))
    finally:
        sys.path.remove(str(REPO / "bench"))


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# --- pure pieces ------------------------------------------------------------------------------


def test_rotary_interleave_is_a_real_permutation_and_inverts() -> None:
    weight = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)
    moved = interleave_rotary(weight, n_head=2)
    assert not np.array_equal(moved, weight)
    # Head 0 rows [0..7] become 0,4,1,5,2,6,3,7: the two rotary halves interleaved.
    assert moved[:8, 0].tolist() == [0, 12, 3, 15, 6, 18, 9, 21]
    assert np.array_equal(deinterleave_rotary(moved, n_head=2), weight)


def test_rewrite_type_keeps_requantizable_source_types_and_falls_back_otherwise() -> None:
    assert rewrite_type(Q.Q4_1, (8, 64), Q.Q8_0) == Q.Q4_1
    assert rewrite_type(Q.Q4_K, (8, 256), Q.Q8_0) == Q.Q8_0
    assert rewrite_type(Q.Q6_K, (8, 48), Q.Q8_0) == Q.F16  # 48 is not a multiple of 32


def test_unchanged_tolerates_rounding_but_not_edits() -> None:
    rng = np.random.default_rng(0)
    values = rng.standard_normal((16, 32)).astype(np.float32)
    assert unchanged(torch.from_numpy(values.copy()), values, offset=False)
    assert unchanged(torch.from_numpy(values).to(torch.bfloat16), values, offset=False)
    edited = values.copy()
    edited[3, 5] += 1e-3
    assert not unchanged(torch.from_numpy(edited), values, offset=False)


# --- the demo model through transformers' GGUF reader -------------------------------------------


@pytest.fixture(scope="module")
def demo_reference() -> tuple[Any, Any, list[str]]:
    model = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    return model, tokenizer, _render(tokenizer, _prompts(100))


@pytest.fixture(scope="module")
def demo_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, GgufExportResult]:
    folder = tmp_path_factory.mktemp("gguf")
    return {t: export_gguf(DEMO, folder / f"demo-{t}.gguf", type=t) for t in ("f16", "q8_0")}


@pytest.mark.parametrize(("kind", "limit"), [("f16", 1e-3), ("q8_0", 1e-2)])
def test_demo_export_matches_the_safetensors_model(
    demo_reference: tuple[Any, Any, list[str]],
    demo_exports: dict[str, GgufExportResult],
    kind: str,
    limit: float,
) -> None:
    reference, tokenizer, texts = demo_reference
    result = demo_exports[kind]
    exported, exported_tokenizer = _load_gguf(result.path)

    kls = _first_token_kl(reference, exported, tokenizer, texts)
    assert len(kls) == 100
    assert float(np.mean(kls)) <= limit, f"mean KL {np.mean(kls):.2e} over {limit}"

    for text in texts:
        assert exported_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert exported_tokenizer.chat_template == tokenizer.chat_template
    assert exported_tokenizer.eos_token == tokenizer.eos_token == "<|end|>"
    assert exported_tokenizer.pad_token == tokenizer.pad_token == "<|pad|>"


def test_demo_export_result_describes_the_file(demo_exports: dict[str, GgufExportResult]) -> None:
    for kind, expected_matrix in (("f16", "F16"), ("q8_0", "Q8_0")):
        result = demo_exports[kind]
        digest = hashlib.sha256(result.path.read_bytes()).hexdigest()
        assert result.sha256 == digest
        reader = gguf.GGUFReader(result.path)
        written = {t.name: t.tensor_type.name for t in reader.tensors}
        assert result.n_tensors == len(written) == len(result.tensors)
        assert {n.name: n.type for n in result.tensors} == written
        assert written["blk.0.attn_q.weight"] == expected_matrix
        assert written["blk.0.attn_norm.weight"] == "F32"
        assert "output.weight" not in written  # tied embeddings stay tied
        assert reader.fields["general.architecture"].contents() == "llama"
        assert reader.fields["llama.block_count"].contents() == 6
        assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"


# --- bad input ----------------------------------------------------------------------------------


def _assert_one_line_failure(folder: Path, call: Any, *words: str) -> ExportError:
    before = _files(folder) if folder.is_dir() else set()
    with pytest.raises(ExportError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message
    for word in words:
        assert word in message
    if folder.is_dir():
        assert _files(folder) == before, "a failed export left files behind"
    return info.value


def test_missing_output_folder(tmp_path: Path) -> None:
    target = tmp_path / "missing" / "model.gguf"
    _assert_one_line_failure(tmp_path, lambda: export_gguf(DEMO, target), "does not exist")
    assert not target.parent.exists()


def test_existing_output_needs_force(tmp_path: Path) -> None:
    target = tmp_path / "model.gguf"
    target.write_bytes(b"keep me")
    _assert_one_line_failure(tmp_path, lambda: export_gguf(DEMO, target), "force")
    assert target.read_bytes() == b"keep me"
    result = export_gguf(DEMO, target, force=True)
    assert target.read_bytes()[:4] == b"GGUF" and result.path == target
    assert _files(tmp_path) == {"model.gguf"}


def test_unknown_type(tmp_path: Path) -> None:
    target = tmp_path / "model.gguf"
    _assert_one_line_failure(tmp_path, lambda: export_gguf(DEMO, target, type="q3_k"), "q3_k")
    assert not target.exists()


def test_unsupported_architecture(tmp_path: Path) -> None:
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
    model_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    out = tmp_path / "out"
    out.mkdir()
    error = _assert_one_line_failure(
        out, lambda: export_gguf(model_dir, out / "m.gguf"), "gpt2", "llama", "qwen2"
    )
    assert "supported" in str(error)
    assert _files(out) == set()


def test_rope_scaling_gguf_cannot_express_is_refused(tmp_path: Path) -> None:
    # Phi-3's long-context variants scale rope per frequency ("longrope"), which llama.cpp keeps
    # in extra tensors this writer does not produce: refused in one line, nothing written.
    model_dir = _tiny("phi3", tmp_path / "source")
    config = json.loads((model_dir / "config.json").read_text())
    half = 16 // 2  # head_dim 16: hidden 64 over 4 heads
    config["rope_scaling"] = {
        "rope_type": "longrope",
        "long_factor": [1.0] * half,
        "short_factor": [1.0] * half,
        "original_max_position_embeddings": 128,
    }
    config.pop("rope_parameters", None)
    (model_dir / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    out.mkdir()
    _assert_one_line_failure(
        out, lambda: export_gguf(model_dir, out / "m.gguf"), "rope scaling", "longrope"
    )
    assert _files(out) == set()


def test_source_of_another_architecture_is_refused(
    tmp_path: Path, demo_exports: dict[str, GgufExportResult]
) -> None:
    config = json.loads((DEMO / "config.json").read_text())
    config["model_type"] = "qwen2"
    model_dir = tmp_path / "qwen"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(config))
    source = demo_exports["q8_0"].path
    _assert_one_line_failure(
        tmp_path,
        lambda: export_gguf(model_dir, tmp_path / "m.gguf", source_gguf=source),
        "source GGUF",
    )


# --- source mode on the demo model (fast) -------------------------------------------------------


def _edit_rank_one(weight: torch.Tensor, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(weight.shape[0], generator=generator)
    direction /= direction.norm()
    weight -= torch.outer(direction, direction @ weight)


def test_a_gguf_is_asked_for_as_plain_layers(
    demo_exports: dict[str, GgufExportResult],
) -> None:
    """Newer transformers keep a quantized GGUF's weights packed for the architectures their
    new GGUF path covers when a matmul kernel is installed (the ``kernels`` package), and warn
    on every GGUF loaded in another dtype than float32 that its weights "stay quantized". The
    loader asks for plain layers, so neither depends on what else is installed."""
    import logging

    from transformers.utils import logging as hf_logging

    from blasphemer.loading import load_model

    said: list[str] = []
    listener = logging.Handler()
    listener.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    library = hf_logging.get_logger()  # transformers' root logger; it does not propagate
    level = hf_logging.get_verbosity()
    library.addHandler(listener)
    hf_logging.set_verbosity_warning()
    try:
        loaded = load_model(str(demo_exports["q8_0"].path), dtypes=["bfloat16"], device_map="cpu")
    finally:
        hf_logging.set_verbosity(level)
        library.removeHandler(listener)
    assert not [line for line in said if "packed" in line or "stay quantized" in line]
    kinds = {type(m).__name__ for m in loaded.model.modules() if "Linear" in type(m).__name__}
    assert kinds == {"Linear"}
    assert loaded.dtype == torch.bfloat16


@pytest.fixture(scope="module")
def demo_from_gguf(
    tmp_path_factory: pytest.TempPathFactory, demo_exports: dict[str, GgufExportResult]
) -> Iterator[tuple[Path, Path, Any]]:
    """The demo's Q8_0 export loaded with transformers, two layers edited, saved."""
    source = demo_exports["q8_0"].path
    model, tokenizer = _load_gguf(source)
    model.hf_quantizer.remove_quantization_config(model)
    with torch.no_grad():
        _edit_rank_one(model.model.layers[1].self_attn.o_proj.weight, 1)
        _edit_rank_one(model.model.layers[4].mlp.down_proj.weight, 2)
    saved = tmp_path_factory.mktemp("edited")
    model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    yield source, saved, model
    shutil.rmtree(saved, ignore_errors=True)


def test_source_mode_keeps_untouched_tensors_byte_identical(
    tmp_path: Path, demo_from_gguf: tuple[Path, Path, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    source, saved, model = demo_from_gguf
    # Compare and quantize a few rows at a time, as for a large model's embeddings.
    monkeypatch.setattr("blasphemer.gguf_tensors.CHUNK_ELEMENTS", 192 * 7)
    result = export_gguf(saved, tmp_path / "edited.gguf", source_gguf=source)
    edited = {"blk.1.attn_output.weight", "blk.4.ffn_down.weight"}
    assert {t.name for t in result.rewritten} == edited
    assert {t.type for t in result.rewritten} == {"Q8_0"}  # the source type, re-quantized
    _assert_same_except(source, result.path, edited)

    exported, tokenizer = _load_gguf(result.path)
    texts = _render(tokenizer, _prompts(20))
    assert float(np.mean(_first_token_kl(model.eval(), exported, tokenizer, texts))) < 1e-2


def _assert_same_except(source: Path, written: Path, edited: set[str]) -> None:
    a, b = gguf.GGUFReader(source), gguf.GGUFReader(written)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for old, new in zip(a.tensors, b.tensors, strict=True):
        if old.name in edited:
            assert old.data.tobytes() != new.data.tobytes(), old.name
        else:
            assert old.tensor_type == new.tensor_type, old.name
            assert old.data.tobytes() == new.data.tobytes(), old.name
    skip = {"GGUF.kv_count", "GGUF.tensor_count"}
    assert set(a.fields) == set(b.fields)
    for key in set(a.fields) - skip:
        assert a.fields[key].contents() == b.fields[key].contents(), key


# --- real models (SmolLM2 Q4_1, from the pinned cache) -------------------------------------------


@pytest.fixture(scope="module")
def smollm2_edited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, Any]]:
    source = _fetch("smollm2")
    model, tokenizer = _load_gguf(source)
    model.hf_quantizer.remove_quantization_config(model)
    with torch.no_grad():
        _edit_rank_one(model.model.layers[3].self_attn.o_proj.weight, 3)
        _edit_rank_one(model.model.layers[3].mlp.down_proj.weight, 4)
        _edit_rank_one(model.model.layers[7].mlp.down_proj.weight, 5)
    saved = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    yield source, saved, model
    shutil.rmtree(saved, ignore_errors=True)


@pytest.mark.real
def test_smollm2_source_mode(tmp_path: Path, smollm2_edited: tuple[Path, Path, Any]) -> None:
    source, saved, model = smollm2_edited
    result = export_gguf(saved, tmp_path / "smollm2-edited.gguf", source_gguf=source)
    edited = {"blk.3.attn_output.weight", "blk.3.ffn_down.weight", "blk.7.ffn_down.weight"}
    assert {t.name for t in result.rewritten} == edited
    assert {t.type for t in result.rewritten} == {"Q4_1"}
    assert sum(t.action == "copied" for t in result.tensors) == result.n_tensors - 3
    _assert_same_except(source, result.path, edited)

    exported, tokenizer = _load_gguf(result.path)
    texts = _render(tokenizer, _prompts(20))
    kl = float(np.mean(_first_token_kl(model.eval(), exported, tokenizer, texts)))
    assert kl < 0.01, f"mean KL {kl:.3g}"


@pytest.mark.real
def test_smollm2_safetensors_round_trip(
    tmp_path: Path, smollm2_edited: tuple[Path, Path, Any]
) -> None:
    _, saved, model = smollm2_edited
    result = export_gguf(saved, tmp_path / "smollm2-f16.gguf", type="f16")
    exported, tokenizer = _load_gguf(result.path)
    original_tokenizer = AutoTokenizer.from_pretrained(saved)
    texts = _render(original_tokenizer, _prompts(20))
    for text in texts:
        assert tokenizer(text)["input_ids"] == original_tokenizer(text)["input_ids"]
    assert tokenizer.chat_template == original_tokenizer.chat_template
    kl = float(np.mean(_first_token_kl(model.eval(), exported, original_tokenizer, texts)))
    assert kl < 1e-3, f"mean KL {kl:.3g}"


@pytest.mark.real
def test_gemma3_unedited_safetensors_round_trip(tmp_path: Path) -> None:
    from blasphemer.loading import load_model

    loaded = load_model(str(_fetch("gemma3")), dtypes=["float32"], device_map="cpu")
    saved = tmp_path / "gemma3"
    loaded.model.save_pretrained(saved)
    loaded.tokenizer.save_pretrained(saved)
    result = export_gguf(saved, tmp_path / "gemma3-f16.gguf", type="f16")
    exported, tokenizer = _load_gguf(result.path)
    texts = [f"User: {p}\nAssistant:" for p in _prompts(20)]  # a base model: no chat template
    for text in texts:
        assert tokenizer(text)["input_ids"] == loaded.tokenizer(text)["input_ids"]
    kl = float(np.mean(_first_token_kl(loaded.model, exported, loaded.tokenizer, texts)))
    assert kl < 1e-3, f"mean KL {kl:.3g}"


def test_quantize_rows_in_blocks_equals_whole_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    import blasphemer.gguf_tensors as tensors

    values = np.random.default_rng(1).standard_normal((10, 64)).astype(np.float32)
    whole = tensors.quantize_rows(values, Q.Q8_0)
    monkeypatch.setattr(tensors, "CHUNK_ELEMENTS", 128)  # two rows per block
    assert np.array_equal(tensors.quantize_rows(values, Q.Q8_0), whole)
    assert whole.shape == (10, 64 // 32 * 34)


# --- the command line ---------------------------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    from blasphemer.app import cli

    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_export_gguf_command_writes_the_file_and_names_its_sha256(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "demo.gguf"
    code, out, err = _cli(capsys, "export-gguf", DEMO, target, "--type", "q8_0")
    assert code == 0, err
    assert hashlib.sha256(target.read_bytes()).hexdigest() in out
    assert {t.tensor_type for t in gguf.GGUFReader(str(target)).tensors} == {Q.F32, Q.Q8_0}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["{missing}/m.gguf"], "does not exist"),
        (["{existing}"], "--force"),
        (["{fresh}", "--type", "q4_k"], "invalid choice"),
        (["{fresh}", "--model-dir-of", "gpt2"], "does not support"),
        (["{fresh}", "--source-gguf", "{missing}/src.gguf"], "does not exist"),
    ],
    ids=["missing-folder", "existing-file", "unknown-type", "architecture", "missing-source"],
)
def test_export_gguf_command_bad_input_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    existing = tmp_path / "existing.gguf"
    existing.write_bytes(b"keep me")
    model_dir = DEMO
    if "--model-dir-of" in args:
        config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
        model_dir = tmp_path / "gpt2"
        GPT2LMHeadModel(config).save_pretrained(model_dir)
        args = args[:1]
    names = {"missing": tmp_path / "missing", "existing": existing, "fresh": tmp_path / "f.gguf"}
    filled = [a.format(**names) for a in args]
    before = _files(tmp_path)
    code, _, err = _cli(capsys, "export-gguf", model_dir, *filled)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert _files(tmp_path) == before  # nothing half-written
    assert existing.read_bytes() == b"keep me"


# --- every architecture the writer names, on tiny random models ---------------------------------


def _tiny(kind: str, folder: Path) -> Path:
    """A tiny random model of ``kind`` with the demo model's tokenizer, saved to ``folder``."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Phi3Config,
        Phi3ForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    shape: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        # Weights ten times the default scale: with the default the logits are so flat that a
        # wrong q/k permutation still gives a first-token KL under 1e-6 (measured); at 0.2 it
        # gives 1.9, and a right export 2e-6.
        "initializer_range": 0.2,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    classes = {
        "mistral": (MistralConfig, MistralForCausalLM, {}),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
        "gemma2": (Gemma2Config, Gemma2ForCausalLM, {"head_dim": 16}),
        "phi3": (Phi3Config, Phi3ForCausalLM, {}),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 128}),
    }
    config_class, model_class, extra = classes[kind]
    torch.manual_seed(0)
    model = model_class(config_class(**shape, **extra)).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# Mistral is written as llama (what llama.cpp reads). transformers reads a llama GGUF whose
# general.name contains "mistral" as model type "mistral", which its GGUF reader then rejects
# ("Unknown gguf model_type: mistral in gguf-py"); the folder is therefore named "source", and the
# file reads back as Llama, the same function as this Mistral (no sliding window at these lengths).
# Qwen3: transformers' GGUF reader ignores attention.key_length and takes Qwen3Config's default
# head_dim of 128 (every released Qwen3 has 128), so the tiny Qwen3 uses 128 too.
@pytest.mark.parametrize("kind", ["qwen2", "gemma2", "phi3", "qwen3", "mistral"])
def test_every_named_architecture_round_trips_through_transformers(
    tmp_path: Path, kind: str
) -> None:
    saved = _tiny(kind, tmp_path / "source")
    reference = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    result = export_gguf(saved, tmp_path / f"{kind}.gguf", type="f16")
    exported, tokenizer = _load_gguf(result.path)
    if kind == "mistral":
        assert type(exported).__name__ == "LlamaForCausalLM"
    texts = _render(AutoTokenizer.from_pretrained(saved), _prompts(10))
    kl = float(np.mean(_first_token_kl(reference, exported, tokenizer, texts)))
    assert kl < 1e-4, f"{kind}: mean KL {kl:.3g}"
    for text in texts:  # every position, relative to the logits' own spread (f16: ~1e-3)
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            want, got = reference(ids).logits[0].double(), exported(ids).logits[0].double()
        spread = (want - want.mean(-1, keepdim=True)).norm()
        assert float((got - want).norm() / spread) < 1e-2, kind


_PEAK_SCRIPT = """
import json, sys, threading, time
from pathlib import Path
from blasphemer.gguf_export import export_gguf

def anonymous():  # private memory; the memory-mapped safetensors pages are page cache
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

before = peak = anonymous()
done = threading.Event()

def sample():
    global peak
    while not done.is_set():
        peak = max(peak, anonymous())
        time.sleep(0.002)

sampler = threading.Thread(target=sample)
sampler.start()
export_gguf(Path(sys.argv[1]), Path(sys.argv[2]), type=sys.argv[3])
done.set()
sampler.join()
print(json.dumps({"before": before, "peak": peak}))
"""


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_export_streams_tensors_peak_memory_stays_under_model_plus_one_tensor(
    tmp_path: Path, kind: str
) -> None:
    # A 134 M-parameter Llama (544 MiB in float32): exporting it whole in memory (every tensor
    # converted before writing) would need about the model again on top; streaming needs one
    # tensor (and its rows in blocks for q8_0). Measured here: 11 MiB of private memory; keeping
    # every converted tensor until the end (a mutation) added 303 MiB (f16) and 154 MiB (q8_0).
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(AutoTokenizer.from_pretrained(DEMO)),
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=256,
    )
    with torch.device("meta"):
        shapes = LlamaForCausalLM(config)
    model = LlamaForCausalLM(config)  # random weights, written once
    model.save_pretrained(tmp_path / "big")
    AutoTokenizer.from_pretrained(DEMO).save_pretrained(tmp_path / "big")
    sizes = [p.numel() * 4 for p in shapes.parameters()]
    model_bytes, largest = sum(sizes), max(sizes)
    del model
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, tmp_path / "big", tmp_path / "big.gguf", kind],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    growth = measured["peak"] - measured["before"]
    print(f"\n{kind}: model {model_bytes / 2**20:.0f} MiB, export added {growth / 2**20:.0f} MiB")
    assert growth <= model_bytes // 8 + largest, growth  # the issue allows model + one tensor
