"""KL divergence of the edited model's next-token distributions from the original model's.

``KLScorer`` records the *original* model's log-probabilities once, at construction (the model
must be unedited then), and ``score()`` compares the model as it is now against them:

    KL(original ‖ edited) = Σ_v p_orig(v) · (log p_orig(v) − log p_edit(v))

at the first response position of every prompt, averaged over prompts (the number the field
reports). With ``positions=k > 1`` the original model's own greedy answer is generated once and
the first ``k`` positions of it are scored teacher-forced (the edited model reads the original's
tokens), averaged over positions and then over prompts; positions after the original answer's
end-of-sequence token are left out. Only the logits of the scored positions are computed. The
prompts' shared chat-template prefix runs once per pass (see :mod:`blasphemer.evaluation.prefix`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from blasphemer.evaluation.decoding import ForwardSpec, left_pad
from blasphemer.evaluation.frozen import LayerCache
from blasphemer.evaluation.generation import (
    ModelLike,
    encode_texts,
    eos_token_ids,
    greedy_tokens,
    input_device,
    length_sorted_batches,
    pad_token_id,
    shared_prefix,
)
from blasphemer.evaluation.prefix import PrefixState, with_prefix_columns


@dataclass(frozen=True)
class _KLBatch:
    indices: list[int]
    input_ids: torch.Tensor  # [B, L] on the input device: what follows the shared prefix
    attention_mask: torch.Tensor | None  # None when nothing is padded; prefix columns first
    position_ids: torch.Tensor  # counted from the start of the prefix
    valid: torch.Tensor  # [B, k] float32: 1 where the position is scored
    original: torch.Tensor  # [B, k, V] float32 log-probs of the unedited model


def kl_divergence(original: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """``Σ p_orig (log p_orig − log p_edit)`` over the last dimension, from log-probabilities.

    Terms with ``p_orig = 0`` are 0 (not NaN), as in the definition.
    """
    edited = edited.to(original.device, torch.float32)
    terms = original.exp() * (original - edited)
    return torch.where(original > float("-inf"), terms, 0.0).sum(dim=-1)


class KLScorer:
    """Mean KL(original ‖ current) of next-token distributions on ``texts``. Lower is better.

    ``texts`` are chat-rendered prompts. Construction runs the model, which must be unedited;
    ``cache_device`` holds the original log-probs (default: where the logits come out). A
    ``layer_cache`` records each batch then, and later passes replay the layers an edit left
    unchanged (:mod:`blasphemer.evaluation.frozen`).
    """

    name = "kl_divergence"

    def __init__(
        self,
        loaded: ModelLike,
        texts: Sequence[str],
        *,
        batch_size: int = 16,
        positions: int = 1,
        cache_device: torch.device | str | None = None,
        share_prefix: bool = True,
        layer_cache: LayerCache | None = None,
    ) -> None:
        if not texts:
            raise ValueError("KLScorer needs at least one prompt")
        self.layer_cache = layer_cache
        if positions < 1:
            raise ValueError(f"positions must be at least 1, got {positions}")
        self.loaded = loaded
        self.positions = positions
        self.cache_device = None if cache_device is None else torch.device(cache_device)
        self.share_prefix = share_prefix
        model, tokenizer = loaded.model, loaded.tokenizer
        self._spec = ForwardSpec.of(model)
        prompts = encode_texts(tokenizer, texts)
        pad_id = pad_token_id(tokenizer)
        continuations = greedy_tokens(
            model,
            prompts,
            positions - 1,
            batch_size=batch_size,
            pad_id=pad_id,
            share_prefix=share_prefix,
        )
        self.continuations = continuations
        eos = eos_token_ids(model, tokenizer)
        device = input_device(model)
        self._batches: list[_KLBatch] = []
        with torch.inference_mode():
            suffixes, prefix = shared_prefix(
                model, self._spec, prompts, share_prefix, positions - 1
            )
        self._prefix = () if prefix is None else tuple(prompts[0][: prefix.length])
        self._span = max(len(prompt) for prompt in prompts) + positions - 1
        batches = length_sorted_batches([len(p) for p in suffixes], batch_size)
        if layer_cache is not None:
            widths = [max(len(suffixes[i]) for i in b) + positions - 1 for b in batches]
            layer_cache.plan(sum(len(b) * w for b, w in zip(batches, widths, strict=True)))
        for indices in batches:
            ids, mask, position_ids = left_pad(
                [suffixes[i] + continuations[i] for i in indices], pad_id
            )
            valid = torch.tensor([_valid_positions(continuations[i], eos) for i in indices])
            padded = bool((mask[:, 0] == 0).any())
            mask = with_prefix_columns(mask, prefix)
            if prefix is not None:
                position_ids = position_ids + prefix.length
            ids, mask, position_ids = ids.to(device), mask.to(device), position_ids.to(device)
            original = self._log_probs(
                ids, mask if padded else None, position_ids, prefix, len(self._batches)
            )
            if self.cache_device is not None:
                original = original.to(self.cache_device)
            self._batches.append(
                _KLBatch(indices, ids, mask if padded else None, position_ids, valid, original)
            )
        self.n_prompts = len(prompts)

    def _log_probs(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        prefix: PrefixState | None,
        key: int,
    ) -> torch.Tensor:
        """float32 log-probs ``[B, positions, V]`` at the scored positions of batch ``key``."""
        # The layer cache records (and replays) keys and values: the pass must keep a cache.
        kwargs: dict[str, object] = {
            "input_ids": ids,
            "use_cache": self.layer_cache is not None,
        }
        if prefix is not None:
            kwargs["use_cache"] = True
            kwargs[self._spec.cache_argument] = prefix.for_batch(ids.shape[0])
        if mask is not None:
            kwargs["attention_mask"] = mask
        if self._spec.position_ids:
            kwargs["position_ids"] = position_ids
        if self._spec.logits_to_keep:
            kwargs["logits_to_keep"] = self.positions
        model = self.loaded.model
        with torch.inference_mode():
            if self.layer_cache is None:
                output = model(**kwargs)
            else:
                output = self.layer_cache.run(key, lambda: model(**kwargs))
            logits = output.logits[:, -self.positions :, :]
            return torch.log_softmax(logits.float(), dim=-1)

    def per_prompt(self) -> torch.Tensor:
        """KL of every prompt (``[n_prompts]`` float32 on the CPU, in the order given)."""
        result = torch.empty(self.n_prompts, dtype=torch.float32)
        model = self.loaded.model
        with torch.inference_mode():  # the prefix under the weights as they are now
            prefix = PrefixState.compute(
                model, self._prefix, self._spec.cache_argument, input_device(model), self._span
            )
        for key, batch in enumerate(self._batches):
            edited = self._log_probs(
                batch.input_ids, batch.attention_mask, batch.position_ids, prefix, key
            )
            divergence = kl_divergence(batch.original, edited).float().cpu()  # [B, k]
            per_prompt = (divergence * batch.valid).sum(-1) / batch.valid.sum(-1)
            result[torch.tensor(batch.indices)] = per_prompt
        return result

    def score(self) -> float:
        """Mean KL over prompts (the :class:`~blasphemer.evaluation.base.Scorer` objective)."""
        return float(self.per_prompt().mean())


def _valid_positions(continuation: list[int], eos: frozenset[int]) -> list[float]:
    """1.0 for each scored position whose context holds no end-of-sequence token yet."""
    valid = [1.0]
    for token in continuation:
        valid.append(0.0 if valid[-1] == 0.0 or token in eos else 1.0)
    return valid
