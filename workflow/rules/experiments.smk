# Experiments (params.yaml `experiments`): the extraction and analysis rules above run for each experiment too
# (wildcard `exp`); here each run (the baseline or an experiment) is reduced to the per-layer quantities of the
# paper's three panels with bootstrap intervals (an experiment's with its paired differences to the baseline, from
# both runs' per-image aggregates), and the runs of a model are compared in one table and figure.

rule run_summary:
    input:
        unpack(run_tables),
    output:
        layout.run_summary_path(RESULTS, "{model}", "{run}"),
    params:
        **declare("probe.interior_k", "bootstrap"),
    log:
        f"{LOGS}/run_summary/{{model}}/{{run}}.log",
    conda:
        "../envs/diffaudit.yaml"
    script:
        "../scripts/task.py"


rule experiment_comparison:
    input:
        # the folder of the model's run summaries (the baseline's is always there; DVC tracks the folder)
        expand(layout.run_summary_path(RESULTS, "{{model}}", "{run}"), run=RUNS),
    output:
        table=report(
            f"{run_dir('{model}')}/{layout.EXPERIMENTS_TABLE}",
            caption="../report/experiments_table.rst",
            category="Experiments",
            subcategory="{model}",
            labels={"model": "{model}", "table": "experiments.csv (per experiment and layer, 95% intervals)"},
        ),
        figure=[
            report(
                f"{FIGURES}/experiments_{{model}}.png",
                caption="../report/experiments.rst",
                category="Experiments",
                subcategory="{model}",
                labels={"model": "{model}", "figure": "baseline and experiments, bootstrap bands"},
            ),
            f"{FIGURES}/experiments_{{model}}.svg",
        ],
    params:
        **declare("experiments"),
    log:
        f"{LOGS}/experiment_comparison/{{model}}.log",
    conda:
        "../envs/diffaudit.yaml"
    script:
        "../scripts/task.py"
