"""What a model source holds before any weights load: checks, config, model class, tokenizer.

:class:`ModelSource` names where ``from_pretrained`` reads (a folder or hub id, and the GGUF
file in it). The checks here run first and turn every problem they can foresee (a folder that
is no model, a GGUF that cannot load, remote code not trusted, a missing tokenizer) into a
one-line :class:`~blasphemer.errors.ModelLoadError` that names the fix; :mod:`blasphemer.loading`
then loads the weights.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from blasphemer import gguf_source
from blasphemer.errors import ConfigError, ModelLoadError
from blasphemer.gguf_source import GgufSource

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    """Where from_pretrained reads: a folder or hub id, and the GGUF file in it if any."""

    location: str
    revision: str | None
    trust_remote_code: bool
    gguf: GgufSource | None

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments every from_pretrained call of this source takes."""
        extra: dict[str, Any] = {"revision": self.revision}
        if self.trust_remote_code:
            extra["trust_remote_code"] = True
        if self.gguf is not None:
            extra["gguf_file"] = self.gguf.filename
        return extra

    @property
    def shown(self) -> str:
        return self.location if self.gguf is None else self.gguf.describe()


def check_bnb_available() -> None:
    """Raise a one-line ModelLoadError unless 4-bit loading can work here (CUDA + bitsandbytes)."""
    if not torch.cuda.is_available():
        raise ModelLoadError(
            "4-bit quantisation needs a CUDA GPU; drop --quantization or run on a machine with one"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(
            "4-bit quantisation needs the bitsandbytes package; run `pip install bitsandbytes` "
            "or drop --quantization"
        )


def _looks_like_path(model_id: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else with path syntax is meant as a folder.
    return (
        model_id.startswith(("/", "./", "../", "~", "\\"))
        or model_id.count("/") > 1
        or (len(model_id) > 1 and model_id[1] == ":")
    )


def check_local_path(model_id: str) -> None:
    """Raise if ``model_id`` is a folder that is no model, a file, or a path that does not exist."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{model_id} is a folder but not a model (no config.json); "
                "point to a folder written by save_pretrained, or use a hub id"
            )
        return
    if path.exists():
        raise ModelLoadError(
            f"{model_id} is a file, not a model folder; pass the folder that holds config.json"
        )
    if _looks_like_path(model_id):
        raise ModelLoadError(f"model folder {model_id} does not exist; check the path")


def check_gguf(gguf: GgufSource, quantization: str) -> None:
    """Raise unless ``gguf`` can be loaded: no quantisation, a readable header, the gguf package."""
    if quantization != "none":
        raise ConfigError(
            "a GGUF is dequantised on loading; drop --quantization (or load the original weights)"
        )
    path = gguf.local_path
    if path is not None:  # a hub file is checked by transformers after the download
        gguf_source.check_loadable(gguf_source.read_header(path))
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("loading a GGUF needs the gguf package; run `pip install gguf`")


def load_config(source: ModelSource) -> PretrainedConfig:
    """The model config of ``source``; every failure becomes a one-line ModelLoadError."""
    try:
        config = AutoConfig.from_pretrained(source.location, **source.kwargs())
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise _remote_code_error(source.shown) from error
        raise ModelLoadError(
            f"transformers does not recognise the config of {source.shown} "
            f"({first_line(error)}); upgrade transformers or pass --trust-remote-code if the "
            "model ships its own code"
        ) from error
    except OSError as error:
        raise ModelLoadError(
            f"cannot read the config of {source.shown} ({first_line(error)}); "
            "check the name and revision, your network, or pass a local model folder"
        ) from error
    except (StrictDataclassError, TypeError, KeyError, AttributeError) as error:
        # A config.json whose values have the wrong types or shape (hand-edited, truncated).
        raise ModelLoadError(
            f"config.json of {source.shown} is invalid ({one_line(error)}); fix the file or "
            "download the model again"
        ) from error
    if source.gguf is not None and not getattr(config, "architectures", None):
        # A GGUF names its architecture only in its metadata; the saved config.json should.
        mapping = auto_class_for(config)._model_mapping
        if type(config) in mapping:
            config.architectures = [mapping[type(config)].__name__]
    return config


def _remote_code_error(model_id: str) -> ModelLoadError:
    return ModelLoadError(
        f"{model_id} needs its own Python code to load; pass --trust-remote-code if you trust it"
    )


def is_multimodal(config: PretrainedConfig) -> bool:
    """True for configs of image-text models (a vision tower next to the language model)."""
    if type(config) not in AutoModelForImageTextToText._model_mapping and not _auto_map_names(
        config, AutoModelForImageTextToText
    ):
        return False
    architectures = getattr(config, "architectures", None) or []
    return getattr(config, "vision_config", None) is not None or any(
        name.endswith("ForConditionalGeneration") for name in architectures
    )


def _auto_map_names(config: PretrainedConfig, auto_class: type) -> bool:
    auto_map = getattr(config, "auto_map", None) or {}
    return auto_class.__name__ in auto_map


def auto_class_for(config: PretrainedConfig) -> Any:
    """``AutoModelForImageTextToText`` for image-text models, else ``AutoModelForCausalLM``."""
    if is_multimodal(config):
        return AutoModelForImageTextToText
    in_causal = type(config) in AutoModelForCausalLM._model_mapping
    if not in_causal and type(config) in AutoModelForImageTextToText._model_mapping:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def check_remote_code(
    model_id: str, config: PretrainedConfig, model_class: Any, trust_remote_code: bool
) -> None:
    """Raise if ``model_class`` needs the model's own code and it is not trusted, or has none."""
    has_library_code = type(config) in model_class._model_mapping
    if not has_library_code and _auto_map_names(config, model_class) and not trust_remote_code:
        raise _remote_code_error(model_id)
    if not has_library_code and not _auto_map_names(config, model_class):
        raise ModelLoadError(
            f"{model_id} (model_type {getattr(config, 'model_type', '?')!r}) is not a text "
            "generation model transformers knows; use a causal language model, or upgrade"
        )


def load_processor(source: ModelSource) -> Any | None:
    """The processor of a multimodal ``source``, or None (logged) when it has none."""
    # Only the tokenizer is needed to measure and edit; a checkpoint without processor files
    # (text tower saved alone, or an incomplete upload) still loads, just without a processor.
    try:
        return AutoProcessor.from_pretrained(source.location, **source.kwargs())
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning(
            "no processor for %s (%s); continuing with the tokenizer alone", source.shown, error
        )
        return None


def load_tokenizer(source: ModelSource, processor: Any | None) -> PreTrainedTokenizerBase:
    """The tokenizer (the processor's if any), padding on the left, with a pad token set."""
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.location, **source.kwargs())
        except (OSError, ValueError, KeyError, TypeError) as error:
            where = (
                "the GGUF needs tokenizer.ggml.* metadata"
                if source.gguf is not None
                else "the model folder needs tokenizer.json or tokenizer_config.json"
            )
            raise ModelLoadError(
                f"cannot load the tokenizer of {source.shown} ({first_line(error)}); {where}"
            ) from error
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(
                f"the tokenizer of {source.shown} has neither a pad nor an eos token; "
                "set pad_token in its tokenizer_config.json"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def one_line(error: BaseException) -> str:
    """The whole message of ``error`` on one line (validation errors span several)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message, at most 200 characters."""
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line if len(line) <= 200 else line[:197] + "..."
