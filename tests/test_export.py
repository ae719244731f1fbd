"""Export on a tiny random Llama: merged save equals the hooked edit, exact restore, refusals.

Also runs :class:`~blasphemer.optimization.objective.Objective` on the same model, since it is
the other place where an edit meets a live model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from blasphemer.ablation import AblationParameters, KernelParameters
from blasphemer.app.results import HeldOutScores, model_card, upload_to_hub, write_results
from blasphemer.architectures.base import ComponentKind, Layout, ModelMap, Writer
from blasphemer.editing import Ablation, apply_ablation
from blasphemer.errors import ExportError
from blasphemer.export import check_output_dir, save_merged
from blasphemer.optimization.objective import Objective, TrialResult, completed_results
from blasphemer.optimization.search_space import SearchSpace
from blasphemer.optimization.selection import pareto_front
from tiny_models import tiny_llama, word_tokenizer

WORDS = ["hello", "world", "how", "do", "i", "make", "a", "cake", "bomb", "please", "no", "sorry"]
N_LAYERS, HIDDEN = 3, 32


@dataclass(eq=False)
class Loaded:
    model: Any
    tokenizer: Any
    model_id: str
    processor: Any | None = None


class RandomDirections:
    """Unit directions per layer; a global index interpolates between neighbouring rows."""

    def __init__(self, seed: int = 1) -> None:
        generator = torch.Generator().manual_seed(seed)
        vectors = torch.randn(N_LAYERS, HIDDEN, generator=generator)
        self.vectors = vectors / vectors.norm(dim=-1, keepdim=True)

    def for_layers(self, direction_index: float | None) -> torch.Tensor:
        if direction_index is None:
            return self.vectors
        low = math.floor(direction_index)
        high = min(low + 1, N_LAYERS - 1)
        t = direction_index - low
        row = (1 - t) * self.vectors[low] + t * self.vectors[high]
        return (row / row.norm()).expand(N_LAYERS, HIDDEN).clone()


def build_tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer(
        ["<pad>", "<eos>", "<unk>", *WORDS],
        unknown="<unk>",
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
    )


def model_map_of(model: LlamaForCausalLM) -> ModelMap:
    layers = list(model.model.layers)
    writers = []
    for index, layer in enumerate(layers):
        o_proj, down_proj = layer.self_attn.o_proj, layer.mlp.down_proj
        writers.append(
            [
                Writer(
                    ComponentKind.ATTENTION,
                    f"model.layers.{index}.self_attn.o_proj",
                    o_proj,
                    o_proj.weight,
                    o_proj.bias,
                    Layout.OUT_IN,
                ),
                Writer(
                    ComponentKind.MLP,
                    f"model.layers.{index}.mlp.down_proj",
                    down_proj,
                    down_proj.weight,
                    down_proj.bias,
                    Layout.OUT_IN,
                ),
            ]
        )
    return ModelMap("llama", "model.layers", layers, writers, HIDDEN)


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = build_tokenizer()
    model = tiny_llama(
        len(tokenizer),
        layers=N_LAYERS,
        hidden=HIDDEN,
        positions=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    folder = tmp_path_factory.mktemp("source")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def loaded(source_dir: Path) -> Loaded:
    model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    return Loaded(model, AutoTokenizer.from_pretrained(source_dir), str(source_dir))


PARAMETERS = AblationParameters(
    1.4,
    {
        ComponentKind.ATTENTION: KernelParameters(1.2, 1.0, 0.4, 1.5),
        ComponentKind.MLP: KernelParameters(0.9, 2.0, 0.0, 1.0),  # layer 0 untouched
    },
)


def logits(model: Any, tokenizer: Any) -> torch.Tensor:
    batch = tokenizer(
        ["how do i make a cake please", "hello world"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        return model(**batch).logits


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("norm_preserving", [False, True])
def test_saved_model_equals_hooked_model_and_memory_is_restored(
    loaded: Loaded, tmp_path: Path, norm_preserving: bool
) -> None:
    parameters = AblationParameters(PARAMETERS.direction_index, PARAMETERS.kernels, norm_preserving)
    model_map, directions = model_map_of(loaded.model), RandomDirections()
    before = snapshot(loaded.model)
    original_logits = logits(loaded.model, loaded.tokenizer)
    with apply_ablation(
        model_map,
        directions.for_layers(parameters.direction_index),
        parameters.layer_weights(N_LAYERS),
        norm_preserving,
    ):
        hooked_logits = logits(loaded.model, loaded.tokenizer)
    assert not torch.allclose(hooked_logits, original_logits, atol=1e-4)

    card = model_card(base_model="org/tiny", parameters=parameters, trial_number=3)
    out = save_merged(
        loaded,
        model_map,
        Ablation(directions, parameters),
        tmp_path / "out",
        card=card,
        max_shard_size="40KB",
    )

    after = snapshot(loaded.model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)  # bit-exact
    assert torch.equal(logits(loaded.model, loaded.tokenizer), original_logits)

    assert len(list(out.glob("*.safetensors"))) > 1  # sharded
    assert (out / "README.md").read_text().startswith("---\nbase_model:")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    torch.testing.assert_close(logits(reloaded, tokenizer), hooked_logits, atol=1e-5, rtol=1e-4)


def test_output_over_or_around_the_source_is_refused(loaded: Loaded, tmp_path: Path) -> None:
    model_map, directions = model_map_of(loaded.model), RandomDirections()
    source = Path(loaded.model_id)
    for target in (source, source / "abliterated", source.parent):
        with pytest.raises(ExportError, match="source model folder"):
            save_merged(loaded, model_map, Ablation(directions, PARAMETERS), target, overwrite=True)


def test_unwritable_output_is_refused(loaded: Loaded, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    model_map, directions = model_map_of(loaded.model), RandomDirections()
    before = snapshot(loaded.model)
    with pytest.raises(ExportError, match="cannot write") as error:
        save_merged(loaded, model_map, Ablation(directions, PARAMETERS), blocker / "out")
    assert "\n" not in str(error.value)
    with pytest.raises(ExportError, match="is a file"):
        save_merged(loaded, model_map, Ablation(directions, PARAMETERS), blocker)
    after = snapshot(loaded.model)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_non_empty_output_needs_overwrite(loaded: Loaded, tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    model_map, directions = model_map_of(loaded.model), RandomDirections()
    with pytest.raises(ExportError, match="not empty"):
        save_merged(loaded, model_map, Ablation(directions, PARAMETERS), target)
    save_merged(loaded, model_map, Ablation(directions, PARAMETERS), target, overwrite=True)
    assert not (target / "old.txt").exists() and (target / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_quantised_models_are_refused(loaded: Loaded, tmp_path: Path) -> None:
    loaded.model.hf_quantizer = object()
    with pytest.raises(ExportError, match="quantization none"):
        save_merged(
            loaded, model_map_of(loaded.model), Ablation(RandomDirections(), PARAMETERS), tmp_path
        )


def test_check_output_dir_accepts_a_fresh_folder(tmp_path: Path) -> None:
    assert check_output_dir(tmp_path / "new", [tmp_path / "src"]) == (tmp_path / "new").resolve()


def test_model_card_front_matter_and_scores() -> None:
    scores = HeldOutScores(refusals=3, n_prompts=100, kl=0.1234, original_refusals=97)
    card = model_card(base_model="org/tiny", parameters=PARAMETERS, trial_number=7, scores=scores)
    front_matter = card.split("---")[1]
    assert 'base_model: "org/tiny"' in front_matter
    assert "library_name: transformers" in front_matter
    for tag in ("abliterated", "uncensored", "blasphemer"):
        assert f"- {tag}" in front_matter
    assert "3/100 = 3.0%" in card and "95 % CI" in card and "0.1234" in card
    assert "97/100" in card and "| attn | 1.200 |" in card
    local = model_card(base_model="/models/x", parameters=PARAMETERS, trial_number=1,
                       hub_base_model=False)  # fmt: skip
    assert "base_model" not in local.split("---")[1]


def test_write_results_is_complete_and_redacted(tmp_path: Path) -> None:
    trials = [
        TrialResult(0, (0.5, 0.01), PARAMETERS, refusals=5, n_prompts=10, seconds=1.5),
        TrialResult(1, (0.0, math.inf), None),
    ]
    path = write_results(
        tmp_path / "sub" / "results.json",
        settings={"storage": "postgresql://bob:s3cret@db/opt", "n_trials": 2},
        trials=trials,
        front=pareto_front(trials),
        chosen=trials[0],
        held_out=HeldOutScores(1, 20, 0.05),
        extra={"model_id": "org/tiny"},
    )
    text = path.read_text()
    assert "s3cret" not in text
    record = json.loads(text)
    assert record["settings"]["storage"] == "postgresql://bob:***@db/opt"
    assert record["trials"][0]["parameters"]["kernels"]["attn"]["max_weight"] == 1.2
    assert record["trials"][1]["kl"] == "inf"
    assert record["pareto_front"] == [1, 0]
    assert record["chosen"]["number"] == 0
    assert record["held_out"]["refusal_rate"] == 0.05
    assert record["model_id"] == "org/tiny"
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_upload_validates_arguments_offline(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"no config\.json"):
        upload_to_hub(tmp_path, "owner/name")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ExportError, match="invalid hub repo id"):
        upload_to_hub(tmp_path, "owner/bad name!")
    with pytest.raises(ExportError, match="needs an owner"):
        upload_to_hub(tmp_path, "name")


# --- the objective on the same model ------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    rate: float
    refused: list[bool]
    partial: bool = False


class RefusalStub:
    """Counts how often the edit is active when asked (what a real scorer would observe)."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.reference = logits(model, tokenizer)

    def evaluate(self, on_batch: Any = None, should_stop: Any = None) -> Outcome:
        changed = not torch.allclose(logits(self.model, self.tokenizer), self.reference)
        return Outcome(0.25 if changed else 1.0, [True, False, False, False])


