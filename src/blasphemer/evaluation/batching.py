"""Choose the batch size: a memory ceiling, then a throughput measurement that cannot collapse.

The ceiling comes from arithmetic, not from trying: the bytes one sequence needs at the longest
prompt plus the response (KV cache, hidden states, attention scores, logits) against the free
memory of the model's device. Below it, powers of two from a floor upwards are timed, every size
once per round over three rounds, the first of which is also the warm-up (so a burst of load
from other processes hits all sizes alike), and each size keeps its fastest round (noise only
ever adds time). A larger size is kept unless it is clearly slower per prompt than the best so
far, and no size below the floor is ever chosen for timing reasons alone: on a busy machine the
pick stays near the quiet machine's pick.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch

from blasphemer.evaluation.generation import ModelLike, greedy_tokens, pad_token_id

logger = logging.getLogger(__name__)

_PROBE_TOKENS = 4
FLOOR = 8  # timing alone never picks fewer prompts per pass (batching is rarely slower per prompt)
REPEATS = 3  # timing rounds, the warm-up included; each size keeps its fastest
CLEARLY_SLOWER = 0.9  # a larger size is kept unless its rate is below this share of the best
MEMORY_SHARE = 0.5  # of the free memory, for the batch's activations and KV cache

Clock = Callable[[], float]


@dataclass(frozen=True)
class BatchChoice:
    """The chosen batch size, why, and what was measured (prompts per second by size)."""

    size: int
    reason: str
    ceiling: int
    rates: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for ``results.json``."""
        return {
            "size": self.size,
            "reason": self.reason,
            "memory_ceiling": self.ceiling,
            "prompts_per_s": {str(k): round(v, 3) for k, v in sorted(self.rates.items())},
        }


