from diffaudit.errors import run_task
from diffaudit.pipeline import extract

run_task(extract, snakemake.config, snakemake.wildcards.model, snakemake.input.dataset, snakemake.output[0],
         shard=snakemake.params.shard)