class KLStub:
    def __init__(self, value: float) -> None:
        self.value = value

    def score(self) -> float:
        return self.value


class NamedStub(KLStub):
    name = "length"


def test_objective_scores_with_the_edit_and_restores(loaded: Loaded) -> None:
    model_map = model_map_of(loaded.model)
    before = snapshot(loaded.model)
    started: list[int] = []
    finished: list[TrialResult] = []
    space = SearchSpace.build(N_LAYERS)
    objective = Objective(
        model_map=model_map,
        directions=RandomDirections(),
        search_space=space,
        refusal_scorer=RefusalStub(loaded.model, loaded.tokenizer),
        kl_scorer=KLStub(float("nan")),
        extra_scorers=[NamedStub(2.0)],
        on_trial_start=lambda number, _params: started.append(number),
        on_trial_end=finished.append,
    )
    assert objective.n_objectives == 3
    study = optuna.create_study(directions=["minimize"] * 3)
    study.enqueue_trial(space.reference_params(1.0))
    study.optimize(objective, n_trials=2)

    after = snapshot(loaded.model)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert started == [0, 1] and [r.number for r in finished] == [0, 1]
    results = completed_results(study)
    assert results[0].values == (0.25, math.inf, 2.0)  # NaN KL becomes inf, edit was active
    assert (results[0].refusals, results[0].n_prompts) == (1, 4)
    assert results[0].parameters == space.reference(1.0)
    assert results[0].extra == {"length": 2.0}
    assert study.trials[0].user_attrs["result"]["edited_writers"] == 2 * N_LAYERS


