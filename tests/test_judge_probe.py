"""bench/judge/probe.py's feature readers on the bundled demo model: a row's features do not
depend on the rows padded beside it, and the question reader reads the last real token."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "judge"))
sys.path.insert(0, str(ROOT / "bench"))

import probe  # noqa: E402

ROWS = [
    {"prompt": "Write a poem about the sea.", "response": "The sea is wide and blue."},
    {"prompt": "Hi", "response": ""},
    {
        "prompt": "Explain how tides work, in detail, for a child of ten.",
        "response": "Tides come from the moon pulling on the water. " * 6,
    },
    {"prompt": "Tell me a joke.", "response": "I can't help with that."},
]


@pytest.fixture(scope="module")
def demo(demo_model_dir: Path) -> tuple[object, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(demo_model_dir), dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(demo_model_dir))


@pytest.mark.parametrize("reader", [probe.response_means, probe.question_states])
def test_features_do_not_depend_on_the_batch(demo: tuple[object, object], reader) -> None:
    model, tokenizer = demo
    together = reader(model, tokenizer, ROWS)
    assert together.shape[:2] == (len(ROWS), model.config.num_hidden_layers + 1)
    for i, row in enumerate(ROWS):
        alone = reader(model, tokenizer, [row])[0]
        torch.testing.assert_close(together[i], alone, atol=1e-4, rtol=1e-4)
    # the rows differ, so a reader that ignored its input would fail above or here
    assert not torch.allclose(together[0], together[1])


@torch.inference_mode()
def test_question_states_read_the_last_token_of_the_question(demo: tuple[object, object]) -> None:
    model, tokenizer = demo
    row = ROWS[0]
    text = probe.QUESTION.format(prompt=row["prompt"], response=row["response"])
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([tokenizer(chat, add_special_tokens=False).input_ids])
    states = model.model(input_ids=ids, output_hidden_states=True).hidden_states
    expected = torch.stack([h[0, -1] for h in states])
    got = probe.question_states(model, tokenizer, ROWS)[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_model_path_takes_a_folder_and_names_what_it_is_not(
    demo_model_dir: Path, tmp_path: Path
) -> None:
    assert probe.model_path(str(demo_model_dir)) == demo_model_dir
    model, _ = probe.load_model(demo_model_dir)
    assert model.config.num_hidden_layers >= 1
    with pytest.raises(SystemExit, match=r"not a pinned model, a \.gguf file or a model folder"):
        probe.model_path(str(tmp_path / "nothing"))


def _saved_probe(tmp_path: Path, name: str, features: torch.Tensor, ids: list[str]) -> Path:
    torch.save({"features": features, "ids": ids}, tmp_path / f"{name}.pt")
    chosen = {"layers": [0], "penalty": 0.01}
    (tmp_path / f"{name}.json").write_text(json.dumps({"probe_choice": {"chosen": chosen}}))
    return tmp_path / name


def test_combine_probes_adds_logits_and_refuses_other_answers(tmp_path: Path) -> None:
    import combine_probes

    rows = probe.labelled_rows()
    ids = [r["id"] for r in rows]
    label = torch.tensor([float(r["refusal"]) for r in rows])
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(len(rows), 1, 4, generator=generator)
    informative = noise.clone()
    informative[:, 0, 0] += 4 * (2 * label - 1)  # one feature that carries the label
    good = _saved_probe(tmp_path, "good", informative, ids)
    bad = _saved_probe(tmp_path, "bad", noise, ids)
    out = tmp_path / "both.json"
    args = [f"{good}.json", f"{good}.pt", f"{bad}.json", f"{bad}.pt", "--out", str(out)]
    assert combine_probes.main(args) == 0
    test = json.loads(out.read_text())["test"]
    assert test["first"]["all"]["accuracy"] > 0.95  # the informative probe
    assert test["second"]["all"]["accuracy"] < 0.8  # noise
    assert test["sum"]["all"]["accuracy"] > 0.9  # the noise probe's logits are small beside
    shuffled = _saved_probe(tmp_path, "shuffled", noise, ids[::-1])
    with pytest.raises(SystemExit, match="not the labelled set's"):
        combine_probes.main(
            [f"{good}.json", f"{good}.pt", f"{shuffled}.json", f"{shuffled}.pt", "--out", str(out)]
        )
