"""Tiny random models, one or more per registry entry, built from configs (no network).

Every model has 2 decoder layers, hidden size 32 (vision towers 16, so a structural guess can tell
the towers apart), a 96-token vocabulary and float32 weights from a fixed seed. Norm gains are
randomised too: the freshly initialised ones are all equal, which would hide a writer edited in
the wrong space (the Gemma post-norm case).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    DeepseekV3Config,
    Gemma2Config,
    Gemma3Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    GptOssConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    MistralConfig,
    MixtralConfig,
    Olmo2Config,
    OlmoeConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen2VLConfig,
    Qwen3Config,
    Qwen3MoeConfig,
    Qwen3NextConfig,
    SiglipVisionConfig,
)

from blasphemer.architectures.base import ComponentKind, Layout, ModelMap, Writer

HIDDEN = 32
VOCAB = 96
SEED = 1234

# Shared by the decoder configs; MoE sizes are per expert.
_DECODER: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
_NO_HEAD_DIM = {k: v for k, v in _DECODER.items() if k != "head_dim"}  # configs without head_dim
_MOE: dict[str, Any] = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24)
_VISION: dict[str, Any] = dict(
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
)


@dataclass(frozen=True)
class TinyCase:
    """A tiny model: which registry entry it must resolve to, and how to build its config."""

    spec: str
    config: Callable[[], PretrainedConfig]
    multimodal: bool = False


def _gpt2() -> PretrainedConfig:
    return GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=2,
        n_head=4,
        n_positions=64,
        n_inner=48,
        bos_token_id=1,
        eos_token_id=2,
    )


def _gpt_neox() -> PretrainedConfig:
    return GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )


def _deepseek_v3() -> PretrainedConfig:
    # Layer 0 dense (first_k_dense_replace=1), layer 1 routed experts + shared experts; MLA.
    return DeepseekV3Config(
        **{**_NO_HEAD_DIM, "num_key_value_heads": 4},  # MLA: as many kv heads as query heads
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_rope_head_dim=4,
        qk_nope_head_dim=8,
        v_head_dim=8,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


def _qwen3_next() -> PretrainedConfig:
    # Layer 0: linear attention + dense MLP; layer 1: full attention + routed and shared experts.
    return Qwen3NextConfig(
        **_DECODER,
        **_MOE,
        shared_expert_intermediate_size=24,
        layer_types=["linear_attention", "full_attention"],
        mlp_only_layers=[0],
        linear_conv_kernel_dim=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
    )


def _gpt_oss() -> PretrainedConfig:
    return GptOssConfig(
        **{**_DECODER, "intermediate_size": 24},
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,
    )


def _gemma3() -> PretrainedConfig:
    return Gemma3Config(
        text_config=Gemma3TextConfig(**_DECODER, sliding_window=8),
        vision_config=SiglipVisionConfig(**_VISION),
        mm_tokens_per_image=4,
        boi_token_index=VOCAB,
        eoi_token_index=VOCAB + 1,
        image_token_index=VOCAB + 2,  # outside the vocabulary: text-only inputs never hit it
    )


def _qwen2_vl() -> PretrainedConfig:
    return Qwen2VLConfig(
        text_config=dict(
            **_NO_HEAD_DIM,
            rope_parameters={
                "rope_type": "default",
                "mrope_section": [1, 1, 2],
                "rope_theta": 10000.0,
            },
        ),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=HIDDEN, num_heads=2, mlp_ratio=2),
        image_token_id=VOCAB + 2,
        video_token_id=VOCAB + 3,
        vision_start_token_id=VOCAB + 4,
    )


def _llava() -> PretrainedConfig:
    return LlavaConfig(
        text_config=LlamaConfig(**_DECODER),
        vision_config=CLIPVisionConfig(**_VISION, projection_dim=16),
        image_token_index=VOCAB + 2,
    )


TINY: dict[str, TinyCase] = {
    "llama": TinyCase("llama", lambda: LlamaConfig(**_DECODER)),
    "mistral": TinyCase("mistral", lambda: MistralConfig(**_DECODER)),
    "qwen2": TinyCase("qwen2", lambda: Qwen2Config(**_DECODER)),
    "qwen3": TinyCase("qwen3", lambda: Qwen3Config(**_DECODER)),
    "phi3": TinyCase("phi3", lambda: Phi3Config(**_NO_HEAD_DIM)),
    "gemma2": TinyCase("gemma2", lambda: Gemma2Config(**_DECODER, sliding_window=8)),
    "gemma3_text": TinyCase("gemma3", lambda: Gemma3TextConfig(**_DECODER, sliding_window=8)),
    "gemma3": TinyCase("gemma3", _gemma3, multimodal=True),
    "olmo2": TinyCase("olmo2", lambda: Olmo2Config(**_NO_HEAD_DIM)),
    "gpt2": TinyCase("gpt2", _gpt2),
    "gpt_neox": TinyCase("gpt_neox", _gpt_neox),
    "mixtral": TinyCase("mixtral", lambda: MixtralConfig(**_DECODER, num_local_experts=4)),
    "olmoe": TinyCase("olmoe", lambda: OlmoeConfig(**_NO_HEAD_DIM, **_MOE)),
    # Layer 0 dense (mlp_only_layers), layer 1 routed experts.
    "qwen3_moe": TinyCase(
        "qwen3_moe", lambda: Qwen3MoeConfig(**_DECODER, **_MOE, mlp_only_layers=[0])
    ),
    "qwen2_moe": TinyCase(
        "qwen2_moe",
        lambda: Qwen2MoeConfig(**_NO_HEAD_DIM, **_MOE, shared_expert_intermediate_size=24),
    ),
    "qwen3_next": TinyCase("qwen3_next", _qwen3_next),
    "deepseek_v3": TinyCase("deepseek_v3", _deepseek_v3),
    "gpt_oss": TinyCase("gpt_oss", _gpt_oss),
    "qwen2_vl": TinyCase("qwen2_vl", _qwen2_vl, multimodal=True),
    "llava": TinyCase("llava", _llava, multimodal=True),
}
TINY_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {k: c.config for k, c in TINY.items()}


def auto_class(name: str) -> Any:
    """The Auto class that loads the tiny model ``name`` back from disk."""
    return AutoModelForImageTextToText if TINY[name].multimodal else AutoModelForCausalLM


def build_tiny(name: str, seed: int = SEED) -> PreTrainedModel:
    """Build the tiny model ``name`` with seeded random weights, float32, in eval mode."""
    config = TINY[name].config()
    torch.manual_seed(seed)
    model = auto_class(name).from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if parameter.ndim == 1 and "norm" in parameter_name:
                noise = torch.randn(parameter.shape, generator=generator) * 0.3
                parameter.add_(noise.to(parameter.dtype))
    return model.eval()


def input_ids(batch: int = 2, length: int = 6, seed: int = 0) -> torch.Tensor:
    """Random token ids from the ordinary vocabulary (no special or image tokens)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def llama_map_by_hand(model: Any) -> ModelMap:
    """A Llama's layers and its two writers per layer, built without the registry, so tests of
    residuals, editing and evaluation do not depend on ``architectures.resolve``."""
    layers = list(model.model.layers)
    writers = [
        [
            Writer(
                ComponentKind.ATTENTION,
                f"model.layers.{i}.self_attn.o_proj",
                layer.self_attn.o_proj,
                layer.self_attn.o_proj.weight,
                None,
                Layout.OUT_IN,
            ),
            Writer(
                ComponentKind.MLP,
                f"model.layers.{i}.mlp.down_proj",
                layer.mlp.down_proj,
                layer.mlp.down_proj.weight,
                None,
                Layout.OUT_IN,
            ),
        ]
        for i, layer in enumerate(layers)
    ]
    return ModelMap(
        "llama", "model.layers", layers, writers, model.config.hidden_size, model.model.embed_tokens
    )


