# The image set, written once as PNGs + index.csv (+ dataset.json provenance).


rule dataset:
    output:
        directory(DATASET_DIR),
    params:
        dataset=config["dataset"],
    script:
        "../scripts/task.py"
