from diffaudit.errors import run_task
from diffaudit.pipeline import build_dataset

run_task(build_dataset, snakemake.config, snakemake.output[0])
