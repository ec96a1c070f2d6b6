# Summary table and figures. Quantitative figures read only the tidy tables; the qualitative views read the
# stores of one model. The paper comparison runs for the authors' models on the paper's image set.
from diffaudit.pipeline import paper_applies

FIGURES = f"{RESULTS}/figures"
TABLE_FILES = ["position_probe.csv", "token_group_similarity.csv", "anomaly_rel_norm.csv", "channel_outliers.csv"]
PAPER_MODELS_RUN = [m for m in MODELS if paper_applies(config, m)]
QUALITATIVE = ["token_similarity", "corner", "norms", "pca"]


rule credibility:
    input:
        expand(f"{RESULTS}/{{{{model}}}}/{{table}}", table=TABLE_FILES),
    output:
        f"{RESULTS}/{{model}}/credibility.csv",
    params:
        credibility=config["credibility"],
    script:
        "../scripts/figures.py"


rule quantitative_figure:
    input:
        expand(f"{RESULTS}/{{{{model}}}}/{{table}}", table=TABLE_FILES),
    output:
        multiext(f"{FIGURES}/quantitative_{{model}}", ".png", ".svg"),
    script:
        "../scripts/figures.py"


rule paper_comparison:
    input:
        expand(f"{RESULTS}/{{{{model}}}}/{{table}}", table=TABLE_FILES),
    output:
        table=f"{RESULTS}/{{model}}/paper_comparison.csv",
        figure=multiext(f"{FIGURES}/paper_comparison_{{model}}", ".png", ".svg"),
    script:
        "../scripts/figures.py"


rule qualitative_figures:
    input:
        rep=repr_dirs,
        dataset=DATASET_DIR,
        labels=label_files,
    output:
        expand(f"{FIGURES}/{{{{model}}}}/qualitative_{{view}}.{{ext}}", view=QUALITATIVE, ext=["png", "svg"]),
    params:
        anomalies=config["anomalies"],
    script:
        "../scripts/figures.py"


rule cross_model_figure:
    input:
        expand(f"{RESULTS}/{{model}}/{{table}}", model=MODELS, table=TABLE_FILES),
    output:
        multiext(f"{FIGURES}/cross_model", ".png", ".svg"),
    script:
        "../scripts/figures.py"
