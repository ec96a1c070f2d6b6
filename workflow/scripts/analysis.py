# One thin wrapper for every analysis rule: the rule name selects the task in diffaudit.pipeline.
from diffaudit import pipeline
from diffaudit.errors import run_task

TASKS = {
    "position_probe": lambda cfg, m, i, o: pipeline.probe(cfg, m, list(i.rep), o[0]),
    "token_group_similarity": lambda cfg, m, i, o: pipeline.similarity(cfg, m, list(i.rep), o[0]),
    "anomalies": lambda cfg, m, i, o: pipeline.anomalies(cfg, m, list(i.rep), o.table, o.detector),
    "channel_outliers": lambda cfg, m, i, o: pipeline.channels(cfg, m, list(i.rep), o[0]),
}
run_task(TASKS[snakemake.rule], snakemake.config, snakemake.wildcards.model, snakemake.input, snakemake.output)
