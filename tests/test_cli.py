"""The CLI: `paged-backend generate ...` prints completions; bad input is an error line and exit 2."""

from __future__ import annotations

import subprocess
import sys

from paged_backend.entrypoints.cli import main


def test_generate_n2_samples_by_default(capsys):
    assert main(["generate", "--max-tokens", "3", "--n", "2", "--max-model-len", "64",
                 "The capital of France is"]) == 0
    out = capsys.readouterr().out
    assert "[0]" in out and "[1]" in out and out.count("Generated:") == 2


def test_missing_model_is_an_error_line(capsys):
    assert main(["generate", "--model", "./no/such/dir", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "no/such/dir" in err


def test_python_dash_m_greedy():
    r = subprocess.run([sys.executable, "-m", "paged_backend", "generate", "--max-tokens", "2",
                        "--max-model-len", "64", "The capital of France is"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Generated: ' Paris" in r.stdout
