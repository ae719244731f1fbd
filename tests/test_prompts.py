"""Prompt sets: the bundled data, every loader format, every bad input, splits and rendering."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from blasphemer.errors import ConfigError, DatasetError
from blasphemer.prompts import (
    Prompt,
    PromptSet,
    bundled_splits,
    load_prompt_set,
    normalise,
    remove_overlap,
    render,
    split_prompt_set,
)

# ------------------------------------------------------------------------------------------
# Bundled sets
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def harmful() -> PromptSet:
    return load_prompt_set("bundled:harmful")


@pytest.fixture(scope="module")
def harmless() -> PromptSet:
    return load_prompt_set("bundled:harmless")


def test_bundled_sizes_and_categories(harmful: PromptSet, harmless: PromptSet) -> None:
    assert len(harmful) >= 1000
    assert len(harmless) >= 3000
    harmful_categories = Counter(p.category for p in harmful.prompts)
    assert len(harmful_categories) >= 12
    assert None not in harmful_categories
    assert Counter(p.category for p in harmless.prompts)["borderline"] >= 150


def test_bundled_sets_have_no_duplicates_and_no_overlap(
    harmful: PromptSet, harmless: PromptSet
) -> None:
    harmful_keys = [normalise(t) for t in harmful.texts()]
    harmless_keys = [normalise(t) for t in harmless.texts()]
    assert len(set(harmful_keys)) == len(harmful_keys)
    assert len(set(harmless_keys)) == len(harmless_keys)
    assert not set(harmful_keys) & set(harmless_keys)
    assert all(t and t == t.strip() for t in harmful.texts() + harmless.texts())


def test_bundled_form_does_not_predict_label(harmful: PromptSet, harmless: PromptSet) -> None:
    """The common request forms occur in both sets, so only the subject tells them apart."""
    for opening in ("Write a tutorial on how to", "Develop a strategy to", "Pretend you are"):
        assert any(t.startswith(opening) for t in harmful.texts()), opening
        assert any(t.startswith(opening) for t in harmless.texts()), opening


def test_bundled_splits_are_fixed_and_disjoint() -> None:
    splits = bundled_splits("harmful")
    assert splits is bundled_splits("harmful")
    again = split_prompt_set(load_prompt_set("bundled:harmful"), seed=0)
    assert splits.fit.fingerprint() == again.fit.fingerprint()
    parts = [{normalise(t) for t in part.texts()} for part in splits.__dict__.values()]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])


def test_unknown_bundled_set() -> None:
    with pytest.raises(DatasetError, match="bundled:harmful"):
        load_prompt_set("bundled:nope")


# ------------------------------------------------------------------------------------------
# Loaders
# ------------------------------------------------------------------------------------------

ROWS = [
    {"text": "First prompt", "category": "a"},
    {"text": "Second prompt", "category": "b"},
    {"text": "Third prompt", "category": "a"},
]
EXPECTED = ["First prompt", "Second prompt", "Third prompt"]


def test_txt(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("First prompt\n\n  Second prompt  \nThird prompt\n", encoding="utf-8")
    ps = load_prompt_set(str(path))
    assert ps.texts() == EXPECTED
    assert ps.name == "p"
    assert ps.source == str(path)


@pytest.mark.parametrize("field", ["text", "instruction", "prompt"])
def test_json_objects_default_fields(tmp_path: Path, field: str) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{field: t, "category": "x"} for t in EXPECTED]), encoding="utf-8")
    ps = load_prompt_set(str(path), name="mine")
    assert ps.texts() == EXPECTED
    assert ps.name == "mine"
    assert {p.category for p in ps.prompts} == {"x"}


def test_json_strings_and_custom_column(tmp_path: Path) -> None:
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(EXPECTED), encoding="utf-8")
    assert load_prompt_set(str(plain)).texts() == EXPECTED
    custom = tmp_path / "custom.json"
    custom.write_text(json.dumps([{"goal": t} for t in EXPECTED]), encoding="utf-8")
    assert load_prompt_set(str(custom), column="goal").texts() == EXPECTED


def test_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n", encoding="utf-8")
    ps = load_prompt_set(str(path))
    assert ps.prompts == tuple(Prompt(r["text"], r["category"]) for r in ROWS)


def test_csv(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text('goal,category\n"First prompt",a\n"Second prompt",b\nThird prompt,a\n')
    ps = load_prompt_set(str(path), column="goal")
    assert ps.texts() == EXPECTED
    assert [p.category for p in ps.prompts] == ["a", "b", "a"]


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert load_prompt_set(str(path)).texts() == EXPECTED


def test_saved_dataset_folders(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    single = tmp_path / "single"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(single))
    assert load_prompt_set(str(single)).texts() == EXPECTED
    multi = tmp_path / "multi"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(ROWS),
            "test": datasets.Dataset.from_list([{"text": "Held out"}]),
        }
    ).save_to_disk(str(multi))
    assert load_prompt_set(str(multi)).texts() == EXPECTED
    assert load_prompt_set(f"{multi}:test").texts() == ["Held out"]
    with pytest.raises(DatasetError, match="no split 'nope'") as info:
        load_prompt_set(f"{multi}:nope")
    assert "train" in str(info.value)


# ------------------------------------------------------------------------------------------
# Bad input: always DatasetError, one line, naming the file
# ------------------------------------------------------------------------------------------


def _write(path: Path, content: str) -> Path:
    path.write_text(content, encoding="utf-8")
    return path


BAD_FILES = {
    "empty.txt": "\n\n   \n",
    "broken.json": '[{"text": "a"',
    "scalar.json": '{"text": "a"}',
    "mixed.json": '[{"text": "a"}, 3]',
    "empty.json": "[]",
    "blank.json": '[{"text": "   "}]',
    "number.json": '[{"text": 3}]',
    "broken.jsonl": '{"text": "a"}\n{"text": \n',
    "nocolumn.jsonl": '{"question": "a"}\n',
    "noheader.csv": "",
    "prompts.yaml": "- a\n",
    "noext": "a\n",
}


@pytest.mark.parametrize("filename", sorted(BAD_FILES))
def test_bad_files(tmp_path: Path, filename: str) -> None:
    path = _write(tmp_path / filename, BAD_FILES[filename])
    with pytest.raises(DatasetError) as info:
        load_prompt_set(str(path))
    message = str(info.value)
    assert filename in message
    assert "\n" not in message


def test_missing_file_and_wrong_column(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"missing\.txt not found"):
        load_prompt_set(str(tmp_path / "missing.txt"))
    path = _write(tmp_path / "cols.jsonl", '{"goal": "a", "target": "b"}\n')
    with pytest.raises(DatasetError) as info:
        load_prompt_set(str(path), column="text")
    assert "cols.jsonl" in str(info.value)
    assert "goal, target" in str(info.value)
    with pytest.raises(DatasetError, match="goal, target"):
        load_prompt_set(str(path))


def test_bad_parquet_and_non_dataset_folder(tmp_path: Path) -> None:
    parquet = _write(tmp_path / "fake.parquet", "not parquet at all")
    with pytest.raises(DatasetError, match=r"fake\.parquet"):
        load_prompt_set(str(parquet))
    folder = tmp_path / "plainfolder"
    folder.mkdir()
    with pytest.raises(DatasetError, match="plainfolder") as info:
        load_prompt_set(str(folder))
    assert "\n" not in str(info.value)


def test_undecodable_file(tmp_path: Path) -> None:
    path = tmp_path / "latin.txt"
    path.write_bytes(b"caf\xe9\n")
    with pytest.raises(DatasetError, match=r"latin\.txt"):
        load_prompt_set(str(path))


def test_bad_hub_spec() -> None:
    with pytest.raises(DatasetError, match="hf:owner/name"):
        load_prompt_set("hf:")


# ------------------------------------------------------------------------------------------
# Splits and overlap
# ------------------------------------------------------------------------------------------


def _set(texts: list[str], categories: list[str | None] | None = None) -> PromptSet:
    cats = categories or [None] * len(texts)
    return PromptSet("s", tuple(Prompt(t, c) for t, c in zip(texts, cats, strict=True)), "test")


def test_split_is_deterministic_disjoint_and_complete() -> None:
    texts = [f"prompt number {i}" for i in range(101)]
    ps = _set([*texts, "Prompt  NUMBER 3", "prompt number 5 "])  # duplicates after normalising
    first = split_prompt_set(ps, seed=7)
    second = split_prompt_set(ps, seed=7)
    assert first == second
    parts = [first.fit, first.select, first.report]
    assert [len(p) for p in parts] == [51, 25, 25]
    keys = [normalise(t) for p in parts for t in p.texts()]
    assert sorted(keys) == sorted(normalise(t) for t in texts)
    assert split_prompt_set(ps, seed=8).fit.texts() != first.fit.texts()
    assert first.fit.name == "s:fit"


def test_split_is_stratified() -> None:
    categories = ["a"] * 80 + ["b"] * 40 + ["c"] * 8
    ps = _set([f"text {i}" for i in range(len(categories))], list(categories))
    splits = split_prompt_set(ps, seed=0)
    for part, fraction in ((splits.fit, 0.5), (splits.select, 0.25), (splits.report, 0.25)):
        counts = Counter(p.category for p in part.prompts)
        for category, total in (("a", 80), ("b", 40), ("c", 8)):
            assert abs(counts[category] - total * fraction) <= 1


def test_split_too_small_and_bad_fractions() -> None:
    with pytest.raises(DatasetError, match=r"has 2 distinct prompts.*at least 3"):
        split_prompt_set(_set(["a", "b", "A "]))
    assert [len(p) for p in split_prompt_set(_set(["a", "b", "c"])).__dict__.values()] == [1, 1, 1]
    with pytest.raises(ConfigError):
        split_prompt_set(_set(["a", "b", "c"]), fractions=(0.5, 0.5))
    with pytest.raises(ConfigError):
        split_prompt_set(_set(["a", "b", "c"]), fractions=(0.5, 0.5, 0.5))


def test_remove_overlap_and_fingerprint() -> None:
    mine = _set(["Hello \u201cworld\u201d", "Other", "Third"])
    bundled = _set(['hello   "WORLD"'])
    cleaned = remove_overlap(mine, bundled)
    assert cleaned.texts() == ["Other", "Third"]
    assert _set(["A  b", "c"]).fingerprint() == _set(["a b", "C"]).fingerprint()
    assert _set(["a", "b"]).fingerprint() != _set(["b", "a"]).fingerprint()


# ------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------

BASIC = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
NO_SYSTEM = (
    "{% for m in messages %}{% if m.role == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
THINKING_SWITCH = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
THINKING_ALWAYS = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}"
)


def _tokenizer(template: str | None) -> Any:
    pytest.importorskip("transformers")
    from tiny_models import word_tokenizer

    tok = word_tokenizer(
        ["[UNK]", "[PAD]", "hello"], unknown="[UNK]", unk_token="[UNK]", pad_token="[PAD]"
    )
    if template is not None:
        tok.chat_template = template
    return tok


def test_render_with_and_without_system_prompt() -> None:
    tok = _tokenizer(BASIC)
    assert render(tok, ["Hi"]) == ["<|user|>Hi<|end|><|assistant|>"]
    assert render(tok, [Prompt("Hi", "x"), "Yo"], system_prompt="Be brief.") == [
        "<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>",
        "<|system|>Be brief.<|end|><|user|>Yo<|end|><|assistant|>",
    ]


def test_render_folds_system_prompt_when_template_rejects_it() -> None:
    tok = _tokenizer(NO_SYSTEM)
    assert render(tok, ["Hi", "Yo"], system_prompt="Be brief.") == [
        "<|user|>Be brief.\n\nHi<|end|><|assistant|>",
        "<|user|>Be brief.\n\nYo<|end|><|assistant|>",
    ]


@pytest.mark.parametrize("template", [THINKING_SWITCH, THINKING_ALWAYS])
def test_render_closes_reasoning_block(template: str) -> None:
    tok = _tokenizer(template)
    assert render(tok, ["Hi"]) == ["<|user|>Hi<|end|><|assistant|><think>\n\n</think>\n\n"]


def test_render_without_chat_template() -> None:
    tok = _tokenizer(None)
    assert render(tok, ["Hi"]) == ["User: Hi\nAssistant:"]
    assert render(tok, ["Hi"], system_prompt="Be brief.") == ["Be brief.\n\nUser: Hi\nAssistant:"]
