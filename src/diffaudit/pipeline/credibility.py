"""Rule ``credibility``: per-layer hazard scores, and the per-layer summary that ``dvc plots`` draws."""
from __future__ import annotations

from pathlib import Path

from . import common


def position_inputs(cfg: dict, run_summaries: dict[str, str | Path] | None = None) -> dict:
    """Which probe the position score reads: ``{position_input, independent_summary, independent_input}``.

    The baseline's probe when the baseline already draws one noise tensor per image; else the run summary of the
    experiment whose only cause is ``noise: independent`` (:func:`diffaudit.experiments.independent_noise_experiment`)
    for the layers it holds, and the baseline's (shared-noise) probe for the others."""
    from ..experiments import baseline_noise, independent_noise_experiment

    noise = baseline_noise({"mode": cfg["extraction"]["mode"]})
    out = {"position_input": f"baseline probe ({noise} noise)", "independent_summary": None, "independent_input": ""}
    name = independent_noise_experiment(cfg["experiments"]) if noise != "independent" else None
    path = (run_summaries or {}).get(name) if name else None
    if path is not None:
        out["independent_summary"] = common.read_table(path)
        out["independent_input"] = f"experiment {name} (independent noise)"
    return out


def run(cfg: dict, model: str, table_dir: str | Path, out_csv: str | Path,
        summary_csv: str | Path | None = None, run_summaries: dict[str, str | Path] | None = None) -> Path:
    """The per-layer hazard scores, and (``summary_csv``) the figure's quantities one row per layer.

    The similarity and anomaly axes read the corrected-mode twins of the tables (:data:`CORRECTED_TABLES`, free of
    the authors' quirks); ``run_summaries`` (run name -> its summary) supply the independent-noise experiment's
    probe (:func:`position_inputs`)."""
    from ..analyses.credibility import credibility as score
    from ..analyses.paper_comparison import per_layer_quantities
    from ..tables import CORRECTED_TABLES

    t = common.read_tables(table_dir)
    corrected = {name: common.read_table(Path(table_dir) / f"{twin}.csv") for name, twin in CORRECTED_TABLES.items()}
    df = score(t["position_probe"], corrected["token_group_similarity"], corrected["anomaly_rel_norm"],
               t["channel_outliers"], model=model, safe_threshold=cfg["credibility"]["safe_below"],
               similarity_mode="corrected", anomaly_mode="corrected", **position_inputs(cfg, run_summaries))
    if summary_csv is not None:
        common.write_csv(per_layer_quantities(t), summary_csv)
    return common.write_csv(df, out_csv)


def from_snakemake(smk):
    runs = {Path(p).stem: p for p in smk.input.runs}  # layout.run_summary_path: <model>/<run>.csv
    return run(common.task_config(smk), smk.wildcards.model, Path(smk.input.tables[0]).parent, smk.output.table,
               smk.output.summary, run_summaries=runs)
