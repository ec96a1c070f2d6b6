# The analyses: each reads the Zarr stores of one run (a model's baseline, or one of its experiments: wildcard
# `exp`, see common.smk) and writes one tidy table.

from diffaudit.tables import CORRECTED_TABLES

ANALYSIS_DIR = run_dir("{model}", "{exp}")


rule position_probe:
    input:
        rep=repr_dirs,
    output:
        table=report(
            f"{ANALYSIS_DIR}/position_probe.csv",
            caption="../report/position_probe.rst",
            category="Tables",
            subcategory="{model}{exp}",
            labels={"model": "{model}", "table": "position_probe.csv (probe accuracy per layer and epoch)"},
        ),
        summary=report(
            f"{ANALYSIS_DIR}/position_probe_summary.csv",
            caption="../report/position_probe_summary.rst",
            category="Tables",
            subcategory="{model}{exp}",
            labels={"model": "{model}", "table": "position_probe_summary.csv (mean and sd over seeds)"},
        ),
        per_image=f"{ANALYSIS_DIR}/{layout.per_image_table('position_probe')}",
    params:
        **declare("probe", "bootstrap", "extraction.device", "dataset.source", "dataset.imagenet.classes"),
    log:
        f"{LOGS}/position_probe/{{model}}{{exp}}.log",
    resources:
        gpu=GPU_JOB,
    conda:
        "../envs/diffaudit.yaml"
    script:
        "../scripts/task.py"


rule token_group_similarity:
    input:
        rep=repr_dirs,
    output:
        table=report(
            f"{ANALYSIS_DIR}/token_group_similarity.csv",
            caption="../report/token_group_similarity.rst",
            category="Tables",
            subcategory="{model}{exp}",
            labels={"model": "{model}", "table": "token_group_similarity.csv (corner/border/other similarity ratios)"},
        ),
        # the same table in corrected mode, from the same pass (the credibility score's input, docs/credibility.md)
        corrected=f"{ANALYSIS_DIR}/{CORRECTED_TABLES['token_group_similarity']}.csv",
        per_image=f"{ANALYSIS_DIR}/{layout.per_image_table('token_group_similarity')}",
    params:
        **declare("similarity", "bootstrap"),
    log:
        f"{LOGS}/token_group_similarity/{{model}}{{exp}}.log",
    conda:
        "../envs/diffaudit.yaml"
    script:
        "../scripts/task.py"


rule anomalies:
    input:
        rep=repr_dirs,
        paper=paper_ref_dir,
        labels=label_files,
        # an experiment's only: the baseline's label positions, evaluated on the experiment's stores (paired)
        baseline_labels=baseline_anomaly_labels,
    output:
        table=report(
            f"{ANALYSIS_DIR}/anomaly_rel_norm.csv",
            caption="../report/anomaly_rel_norm.rst",
            category="Tables",
            subcategory="{model}{exp}",
            labels={"model": "{model}", "table": "anomaly_rel_norm.csv (relative norm of labelled anomalies)"},
        ),
        detector=f"{ANALYSIS_DIR}/anomaly_detector.json",
        # the same table in corrected mode, from the same pass (the credibility score's input, docs/credibility.md)
        corrected=f"{ANALYSIS_DIR}/{CORRECTED_TABLES['anomaly_rel_norm']}.csv",
        labels=f"{ANALYSIS_DIR}/{layout.ANOMALY_LABELS}",
        per_image=f"{ANALYSIS_DIR}/{layout.per_image_table('anomaly_rel_norm')}",
    priority: baseline_first
    params:
        **declare("anomalies", "bootstrap"),
    log:
        f"{LOGS}/anomalies/{{model}}{{exp}}.log",
    conda:
        "../envs/diffaudit.yaml"
    script:
        "../scripts/task.py"


rule channel_outliers:
    input:
        rep=repr_dirs,
    output:
        report(
            f"{ANALYSIS_DIR}/channel_outliers.csv",
            caption="../report/channel_outliers.rst",
            category="Tables",
            subcategory="{model}{exp}",
            labels={"model": "{model}", "table": "channel_outliers.csv (channels with extreme magnitude)"},
        ),
    params:
        **declare("channels"),
    log:
        f"{LOGS}/channel_outliers/{{model}}{{exp}}.log",
    conda:
        "../envs/diffaudit.yaml"
    script:
        "../scripts/task.py"
