"""``blasphemer judge``: reading answer files, the marker judge, the command and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from blasphemer.app import cli
from blasphemer.errors import DatasetError
from blasphemer.evaluation.judging import Answer, MarkerJudge, make_judge, read_answers

# (response, refusal by the marker rule): hand-written, each for a reason named beside it.
CASES = [
    ("I'm sorry, but I can't help with that.", True),  # the classic refusal
    ("I cannot provide instructions for making weapons.", True),
    ("Sure! Step 1: preheat the oven to 180 °C.", False),
    ("", True),  # no content at all
    ("...", True),  # punctuation only
    ("Is jaywalking illegal? In most countries it is a minor offence.", False),  # topic word
    ("<think>\n\n</think>\n\nI’m sorry, I can’t do that.", True),  # typographic apostrophes
    ("<think>\n\n</think>\n\nHere is the poem you asked for.", False),
]


def _write(path: Path, records: list[object]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _answers(tmp_path: Path) -> Path:
    records = [{"prompt": f"p{i}", "response": r, "model": "x"} for i, (r, _) in enumerate(CASES)]
    return _write(tmp_path / "answers.jsonl", records)


def test_marker_judge_gives_the_rule_verdicts_in_order(tmp_path: Path) -> None:
    answers = read_answers(_answers(tmp_path))
    assert [a.line for a in answers] == list(range(1, len(CASES) + 1))
    verdicts = MarkerJudge().judge(answers)
    assert [v.refusal for v in verdicts] == [want for _, want in CASES]
    assert all(v.score == (1.0 if v.refusal else 0.0) for v in verdicts)


def test_marker_judge_uses_the_given_markers() -> None:
    answers = [Answer("p", "Let's talk about something else.", 1), Answer("q", "Sure.", 2)]
    assert [v.refusal for v in MarkerJudge().judge(answers)] == [False, False]
    custom = make_judge("markers", ["something else"])
    assert [v.refusal for v in custom.judge(answers)] == [True, False]


def test_blank_lines_are_skipped_and_line_numbers_kept(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.jsonl", ["", json.dumps({"prompt": "p", "response": "r"}), "  "])
    assert read_answers(path) == [Answer("p", "r", 2)]


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        ("", ("holds no answers",)),
        ("\n \n", ("holds no answers",)),
        ('{"prompt": "p", "response": "r"}\n{"prompt": "q"}\n', ("line 2", "'response'")),
        ('{"response": "r"}\n', ("line 1", "'prompt'")),
        ('{"prompt": "p", "response": 3}\n', ("line 1", "'response'", "int")),
        ('{"prompt": "p", "response": "r"}\n{"prompt": \n', ("line 2", "not valid json")),
        ('["p", "r"]\n', ("line 1", "not a json object")),
    ],
    ids=["empty", "blank", "no-response", "no-prompt", "not-text", "bad-json", "not-object"],
)
def test_bad_answer_files_name_the_line(tmp_path: Path, content: str, needles: tuple) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DatasetError) as error:
        read_answers(path)
    message = str(error.value)
    assert "\n" not in message and "a.jsonl" in message
    for needle in needles:
        assert needle.lower() in message.lower(), (needle, message)


def test_missing_folder_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        read_answers(tmp_path / "absent.jsonl")
    with pytest.raises(DatasetError, match="is a folder"):
        read_answers(tmp_path)
    (tmp_path / "b.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DatasetError, match="not UTF-8"):
        read_answers(tmp_path / "b.jsonl")


def test_judge_command_json_is_one_line_per_answer_in_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["judge", str(_answers(tmp_path)), "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["line"] for r in records] == list(range(1, len(CASES) + 1))
    assert [r["refusal"] for r in records] == [want for _, want in CASES]
    assert {r["judge"] for r in records} == {"markers"}


def test_judge_command_summary_and_custom_markers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _answers(tmp_path)
    assert cli.main(["judge", str(path)]) == 0
    refused = sum(want for _, want in CASES)
    assert f"{refused}/{len(CASES)} answers are refusals" in capsys.readouterr().out
    assert cli.main(["judge", str(path), "--refusal-markers", "oven"]) == 0
    # "oven" marks one answer; the two without content are refusals under any markers
    assert f"3/{len(CASES)} answers are refusals" in capsys.readouterr().out


def test_judge_command_bad_line_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path / "a.jsonl", [{"prompt": "p", "response": "r"}, {"prompt": "q"}])
    assert cli.main(["judge", str(path)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "line 2" in err[0]


def test_judge_command_imports_no_heavy_library(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from blasphemer.app import cli\n"
        f"code = cli.main(['judge', {str(_answers(tmp_path))!r}, '--json'])\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers'})\n"
        "print('RESULT', code, ','.join(heavy) or '-', file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stderr.strip().splitlines()[-1] == "RESULT 0 -"
