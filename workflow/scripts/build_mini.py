from diffaudit.errors import run_task
from diffaudit.pipeline import build_mini

run_task(build_mini, snakemake.config, snakemake.output[0])
