"""The architecture registry: one declarative entry per model family.

Each entry says where the decoder layers live and which modules inside a layer write into the
residual stream. Paths were read off the transformers 5.x modeling code; every writer's output
(after the noted post-norm, if any) is exactly what its layer adds to the residual stream.

Multimodal models are matched by their own ``model_type`` or by their text tower's
``text_config.model_type``; only the text tower's layers are mapped (``model.language_model``).
"""

from __future__ import annotations

from blasphemer.architectures.base import ArchitectureSpec, ComponentKind, Layout, WriterSpec

ATTN = ComponentKind.ATTENTION
MLP = ComponentKind.MLP

# Causal LMs keep their decoder under ``model``; multimodal wrappers under
# ``model.language_model``. Both are listed so a text family also maps inside an unknown wrapper.
DECODER_LAYERS = ("model.layers", "model.language_model.layers")
TOKEN_EMBEDDINGS = ("model.embed_tokens", "model.language_model.embed_tokens")

O_PROJ = WriterSpec(ATTN, ("self_attn.o_proj",))
DOWN_PROJ = WriterSpec(MLP, ("mlp.down_proj",))
DENSE = (O_PROJ, DOWN_PROJ)


def _experts(layout: Layout = Layout.EXPERTS_OUT_IN, optional: bool = False) -> WriterSpec:
    """Fused experts: hooking the module sees the routing-weighted sum, ``down_proj`` is 3-D."""
    return WriterSpec(
        MLP, ("mlp.experts",), layout, "down_proj", "down_proj_bias", optional=optional
    )


def _dense(name: str, *model_types: str) -> ArchitectureSpec:
    """A Llama-style pre-norm decoder: attention ``o_proj`` and MLP ``down_proj``."""
    return ArchitectureSpec(name, model_types or (name,), DECODER_LAYERS, DENSE, TOKEN_EMBEDDINGS)


# Gemma 2/3 and OLMo 2 normalise each sublayer's output before the residual add ("sandwich"
# norms): the residual receives post_norm(o_proj(x)). We still edit o_proj (a linear map, so
# hooks and merged weights agree) but against the direction pulled back through the norm's gain,
# see Writer.output_direction. Gemma's RMSNorm multiplies by (1 + weight), OLMo 2's by weight.
# Note: in Llama-style models ``post_attention_layernorm`` is the *pre*-MLP norm; only here is it
# applied to the attention output.
def _sandwich(name: str, model_types: tuple[str, ...], offset: float) -> ArchitectureSpec:
    writers = (
        WriterSpec(
            ATTN,
            ("self_attn.o_proj",),
            post_norm="post_attention_layernorm",
            post_norm_offset=offset,
        ),
        WriterSpec(
            MLP, ("mlp.down_proj",), post_norm="post_feedforward_layernorm", post_norm_offset=offset
        ),
    )
    return ArchitectureSpec(name, model_types, DECODER_LAYERS, writers, TOKEN_EMBEDDINGS)


