# diffaudit: reproduce "Latent Diffusion U-Net Representations Contain Positional Embeddings and
# Anomalies" (Loos & Linhardt, ICLR 2025 DeLTa) and run the same diagnostics on other models.
#   snakemake --cores 2 --configfile config/demo.yaml     # offline demo
#   snakemake --cores 2                                   # the paper's settings (params.yaml)

configfile: "params.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/reference.smk"
include: "workflow/rules/analyses.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/experiments.smk"
include: "workflow/rules/harm.smk"


rule all:
    input:
        expand(f"{run_dir('{model}')}/{{table}}", model=MODELS, table=TABLE_FILES + ["credibility.csv"]),
        expand(rules.quantitative_figure.output, model=MODELS),
        expand(rules.qualitative_figures.output, model=MODELS),
        expand(rules.paper_comparison.output, model=MODELS),
        expand(rules.model_files.output, model=MODELS),
        rules.cross_model_figure.output,
        expand(f"{run_dir('{model}', layout.run_suffix('{name}'))}/{{table}}", model=MODELS, name=EXPERIMENTS,
               table=TABLE_FILES),
        expand(rules.experiment_comparison.output, model=MODELS),
        expand(f"{run_dir('{model}', '{exp}')}/{{table}}", model=MODELS, exp=harm_runs(),
               table=[layout.HARM_TABLE, layout.MITIGATIONS_TABLE]),
        expand(rules.credibility_validation.output, model=MODELS),
        expand(rules.harm_figure.output, model=MODELS),
