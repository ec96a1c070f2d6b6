# diffaudit: reproduce "Latent Diffusion U-Net Representations Contain Positional Embeddings and
# Anomalies" (Loos & Linhardt, ICLR 2025 DeLTa) and run the same diagnostics on other models.
#   snakemake --cores 2 --configfile config/demo.yaml     # offline demo
#   snakemake --cores 2                                   # the paper's settings (params.yaml)

configfile: "params.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/analyses.smk"


rule all:
    input:
        expand(REPR_DIR, model=MODELS),
        expand(
            f"{RESULTS}/{{model}}/{{table}}",
            model=MODELS,
            table=["position_probe.csv", "token_group_similarity.csv", "anomaly_rel_norm.csv",
                   "channel_outliers.csv"],
        ),