REGISTRY: tuple[ArchitectureSpec, ...] = (
    _dense("llama"),
    _dense("mistral"),
    _dense("qwen2"),
    _dense("qwen3"),
    _dense("phi3"),  # fused qkv/gate_up inputs; the writers are the usual o_proj/down_proj
    _sandwich("gemma2", ("gemma2",), offset=1.0),
    # gemma3: multimodal Gemma3ForConditionalGeneration; gemma3_text: text-only Gemma3ForCausalLM
    _sandwich("gemma3", ("gemma3", "gemma3_text"), offset=1.0),
    _sandwich("olmo2", ("olmo2",), offset=0.0),
    # Qwen2-VL: the text tower is a Qwen2 decoder at model.language_model.
    _dense("qwen2_vl", "qwen2_vl", "qwen2_vl_text"),
    # LLaVA wraps any text decoder; the common towers (Llama, Mistral, Qwen2) are Llama-style.
    ArchitectureSpec(
        "llava",
        ("llava",),
        ("model.language_model.layers",),
        DENSE,
        ("model.language_model.embed_tokens",),
    ),
    ArchitectureSpec(
        "gpt2",
        ("gpt2",),
        ("transformer.h",),
        (
            WriterSpec(ATTN, ("attn.c_proj",), Layout.IN_OUT),  # Conv1D: weight [in, out]
            WriterSpec(MLP, ("mlp.c_proj",), Layout.IN_OUT),
        ),
        ("transformer.wte",),
    ),
    # Parallel or sequential residual, both add attention.dense and mlp.dense_4h_to_h unchanged.
    ArchitectureSpec(
        "gpt_neox",
        ("gpt_neox",),
        ("gpt_neox.layers",),
        (WriterSpec(ATTN, ("attention.dense",)), WriterSpec(MLP, ("mlp.dense_4h_to_h",))),
        ("gpt_neox.embed_in",),
    ),
    ArchitectureSpec(
        "mixtral", ("mixtral",), DECODER_LAYERS, (O_PROJ, _experts()), TOKEN_EMBEDDINGS
    ),
    ArchitectureSpec("olmoe", ("olmoe",), DECODER_LAYERS, (O_PROJ, _experts()), TOKEN_EMBEDDINGS),
    # Qwen MoE families: layers listed in mlp_only_layers (or off decoder_sparse_step) are dense.
    ArchitectureSpec(
        "qwen3_moe",
        ("qwen3_moe",),
        DECODER_LAYERS,
        (O_PROJ, WriterSpec(MLP, ("mlp.down_proj",), optional=True), _experts(optional=True)),
        TOKEN_EMBEDDINGS,
    ),
    # The shared expert's output is scaled by a per-token sigmoid gate: a scalar, so removing the
    # direction from the shared expert's down_proj removes it from the gated sum too.
    ArchitectureSpec(
        "qwen2_moe",
        ("qwen2_moe",),
        DECODER_LAYERS,
        (
            O_PROJ,
            WriterSpec(MLP, ("mlp.down_proj",), optional=True),
            _experts(optional=True),
            WriterSpec(MLP, ("mlp.shared_expert.down_proj",), optional=True),
        ),
        TOKEN_EMBEDDINGS,
    ),
    # Hybrid: linear-attention (Gated DeltaNet) layers write through linear_attn.out_proj, full
    # attention layers through self_attn.o_proj.
    ArchitectureSpec(
        "qwen3_next",
        ("qwen3_next",),
        DECODER_LAYERS,
        (
            WriterSpec(ATTN, ("self_attn.o_proj", "linear_attn.out_proj")),
            WriterSpec(MLP, ("mlp.down_proj",), optional=True),
            _experts(optional=True),
            WriterSpec(MLP, ("mlp.shared_expert.down_proj",), optional=True),
        ),
        TOKEN_EMBEDDINGS,
    ),
    # The first first_k_dense_replace layers have a dense MLP, the rest routed + shared experts.
    ArchitectureSpec(
        "deepseek_v3",
        ("deepseek_v3",),
        DECODER_LAYERS,
        (
            O_PROJ,
            WriterSpec(MLP, ("mlp.down_proj",), optional=True),
            _experts(optional=True),
            WriterSpec(MLP, ("mlp.shared_experts.down_proj",), optional=True),
        ),
        TOKEN_EMBEDDINGS,
    ),
    # GPT-OSS experts store down_proj as [E, in, out] and add a per-expert bias; both are
    # weighted by the router, so the experts module's output is still a linear write.
    ArchitectureSpec(
        "gpt_oss",
        ("gpt_oss",),
        DECODER_LAYERS,
        (O_PROJ, _experts(Layout.EXPERTS_IN_OUT)),
        TOKEN_EMBEDDINGS,
    ),
)


def _index(registry: tuple[ArchitectureSpec, ...]) -> dict[str, ArchitectureSpec]:
    index: dict[str, ArchitectureSpec] = {}
    for spec in registry:
        for model_type in spec.model_types:
            if model_type in index:
                raise ValueError(f"model_type {model_type!r} registered twice")
            index[model_type] = spec
    return index


_BY_MODEL_TYPE = _index(REGISTRY)


def spec_for_model_types(
    model_types: list[str], registry: tuple[ArchitectureSpec, ...] = REGISTRY
) -> ArchitectureSpec | None:
    """The first registry entry matching any of ``model_types`` (in order), or ``None``."""
    index = _BY_MODEL_TYPE if registry is REGISTRY else _index(registry)
    for model_type in model_types:
        if model_type in index:
            return index[model_type]
    return None
