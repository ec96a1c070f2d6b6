# The script of every rule: the task module named after the rule does the work (diffaudit.pipeline.<rule>).
# Only that module is imported, so a stage's code dependencies are exactly what it runs (see diffaudit.dvcgen).
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))  # noqa: F821 (the package of this checkout)
from diffaudit.errors import run_task  # noqa: E402

task = importlib.import_module(f"diffaudit.pipeline.{snakemake.rule}")  # noqa: F821 (set by Snakemake)
run_task(task.from_snakemake, snakemake, log=snakemake.log[0])  # noqa: F821
