# The only GPU rule: U-Net representations of every image into Zarr stores (full + cropped variants).
# Progress is kept in {output}.partial, so an interrupted run resumes from the last complete batch.


rule extract:
    input:
        dataset=DATASET_DIR,
        model=model_inputs,
    output:
        directory(REPR_DIR),
    params:
        layers=config["layers"],
        extraction=config["extraction"],
        source=lambda wc: config["model_sources"].get(wc.model, wc.model),
        shard=lambda wc: shard_index(wc.part),
    resources:
        gpu=1,
    script:
        "../scripts/task.py"
