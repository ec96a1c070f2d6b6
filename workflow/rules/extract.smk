# The main GPU rule: U-Net representations of every image into Zarr stores (full + cropped variants), for the
# baseline (empty {exp}) and for each experiment ({exp}: the slash-prefixed experiments/<name>, its overrides as
# params). It declares `gpu=1` only when it will run on a CUDA device (GPU_JOB, common.smk).
# Progress is kept in {output}.partial, so an interrupted run resumes from the last complete batch.


rule extract:
    input:
        dataset=DATASET_DIR,
        model=model_inputs,
    output:
        directory(REPR_DIR),
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
