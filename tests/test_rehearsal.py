"""The full-size rehearsal (benchmarks/rehearse_full_size.py): seeded full-size SD-1.5 through the hub path, the
extraction and the analyses. Slow (minutes of CPU and ~10 GB of memory), so opt-in: DIFFAUDIT_REHEARSAL=1."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "rehearse_full_size.py"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DIFFAUDIT_REHEARSAL") != "1",
                    reason="opt-in: DIFFAUDIT_REHEARSAL=1 (minutes of CPU, ~10 GB of memory)")
def test_full_size_sd15_rehearsal(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--models", "sd15", "--images", "2", "--work",
                           str(tmp_path)], capture_output=True, text=True, timeout=3600)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "45 layers, all as expected" in out
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5 @ " in out and "rehearsal: OK" in out
