# Measured harm (docs/harm.md): image pairs with a known dense correspondence (flip, shift, stereo) made from the
# run's images, extracted with each run's own settings, matched token by token per layer without and with each
# training-free mitigation; the artifact measures on mitigated features; the credibility axes against the harm.
# For the baseline when `harm.enabled`, and for every experiment with `harm: true`.

HARM_PAIRS = layout.harm_pairs_dir(RESULTS)
HARM_REPR = f"{layout.harm_dir(run_dir('{model}', '{exp}'))}/{layout.REPRESENTATIONS}"


rule harm_pairs:
    input:
        dataset=DATASET_DIR,
    output:
        directory(HARM_PAIRS),
    params:
        # the probe's split only (its training images fit the mitigations, its test images are the sources)
        **declare("harm", "probe.mode", "probe.train_frac", "probe.seed", "probe.seeds", "dataset.n_images"),
    log:
        f"{LOGS}/harm_pairs.log",
    conda:
        "../envs/diffaudit.yaml"
    script:
        "../scripts/task.py"


rule extract_harm:
    input:
        pairs=HARM_PAIRS,
        model=model_inputs,
        lock=layout.MODELS_LOCK,
    output:
        directory(HARM_REPR),
    # scheduled as soon as they can run, so that the single-threaded harm job does not run alone at the end
    priority: 10
    params:
        **declare("layers", "extraction", "dataset"),
        model_source=model_source,
        experiment=experiment_overrides,
    resources:
        gpu=GPU_JOB,
    log:
        f"{LOGS}/extract_harm/{{model}}{{exp}}.log",
    conda:
        "../envs/diffaudit.yaml"
    script:
        "../scripts/task.py"


rule harm:
    input:
        rep=repr_dirs,
        pairs=HARM_PAIRS,
        pairs_rep=HARM_REPR,
        # the run's anomaly label positions (rel_norm on mitigated features)
        labels=f"{ANALYSIS_DIR}/{layout.ANOMALY_LABELS}",
    output:
        harm=report(
            f"{ANALYSIS_DIR}/{layout.HARM_TABLE}",
            caption="../report/harm_table.rst",
            category="Harm",
            subcategory="{model}{exp}",
            labels={"model": "{model}", "table": "harm.csv (matching per layer, task and mitigation)"},
        ),
        mitigations=report(
            f"{ANALYSIS_DIR}/{layout.MITIGATIONS_TABLE}",
            caption="../report/mitigations.rst",
            category="Harm",
            subcategory="{model}{exp}",
            labels={"model": "{model}", "table": "mitigations.csv (artifact measures after each mitigation)"},
        ),
        # means over layers per task, mitigation and metric (DVC metrics: `dvc metrics show`)
        summary=f"{ANALYSIS_DIR}/{layout.HARM_SUMMARY}",
    params:
        **declare("harm", "probe", "anomalies.threshold", "channels.ratio_threshold", "bootstrap",
                  "extraction.device"),
    threads: 1
    priority: 10
    resources:
        gpu=GPU_JOB,
    log:
        f"{LOGS}/harm/{{model}}{{exp}}.log",
    conda:
        "../envs/diffaudit.yaml"
    script:
        "../scripts/task.py"


rule credibility_validation:
    input:
        credibility=f"{run_dir('{model}')}/credibility.csv",
        harm=f"{run_dir('{model}')}/{layout.HARM_TABLE}",
    output:
        report(
            f"{run_dir('{model}')}/{layout.CREDIBILITY_VALIDATION_TABLE}",
            caption="../report/credibility_validation.rst",
            category="Harm",
            subcategory="{model}",
            labels={"model": "{model}", "table": "credibility_validation.csv (axes vs harm, Spearman)"},
        ),
    params:
        **declare("bootstrap"),
    log:
        f"{LOGS}/credibility_validation/{{model}}.log",
    conda:
        "../envs/diffaudit.yaml"
    script:
        "../scripts/task.py"


rule harm_figure:
    input:
        f"{run_dir('{model}')}/{layout.HARM_TABLE}",
    output:
        png=report(
            f"{FIGURES}/harm_{{model}}.png",
            caption="../report/harm.rst",
            category="Harm",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "pck and position following per layer, per mitigation"},
        ),
        svg=f"{FIGURES}/harm_{{model}}.svg",
    log:
        f"{LOGS}/harm_figure/{{model}}.log",
    conda:
        "../envs/diffaudit.yaml"
    script:
        "../scripts/task.py"
