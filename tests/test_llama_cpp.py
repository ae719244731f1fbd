"""An exported GGUF read by llama.cpp itself, not only by transformers' GGUF reader.

llama-cpp-python 0.3.36 is built once from its PyPI source (about 4 minutes on 2 cores) into a
venv cached outside the repository (``~/.cache/blasphemer/llama-cpp-0.3.36``); it runs as a
separate program, so none of it is imported here. The demo model is exported as f16 and q8_0;
llama.cpp must tokenise rendered prompts to the same ids as the model's own tokenizer and predict
the same top token at (almost) every position of every prompt.

Marked ``real`` with the other tests that need downloads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from blasphemer.gguf_export import export_gguf

pytestmark = pytest.mark.real

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "src" / "blasphemer" / "data" / "demo-model"
HARMLESS = REPO.parent / "shared" / "datasets" / "refusal_direction" / "harmless_test.json"
VERSION = "0.3.36"
CHECK = """
import json, sys
import numpy as np
from llama_cpp import Llama
path, texts = sys.argv[1], json.load(open(sys.argv[2]))
llm = Llama(model_path=path, n_ctx=512, n_threads=1, verbose=False, logits_all=True)
rows = []
for text in texts:
    ids = llm.tokenize(text.encode(), add_bos=False, special=True)
    llm.reset()
    llm.eval(ids)
    top = np.argmax(np.array(llm.scores[: llm.n_tokens]), axis=-1)
    rows.append({"ids": ids, "top": [int(t) for t in top]})
print(json.dumps(rows))
"""


def _llama_python() -> Path:
    """Python of a venv holding llama-cpp-python, built once and cached.

    A venv cannot be moved, so it is built in place; a ``.complete`` file written after a
    successful install marks it usable, and a half-built one (a killed build) is started over.
    """
    target = Path.home() / ".cache" / "blasphemer" / f"llama-cpp-{VERSION}"
    python, complete = target / "bin" / "python", target / ".complete"
    if complete.is_file():
        return python
    shutil.rmtree(target, ignore_errors=True)
    venv.create(target, with_pip=True)
    env = {
        **os.environ,
        "CMAKE_ARGS": "-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF",
        "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2),
    }
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-cache-dir",
         f"llama-cpp-python=={VERSION}"],
        env=env, capture_output=True, text=True, timeout=1500, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    complete.write_text(VERSION)
    return python


def _texts(tokenizer: object, n: int) -> list[str]:
    rows = json.loads(HARMLESS.read_text(encoding="utf-8"))[:n]
    return [
        tokenizer.apply_chat_template(  # type: ignore[attr-defined]
            [{"role": "user", "content": row["instruction"]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for row in rows
    ]


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_llama_cpp_reads_the_exported_demo_model(tmp_path: Path, kind: str) -> None:
    python = _llama_python()
    exported = export_gguf(DEMO, tmp_path / f"demo-{kind}.gguf", type=kind).path
    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    model = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    texts = _texts(tokenizer, 10)
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    (tmp_path / "check.py").write_text(CHECK)
    result = subprocess.run(
        [str(python), str(tmp_path / "check.py"), str(exported), str(tmp_path / "texts.json")],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(result.stdout)
    agree = total = 0
    with torch.no_grad():
        for text, row in zip(texts, rows, strict=True):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert row["ids"] == ids  # llama.cpp's tokenizer from our metadata = the model's
            top = model(torch.tensor([ids])).logits[0].argmax(-1).tolist()
            agree += sum(a == b for a, b in zip(top, row["top"], strict=True))
            total += len(top)
    assert agree / total >= 0.99, f"top tokens agree at {agree}/{total} positions"


if __name__ == "__main__":  # pragma: no cover - build the cached venv by hand
    print(_llama_python(), file=sys.stderr)
