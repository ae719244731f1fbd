"""Tokenizer metadata for GGUF export: a saved tokenizer as llama.cpp's ``tokenizer.*`` keys.

:func:`read_tokenizer` reads ``tokenizer.json``, ``tokenizer_config.json`` and the chat template
of a saved folder into a :class:`TokenizerSpec`; :func:`tokenizer_metadata` turns that into
:class:`~blasphemer.gguf_metadata.Field` values. Byte-level BPE becomes ``gpt2`` (what
transformers' GGUF reader and llama.cpp expect for GPT-2/Llama-3/Qwen-style vocabularies),
SentencePiece-style vocabularies become ``llama`` with scores. Problems are one-line
:class:`~blasphemer.errors.ExportError`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGUFValueType, TokenType

from blasphemer.errors import ExportError
from blasphemer.gguf_metadata import Field, u32_field


@dataclass(frozen=True)
class TokenizerSpec:
    """A saved tokenizer as GGUF sees it (``model`` is ``gpt2`` or ``llama``)."""

    model: str
    pre: str
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    scores: tuple[float, ...] | None
    merges: tuple[str, ...]
    special_ids: Mapping[str, int]
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None
    chat_template: str | None
    notes: tuple[str, ...] = ()


_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read {path}: {exc}; save the tokenizer again") from exc
    if not isinstance(data, dict):
        raise ExportError(f"{path} is not a JSON object; save the tokenizer with save_pretrained")
    return data


def _pre_tokenizer_name(pre: Mapping[str, Any] | None) -> tuple[str, str | None]:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level pre-tokenizer, and a note if unsure."""
    if not pre:
        return "default", "tokenizer has no pre-tokenizer; wrote tokenizer.ggml.pre='default'"
    parts = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2", None
    if kinds == ["Digits", "ByteLevel"]:
        return "smollm", None
    if kinds == ["Split", "ByteLevel"]:
        pattern = (parts[0].get("pattern") or {}).get("Regex")
        name = _known_split_names().get(pattern or "")
        if name:
            return name, None
    note = f"unrecognised pre-tokenizer {kinds}; wrote tokenizer.ggml.pre='default'"
    return "default", note


