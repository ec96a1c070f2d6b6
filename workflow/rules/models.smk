# The embedded offline model `mini`: an SD-1.5-shaped pipeline with seeded weights, saved with
# save_pretrained and loaded back through the same from_pretrained path as hub models.


rule build_mini:
    output:
        directory(MINI_DIR),
    params:
        **declare("mini"),
    log:
        f"{LOGS}/build_mini.log",
    conda:
        "../envs/diffaudit.yaml"
    script:
        "../scripts/task.py"
