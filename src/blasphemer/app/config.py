"""One typed settings object for every command.

Precedence: command line > environment (``BLASPHEMER_*``) > TOML file (``--config``) > preset
(``--preset``, a TOML file shipped in ``blasphemer/presets/``) > defaults.
Each field's ``description`` doubles as its ``--help`` text; ``config.default.toml`` documents
every field with its default (a test keeps the two in sync).
"""

from __future__ import annotations

import importlib.resources
import re
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from blasphemer.errors import ConfigError
from blasphemer.evaluation.markers import DEFAULT_DECIDED_AFTER, DEFAULT_REFUSAL_MARKERS

_toml_values: ContextVar[dict[str, Any] | None] = ContextVar("_toml_values", default=None)


class _TomlSource(PydanticBaseSettingsSource):
    """Values from the ``--config`` file (parsed and checked by :func:`load_settings`)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        values = _toml_values.get() or {}
        return values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_toml_values.get() or {})


class Settings(BaseSettings):
    """Everything a Blasphemer run can be told. Field descriptions are the ``--help`` texts."""

    model_config = SettingsConfigDict(
        env_prefix="BLASPHEMER_", extra="forbid", validate_default=True, cli_parse_args=False
    )

    # --- model ---------------------------------------------------------------------------
    model: str | None = Field(
        None, description="Hugging Face model id, local model folder, or a .gguf file."
    )
    gguf_file: str | None = Field(
        None,
        description="Name of the .gguf file to load inside the model folder or hub repository.",
    )
    revision: str | None = Field(
        None, description="Model revision (branch, tag or commit) on the hub."
    )
    dtypes: list[str] = Field(
        ["auto", "bfloat16", "float16", "float32"],
        description="Weight dtypes to try in order; the first that loads with finite logits wins.",
    )
    device_map: str = Field(
        "auto", description='Accelerate device map: "auto", "cpu", "cuda:0", ...'
    )
    quantization: Literal["none", "bnb_4bit"] = Field(
        "none", description="Load the weights in 4-bit with bitsandbytes (CUDA only)."
    )
    trust_remote_code: bool = Field(
        False,
        description="Allow the model's own Python code from the hub to run (only if you trust it).",
    )
    architecture_override: Path | None = Field(
        None,
        description="TOML file naming the decoder layers and writer modules of an unknown model.",
    )

    # --- prompts --------------------------------------------------------------------------
    harmful: str = Field(
        "bundled:harmful",
        description='Harmful prompt set: "bundled:harmful", a file (.txt/.json/.jsonl/.csv/'
        '.parquet), a saved datasets folder, or "hf:owner/name[:split[:column]]".',
    )
    harmless: str = Field(
        "bundled:harmless", description="Harmless prompt set (same forms as --harmful)."
    )
    harmful_column: str | None = Field(
        None, description="Column or field holding the harmful prompts."
    )
    harmless_column: str | None = Field(
        None, description="Column or field holding the harmless prompts."
    )
    system_prompt: str | None = Field(
        None, description="System prompt used when rendering every prompt."
    )
    split_seed: int = Field(
        0, description="Seed of the fit/select/report split of the prompt sets."
    )
    max_fit_prompts: int = Field(
        400, ge=2, description="At most this many prompts per set are used to fit the directions."
    )
    n_select_prompts: int = Field(
        100, ge=1, description="Prompts per set the optimiser scores each trial on (select split)."
    )
    n_report_prompts: int = Field(
        200, ge=1, description="Prompts per set for the held-out numbers at the end (report split)."
    )

    # --- directions and ablation ------------------------------------------------------------
    projected_directions: bool = Field(
        True,
        description=(
            "Remove each direction's component along the harmless mean (projected; "
            "false: the plain difference of means)."
        ),
    )
    norm_preserving: bool = Field(
        False,
        description="Keep every input neuron's write-vector norm while removing the direction.",
    )

    # --- scoring ---------------------------------------------------------------------------
    refusal_markers: list[str] = Field(
        list(DEFAULT_REFUSAL_MARKERS),
        description="Substrings that mark a response as a refusal (after normalisation).",
    )
    max_new_tokens: int = Field(
        100, ge=1, description="Response length for the held-out report (and for --exact-verdicts)."
    )
    decided_after: int = Field(
        DEFAULT_DECIDED_AFTER,
        ge=1,
        description="During the search a response with this many clean tokens counts as compliant.",
    )
    exact_verdicts: bool = Field(
        False,
        description="Judge every search response on the full --max-new-tokens (no early stop).",
    )
    prune_dominated: bool = Field(
        True,
        description="Stop scoring a trial once it provably cannot reach the Pareto front "
        "(its refusals are then a lower bound).",
    )
    confirm_front: bool = Field(
        False,
        description="After the search, judge the Pareto front's trials again on whole answers "
        "(up to --max-new-tokens), until the front holds only such counts: the front "
        "--exact-verdicts would give (Heretic's rule), usually for fewer evaluations.",
    )
    kl_positions: int = Field(
        1,
        ge=1,
        description="KL over this many positions of the original greedy answer (1 = first token).",
    )
    layer_cache_mib: int = Field(
        1024,
        ge=0,
        description="Memory (MiB, per prompt set) for recording the layers below an edit once "
        "and replaying them in every trial instead of running them again (exact; 0 = off).",
    )
    draft_tokens: int = Field(
        0,
        ge=0,
        le=16,
        description="Draft tokens checked per answer in each decoding pass, taken from earlier "
        "answers to the same prompt: the same answers in fewer passes, each pass dearer "
        "(0 = off; see the README for where it pays).",
    )
    judge: Literal["markers", "semantic", "both"] = Field(
        "markers",
        description="How held-out answers (and evaluate's, and judge's) are judged: the refusal "
        "markers, the semantic judge (a sentence encoder and a trained head; answers are then "
        "generated in full, never cut at a marker), or both counts side by side.",
    )
    search_judge: Literal["markers", "semantic"] = Field(
        "markers",
        description="How the search counts a trial's refusals on the select split: the markers "
        "on early-stopped answers, or the semantic judge on whole answers (slower: no early "
        "stop, no pruning; it keeps finding declines without a marker word once markers are "
        "gone).",
    )
    judge_encoder: str = Field(
        "sentence-transformers/all-MiniLM-L6-v2",
        description="The semantic judge's encoder: a hub id or a local folder holding "
        "all-MiniLM-L6-v2.",
    )
    held_out_trials: int = Field(
        8,
        ge=1,
        description="Front trials scored on the report split at the end (full-length answers; "
        "the recommended trial first).",
    )
    batch_size: int | None = Field(
        None, ge=1, description="Prompts per forward pass (default: measured)."
    )
    max_batch_size: int = Field(
        64, ge=1, description="Upper bound when the batch size is chosen automatically."
    )
    scorers: list[Path] = Field(
        [], description="Python files defining extra objectives (Scorer classes)."
    )

    # --- optimisation -----------------------------------------------------------------------
    max_weight_range: list[float] = Field(
        [0.8, 1.5],
        description="Lowest and highest peak weight a trial may give a component's edit "
        "(1 removes the direction once; more overshoots, which real models may need).",
    )
    n_trials: int = Field(100, ge=1, description="Trial budget of the study.")
    n_startup_trials: int = Field(20, ge=1, description="Random trials before TPE takes over.")
    seed: int = Field(0, description="Seed of the optimiser.")
    storage: str | None = Field(
        None,
        description="Optuna storage URL (default: SQLite in the run directory; postgresql://... "
        "for many workers). The password may come from the environment instead of the URL.",
    )
    study_name: str | None = Field(
        None, description="Study name (default: derived from the model)."
    )
    resume: bool | None = Field(
        None, description="Continue an existing study (--resume) or start over (--no-resume)."
    )
    heartbeat_interval: int = Field(30, ge=1, description="Seconds between a worker's heartbeats.")
    grace_period: int = Field(
        120, ge=2, description="Seconds without heartbeat before a trial is retried."
    )
    run_dir: Path | None = Field(None, description="Folder for the study database and caches.")

    # --- results -----------------------------------------------------------------------------
    output_dir: Path | None = Field(
        None, description="Where the merged model, results.json and report go."
    )
    gguf: Literal["f16", "bf16", "q8_0"] | None = Field(
        None,
        description="Also write the saved model as a GGUF file of this type for llama.cpp "
        "(from a GGUF source: unedited tensors copied, edited ones in their source type).",
    )
    select: str | None = Field(
        None,
        description='Trial to save: a trial number, "lowest-kl:refusals<=0.05", '
        '"lowest-refusals:kl<=0.2" or "knee" (default with --yes).',
    )
    yes: bool = Field(
        False, description="Ask no questions: pick with --select (or the default rule) and save."
    )
    upload_repo: str | None = Field(
        None, description="Also upload the saved model to this hub repo id."
    )
    upload_private: bool = Field(True, description="Create the uploaded repo as private.")
    quiet: bool = Field(False, description="No live display; plain log lines only.")
    debug: bool = Field(False, description="Show tracebacks for errors.")

    @field_validator("dtypes")
    @classmethod
    def _known_dtypes(cls, value: list[str]) -> list[str]:
        allowed = {"auto", "bfloat16", "float16", "float32"}
        unknown = [d for d in value if d not in allowed]
        if unknown or not value:
            raise ValueError(f"dtypes must be a non-empty list of {sorted(allowed)}, got {value}")
        return value

    @field_validator("max_weight_range")
    @classmethod
    def _weight_range(cls, value: list[float]) -> list[float]:
        if len(value) != 2 or not 0 <= value[0] <= value[1]:
            raise ValueError(
                f"max_weight_range must be two numbers LOW HIGH with 0 <= LOW <= HIGH, got {value}"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError("grace_period must be larger than heartbeat_interval")
        if self.search_judge != "markers" and self.confirm_front:
            raise ValueError(
                "confirm_front re-judges by markers; with search_judge semantic the search "
                "already reads whole answers: drop one of them"
            )
        if self.decided_after > self.max_new_tokens:
            if "decided_after" in self.model_fields_set:
                raise ValueError("decided_after must not exceed max_new_tokens")
            # The default follows a shorter --max-new-tokens (evaluate and chat have no
            # --decided-after to lower it); set directly so it still counts as not given.
            object.__setattr__(self, "decided_after", self.max_new_tokens)
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlSource(settings_cls))


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a settings TOML file; unknown keys and syntax errors become one-line ConfigErrors."""
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; check the --config path") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        reason = " ".join(str(error).split())
        raise ConfigError(
            f"cannot read config file {path}: {reason}; fix the file (UTF-8 TOML) or drop --config"
        ) from None
    unknown = sorted(set(data) - set(Settings.model_fields))
    if unknown:
        raise ConfigError(
            f"config file {path} has unknown keys {unknown}; see config.default.toml for names"
        )
    return data


