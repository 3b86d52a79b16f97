"""Every command goes through one error wrapper: a user's mistake is one line ``<prog>: <message>`` (exit status 1,
the fix named, a hint at FCT_DEBUG), and ``FCT_DEBUG=1`` lets the original exception through for bug reports."""

from __future__ import annotations

import pytest

from fct_lightning.commands import run_command
from fct_lightning.commands.chain import chain_command, makefile_text
from fct_lightning.commands.evaluate import evaluate_command
from fct_lightning.commands.fit import fit
from fct_lightning.commands.gallery import embed_command, transform_command
from fct_lightning.commands.report import report_command

MISTAKES = [
    ("fct-fit", fit, ["--stage", "old", "--seed", "-1"], "--seed -1 is negative"),
    ("fct-eval", evaluate_command, ["--cases", "nope/nope", "--no_wandb"], "case 'nope/nope' is not known"),
    ("fct-report", report_command, ["/nonexistent/results.json", "--no_wandb"], "does not exist; run fct-eval"),
    ("fct-embed", embed_command, ["--checkpoint", "/nonexistent.ckpt", "--out", "x.txt"], "must end in .npy"),
    ("fct-transform", transform_command, ["--checkpoint", "/nonexistent.ckpt", "--old", "o.npy", "--out", "o.npy"],
     "would replace"),
]


@pytest.mark.parametrize(("prog", "main", "argv", "message"), MISTAKES, ids=[m[0] for m in MISTAKES])
def test_user_errors_are_one_line_with_the_fix(prog, main, argv, message, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FCT_DEBUG", raising=False)
    with pytest.raises(SystemExit) as err:
        run_command(prog, main, argv)
    text = str(err.value.code)
    assert text.startswith(f"{prog}: ") and message in text and "FCT_DEBUG=1" in text, text
    monkeypatch.setenv("FCT_DEBUG", "1")
    with pytest.raises((ValueError, FileNotFoundError), match=message.split(";")[0].replace("(", r"\(")):
        run_command(prog, main, argv)


def test_fct_chain_lists_the_registry(capsys):
    chain_command(["list"])
    out = capsys.readouterr().out
    assert "transformation_noside: stage transformation" in out and "cases fct+side/old" in out
    assert "CHAIN_VARIANTS := old side_info new bct transformation" in makefile_text()
