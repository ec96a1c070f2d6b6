# The script of every rule: the task module named after the rule does the work (diffaudit.pipeline.<rule>).
# Only that module is imported, so a stage's code dependencies are exactly what it runs (see diffaudit.dvcgen).
import importlib

from diffaudit.errors import run_task

task = importlib.import_module(f"diffaudit.pipeline.{snakemake.rule}")  # noqa: F821 (set by Snakemake)
run_task(task.from_snakemake, snakemake)  # noqa: F821
