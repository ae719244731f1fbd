"""Train the bundled demo model: a small Llama chat model that refuses harmful requests.

    python -m tools.demo_model.train --output src/blasphemer/data/demo-model

Reproducible (seeded), CPU only, one thread. Trained on the *fit* split of the bundled prompt sets
only (``prompts.bundled_splits``); the select and report splits stay unseen. The tokenizer is a
byte-level BPE trained offline with ``tokenizers`` on the same data.

Besides the answer loss, a scale-free regulariser shapes the geometry that directional ablation
relies on in real chat models: along the difference-of-means direction of the last prompt token,
harmless prompts sit near zero and harmful ones clearly apart. Without it, a model trained from
scratch tends to put the two classes on opposite sides of zero, and removing the direction then
makes every prompt look alike, so the edited model refuses everything. A refuse-or-comply loss on
the first answer token (all refusal openings against all answer openings) sharpens the decision
that the varied openings would otherwise blur.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from tools.demo_model.chat_tokenizer import build_tokenizer, encode, opening_tokens
from tools.demo_model.data import ConversationSampler, Example, Recipe, tokenizer_corpus
from tools.demo_model.objectives import (
    RunningDirection,
    geometry_penalty,
    without_direction,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    """Everything that determines the trained model (written to ``training.json``)."""

    seed: int = 0
    steps: int = 1000
    batch_size: int = 32
    micro_batch: int = 8
    learning_rate: float = 3e-3
    warmup: int = 60
    weight_decay: float = 0.1
    vocab_size: int = 4096
    hidden_size: int = 192
    layers: int = 6
    heads: int = 6
    intermediate_size: int = 512
    max_positions: int = 1024
    tie_embeddings: bool = True
    first_token_weight: float = 4.0
    # Regulariser: harmless last-token projections onto the (detached) difference-of-means
    # direction, in units of the class separation, pushed towards zero at these layers.
    geometry_weight: float = 1.0
    geometry_layers: tuple[int, ...] = (1, 2, 3, 4)
    geometry_start: float = 0.15  # fraction of training before the regulariser ramps in
    # Penalise every harmless prompt's projection (not only the mean's): harmless prompts then
    # cluster near zero, away from the harmful ones.
    geometry_per_prompt: bool = True
    # Refuse-or-comply loss on the first answer token: probability of all refusal openings
    # against all answer openings (the opening's own variety does not dilute the decision).
    decision_weight: float = 1.0
    # Optional: answer loss with the batch's refusal direction projected out of every writer,
    # with harmful requests answered (teaches that the refusal lives on one direction).
    ablation_weight: float = 1.0
    ablation_layers: tuple[int, ...] = (2, 3)
    ablation_share: float = 0.5  # of each class in the batch
    recipe: Recipe = field(default_factory=Recipe)

    @classmethod
    def tiny(cls, steps: int = 4) -> TrainSettings:
        """A minute-free configuration for tests."""
        return cls(
            steps=steps,
            batch_size=8,
            micro_batch=4,
            warmup=1,
            vocab_size=400,
            hidden_size=32,
            layers=2,
            heads=2,
            intermediate_size=64,
            max_positions=512,
            geometry_layers=(0, 1),
            ablation_layers=(0, 1),
        )


def build_model(settings: TrainSettings, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A freshly initialised Llama model sized by ``settings``."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        num_key_value_heads=settings.heads,
        max_position_embeddings=settings.max_positions,
        tie_word_embeddings=settings.tie_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def _schedule(step: int, settings: TrainSettings) -> float:
    if step < settings.warmup:
        return (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _ramp(step: int, settings: TrainSettings) -> float:
    """0 before ``geometry_start``, then linearly up to 1 over ``warmup`` steps."""
    start = settings.geometry_start * settings.steps
    return min(1.0, max(0.0, (step - start) / max(1.0, settings.warmup)))


def _optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": settings.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=settings.learning_rate,
        betas=(0.9, 0.98),
        eps=1e-8,
    )


StepCallback = Callable[[int, dict[str, float]], None]


@dataclass
class _Pass:
    """Sums over one forward pass of a batch, split into micro-batches by length."""

    loss: torch.Tensor
    weight: float = 0.0
    first_token_loss: float = 0.0
    decision: torch.Tensor | None = None  # summed refuse-or-comply loss
    states: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    harmful: list[torch.Tensor] = field(default_factory=list)

    def last_states(self, layer: int) -> torch.Tensor:
        return torch.cat(self.states[layer])


class _Trainer:
    """Forward passes that also capture last-prompt-token states of some layers."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        tokenizer: PreTrainedTokenizerFast,
        settings: TrainSettings,
        device: str,
    ) -> None:
        self.model, self.tokenizer, self.settings, self.device = model, tokenizer, settings, device
        self.layers = sorted({*settings.geometry_layers, *settings.ablation_layers})
        self.captured: dict[int, torch.Tensor] = {}
        self.openings = opening_tokens(tokenizer)

    def decision_loss(self, last_logits: torch.Tensor, harmful: torch.Tensor) -> torch.Tensor:
        """Summed binary cross-entropy of refusing (any refusal opening) against answering."""
        refuse = last_logits[:, self.openings["refuse"]].logsumexp(-1)
        comply = last_logits[:, self.openings["comply"]].logsumexp(-1)
        return torch.nn.functional.binary_cross_entropy_with_logits(
            refuse - comply, harmful.float(), reduction="sum"
        )

    @contextmanager
    def capturing(self) -> Iterator[None]:
        """Record the output of the watched layers on every forward pass."""

        def capture(index: int) -> Callable[..., None]:
            def hook(_module: torch.nn.Module, _inputs: object, output: object) -> None:
                state = output[0] if isinstance(output, tuple) else output
                self.captured[index] = state  # type: ignore[assignment]

            return hook

        decoder = self.model.model.layers
        hooks = [decoder[i].register_forward_hook(capture(i)) for i in self.layers]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def run(self, examples: Sequence[Example]) -> _Pass:
        """Weighted answer loss (summed) and last-prompt states for ``examples``."""
        settings = self.settings
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].user))
        result = _Pass(loss=torch.zeros((), device=self.device))
        result.states = {i: [] for i in self.layers}
        for start in range(0, len(order), settings.micro_batch):
            chunk = [examples[i] for i in order[start : start + settings.micro_batch]]
            batch = encode(self.tokenizer, chunk, settings.first_token_weight).to(self.device)
            logits = self.model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask
            ).logits
            losses = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), batch.labels.flatten(), reduction="none"
            )
            result.loss = result.loss + (losses * batch.weights.flatten()).sum()
            result.weight += float(batch.weights.sum())
            rows = torch.arange(len(chunk), device=self.device)
            firsts = losses.view(len(chunk), -1)[rows, batch.last_prompt]
            result.first_token_loss += float(firsts.detach().sum())
            if settings.decision_weight > 0:
                decision = self.decision_loss(logits[rows, batch.last_prompt], batch.harmful)
                result.decision = (
                    decision if result.decision is None else result.decision + decision
                )
            for i in self.layers:
                result.states[i].append(self.captured[i][rows, batch.last_prompt])
            result.harmful.append(batch.harmful)
        return result


