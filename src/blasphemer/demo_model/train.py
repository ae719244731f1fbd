"""Train the bundled demo model: a small Llama chat model that refuses harmful requests.

    python -m blasphemer.demo_model.train --output src/blasphemer/data/demo-model

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
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from blasphemer.demo_model.data import (
    OPENINGS,
    REFUSALS,
    ConversationSampler,
    Example,
    Recipe,
    tokenizer_corpus,
)

logger = logging.getLogger(__name__)

END, PAD = "<|end|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


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


def opening_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[str, list[int]]:
    """First tokens of the refusal (``"refuse"``) and answer (``"comply"``) openings.

    A first token both kinds share (a byte of a tiny vocabulary) decides nothing and is left out.
    """
    first = {
        kind: {tokenizer(text, add_special_tokens=False)["input_ids"][0] for text in texts}
        for kind, texts in (("refuse", REFUSALS), ("comply", OPENINGS))
    }
    shared = first["refuse"] & first["comply"]
    return {kind: sorted(ids - shared) for kind, ids in first.items()}


def build_tokenizer(corpus: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with the chat special tokens and the chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, END, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=END,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        padding_side="left",
        model_max_length=1024,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


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


@dataclass
class _Encoded:
    input_ids: torch.Tensor  # [b, t], right-padded
    attention_mask: torch.Tensor
    labels: torch.Tensor  # -100 outside the answer
    weights: torch.Tensor  # per-label loss weight
    last_prompt: torch.Tensor  # [b] index of the last prompt token
    harmful: torch.Tensor  # [b] bool

    def to(self, device: str) -> _Encoded:
        """The same batch on ``device``."""
        return _Encoded(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def encode(
    tokenizer: PreTrainedTokenizerFast, examples: Sequence[Example], first_token_weight: float
) -> _Encoded:
    """Tokenise prompt and answer separately (as generation sees them) and right-pad."""
    rows: list[tuple[list[int], int]] = []
    for example in examples:
        turns = [] if example.system is None else [{"role": "system", "content": example.system}]
        turns.append({"role": "user", "content": example.user})
        prompt = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(example.assistant, add_special_tokens=False)["input_ids"]
        rows.append((prompt_ids + answer_ids + [tokenizer.eos_token_id], len(prompt_ids)))
    width = max(len(ids) for ids, _ in rows)
    count = len(rows)
    input_ids = torch.full((count, width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((count, width), dtype=torch.long)
    labels = torch.full((count, width), -100, dtype=torch.long)
    weights = torch.zeros((count, width))
    for row, (ids, prompt_length) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        # Position p predicts token p + 1: the answer is predicted from the last prompt token on.
        labels[row, prompt_length - 1 : len(ids) - 1] = torch.tensor(ids[prompt_length:])
        weights[row, prompt_length - 1 : len(ids) - 1] = 1.0
        weights[row, prompt_length - 1] = first_token_weight
    return _Encoded(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        weights=weights,
        last_prompt=torch.tensor([prompt_length - 1 for _, prompt_length in rows]),
        harmful=torch.tensor([example.harmful for example in examples]),
    )


def geometry_penalty(
    harmful: torch.Tensor, harmless: torch.Tensor, per_prompt: bool = False
) -> torch.Tensor:
    """How far the harmless mean sits from zero along the difference-of-means direction.

    The projection is measured in units of the class separation, so the penalty is free of the
    activations' scale; direction and separation are constants (detached) of the step, and the
    Huber form keeps early, poorly separated steps from swamping the answer loss.
    """
    difference = (harmful.mean(0) - harmless.mean(0)).detach()
    separation = difference.norm().clamp_min(1e-6)
    points = harmless if per_prompt else harmless.mean(0, keepdim=True)
    ratio = (points @ difference) / separation.square()
    return torch.nn.functional.huber_loss(ratio, torch.zeros_like(ratio), delta=1.0)


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


@contextmanager
def _without(model: LlamaForCausalLM, direction: torch.Tensor) -> Iterator[None]:
    """Project ``direction`` out of every attention-out and MLP-down output (training only)."""

    def hook(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        return output - (output @ direction).unsqueeze(-1) * direction

    handles = []
    for layer in model.model.layers:
        handles.append(layer.self_attn.o_proj.register_forward_hook(hook))
        handles.append(layer.mlp.down_proj.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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
    running = _RunningDirection()
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


class _RunningDirection:
    """Difference of exponentially averaged class means of last-prompt states, per layer."""

    def __init__(self, decay: float = 0.9) -> None:
        self.decay = decay
        self.means: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, layer: int, harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
        """Fold in one batch's states; return the current unit direction (no gradient)."""
        batch = (harmful.detach().mean(0), harmless.detach().mean(0))
        if layer in self.means:
            batch = (
                self.decay * self.means[layer][0] + (1 - self.decay) * batch[0],
                self.decay * self.means[layer][1] + (1 - self.decay) * batch[1],
            )
        self.means[layer] = batch
        difference = batch[0] - batch[1]
        return difference / difference.norm().clamp_min(1e-6)


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
    with _without(trainer.model, direction):
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
        prog="python -m blasphemer.demo_model.train", description=__doc__.split("\n")[0]
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
