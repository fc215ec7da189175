"""The command line's error contract: one line on stderr, no traceback, an exit status a script can test."""

from __future__ import annotations

import pytest

import hf_capgap.hub
from hf_capgap import HubUploadError, cli
from hf_capgap.errors import ConfigError


def _raising(error: Exception):
    def push_student(*args, **kwargs):
        raise error

    return push_student


def test_a_failed_push_is_one_line_and_exit_1(monkeypatch, capsys):
    failure = HubUploadError("pushing out to me/student failed: 500\nThe local folder is unchanged. Retry with: x")
    monkeypatch.setattr(hf_capgap.hub, "push_student", _raising(failure))
    assert cli.main(["push", "out", "me/student"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "hf-capgap push: error: pushing out to me/student failed: 500 The local folder is unchanged. Retry with: x"
    ]
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("error", [ConfigError("--private needs a token"), FileNotFoundError("no out")])
def test_an_error_in_the_input_is_one_line_and_exit_2(monkeypatch, capsys, error):
    monkeypatch.setattr(hf_capgap.hub, "push_student", _raising(error))
    assert cli.main(["push", "out", "me/student"]) == 2
    assert capsys.readouterr().err == f"hf-capgap push: error: {error}\n"


def test_other_exceptions_are_not_hidden(monkeypatch):
    monkeypatch.setattr(hf_capgap.hub, "push_student", _raising(KeyError("a bug")))
    with pytest.raises(KeyError):
        cli.main(["push", "out", "me/student"])


def test_prune_and_cache_build_name_a_missing_tokenizer_before_anything_loads(tmp_path, capsys):
    from tests.conftest import tiny_llama

    folder = tmp_path / "teacher"
    tiny_llama().save_pretrained(folder)  # weights and config, no tokenizer
    assert cli.main(["prune", str(folder), "--target-params", "1K", "--out", str(tmp_path / "student")]) == 2
    assert "is missing a tokenizer" in capsys.readouterr().err
    (folder / "tokenizer_config.json").write_text("{}")  # tokenizer settings without a vocabulary
    assert cli.main(["cache", "build", str(folder), "--dataset", str(tmp_path), "--out", str(tmp_path / "c")]) == 2
    error = capsys.readouterr().err
    assert "is missing a tokenizer" in error and "sentencepiece" not in error