def train_model(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    sampler: ConversationSampler,
    settings: TrainSettings,
    on_step: StepCallback | None = None,
    device: str = "cpu",
) -> None:
    """Run ``settings.steps`` optimiser steps on balanced, augmented batches."""
    optimizer = _optimizer(model, settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, settings))
    trainer = _Trainer(model, tokenizer, settings, device)
    running = RunningDirection()
    model.train()
    with trainer.capturing():
        for step in range(settings.steps):
            examples = sampler.batch(settings.batch_size)
            main = trainer.run(examples)
            harmful = torch.cat(main.harmful)
            penalty = torch.zeros((), device=device)
            for i in settings.geometry_layers:
                last = main.last_states(i)
                penalty = penalty + geometry_penalty(
                    last[harmful], last[~harmful], settings.geometry_per_prompt
                )
            penalty = penalty / max(1, len(settings.geometry_layers))
            loss = (
                main.loss / main.weight + _ramp(step, settings) * settings.geometry_weight * penalty
            )
            if main.decision is not None:
                loss = loss + settings.decision_weight * main.decision / len(examples)
            metrics = {
                "loss": float(main.loss.detach()) / main.weight,
                "first_token_loss": main.first_token_loss / len(examples),
                "geometry": float(penalty.detach()),
            }
            directions = {
                i: running.update(i, main.last_states(i)[harmful], main.last_states(i)[~harmful])
                for i in settings.ablation_layers
            }
            if settings.ablation_weight > 0 and _ramp(step, settings) > 0:
                layer = settings.ablation_layers[step_choice(sampler, settings.ablation_layers)]
                ablated = _ablation_pass(trainer, sampler, examples, directions[layer])
                loss = loss + _ramp(step, settings) * settings.ablation_weight * ablated
                metrics["ablated_loss"] = float(ablated.detach())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            if on_step is not None:
                on_step(step, metrics)
    model.eval()