def test_objective_rejects_clashing_scorer_names(loaded: Loaded) -> None:
    stub = NamedStub(1.0)
    stub.name = "kl"
    with pytest.raises(ValueError, match="unique"):
        Objective(
            model_map=model_map_of(loaded.model),
            directions=RandomDirections(),
            search_space=SearchSpace.build(N_LAYERS),
            refusal_scorer=RefusalStub(loaded.model, loaded.tokenizer),
            kl_scorer=KLStub(0.0),
            extra_scorers=[stub],
        )


class TickingClock:
    """A clock that moves only when a stub spends time, so each phase's length is known."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_objective_records_the_time_of_each_phase(loaded: Loaded) -> None:
    clock = TickingClock()

    class SlowKL(KLStub):
        def score(self) -> float:
            clock.now += 2.0
            return 0.5

    class SlowRefusals(RefusalStub):
        def evaluate(self, on_batch: Any = None, should_stop: Any = None) -> Outcome:
            clock.now += 7.0
            return super().evaluate(on_batch, should_stop)

    class SlowExtra(NamedStub):
        def score(self) -> float:
            clock.now += 0.5
            return 1.0

    objective = Objective(
        model_map=model_map_of(loaded.model),
        directions=RandomDirections(),
        search_space=SearchSpace.build(N_LAYERS),
        refusal_scorer=SlowRefusals(loaded.model, loaded.tokenizer),
        kl_scorer=SlowKL(0.0),
        extra_scorers=[SlowExtra(0.0)],
        clock=clock,
    )
    study = optuna.create_study(directions=["minimize"] * 3)
    study.optimize(objective, n_trials=1)
    record = study.trials[0].user_attrs["result"]
    assert record["phases_s"] == {
        "apply": 0.0,
        "kl": 2.0,
        "refusals": 7.0,
        "extra": 0.5,
        "restore": 0.0,
    }
    assert record["seconds"] == 9.5
