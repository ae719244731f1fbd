"""The subcommands that take a model: ``inspect``, ``evaluate``, ``chat`` and ``export-gguf``."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TextIteratorStreamer

from blasphemer import architectures, gguf_source, loading
from blasphemer.app import stages
from blasphemer.app.config import Settings
from blasphemer.app.console import Console
from blasphemer.errors import ConfigError
from blasphemer.evaluation import wilson_interval
from blasphemer.optimization import (
    tier,
)


@dataclass(frozen=True)
class ModelRef:
    """A model named on the command line: id, folder or .gguf file, and the GGUF inside it."""

    name: str
    gguf_file: str | None = None


def _load(settings: Settings, model: ModelRef | None = None) -> loading.LoadedModel:
    if model is None:
        return stages.load_model(settings)
    return stages.load_model(settings, model.name, model.gguf_file)


def inspect(settings: Settings, as_json: bool, console: Console) -> int:
    """Print the layers and residual-stream writers Blasphemer would edit."""
    loaded = _load(settings)
    description = architectures.describe(stages.resolve_map(settings, loaded))
    if loaded.gguf is not None and loaded.gguf.local_path is not None:
        header = gguf_source.read_header(loaded.gguf.local_path)
        description["gguf"] = {
            "file": str(header.path),
            "architecture": header.architecture,
            "tensor_types": header.tensor_types,
            "parameters": header.n_parameters,
            "chat_template": header.has_chat_template,
        }
    if as_json:
        console.info(json.dumps(description, indent=2))
        return 0
    console.info(
        f"{settings.model}: {description['spec']} with {description['n_layers']} layers, "
        f"hidden size {description['hidden_size']}, layers at {description['layers_path']}"
    )
    rows = [  # describe() lists, per layer, that layer's writers
        [str(index), w["kind"], w["path"], "x".join(map(str, w["shape"])), w["layout"]]
        for index, writers in enumerate(description["layers"])
        for w in writers
    ]
    console.table("residual-stream writers", ["layer", "kind", "module", "shape", "layout"], rows)
    return 0


def evaluate(settings: Settings, base_ref: ModelRef, as_json: bool, console: Console) -> int:
    """Refusals (report split, full length) and KL of ``settings.model`` against ``base``."""
    base = base_ref.name
    # The base model's run context: its prompt splits and the batch size measured on it (or
    # --batch-size), used for both models.
    notes = console.on_stderr() if as_json else console
    ctx = stages.prepare(settings, notes, model=base, gguf_file=base_ref.gguf_file)
    prompts = ctx.prompts
    kl = ctx.kl_scorer(prompts.harmless.report)

    def refusals() -> tuple[int, int, int | None]:  # of the context's model: markers, semantic
        scorer = ctx.refusal_scorer(prompts.harmful.report, for_judge=True)
        result = scorer.evaluate()
        semantic = ctx.semantic_refusals(scorer, result, prompts.harmful.report_prompts)
        return sum(result.refused), len(result.refused), semantic

    base_refused, n, base_semantic = refusals()
    model_loaded = _load(settings)
    if len(model_loaded.tokenizer) != len(ctx.loaded.tokenizer):
        raise ConfigError(
            f"{settings.model} and {base} have different vocabularies; KL needs the same tokenizer"
        )
    ctx.loaded = kl.loaded = model_loaded  # the base model goes; KL keeps its logits
    divergence = kl.score()
    refused, _, semantic = refusals()
    low, high = wilson_interval(refused, n)
    result: dict[str, object] = {
        "model": settings.model,
        "base": base,
        "n_harmful": n,
        "refusals": refused,
        "refusal_rate": refused / n,
        "refusal_rate_95ci": [low, high],
        "base_refusals": base_refused,
        "base_refusal_rate": base_refused / n,
        "n_harmless": len(prompts.harmless.report),
        "kl": divergence,
    }
    rows = [
        ["refusals (markers)", f"{refused}/{n} = {refused / n:.1%} [{low:.1%}-{high:.1%}]"],
        ["base refusals (markers)", f"{base_refused}/{n} = {base_refused / n:.1%}"],
    ]
    headline = refused
    if semantic is not None and base_semantic is not None:
        s_low, s_high = wilson_interval(semantic, n)
        result.update(
            semantic_refusals=semantic,
            semantic_refusal_rate=semantic / n,
            semantic_refusal_rate_95ci=[s_low, s_high],
            base_semantic_refusals=base_semantic,
            base_semantic_refusal_rate=base_semantic / n,
        )
        rows += [
            [
                "refusals (semantic)",
                f"{semantic}/{n} = {semantic / n:.1%} [{s_low:.1%}-{s_high:.1%}]",
            ],
            ["base refusals (semantic)", f"{base_semantic}/{n} = {base_semantic / n:.1%}"],
        ]
        headline = semantic
    if as_json:
        console.info(json.dumps(result, indent=2))
    else:
        rows += [
            ["KL (first token)", f"{divergence:.4f}"],
            ["tier", tier(headline / n, divergence).value],
        ]
        console.table(f"{settings.model} against {base} (report split)", ["measure", "value"], rows)
    return 0


def chat(settings: Settings, console: Console) -> int:
    """A streaming chat REPL; an empty line or Ctrl-D ends it."""
    loaded = _load(settings)
    tokenizer = loaded.tokenizer
    messages: list[dict[str, str]] = []
    if settings.system_prompt:
        messages.append({"role": "system", "content": settings.system_prompt})
    console.info("chat with the model; an empty line ends the chat")
    while True:
        try:
            text = console.text("> ").strip()
        except EOFError:
            break
        if not text:
            break
        messages.append({"role": "user", "content": text})
        encoded: Any = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        ids = encoded.to(loaded.input_device)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = {**ids, "max_new_tokens": settings.max_new_tokens, "do_sample": False}
        worker = threading.Thread(target=_generate, args=(loaded, kwargs, streamer), daemon=True)
        worker.start()
        reply = []
        for piece in streamer:
            reply.append(piece)
            console.stream(piece)
        worker.join()
        console.stream("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


def _generate(loaded: loading.LoadedModel, kwargs: dict[str, object], streamer: object) -> None:
    with torch.inference_mode():
        loaded.model.generate(**kwargs, streamer=streamer)  # type: ignore[operator]


def export_gguf(
    model_dir: Path,
    output: Path,
    *,
    gguf_type: str | None,
    force: bool,
    source_gguf: Path | None,
    console: Console,
) -> int:
    """``blasphemer export-gguf``: one GGUF file from a saved model folder."""
    from blasphemer import gguf_export

    if source_gguf is None:
        source_gguf = _recorded_source(model_dir, console)
    result = gguf_export.export_gguf(
        model_dir, output, type=gguf_type, force=force, source_gguf=source_gguf
    )
    record = gguf_export.describe(result)
    for note in result.notes:
        console.warn(note)
    console.info(f"wrote {result.path} ({record['summary']}); sha256 {result.sha256}")
    return 0


def _recorded_source(model_dir: Path, console: Console) -> Path | None:
    """The GGUF ``model_dir/results.json`` says the model came from, if unchanged on disk."""
    try:
        recorded = json.loads((model_dir / "results.json").read_text()).get("gguf_source")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(recorded, dict) or not recorded.get("file"):
        return None
    path = Path(recorded["file"])
    if not path.is_file() or gguf_source.sha256_of(path) != recorded.get("sha256"):
        console.warn(
            f"the source GGUF {path} named in results.json is gone or changed; "
            "writing every tensor anew (pass --source-gguf to copy from a file)"
        )
        return None
    console.info(f"copying unedited tensors from the source GGUF {path}")
    return path
