# The analyses: each reads the Zarr stores of one model and writes one tidy table.

ANALYSIS_DIR = f"{RESULTS}/{{model}}"


def label_files(wildcards):
    """User label files (a change re-runs the analysis); the authors' labels are fetched by the rule."""
    from diffaudit.pipeline import label_sources

    return [p for s, p in label_sources(config, wildcards.model).items() if s.startswith("user:")]


rule position_probe:
    input:
        rep=repr_dirs,
    output:
        f"{ANALYSIS_DIR}/position_probe.csv",
    params:
        probe=config["probe"],
    resources:
        gpu=1 if config["extraction"]["device"] != "cpu" else 0,
    script:
        "../scripts/analysis.py"


rule token_group_similarity:
    input:
        rep=repr_dirs,
    output:
        f"{ANALYSIS_DIR}/token_group_similarity.csv",
    params:
        similarity=config["similarity"],
    script:
        "../scripts/analysis.py"


rule anomalies:
    input:
        rep=repr_dirs,
        labels=label_files,
    output:
        table=f"{ANALYSIS_DIR}/anomaly_rel_norm.csv",
        detector=f"{ANALYSIS_DIR}/anomaly_detector.json",
    params:
        anomalies=config["anomalies"],
    script:
        "../scripts/analysis.py"


rule channel_outliers:
    input:
        rep=repr_dirs,
    output:
        f"{ANALYSIS_DIR}/channel_outliers.csv",
    params:
        channels=config["channels"],
    script:
        "../scripts/analysis.py"
