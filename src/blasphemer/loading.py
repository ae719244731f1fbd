"""Load a model and its tokenizer, ready for measurement and editing.

:func:`load_model` tries each requested dtype in turn and keeps the first one that loads *and*
produces finite next-token logits on a short prompt (some checkpoints overflow in float16, some
kernels are missing for bfloat16 on older hardware). Every failure it can foresee becomes a
:class:`~blasphemer.errors.ModelLoadError` whose one-line message names the fix.

Multimodal checkpoints (a ``vision_config``, or a ``...ForConditionalGeneration`` class that
maps to image-text-to-text) load through ``AutoModelForImageTextToText`` with their processor;
only the text tower is measured and edited later, but the whole model stays loadable and
exportable. The checks before any weights load live in :mod:`blasphemer.model_source`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from blasphemer import gguf_source
from blasphemer.errors import ConfigError, ModelLoadError
from blasphemer.gguf_source import GgufSource
from blasphemer.model_source import (
    ModelSource,
    auto_class_for,
    check_bnb_available,
    check_gguf,
    check_local_path,
    check_remote_code,
    first_line,
    is_multimodal,
    load_config,
    load_processor,
    load_tokenizer,
)

logger = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
_QUANTIZATIONS = ("none", "bnb_4bit")
_SANITY_PROMPT = "The capital of France is"


@dataclass(eq=False)
class LoadedModel:
    """A generation-capable model with its tokenizer (left padding, pad token set)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    revision: str | None
    dtype: torch.dtype
    processor: Any | None = None  # multimodal checkpoints only
    gguf: GgufSource | None = None  # set when the weights came from a GGUF file

    @property
    def input_device(self) -> torch.device:
        """Device of the input embeddings: where token ids must be sent."""
        return input_device(self.model)


def load_model(
    model_id: str,
    *,
    dtypes: Sequence[str] = ("auto", "bfloat16", "float16", "float32"),
    device_map: str | dict[str, Any] = "auto",
    quantization: str = "none",
    trust_remote_code: bool = False,
    revision: str | None = None,
    gguf_file: str | None = None,
) -> LoadedModel:
    """Load ``model_id`` (hub id, local folder or ``.gguf`` file) in the first working dtype.

    A GGUF (``model_id`` ending in ``.gguf``, or a folder or hub repository with ``gguf_file``
    naming the file in it) is dequantised by transformers into plain float layers of the
    chosen dtype; its header is checked first (see :mod:`blasphemer.gguf_source`), the file is
    only read, and the loaded model saves as an ordinary safetensors folder.

    ``"auto"`` in ``dtypes`` means the checkpoint's own dtype. A dtype "works" when the model
    loads and its next-token logits for a short prompt are all finite; a failed attempt is freed
    before the next one. ``device_map="auto"`` on a machine without an accelerator loads on the
    CPU. ``quantization="bnb_4bit"`` needs CUDA and ``bitsandbytes``.

    Returns a :class:`LoadedModel` in eval mode with every parameter's ``requires_grad`` off.
    Raises :class:`ModelLoadError` (one line, naming the fix) when the model cannot be loaded.
    """
    if quantization not in _QUANTIZATIONS:
        raise ConfigError(f"unknown quantization {quantization!r}; use one of {_QUANTIZATIONS}")
    unknown = [name for name in dtypes if name != "auto" and name not in _DTYPES]
    if unknown or not dtypes:
        raise ConfigError(
            f"dtypes must be a non-empty list of auto/{'/'.join(_DTYPES)}, got {list(dtypes)}"
        )
    if quantization == "bnb_4bit":
        check_bnb_available()

    gguf = gguf_source.resolve_source(model_id, gguf_file)
    if gguf is None:
        check_local_path(model_id)
    else:
        check_gguf(gguf, quantization)
    source = ModelSource(
        model_id if gguf is None else gguf.location, revision, trust_remote_code, gguf
    )
    config = load_config(source)
    model_class = auto_class_for(config)
    check_remote_code(model_id, config, model_class, trust_remote_code)
    processor = load_processor(source) if is_multimodal(config) and gguf is None else None
    tokenizer = load_tokenizer(source, processor)
    device_map = _resolve_device_map(device_map)

    request = _Request(source, device_map, quantization, config, model_class)
    failures: list[str] = []
    for dtype in _candidate_dtypes(dtypes, config):
        model, reason = _try_load(request, dtype, tokenizer)
        if model is not None:
            logger.info("loaded %s as %s", model_id, dtype)
            generation_config = getattr(model, "generation_config", None)
            if generation_config is not None and generation_config.pad_token_id is None:
                generation_config.pad_token_id = tokenizer.pad_token_id
            return LoadedModel(model, tokenizer, model_id, revision, dtype, processor, gguf)
        failures.append(f"{_dtype_name(dtype)}: {reason}")
        logger.warning("loading %s as %s failed: %s", model_id, dtype, reason)
    raise ModelLoadError(
        f"could not load {model_id} in any dtype tried ({'; '.join(failures)}); "
        "add float32 to --dtypes, or check that the checkpoint is not corrupt"
    )


