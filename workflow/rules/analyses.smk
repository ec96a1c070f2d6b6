# The analyses: each reads the Zarr stores of one model and writes one tidy table.

ANALYSIS_DIR = f"{RESULTS}/{{model}}"


def label_files(wildcards):
    """User label files (a change re-runs the analysis); the authors' labels are fetched by the rule."""
    from diffaudit.pipeline.anomalies import label_sources

    return [p for s, p in label_sources(config, wildcards.model).items() if s.startswith("user:")]


rule position_probe:
    input:
        rep=repr_dirs,
    output:
        table=report(
            f"{ANALYSIS_DIR}/position_probe.csv",
            caption="../report/position_probe.rst",
            category="Tables",
            subcategory="{model}",
            labels={"model": "{model}", "table": "position_probe.csv (probe accuracy per layer and epoch)"},
        ),
        summary=report(
            f"{ANALYSIS_DIR}/position_probe_summary.csv",
            caption="../report/position_probe_summary.rst",
            category="Tables",
            subcategory="{model}",
            labels={"model": "{model}", "table": "position_probe_summary.csv (mean and sd over seeds)"},
        ),
    params:
        probe=config["probe"],
    resources:
        gpu=1 if config["extraction"]["device"] != "cpu" else 0,
    script:
        "../scripts/task.py"


rule token_group_similarity:
    input:
        rep=repr_dirs,
    output:
        report(
            f"{ANALYSIS_DIR}/token_group_similarity.csv",
            caption="../report/token_group_similarity.rst",
            category="Tables",
            subcategory="{model}",
            labels={"model": "{model}", "table": "token_group_similarity.csv (corner/border/other similarity ratios)"},
        ),
    params:
        similarity=config["similarity"],
    script:
        "../scripts/task.py"


rule anomalies:
    input:
        rep=repr_dirs,
        labels=label_files,
    output:
        table=report(
            f"{ANALYSIS_DIR}/anomaly_rel_norm.csv",
            caption="../report/anomaly_rel_norm.rst",
            category="Tables",
            subcategory="{model}",
            labels={"model": "{model}", "table": "anomaly_rel_norm.csv (relative norm of labelled anomalies)"},
        ),
        detector=f"{ANALYSIS_DIR}/anomaly_detector.json",
    params:
        anomalies=config["anomalies"],
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
            subcategory="{model}",
            labels={"model": "{model}", "table": "channel_outliers.csv (channels with extreme magnitude)"},
        ),
    params:
        channels=config["channels"],
    script:
        "../scripts/task.py"