def _known_split_names() -> dict[str, str]:
    """Split regexes transformers' GGUF reader knows, keyed by regex, valued by GGUF name."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_PRE_TOKENIZER_SPLITS,
        )
    except ImportError:  # pragma: no cover - older transformers
        return {}
    names: dict[str, str] = {}
    for name, pattern in GGUF_PRE_TOKENIZER_SPLITS.items():
        names.setdefault(pattern, name)
    return names


def _token_id(
    value: Any, vocab: Mapping[str, int], added: Mapping[str, int], fallback: Any
) -> int | None:
    """An id for a special-token entry (string, AddedToken dict or id), else ``fallback``."""
    if isinstance(value, Mapping):
        value = value.get("content")
    if isinstance(value, str):
        found = added.get(value, vocab.get(value))
        if found is not None:
            return int(found)
    if isinstance(fallback, list):
        fallback = fallback[0] if fallback else None
    return int(fallback) if isinstance(fallback, int) else None


def read_tokenizer(model_dir: Path, config: Mapping[str, Any]) -> TokenizerSpec:
    """Read ``tokenizer.json``, ``tokenizer_config.json`` and the chat template of a folder.

    Byte-level BPE tokenizers become ``gpt2``; SentencePiece-style BPE/Unigram (Metaspace or
    byte fallback) becomes ``llama`` with scores. The token list is padded with unused
    ``[PAD<i>]`` entries up to ``config["vocab_size"]``. Raises ExportError when a file is
    missing or malformed, or when the tokenizer has more tokens than the embedding has rows.
    """
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{model_dir} has no tokenizer.json; save the tokenizer beside the model")
    data = _json(path)
    tok_config = (
        _json(model_dir / "tokenizer_config.json")
        if (model_dir / "tokenizer_config.json").is_file()
        else {}
    )
    model = data.get("model") or {}
    vocab: dict[str, int] = {}
    scores_by_id: dict[int, float] = {}
    if model.get("type") == "BPE":
        vocab = dict(model.get("vocab") or {})
    elif model.get("type") == "Unigram":
        for index, (piece, score) in enumerate(model.get("vocab") or []):
            vocab[piece] = index
            scores_by_id[index] = float(score)
    else:
        raise ExportError(
            f"GGUF export supports BPE and Unigram tokenizers, not {model.get('type')!r}; "
            "export a model with a BPE tokenizer"
        )
    added = {str(t["content"]): int(t["id"]) for t in data.get("added_tokens") or []}
    special = {str(t["content"]) for t in data.get("added_tokens") or [] if t.get("special")}
    by_id = {index: token for token, index in vocab.items()}
    by_id.update({index: token for token, index in added.items()})
    vocab_size = int(config.get("vocab_size") or 0) or (max(by_id) + 1)
    if by_id and max(by_id) >= vocab_size:
        raise ExportError(
            f"the tokenizer has token id {max(by_id)} but the model has {vocab_size} embeddings; "
            "resize the embeddings before exporting"
        )
    byte_level = _is_byte_level(data)
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(int(TokenType.UNUSED))
        elif token in special:
            tokens.append(token)
            types.append(int(TokenType.CONTROL))
        elif token in added:
            tokens.append(token)
            types.append(int(TokenType.USER_DEFINED))
        elif not byte_level and _BYTE_TOKEN.match(token):
            tokens.append(token)
            types.append(int(TokenType.BYTE))
        else:
            tokens.append(token)
            types.append(int(TokenType.NORMAL))
    merges = tuple(m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or [])
    notes: list[str] = []
    if byte_level:
        pre, note = _pre_tokenizer_name(data.get("pre_tokenizer"))
        notes += [note] if note else []
        kind, scores, prefix = "gpt2", None, None
    else:
        kind, pre = "llama", "default"
        scores = tuple(scores_by_id.get(i, -float(i)) for i in range(vocab_size))
        prefix = _adds_space_prefix(data)
    ids = {
        name: found
        for name, key in (
            ("bos", "bos_token"),
            ("eos", "eos_token"),
            ("unknown", "unk_token"),
            ("padding", "pad_token"),
        )
        if (found := _token_id(tok_config.get(key), vocab, added, config.get(f"{key}_id")))
        is not None
    }
    return TokenizerSpec(
        model=kind,
        pre=pre,
        tokens=tuple(tokens),
        token_types=tuple(types),
        scores=scores,
        merges=merges,
        special_ids=ids,
        add_bos=bool(tok_config.get("add_bos_token", _post_processor_adds_bos(data, ids))),
        add_eos=bool(tok_config.get("add_eos_token", False)),
        add_space_prefix=prefix,
        chat_template=read_chat_template(model_dir, tok_config),
        notes=tuple(notes),
    )


def _is_byte_level(data: Mapping[str, Any]) -> bool:
    pre = data.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre else []
    return any(p.get("type") == "ByteLevel" for p in parts)


def _adds_space_prefix(data: Mapping[str, Any]) -> bool:
    """Whether a SentencePiece-style tokenizer prepends '▁' to the text."""
    text = json.dumps([data.get("normalizer"), data.get("pre_tokenizer")])
    if '"Prepend"' in text:
        return True
    return '"Metaspace"' in text and '"prepend_scheme": "never"' not in text


def _post_processor_adds_bos(data: Mapping[str, Any], ids: Mapping[str, int]) -> bool:
    """Whether the post-processor's single template starts with the BOS token."""
    bos = ids.get("bos")
    post = data.get("post_processor") or {}
    posts = post.get("processors", [post]) if post else []
    for proc in posts:
        single = proc.get("single") or []
        if single and "SpecialToken" in single[0]:
            return bos is not None and single[0]["SpecialToken"].get("id") is not None
    return False


def read_chat_template(model_dir: Path, tok_config: Mapping[str, Any]) -> str | None:
    """The default chat template: ``chat_template.jinja`` first, then tokenizer_config.json."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = tok_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def tokenizer_metadata(spec: TokenizerSpec) -> list[Field]:
    """The ``tokenizer.*`` keys for a :class:`TokenizerSpec`."""
    string, array = GGUFValueType.STRING, GGUFValueType.ARRAY
    fields = [
        Field("tokenizer.ggml.model", spec.model, string),
        Field("tokenizer.ggml.pre", spec.pre, string),
        Field("tokenizer.ggml.tokens", list(spec.tokens), array, string),
        Field("tokenizer.ggml.token_type", list(spec.token_types), array, GGUFValueType.INT32),
    ]
    if spec.scores is not None:
        scores = list(spec.scores)
        fields += [Field("tokenizer.ggml.scores", scores, array, GGUFValueType.FLOAT32)]
    if spec.merges:
        fields += [Field("tokenizer.ggml.merges", list(spec.merges), array, string)]
    for name, token_id in spec.special_ids.items():
        fields += [u32_field(f"tokenizer.ggml.{name}_token_id", token_id)]
    fields += [
        Field("tokenizer.ggml.add_bos_token", spec.add_bos, GGUFValueType.BOOL),
        Field("tokenizer.ggml.add_eos_token", spec.add_eos, GGUFValueType.BOOL),
    ]
    if spec.add_space_prefix is not None:
        prefix = spec.add_space_prefix
        fields += [Field("tokenizer.ggml.add_space_prefix", prefix, GGUFValueType.BOOL)]
    if spec.chat_template:
        fields += [Field("tokenizer.chat_template", spec.chat_template, string)]
    return fields
