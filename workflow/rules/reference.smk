# The authors' published files (per-layer numbers and hand labels) for one model, sha256-checked, with
# status.json saying whether they apply to this run (diffaudit.paper_run; the extraction's recorded device and
# precision count too): the anomaly, comparison and qualitative rules take this folder as input, so no result
# depends on which job downloaded first.
from diffaudit.paper_run import SECTIONS as PAPER_RUN_SECTIONS


rule paper_reference:
    input:
        rep=repr_dirs,
    output:
        directory(PAPER_REF_DIR),
    params:
        **declare(*PAPER_RUN_SECTIONS),
        model_source=model_source,
        experiment=experiment_overrides,
    log:
        f"{LOGS}/paper_reference/{{model}}{{exp}}.log",
    conda:
        "../envs/diffaudit.yaml"
    script:
        "../scripts/task.py"
