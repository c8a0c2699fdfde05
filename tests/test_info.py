"""``python -m vmae_fast.info``: one line per fact, the native extension's state in words a user can act on."""
from __future__ import annotations

import pytest

from vmae_fast import _native, info


@pytest.mark.parametrize("state, reason, words, code", [
    ("loaded", None, ["vmae_fast._C: loaded"], 0),
    ("not_built", "vmae_fast._C is not built (...)", ["not built: vmae_fast._C is not built", _native.BUILD_COMMAND], 0),
    ("broken", "built for torch 2.6.0 only", ["broken: built for torch 2.6.0 only"], 1),
    ("disabled", "VMAE_FAST_NO_EXT is set", ["off (VMAE_FAST_NO_EXT is set)"], 0),
])
def test_info_says_whether_the_extension_built(monkeypatch, capsys, state, reason, words, code):
    monkeypatch.setattr(_native, "status", lambda: _native.Status(state, reason))
    assert info.main([]) == code
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and lines[0].startswith("vmae-fast ") and "torch " in lines[0]
    assert all(w in lines[1] for w in words), lines[1]
    assert lines[2].startswith("video decoders: torchcodec ") and lines[3].startswith("--dtype auto: ")
    assert lines[4].startswith("extras importable: train ")


def test_a_stray_argument_is_one_usage_line(capsys):
    """(It printed the report and ignored the word.)"""
    from vmae_fast.cli import run_cli
    from vmae_fast.errors import EXIT_USAGE

    assert run_cli(info.main, info.PROG, ["--bogus"]) == EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == (
        "python -m vmae_fast.info: error: unrecognized arguments: --bogus (see python -m vmae_fast.info --help)\n")
