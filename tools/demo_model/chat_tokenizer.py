"""The demo model's tokenizer: a byte-level BPE trained offline, with the chat template.

The special tokens mark the turns (``<|system|>``, ``<|user|>``, ``<|assistant|>``, each closed by
``<|end|>``, the EOS); :func:`opening_tokens` names the first tokens of refusals and answers, which
the training's decision loss and the evaluation's refusal log-odds compare; :func:`encode` turns
training conversations into padded batches with their answer labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from tools.demo_model.data import OPENINGS, REFUSALS, Example

END, PAD = "<|end|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
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


@dataclass
class Encoded:
    """A tokenised training batch: right-padded ids, answer labels and their loss weights."""

    input_ids: torch.Tensor  # [b, t], right-padded
    attention_mask: torch.Tensor
    labels: torch.Tensor  # -100 outside the answer
    weights: torch.Tensor  # per-label loss weight
    last_prompt: torch.Tensor  # [b] index of the last prompt token
    harmful: torch.Tensor  # [b] bool

    def to(self, device: str) -> Encoded:
        """The same batch on ``device``."""
        return Encoded(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def encode(
    tokenizer: PreTrainedTokenizerFast, examples: Sequence[Example], first_token_weight: float
) -> Encoded:
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
    return Encoded(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        weights=weights,
        last_prompt=torch.tensor([prompt_length - 1 for _, prompt_length in rows]),
        harmful=torch.tensor([example.harmful for example in examples]),
    )