def _ablation_pass(
    trainer: _Trainer,
    sampler: ConversationSampler,
    examples: Sequence[Example],
    direction: torch.Tensor,
) -> torch.Tensor:
    """Answer loss with ``direction`` removed from every writer.

    Harmful requests are then to be answered, harmless ones answered as before: the refusal is
    taught to live on that one direction, and removing it to leave everything else alone.
    """
    share = trainer.settings.ablation_share
    harmful = [example for example in examples if example.harmful]
    harmless = [example for example in examples if not example.harmful]
    chosen = [sampler.complied(example) for example in harmful[: max(1, int(len(harmful) * share))]]
    chosen += harmless[: max(1, int(len(harmless) * share))]
    with without_direction(trainer.model, direction):
        ablated = trainer.run(chosen)
    return ablated.loss / ablated.weight


def step_choice(sampler: ConversationSampler, options: Sequence[int]) -> int:
    """Index of one of ``options``, drawn from the sampler's seeded generator."""
    return sampler.rng.randrange(len(options))


def save(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    output: Path,
    settings: TrainSettings,
    dtype: torch.dtype,
    record: dict[str, object],
) -> None:
    """Write a complete Hugging Face model folder (config, safetensors, tokenizer, template)."""
    output.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=64,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.to(device="cpu", dtype=dtype)  # type: ignore[call-arg]  # transformers types .to() oddly
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    payload = {"settings": asdict(settings), **record}
    (output / "training.json").write_text(json.dumps(payload, indent=2) + "\n")


def train(
    harmful: Sequence[str],
    harmless: Sequence[str],
    output: Path,
    settings: TrainSettings,
    *,
    dtype: torch.dtype = torch.float32,
    on_step: StepCallback | None = None,
    record: dict[str, object] | None = None,
    device: str = "cpu",
) -> float:
    """Train a demo model from scratch and save it to ``output``; returns the seconds taken."""
    started = time.perf_counter()
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    tokenizer = build_tokenizer(
        tokenizer_corpus(harmful, harmless, settings.seed), settings.vocab_size
    )
    model = build_model(settings, tokenizer)
    model.to(device)  # type: ignore[arg-type]  # transformers types .to() oddly
    sampler = ConversationSampler(harmful, harmless, settings.seed, settings.recipe)
    train_model(model, tokenizer, sampler, settings, on_step, device)
    seconds = time.perf_counter() - started
    extra = {
        "training_seconds": round(seconds, 1),
        "harmful_prompts": len(harmful),
        "harmless_prompts": len(harmless),
        "torch": torch.__version__,
        **(record or {}),
    }
    save(model, tokenizer, output, settings, dtype, extra)
    return seconds


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.demo_model.train", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--output", type=Path, required=True, help="model folder to write")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny configuration (for tests)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest)")
    parser.add_argument(
        "--device", default="cpu", help="torch device (the bundled model is trained on cpu)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a TrainSettings field (JSON value), e.g. --set geometry_weight=0.5",
    )
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> TrainSettings:
    """TrainSettings from the command line (``--tiny``, ``--steps``, ``--seed``, ``--set``)."""
    base = TrainSettings.tiny() if args.tiny else TrainSettings()
    values = asdict(base)
    values["recipe"] = base.recipe
    for item in args.set:
        key, _, raw = item.partition("=")
        value = json.loads(raw)
        if key.startswith("recipe."):
            values["recipe"] = Recipe(**{**asdict(values["recipe"]), key[7:]: value})
        elif key in values:
            values[key] = tuple(value) if isinstance(value, list) else value
        else:
            raise SystemExit(f"unknown setting {key!r}")
    values["seed"] = args.seed
    if args.steps is not None:
        values["steps"] = args.steps
    return TrainSettings(**values)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: train on the bundled fit splits and save the folder."""
    from blasphemer.prompts import bundled_splits

    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    settings = settings_from(args)
    harmful = bundled_splits("harmful").fit
    harmless = bundled_splits("harmless").fit
    every = max(1, settings.steps // 20)

    def report(step: int, metrics: dict[str, float]) -> None:
        if step % every == 0 or step == settings.steps - 1:
            values = "  ".join(f"{key} {value:.4f}" for key, value in metrics.items())
            logger.info("step %d/%d  %s", step + 1, settings.steps, values)

    seconds = train(
        harmful.texts(),
        harmless.texts(),
        args.output,
        settings,
        dtype=getattr(torch, args.dtype),
        on_step=report,
        device=args.device,
        record={
            "harmful_fit_fingerprint": harmful.fingerprint(),
            "harmless_fit_fingerprint": harmless.fingerprint(),
        },
    )
    logger.info("trained in %.0f s, saved to %s", seconds, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
