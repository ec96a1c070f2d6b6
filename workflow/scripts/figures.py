# One thin wrapper for the summary and figure rules: the rule name selects the task in diffaudit.pipeline.
from pathlib import Path

from diffaudit import pipeline
from diffaudit.errors import run_task


def stem(path):
    return str(Path(path).with_suffix(""))


def table_dir(inputs):
    return Path(inputs[0]).parent


TASKS = {
    "credibility": lambda cfg, wc, i, o: pipeline.credibility(cfg, wc.model, table_dir(i), o.table, o.summary),
    "quantitative_figure": lambda cfg, wc, i, o: pipeline.quantitative_figure(cfg, wc.model, table_dir(i), stem(o[0])),
    "paper_comparison": lambda cfg, wc, i, o: pipeline.paper_comparison(cfg, wc.model, table_dir(i), o.table,
                                                                         stem(o.figure[0])),
    "qualitative_figures": lambda cfg, wc, i, o: pipeline.qualitative_figures(cfg, wc.model, list(i.rep), i.dataset,
                                                                              Path(o[0]).parent),
    "cross_model_figure": lambda cfg, wc, i, o: pipeline.cross_model_figure(
        cfg, {Path(p).parent.name: Path(p).parent for p in i}, stem(o[0])),
}
run_task(TASKS[snakemake.rule], snakemake.config, snakemake.wildcards, snakemake.input, snakemake.output)
