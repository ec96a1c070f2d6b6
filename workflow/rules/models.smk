# The embedded offline models (mini: SD-1.5's layout; mini-sdxl, mini-sd3, mini-flux): small pipelines with seeded
# weights, saved with save_pretrained and loaded back through the same from_pretrained path as hub models.


rule build_mini:
    output:
        directory(layout.embedded_dir("{embedded}")),
    params:
        **declare("mini"),
    log:
        f"{LOGS}/build_{{embedded}}.log",
    wildcard_constraints:
        embedded=EMBEDDED_PATTERN,
    conda:
        "../envs/diffaudit.yaml"
    script:
        "../scripts/task.py"
