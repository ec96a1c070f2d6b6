# The main GPU rule: U-Net representations of every image into Zarr stores (full + cropped variants), for the
# baseline (empty {exp}) and for each experiment ({exp}: the slash-prefixed experiments/<name>, its overrides as
# params). It declares `gpu=1` only when it will run on a CUDA device (GPU_JOB, common.smk).
# Progress is kept in {output}.partial, so an interrupted run resumes from the last complete batch.


rule extract:
    input:
        dataset=DATASET_DIR,
        model=model_inputs,
        # the weights lock (diffaudit lock): the model's files are checked against it before the first batch
        lock=layout.MODELS_LOCK,
    output:
        directory(REPR_DIR),
    priority: baseline_first
    params:
        **declare("layers", "extraction", "dataset"),
        model_source=model_source,
        experiment=experiment_overrides,
        shard=lambda wc: shard_index(wc.part),
    resources:
        gpu=GPU_JOB,
    log:
        f"{LOGS}/extract/{{model}}{{exp}}/{{part}}.log",
    conda:
        "../envs/diffaudit.yaml"
    script:
        "../scripts/task.py"


# Where the weights came from (the store's provenance), for the report: hub id, mirror, commit, file hashes.
rule model_files:
    input:
        rep=repr_dirs,
    output:
        report(
            f"{run_dir('{model}')}/{layout.MODEL_FILES_TABLE}",
            caption="../report/model_files.rst",
            category="Models",
            subcategory="{model}",
            labels={"model": "{model}", "table": "model_files.csv (source, commit, sha256 per file)"},
        ),
    log:
        f"{LOGS}/model_files/{{model}}.log",
    conda:
        "../envs/diffaudit.yaml"
    script:
        "../scripts/task.py"