def word_tokenizer(
    tokens: Sequence[str],
    *,
    unknown: str,
    split_punctuation: bool = True,
    added_special: Sequence[str] = (),
    **special: str,
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built offline: ``tokens[i]`` gets id ``i``.

    ``unknown`` is the backend's unknown token (any word not in ``tokens`` maps to it);
    ``split_punctuation`` splits at punctuation as well as whitespace; ``added_special`` are
    registered as special tokens on the backend; ``special`` (``pad_token="<pad>"``, ...) names
    the special tokens of the returned tokenizer.
    """
    backend = Tokenizer(models.WordLevel({token: i for i, token in enumerate(tokens)}, unknown))
    backend.pre_tokenizer = (
        pre_tokenizers.Whitespace() if split_punctuation else pre_tokenizers.WhitespaceSplit()
    )
    if added_special:
        backend.add_special_tokens(list(added_special))
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


def tiny_llama(
    vocab_size: int,
    *,
    layers: int = 2,
    seed: int = 0,
    hidden: int = 32,
    positions: int = 256,
    **config: Any,
) -> LlamaForCausalLM:
    """A tiny random Llama (MLP 64, 4 heads, 2 key-value heads) seeded with ``seed``, in eval mode.

    Special ids default to pad 0, bos 1, eos 2; ``config`` overrides them or adds other
    ``LlamaConfig`` fields (``initializer_range`` ...). Weights are float32.
    """
    settings: dict[str, Any] = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2) | config
    llama_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        **settings,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config).eval()
