"""Model loading: saved tiny models (text and multimodal), dtype fallback, every error case."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    CLIPImageProcessorPil,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from blasphemer import loading
from blasphemer.errors import ConfigError, ModelLoadError
from blasphemer.loading import LoadedModel, load_model
from tiny_models import build_tiny, word_tokenizer

SAMPLE = "the capital of france is hello world how are you"
WORDS = SAMPLE.split()


def _tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built offline, deliberately without a pad token."""
    return word_tokenizer(
        ["<unk>", "<s>", "</s>", "<image>", *WORDS],
        unknown="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def _save(model: PreTrainedModel, path: Path, *, tokenizer: bool = True) -> Path:
    model.save_pretrained(path)
    if tokenizer:
        _tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = build_tiny("llama")
    model.generation_config.pad_token_id = None  # so the loader has to fill it in
    return _save(model, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def overflow_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama whose embeddings overflow float16 (max ~65504): NaN logits in float16 only."""
    model = build_tiny("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1e7)
    return _save(model, tmp_path_factory.mktemp("overflow"))


def _one_line(error: pytest.ExceptionInfo[ModelLoadError]) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_loads_a_saved_llama(llama_dir: Path) -> None:
    loaded = load_model(str(llama_dir))
    assert isinstance(loaded, LoadedModel)
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.dtype == torch.float32  # "auto": the checkpoint's dtype
    assert loaded.model_id == str(llama_dir) and loaded.revision is None
    assert loaded.processor is None
    assert not loaded.model.training
    assert not any(parameter.requires_grad for parameter in loaded.model.parameters())
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.tokenizer.pad_token == "</s>"  # no pad token: eos stands in
    assert loaded.model.generation_config.pad_token_id == loaded.tokenizer.pad_token_id
    if not torch.accelerator.is_available():
        assert loaded.input_device == torch.device("cpu")
        assert all(p.device.type == "cpu" for p in loaded.model.parameters())


def test_auto_dtype_is_the_checkpoint_dtype(tmp_path: Path) -> None:
    path = _save(build_tiny("llama").to(torch.bfloat16), tmp_path)
    loaded = load_model(str(path), dtypes=("auto",), device_map="cpu")
    assert loaded.dtype == torch.bfloat16
    assert loaded.model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_explicit_dtype_overrides_the_checkpoint(llama_dir: Path) -> None:
    loaded = load_model(str(llama_dir), dtypes=("bfloat16", "float32"))
    assert loaded.dtype == torch.bfloat16
    assert loaded.model.lm_head.weight.dtype == torch.bfloat16


def test_non_finite_logits_fall_through_to_the_next_dtype(overflow_dir: Path) -> None:
    loaded = load_model(str(overflow_dir), dtypes=("float16", "float32"))
    assert loaded.dtype == torch.float32
    assert loaded.model.lm_head.weight.dtype == torch.float32


def test_all_dtypes_failing_names_them_and_the_fix(overflow_dir: Path) -> None:
    with pytest.raises(ModelLoadError) as error:
        load_model(str(overflow_dir), dtypes=("float16",))
    message = _one_line(error)
    assert "float16: non-finite logits" in message and "--dtypes" in message


def test_load_errors_are_retried_and_dtypes_tried_once(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[torch.dtype] = []

    def failing_check(model: PreTrainedModel, _tokenizer: Any) -> bool:
        calls.append(model.dtype)
        raise RuntimeError("kernel not implemented for this dtype\nsecond line")

    monkeypatch.setattr(loading, "_next_token_logits_finite", failing_check)
    with pytest.raises(ModelLoadError) as error:
        load_model(str(llama_dir), dtypes=("float16", "auto", "float32", "float16"))
    message = _one_line(error)
    assert calls == [torch.float16, torch.float32]  # "auto" is float32 here: not tried twice
    assert "float16: RuntimeError: kernel not implemented" in message
    assert "float32: RuntimeError" in message


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist") as error:
        load_model(str(tmp_path / "no" / "such" / "model"))
    _one_line(error)


def test_folder_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelLoadError, match="not a model") as error:
        load_model(str(tmp_path))
    _one_line(error)


def test_file_instead_of_folder(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a model folder") as error:
        load_model(str(path))
    _one_line(error)


def test_config_without_weights(tmp_path: Path) -> None:
    build_tiny("llama").config.save_pretrained(tmp_path)
    _tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="weights") as error:
        load_model(str(tmp_path))
    _one_line(error)


def test_model_without_tokenizer(tmp_path: Path) -> None:
    _save(build_tiny("llama"), tmp_path, tokenizer=False)
    with pytest.raises(ModelLoadError, match="tokenizer") as error:
        load_model(str(tmp_path))
    _one_line(error)


def test_remote_code_needs_the_flag(tmp_path: Path) -> None:
    config = {
        "model_type": "blasphemer-custom",
        "architectures": ["CustomForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_custom.CustomConfig",
            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
        },
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="--trust-remote-code") as error:
        load_model(str(tmp_path))
    _one_line(error)


def test_known_config_with_remote_model_class_needs_the_flag(tmp_path: Path) -> None:
    # A config type transformers knows (ViT), whose causal-LM class exists only as remote code.
    config: dict[str, Any] = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
    config.update(
        model_type="vit",
        architectures=["CustomForCausalLM"],
        auto_map={"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"},
    )
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="--trust-remote-code"):
        load_model(str(tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_4bit_needs_cuda(llama_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="needs a CUDA GPU") as error:
        load_model(str(llama_dir), quantization="bnb_4bit")
    assert "--quantization" in _one_line(error)


def test_invalid_settings_are_config_errors(llama_dir: Path) -> None:
    with pytest.raises(ConfigError):
        load_model(str(llama_dir), quantization="int3")
    with pytest.raises(ConfigError):
        load_model(str(llama_dir), dtypes=("float8",))
    with pytest.raises(ConfigError):
        load_model(str(llama_dir), dtypes=())


def _save_llava(path: Path, *, processor: bool) -> Path:
    model = build_tiny("llava")
    model.save_pretrained(path)
    if processor:
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
        )
        LlavaProcessor(
            image_processor=image_processor, tokenizer=_tokenizer(), patch_size=14
        ).save_pretrained(path)
    else:
        _tokenizer().save_pretrained(path)
    return path


def test_loads_a_saved_multimodal_model_with_its_processor(tmp_path: Path) -> None:
    loaded = load_model(str(_save_llava(tmp_path, processor=True)))
    assert isinstance(loaded.model, LlavaForConditionalGeneration)
    assert isinstance(loaded.processor, LlavaProcessor)
    assert loaded.tokenizer is loaded.processor.tokenizer
    assert loaded.tokenizer.padding_side == "left" and loaded.tokenizer.pad_token == "</s>"
    assert not any(parameter.requires_grad for parameter in loaded.model.parameters())
    assert loaded.dtype == torch.float32


def test_multimodal_model_without_processor_files_loads_with_its_tokenizer(
    tmp_path: Path,
) -> None:
    loaded = load_model(str(_save_llava(tmp_path, processor=False)))
    assert isinstance(loaded.model, LlavaForConditionalGeneration)
    assert loaded.processor is None
    assert loaded.tokenizer.padding_side == "left"


def test_loaded_model_generates(llama_dir: Path) -> None:
    loaded = load_model(str(llama_dir))
    batch = loaded.tokenizer(
        ["hello", "the capital of france is"], return_tensors="pt", padding=True
    )
    output = loaded.model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert output.shape == (2, batch["input_ids"].shape[1] + 2)


@pytest.mark.parametrize(
    "texts", [["hello world how are you", "the capital of"], ["the capital of"]]
)
def test_the_head_gets_a_contiguous_input(llama_dir: Path, texts: list[str]) -> None:
    """``logits_to_keep`` hands the head a strided slice, which torch multiplies very slowly in
    bfloat16 on a CPU: the loader lays it out afresh, for one row too (where ``is_contiguous``
    says yes to the slice), and the kept logits stay those of the full pass."""
    loaded = load_model(str(llama_dir), dtypes=("bfloat16",), device_map="cpu")
    seen: list[torch.Tensor] = []
    head = loaded.model.get_output_embeddings()
    head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    batch = loaded.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        kept = loaded.model(**batch, logits_to_keep=1).logits
        full = loaded.model(**batch).logits[:, -1:, :]
    rows, width = len(texts), loaded.model.config.hidden_size
    assert seen[0].shape == (rows, 1, width) and seen[0].stride() == (width, width, 1)
    torch.testing.assert_close(kept, full)


def test_standard_strides() -> None:
    fresh = torch.zeros(3, 1, 4)
    assert loading.standard_strides(fresh)
    assert loading.standard_strides(torch.zeros(5))
    sliced = torch.zeros(1, 6, 4)[:, -1:, :]
    assert sliced.is_contiguous() and not loading.standard_strides(sliced)
    assert not loading.standard_strides(torch.zeros(4, 3).t())


def test_bfloat16_on_a_cpu_without_its_instructions_gets_a_hint(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = load_model(str(llama_dir), dtypes=("bfloat16",), device_map="cpu")
    monkeypatch.setattr(loading, "cpu_has_bfloat16", lambda: False)
    hint = loading.slow_dtype_hint(loaded)
    assert hint is not None and "--dtypes float32" in hint and "\n" not in hint
    monkeypatch.setattr(loading, "cpu_has_bfloat16", lambda: True)
    assert loading.slow_dtype_hint(loaded) is None
    monkeypatch.setattr(loading, "cpu_has_bfloat16", lambda: False)
    assert loading.slow_dtype_hint(load_model(str(llama_dir), dtypes=("float32",))) is None


def test_config_of_a_model_that_cannot_generate_text(tmp_path: Path) -> None:
    config = {"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="not a text generation model") as error:
        load_model(str(tmp_path))
    _one_line(error)