def bytes_per_sequence(config: Any, tokens: int, dtype_bytes: int) -> int:
    """Peak bytes one sequence of ``tokens`` tokens needs in a batch (weights excluded).

    KV cache and every layer's hidden states in the model dtype, one layer's transient
    activations and the attention scores in float32, and the last position's logits. An
    estimate on the safe side; ``config`` is a transformers config (text config for multimodal).
    """
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 0) or 1)
    kv_heads = int(getattr(config, "num_key_value_heads", 0) or heads)
    head_dim = int(getattr(config, "head_dim", 0) or (hidden // heads if hidden else 0))
    intermediate = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    per_token = (
        2 * layers * kv_heads * head_dim * dtype_bytes  # KV cache
        + (layers + 1) * hidden * dtype_bytes  # hidden states (residual measurements)
        + (4 * hidden + 2 * intermediate) * 4  # one layer's activations
    )
    return tokens * per_token + heads * tokens * tokens * 4 + 2 * vocab * 4


def free_memory(device: torch.device) -> int:
    """Free bytes where the batch lives: the GPU's free memory, or available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(psutil.virtual_memory().available)


def memory_ceiling(per_sequence: int, free_bytes: int, max_batch_size: int) -> int:
    """The most sequences that fit in :data:`MEMORY_SHARE` of ``free_bytes`` (1 to the maximum)."""
    fitting = int(MEMORY_SHARE * free_bytes) // max(1, per_sequence)
    return max(1, min(max_batch_size, fitting))


def candidate_sizes(floor: int, ceiling: int, n_prompts: int) -> list[int]:
    """Powers of two from ``floor`` up to the ceiling; the ceiling (or the prompt count) last."""
    top = max(1, min(ceiling, n_prompts))
    start = max(1, min(floor, top))
    sizes = []
    size = start
    while size < top:
        sizes.append(size)
        size *= 2
    sizes.append(top)
    return sizes


def measure_rates(
    run: Callable[[int], None], sizes: Sequence[int], *, repeats: int, clock: Clock
) -> dict[int, float]:
    """Prompts per second of ``run(size)`` for each size: its fastest of ``repeats`` rounds.

    Every size runs once per round, so a load burst from other processes slows all sizes alike
    instead of one. The first round also warms up (allocator, kernels, caches) and finds the
    sizes that fit: it is timed like the others, and since each size keeps its fastest round, a
    slow warm-up never wins. A size that runs out of memory is dropped with every larger one.
    """
    fitting: list[int] = []
    best: dict[int, float] = {}
    for round_ in range(max(1, repeats)):
        for size in list(sizes if round_ == 0 else fitting):
            started = clock()
            if not _fits(run, size):
                fitting = [s for s in fitting if s < size]
                break
            elapsed = max(clock() - started, 1e-9)
            best[size] = max(best.get(size, 0.0), size / elapsed)
            if round_ == 0:
                fitting.append(size)
    return {size: rate for size, rate in best.items() if size in fitting}


def _fits(run: Callable[[int], None], size: int) -> bool:
    """Run once; False when it ran out of memory (other errors propagate)."""
    try:
        run(size)
    except RuntimeError as error:  # torch.OutOfMemoryError, or a CPU allocator's RuntimeError
        if not _out_of_memory(error):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return False
    return True


def _out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def pick_size(rates: dict[int, float]) -> tuple[int, str]:
    """The largest size reached without a clearly slower step, and why it stopped there.

    Sizes are walked upwards; each larger one is kept unless its rate is below
    :data:`CLEARLY_SLOWER` times the best rate so far, where the walk stops.
    """
    sizes = sorted(rates)
    pick, best = sizes[0], rates[sizes[0]]
    for size in sizes[1:]:
        if rates[size] < CLEARLY_SLOWER * best:
            return pick, (
                f"{size} was clearly slower ({rates[size]:.1f} vs {best:.1f} prompts/s, best of "
                "repeated rounds)"
            )
        pick, best = size, max(best, rates[size])
    return pick, "the largest size measured was not clearly slower"


def choose_batch_size(
    loaded: ModelLike,
    texts: Sequence[str],
    max_batch_size: int,
    *,
    response_tokens: int = _PROBE_TOKENS,
    sizing_texts: Sequence[str] | None = None,
    floor: int = FLOOR,
    repeats: int = REPEATS,
    clock: Clock = time.perf_counter,
    free_bytes: int | None = None,
    run: Callable[[int], None] | None = None,
) -> BatchChoice:
    """Choose the batch size for ``loaded`` on ``texts`` (timed with short greedy generations).

    The memory ceiling is for the longest of ``sizing_texts`` (default ``texts``) plus
    ``response_tokens``; ``free_bytes`` defaults to the device's free memory. Sizes from
    ``floor`` up to the ceiling are timed (see :func:`measure_rates`, :func:`pick_size`).
    ``clock`` and ``run`` (one timed generation of ``size`` prompts) are injectable for tests.
    Returns the size with its reason; the size never exceeds the ceiling or ``max_batch_size``
    and is below ``floor`` only when memory or the prompt count says so.
    """
    tokenizer = loaded.tokenizer
    prompts = list(tokenizer(list(texts), add_special_tokens=False)["input_ids"])
    sizing = (
        prompts
        if sizing_texts is None
        else tokenizer(list(sizing_texts), add_special_tokens=False)["input_ids"]
    )
    longest = max((len(ids) for ids in sizing), default=1) + response_tokens
    model = loaded.model
    config: Any = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    parameter = next(model.parameters())
    per_sequence = bytes_per_sequence(config, longest, parameter.element_size())
    free = free_memory(parameter.device) if free_bytes is None else free_bytes
    ceiling = memory_ceiling(per_sequence, free, max_batch_size)
    sizes = candidate_sizes(floor, ceiling, len(prompts))
    if run is None:
        pad = pad_token_id(tokenizer)

        def run(size: int) -> None:
            sample = [prompts[i % len(prompts)] for i in range(size)]
            greedy_tokens(model, sample, _PROBE_TOKENS, batch_size=size, pad_id=pad)

    rates = measure_rates(run, sizes, repeats=repeats, clock=clock)
    while not rates and sizes[0] > 1:  # even the smallest candidate ran out of memory
        sizes = [sizes[0] // 2]
        rates = measure_rates(run, sizes, repeats=1, clock=clock)
    if not rates:
        raise MemoryError("a batch of one prompt does not fit in memory")
    size, why = pick_size(rates)
    if len(rates) == 1:
        why = "the only size left to measure (memory, prompt count or floor)"
    reason = (
        f"{why}; memory allows {ceiling} ({per_sequence / 2**20:.2f} MiB per sequence of "
        f"{longest} tokens, {free / 2**30:.1f} GiB free); timing never picks below "
        f"{min(floor, ceiling)}"
    )
    logger.info("batch size %d: %s", size, reason)
    return BatchChoice(size, reason, ceiling, dict(rates))
