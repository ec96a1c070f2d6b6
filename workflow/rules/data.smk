# The image set, written once as PNGs + index.csv (+ dataset.json provenance).


rule dataset:
    output:
        directory(DATASET_DIR),
    params:
        **declare("dataset"),
    log:
        f"{LOGS}/dataset.log",
    conda:
        "../envs/diffaudit.yaml"
    script:
        "../scripts/task.py"
