"""Workflow tasks: one module per Snakemake rule, named after the rule.

``diffaudit.pipeline.<rule>.run(cfg, ...)`` does the work from explicit arguments (usable on its own);
``from_snakemake(smk)`` maps the rule's inputs, outputs and wildcards onto it. Every rule runs the same thin script,
``workflow/scripts/task.py``, which imports only its own module, so DVC can depend on exactly the code a stage
runs (``diffaudit.dvcgen``). Shared helpers live in :mod:`diffaudit.pipeline.common`.
"""
