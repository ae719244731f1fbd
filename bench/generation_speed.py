"""Micro benchmark: early-stopping refusal generation against full-length generation.

Runs a random Llama built from a config (no download) on chat-like random prompts, with markers
chosen among the words the model writes first, so that about half of the answers are "refused"
at once and the rest run on (like a harmful prompt set during a study). Prints the median time
of each mode over several repeats, measured in the same run, and their ratios:

    python bench/generation_speed.py            # CPU, small model
    python bench/generation_speed.py --device cuda --hidden 1024 --layers 16 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from blasphemer.evaluation.generation import (
    encode_texts,
    generate_verdicts,
    length_sorted_batches,
)
from blasphemer.evaluation.markers import DEFAULT_DECIDED_AFTER, RefusalMarkers


def build(args: argparse.Namespace) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    vocab = ["<pad>", "<s>", "</s>", *(f"w{i}" for i in range(args.vocab - 3))]
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="w0"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 256),
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    with torch.device(args.device):  # initialise on the device: fast for large models
        model = LlamaForCausalLM(config)
    model = model.to(getattr(torch, args.dtype)).eval()
    return model, tokenizer


def median_times(
    functions: dict[str, Callable[[], object]], repeats: int, device: str
) -> dict[str, float]:
    """Median wall time of each function; repeats are interleaved so load changes hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            function()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-words", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--decided-after", type=int, default=DEFAULT_DECIDED_AFTER)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    model, tokenizer = build(args)
    rng = random.Random(0)
    texts = [
        " ".join(
            f"w{rng.randrange(3, args.vocab - 3)}" for _ in range(rng.randint(8, args.prompt_words))
        )
        for _ in range(args.prompts)
    ]
    prompts = encode_texts(tokenizer, texts)

    # Markers: the most common first words, until about half of the answers open with one.
    probe = generate_verdicts(
        model, tokenizer, prompts, RefusalMarkers(["<never>"]),
        max_new_tokens=1, decided_after=None, batch_size=args.batch_size,
    )  # fmt: skip
    first_words = Counter(v.text.split()[0] for v in probe if v.text.split())
    chosen, covered = [], 0
    for word, count in first_words.most_common():
        if covered >= args.prompts // 2:
            break
        chosen.append(word)
        covered += count
    markers = RefusalMarkers(chosen or ["<never>"])

    def run(decided_after: int | None) -> list:
        return generate_verdicts(
            model, tokenizer, prompts, markers, max_new_tokens=args.max_new_tokens,
            decided_after=decided_after, batch_size=args.batch_size,
        )  # fmt: skip

    def hf_generate() -> list[list[int]]:
        """The baseline: model.generate on batches of the same size and the same grouping."""
        answers: list[list[int]] = [[] for _ in texts]
        for indices in length_sorted_batches([len(p) for p in prompts], args.batch_size):
            batch = tokenizer(
                [texts[i] for i in indices],
                padding=True,
                padding_side="left",
                return_tensors="pt",
                add_special_tokens=False,
            ).to(args.device)
            with torch.inference_mode():
                output = model.generate(
                    **batch, do_sample=False, max_new_tokens=args.max_new_tokens, pad_token_id=0
                )
            rows = output[:, batch["input_ids"].shape[1] :].tolist()
            for index, row in zip(indices, rows, strict=True):
                answers[index] = row[: row.index(2)] if 2 in row else row
        return answers

    run(args.decided_after)  # warm-up (allocator, kernels)
    early_verdicts, full_verdicts = run(args.decided_after), run(None)
    refused = sum(v.refused for v in early_verdicts)
    same_as_generate = sum(
        list(v.tokens) == row for v, row in zip(full_verdicts, hf_generate(), strict=True)
    )
    agree = sum(a.refused == b.refused for a, b in zip(early_verdicts, full_verdicts, strict=True))
    medians = median_times(
        {
            "early": lambda: run(args.decided_after),
            "full": lambda: run(None),
            "generate": hf_generate,
            "prefill": lambda: generate_verdicts(
                model, tokenizer, prompts, markers, max_new_tokens=1, decided_after=None,
                batch_size=args.batch_size,
            ),
        },
        args.repeats,
        args.device,
    )  # fmt: skip
    early, full, reference, prefill = (
        medians[name] for name in ("early", "full", "generate", "prefill")
    )
    tokens_early = sum(len(v.tokens) for v in early_verdicts)
    tokens_full = sum(len(v.tokens) for v in full_verdicts)

    print(
        f"model: random Llama hidden={args.hidden} layers={args.layers} vocab={args.vocab} "
        f"{args.dtype} on {args.device}; {args.prompts} prompts, batch {args.batch_size}, "
        f"max_new_tokens={args.max_new_tokens}, decided_after={args.decided_after}"
    )
    print(f"refused (early): {refused}/{args.prompts}; verdicts equal to full length: {agree}")
    print(f"tokens generated: early {tokens_early}, full {tokens_full}")
    print(f"full-mode answers identical to model.generate: {same_as_generate}/{args.prompts}")
    print(f"median of {args.repeats} runs (s): early {early:.3f}, full {full:.3f}, ", end="")
    print(f"model.generate {reference:.3f}, prompt pass + 1 token {prefill:.3f}")
    print(f"ratio early / full length:      {early / full:.3f}  (speed-up {full / early:.2f}x)")
    print(f"ratio our full / model.generate: {full / reference:.3f}")


if __name__ == "__main__":
    main()