@dataclass(frozen=True)
class _Request:
    """What stays the same across the dtype attempts of one :func:`load_model` call."""

    source: ModelSource
    device_map: str | dict[str, Any]
    quantization: str
    config: PretrainedConfig
    model_class: Any  # AutoModelForCausalLM or AutoModelForImageTextToText


def _resolve_device_map(device_map: str | dict[str, Any]) -> str | dict[str, Any]:
    # Without an accelerator "auto" would only add accelerate's dispatch machinery (and possibly
    # disk offload); plain CPU loading is what the user means.
    if device_map == "auto" and not torch.accelerator.is_available():
        return "cpu"
    return device_map


def _candidate_dtypes(names: Sequence[str], config: PretrainedConfig) -> list[torch.dtype]:
    """Requested dtypes in order, "auto" replaced by the checkpoint's dtype, duplicates dropped."""
    resolved: list[torch.dtype] = []
    for name in names:
        dtype = _checkpoint_dtype(config) if name == "auto" else _DTYPES[name]
        if dtype not in resolved:
            resolved.append(dtype)
    return resolved


def _checkpoint_dtype(config: PretrainedConfig) -> torch.dtype:
    for candidate in (config, config.get_text_config()):
        value = getattr(candidate, "dtype", None) or getattr(candidate, "torch_dtype", None)
        if isinstance(value, torch.dtype):
            return value
        if isinstance(value, str) and value in _DTYPES:
            return _DTYPES[value]
    return torch.float32


def _try_load(
    request: _Request, dtype: torch.dtype, tokenizer: PreTrainedTokenizerBase
) -> tuple[PreTrainedModel | None, str]:
    """One attempt: the model on success, else ``None`` and the reason (memory already freed)."""
    source = request.source
    model_id = source.shown
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "device_map": request.device_map,
        **source.kwargs(),
    }
    if source.gguf is not None:
        kwargs.update(gguf_dequantized())
    if request.quantization == "bnb_4bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
        )
    model: PreTrainedModel | None = None
    try:
        # A fresh copy each attempt: from_pretrained records dtype and quantisation on the config.
        config = copy.deepcopy(request.config)
        with gguf_bar_follows_the_switch() if source.gguf is not None else contextlib.nullcontext():
            model, info = request.model_class.from_pretrained(
                source.location, config=config, output_loading_info=True, **kwargs
            )
        if source.gguf is None:
            _check_all_weights_loaded(source, info)
        if source.gguf is not None:
            _forget_gguf_quantizer(model)
        model.eval()
        model.requires_grad_(False)
        contiguous_head_input(model)
        if _next_token_logits_finite(model, tokenizer):
            return model, ""
        reason = "non-finite logits on a test prompt"
    except SafetensorError as error:
        # Corrupt or truncated weights: no other dtype will help.
        raise ModelLoadError(
            f"weight file {_corrupt_weight_file(source)} is corrupt or truncated "
            f"({first_line(error)}); download the model again"
        ) from error
    except OSError as error:
        # Missing or unreadable weight files: no other dtype will help.
        raise ModelLoadError(
            f"cannot read the weights of {model_id} ({first_line(error)}); "
            "check that the folder or repo holds the *.safetensors files"
        ) from error
    except ImportError as error:
        raise ModelLoadError(
            f"loading {model_id} needs a missing package ({first_line(error)}); install it, retry"
        ) from error
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as error:
        if "mismatched_sizes" in str(error) or "size mismatch" in str(error):
            raise _mismatch_error(source, "have other shapes than config.json says") from error
        # Out of memory, a kernel missing for this dtype on this device, a dtype the
        # checkpoint rejects: the next dtype may well work.
        reason = f"{type(error).__name__}: {first_line(error)}"
    del model
    _free_memory()
    return None, reason


