"""A user's mistake is one line that says what to do; a bug keeps its traceback; loading a model is quiet."""
import subprocess
import sys

import pytest

from diffaudit.errors import DiffauditError, MissingInputError, UserError, run_task


def bad_config():
    raise UserError("config key probe.epochs: must be >= 1; set probe.epochs: 5")


def numpy_bug():
    import numpy as np

    np.zeros((2, 3)) @ np.zeros((2, 3))  # a ValueError from inside numpy: a bug, not the user's


def test_a_user_error_is_one_line_in_stderr_and_the_log(tmp_path, capsys):
    log = tmp_path / "logs" / "rule.log"
    with pytest.raises(SystemExit) as e:
        run_task(bad_config, log=log)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["diffaudit error: config key probe.epochs: must be >= 1; set probe.epochs: 5"]
    assert log.read_text().strip().endswith("set probe.epochs: 5") and "Traceback" not in log.read_text()


def test_a_bug_keeps_its_traceback(tmp_path):
    log = tmp_path / "rule.log"
    with pytest.raises(ValueError, match="matmul"):
        run_task(numpy_bug, log=log)
    text = log.read_text()
    assert "Traceback" in text and "numpy_bug" in text


def test_user_errors_stay_catchable_as_before():
    assert issubclass(UserError, ValueError) and issubclass(UserError, DiffauditError)
    assert issubclass(MissingInputError, FileNotFoundError) and issubclass(MissingInputError, DiffauditError)


def test_loading_a_model_prints_no_library_noise(mini_dir):
    """transformers warns about torchvision at import and diffusers draws progress bars: none of it in a job."""
    code = ("from diffaudit.models import ModelSpec, load_pipeline; "
            f"load_pipeline(ModelSpec('mini', {str(mini_dir)!r}), device='cpu')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    out = proc.stdout + proc.stderr
    assert "torchvision" not in out and "Loading pipeline components" not in out and "it/s" not in out, out