def preset_names() -> list[str]:
    """Names of the presets shipped with the package (``--preset NAME``)."""
    folder = importlib.resources.files("blasphemer") / "presets"
    return sorted(
        p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml")
    )


def preset_path(name: str) -> Path:
    """The TOML file of the shipped preset ``name``; a one-line ConfigError if there is none."""
    if name not in preset_names():
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(preset_names())}")
    return Path(str(importlib.resources.files("blasphemer") / "presets" / f"{name}.toml"))


def load_settings(
    cli_values: dict[str, Any], config_file: Path | None = None, preset: str | None = None
) -> Settings:
    """Build :class:`Settings` from command-line values (None = not given), env and TOML files.

    A ``preset`` is a shipped TOML file read beneath ``config_file``: the file's values win.
    """
    toml = read_toml(preset_path(preset)) if preset is not None else {}
    if config_file is not None:
        toml.update(read_toml(config_file))
    given = {key: value for key, value in cli_values.items() if value is not None}
    token = _toml_values.set(toml)
    try:
        return Settings(**given)
    except ValidationError as error:
        raise ConfigError(_one_line(error)) from None
    except SettingsError as error:  # an environment value that is not valid JSON for a list
        match = re.search(r'field "(\w+)"', str(error))
        variable = f"BLASPHEMER_{match[1].upper()}" if match else "a BLASPHEMER_* variable"
        raise ConfigError(
            f"cannot parse {variable} from the environment; list settings there are JSON, "
            "e.g. BLASPHEMER_DTYPES='[\"float32\"]'"
        ) from None
    finally:
        _toml_values.reset(token)


def _one_line(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        location = ".".join(str(p) for p in item["loc"]) or "settings"
        option = "--" + location.replace("_", "-") if item["loc"] else location
        parts.append(f"{option}: {item['msg']}")
    return "invalid settings: " + "; ".join(parts) + " (see --help)"


def default_toml() -> str:
    """The commented defaults file: every field, its description and its default value."""
    lines = [
        "# Blasphemer settings with their defaults. Copy, edit, and pass with --config FILE.",
        "# Precedence: command line > environment (BLASPHEMER_<NAME>) > this file > defaults.",
        "",
    ]
    for name, info in Settings.model_fields.items():
        lines.append(f"# {info.description}")
        default = info.default
        if default is None:
            lines.append(f"# {name} =")
        else:
            lines.append(f"{name} = {_toml_value(default)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
