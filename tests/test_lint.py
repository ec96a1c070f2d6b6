"""The workflow passes `snakemake --lint` (every rule has a log, a software environment, named inputs...)."""
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.parametrize("configfiles", [[], ["--configfile", "config/demo.yaml"]], ids=["paper", "demo"])
def test_snakemake_lint_is_clean(configfiles):
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--lint", *configfiles], cwd=REPO,
                          capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Lints for" not in out, out[-4000:]
    assert "Congratulations, your workflow is in a good condition!" in out


def test_the_conda_environment_lists_the_projects_dependencies():
    import tomllib

    import yaml

    env = yaml.safe_load((REPO / "workflow" / "envs" / "diffaudit.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert pip == deps