def gguf_dequantized() -> dict[str, Any]:
    """``from_pretrained`` arguments that load a GGUF as plain float layers. Newer transformers
    keep a quantized GGUF's weights packed (and switch the attention kernel) whenever the
    ``kernels`` package is installed; edits, the layer cache and saving need plain weights, so
    ask for them rather than depend on what else is installed. Older releases always unpack."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


@contextlib.contextmanager
def gguf_bar_follows_the_switch() -> Iterator[None]:
    """While loading a GGUF, make transformers' de-quantisation progress bar obey transformers'
    own progress-bar switch (``transformers.utils.logging.disable_progress_bar``), which it
    ignores: it calls ``tqdm`` directly, so a bar interleaves with the caller's output."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    original = getattr(gguf_utils, "tqdm", None)
    if original is None or hf_logging.is_progress_bar_enabled():
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _mismatch_error(source: ModelSource, what: str) -> ModelLoadError:
    return ModelLoadError(
        f"the weights of {source.shown} {what}; config.json and the *.safetensors files come "
        "from different models: download the model again or restore its config.json"
    )


def _check_all_weights_loaded(source: ModelSource, info: dict[str, Any]) -> None:
    """Refuse a checkpoint that lacks weights its config calls for (they would be random)."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise _mismatch_error(source, f"lack {missing[0]}{more}")


def _corrupt_weight_file(source: ModelSource) -> str:
    """The first local ``*.safetensors`` file whose header cannot be read (else the source)."""
    folder = Path(source.location).expanduser()
    if folder.is_dir():
        for path in sorted(folder.glob("*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as handle:
                    handle.keys()
            except (SafetensorError, OSError):
                return str(path)
    return f"of {source.shown}"


def _forget_gguf_quantizer(model: PreTrainedModel) -> None:
    """Drop the GGUF "quantizer" transformers attaches to a dequantised load.

    The layers are plain float layers already; the marker only makes ``save_pretrained``
    refuse ("quantized with gguf and is not serializable") and editing code treat the weights
    as quantised.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


def contiguous_head_input(model: PreTrainedModel) -> None:
    """Hand the output head an input laid out in the standard (row-major) way.

    With ``logits_to_keep`` the model slices its last positions out of the hidden states and
    passes that strided view to the head. On a CPU torch then multiplies a view whose leading
    dimensions cannot be merged through a path that copies the whole head weight for every row
    (when the weight does not require gradients, as here): on Qwen2.5 (vocabulary 151,936) the
    head took 51 s for 32 prompts instead of 0.07 s, and 2.3 s for one prompt instead of 0.06 s;
    in float32 the strided input doubles its time (0.45 s against 0.23 s). ``is_contiguous``
    does not see the one-row case (it ignores dimensions of size 1), which every trial met twice,
    in the shared prefix's pass of the KL and the refusal scorer; the strides are compared with
    the standard ones instead. Copying the few kept positions costs microseconds. The result can
    differ from the strided product in the last bits (another summation order).
    """
    head = model.get_output_embeddings()
    if isinstance(head, torch.nn.Module):
        head.register_forward_pre_hook(_contiguous_first_input)


def standard_strides(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` has the strides of a fresh row-major tensor of its shape, size-1
    dimensions included."""
    expected, step = [], 1
    for size in reversed(tensor.shape):
        expected.append(step)
        step *= size
    return tuple(reversed(expected)) == tensor.stride()


def _contiguous_first_input(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    if args and isinstance(args[0], torch.Tensor) and not standard_strides(args[0]):
        return (args[0].clone(memory_format=torch.contiguous_format), *args[1:])
    return args


def slow_dtype_hint(loaded: LoadedModel) -> str | None:
    """A one-line hint when the model runs in bfloat16 on a CPU without bfloat16 instructions
    (AVX512-BF16 or AMX), where float32 is likely faster; else None. Where the instructions
    exist bfloat16 takes half float32's time (Qwen2.5-0.5B on an AVX512-BF16 CPU:
    bench/results/2026-12-03-bfloat16.md)."""
    if loaded.dtype != torch.bfloat16 or loaded.input_device.type != "cpu":
        return None
    if cpu_has_bfloat16():
        return None
    return (
        "this CPU has no bfloat16 instructions (AVX512-BF16 or AMX): "
        "--dtypes float32 is likely faster"
    )


def cpu_has_bfloat16() -> bool:
    """Whether torch's CPU kernels have native bfloat16 here (oneDNN's own check)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _next_token_logits_finite(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Greedy one-token check: are the next-token logits of a short prompt all finite?"""
    encoded = tokenizer([_SANITY_PROMPT], return_tensors="pt")
    device = input_device(model)
    with torch.inference_mode():
        output = model(
            input_ids=encoded["input_ids"].to(device),
            attention_mask=encoded["attention_mask"].to(device),
            use_cache=False,
        )
    return bool(torch.isfinite(output.logits[:, -1, :]).all())


def input_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's input embeddings, where input ids must be placed."""
    embeddings: torch.nn.Module = model.get_input_embeddings()  # type: ignore[operator]
    return next(embeddings.parameters()).device


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
