# Summary table and figures. Quantitative figures read only the tidy tables; the qualitative views read the
# stores of one model. The paper comparison runs for every model and compares where the authors' numbers apply
# (status.json of rule paper_reference); elsewhere it writes an empty table and says why.
from diffaudit.tables import CORRECTED_TABLES, MODEL_TABLES

FIGURES = layout.figures_dir(RESULTS)
TABLE_FILES = [f"{name}.csv" for name in MODEL_TABLES]
# One file per model with the figure's per-layer quantities, in one folder: `dvc plots` draws each, and the
# cross-model figure reads them all.
SUMMARIES = layout.layer_summary_dir(RESULTS)
QUALITATIVE = ["token_similarity", "corner", "norms", "pca"]
# A model's tables (in its baseline folder).
MODEL_TABLES_OF = [f"{run_dir('{model}')}/{table}" for table in TABLE_FILES]
# Their corrected-mode twins (the credibility score's inputs, free of the authors' quirks).
CORRECTED_TABLES_OF = [f"{run_dir('{model}')}/{twin}.csv" for twin in CORRECTED_TABLES.values()]


rule credibility:
    input:
        tables=MODEL_TABLES_OF,
        corrected=CORRECTED_TABLES_OF,
        # every run's summary (DVC tracks the folder): the position score reads the independent-noise
        # experiment's probe where there is one (docs/credibility.md)
        runs=expand(layout.run_summary_path(RESULTS, "{{model}}", "{run}"), run=RUNS),
    output:
        table=report(
            f"{run_dir('{model}')}/credibility.csv",
            caption="../report/credibility.rst",
            category="Tables",
            subcategory="{model}",
            labels={"model": "{model}", "table": "credibility.csv (per-layer hazard scores)"},
        ),
        # the figure's quantities one row per layer, for `dvc plots` (see dvc.yaml's top-level plots)
        summary=f"{SUMMARIES}/{{model}}.csv",
    params:
        **declare("credibility", "extraction.mode", "experiments"),
    log:
        f"{LOGS}/credibility/{{model}}.log",
    conda:
        "../envs/diffaudit.yaml"
    script:
        "../scripts/task.py"


rule quantitative_figure:
    input:
        MODEL_TABLES_OF,
    output:
        report(
            f"{FIGURES}/quantitative_{{model}}.png",
            caption="../report/quantitative.rst",
            category="Paper figure",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "probe accuracy, corner/border similarity, anomaly norm"},
        ),
        f"{FIGURES}/quantitative_{{model}}.svg",
    log:
        f"{LOGS}/quantitative_figure/{{model}}.log",
    conda:
        "../envs/diffaudit.yaml"
    script:
        "../scripts/task.py"


rule paper_comparison:
    input:
        tables=MODEL_TABLES_OF,
        paper=paper_ref_dir,
    output:
        table=report(
            f"{run_dir('{model}')}/paper_comparison.csv",
            caption="../report/paper_comparison_table.rst",
            category="Tables",
            subcategory="{model}",
            labels={"model": "{model}", "table": "paper_comparison.csv (ours vs published, per layer)"},
        ),
        figure=[
            report(
                f"{FIGURES}/paper_comparison_{{model}}.png",
                caption="../report/paper_comparison.rst",
                category="Paper comparison",
                subcategory="{model}",
                labels={"model": "{model}", "figure": "ours (colour) vs published (black dashed)"},
            ),
            f"{FIGURES}/paper_comparison_{{model}}.svg",
        ],
    log:
        f"{LOGS}/paper_comparison/{{model}}.log",
    conda:
        "../envs/diffaudit.yaml"
    script:
        "../scripts/task.py"


rule qualitative_figures:
    input:
        rep=repr_dirs,
        dataset=DATASET_DIR,
        paper=paper_ref_dir,
        labels=label_files,
    output:
        # same files and order as expand(".../qualitative_{view}.{ext}", view=QUALITATIVE, ext=["png", "svg"])
        [
            report(
                f"{FIGURES}/{{model}}/qualitative_{view}.png",
                caption=f"../report/qualitative_{view}.rst",
                category="Qualitative",
                subcategory="{model}",
                labels={"model": "{model}", "view": view.replace("_", " ")},
            )
            if ext == "png"
            else f"{FIGURES}/{{model}}/qualitative_{view}.{ext}"
            for view in QUALITATIVE
            for ext in ["png", "svg"]
        ],
    params:
        **declare("anomalies"),
    log:
        f"{LOGS}/qualitative_figures/{{model}}.log",
    conda:
        "../envs/diffaudit.yaml"
    script:
        "../scripts/task.py"


rule cross_model_figure:
    input:
        expand(f"{SUMMARIES}/{{model}}.csv", model=MODELS),
    output:
        report(
            f"{FIGURES}/cross_model.png",
            caption="../report/cross_model.rst",
            category="Cross-model",
            subcategory="all models",
            labels={"models": ", ".join(MODELS), "figure": "one line per model"},
        ),
        f"{FIGURES}/cross_model.svg",
    params:
        **declare("models"),
    log:
        f"{LOGS}/cross_model_figure.log",
    conda:
        "../envs/diffaudit.yaml"
    script:
        "../scripts/task.py"
