"""Choose the batch size by measurement: the largest that fits and is fastest per prompt."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from blasphemer.evaluation.base import ModelLike
from blasphemer.evaluation.generation import greedy_tokens, pad_token_id

_PROBE_TOKENS = 4


def _out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def choose_batch_size(loaded: ModelLike, texts: Sequence[str], max_batch_size: int) -> int:
    """Time a short greedy generation at batch sizes 1, 2, 4, … up to ``max_batch_size``.

    Stops at the first size that runs out of memory or is clearly slower per prompt than the
    best so far (throughput usually rises, then flattens). Returns the fastest size that fit.
    """
    prompts = [ids for ids in loaded.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    pad = pad_token_id(loaded.tokenizer)
    best_size, best_rate = 1, 0.0
    size = 1
    while size <= max_batch_size:
        sample = [prompts[i % len(prompts)] for i in range(size)]
        try:
            greedy_tokens(loaded.model, sample, 1, batch_size=size, pad_id=pad)  # warm-up
            started = time.perf_counter()
            greedy_tokens(loaded.model, sample, _PROBE_TOKENS, batch_size=size, pad_id=pad)
            rate = size / (time.perf_counter() - started)
        except (RuntimeError, torch.OutOfMemoryError) as error:
            if not _out_of_memory(error):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            break
        if rate > best_rate:
            best_size, best_rate = size, rate
        elif rate < 0.8 * best_rate:
            break
        if size >= len(prompts):
            break
        size *= 2
    return best_size
