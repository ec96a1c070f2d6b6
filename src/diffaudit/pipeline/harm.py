"""Rule ``harm``: harm metrics per layer, task and mitigation (``harm.csv``) and the artifact measures and class
probe on mitigated features (``mitigations.csv``) of one run (:mod:`diffaudit.harm.evaluate`, docs/harm.md)."""
from __future__ import annotations

import logging
from pathlib import Path

from . import common


def settings(cfg: dict):
    from ..harm.evaluate import HarmSettings
    from ..harm.mitigations import MitigationSettings

    h = cfg["harm"]
    return HarmSettings(tasks=tuple(h["tasks"]), mitigations=tuple(h["mitigations"]),
                        source_tokens=None if h["source_tokens"] is None else int(h["source_tokens"]),
                        probe_tokens=None if h["probe_tokens"] is None else int(h["probe_tokens"]),
                        seed=int(h["seed"]),
                        mitigation=MitigationSettings(subspace_k=int(h["subspace_k"]),
                                                      threshold=float(cfg["anomalies"]["threshold"]),
                                                      channel_ratio=float(cfg["channels"]["ratio_threshold"])),
                        device=common.device(cfg))


def run_labels(labels_csv: str | Path | None):
    """The run's anomaly label positions of one source (the hand labels, else the detector's): (K, 3) and grid."""
    import numpy as np

    from ..analyses.credibility import choose_source
    from ..analyses.paired import read_table

    table = read_table(labels_csv) if labels_csv is not None else None
    if table is None or table.empty:
        return None, None
    source = choose_source(table["label_source"].drop_duplicates().tolist())
    t = table[table["label_source"] == source]
    return t[["image", "x", "y"]].to_numpy(np.int64), int(t["grid"].iloc[0])


def summary(harm, measures) -> dict:
    """Means over layers (finite values only) of every harm metric per task and mitigation, and of every measure
    per mitigation: ``{"harm": {task: {mitigation: {metric: mean}}}, "mitigations": {mitigation: {measure: mean}},
    "n_layers": ...}`` (DVC metrics)."""
    import numpy as np

    from ..tables import MITIGATION_MEASURES as MEASURES

    out: dict = {"harm": {}, "mitigations": {}, "n_layers": int(harm["layer"].nunique()) if len(harm) else 0}
    for (task, mit, metric), v in harm.groupby(["task", "mitigation", "metric"], sort=False)["value"]:
        v = v.to_numpy(float)
        out["harm"].setdefault(task, {}).setdefault(mit, {})[metric] = (
            round(float(np.nanmean(v)), 6) if np.isfinite(v).any() else None)
    for mit, d in measures.groupby("mitigation", sort=False):
        out["mitigations"][mit] = {m: (round(float(np.nanmean(d[m].to_numpy(float))), 6)
                                       if np.isfinite(d[m].to_numpy(float)).any() else None) for m in MEASURES}
    return out


def run(cfg: dict, model: str, rep_dirs, pairs_dir: str | Path, pairs_rep: str | Path, harm_csv: str | Path,
        mitigations_csv: str | Path, labels_csv: str | Path | None = None,
        summary_json: str | Path | None = None) -> Path:
    from ..analyses.anomalies import reference_grid
    from ..analyses.bootstrap import Bootstrap
    from ..analyses.paired import store_image_size
    from ..harm.evaluate import HARM_COLUMNS, MITIGATION_COLUMNS, harm_images, harm_tables
    from ..harm.pairs import load_pairs
    from ..layout import FULL, store_path
    from ..store import ReprStore, open_model_stores

    import pandas as pd

    pairs, disparity = load_pairs(pairs_dir)
    if pairs.empty:
        logging.getLogger(__name__).info("%s: no harm pair (harm.enabled is false): empty harm tables", model)
        harm, measures = pd.DataFrame(columns=HARM_COLUMNS), pd.DataFrame(columns=MITIGATION_COLUMNS)
        _write_summary(summary(harm, measures), summary_json)
        common.write_csv(measures, mitigations_csv)
        return common.write_csv(harm, harm_csv)
    full, crops = open_model_stores(rep_dirs)
    pairs_store = ReprStore(store_path(pairs_rep, FULL))
    fit, test = harm_images(full.n_images, cfg["probe"], full.n_images)
    labels, grid = run_labels(labels_csv)
    harm, measures = harm_tables(
        full, crops, pairs_store, pairs, disparity, layers=None, fit_images=fit, test_images=test, labels=labels,
        ref_grid=grid or reference_grid(full), probe=cfg["probe"], image_size=store_image_size(full),
        settings=settings(cfg), bootstrap=Bootstrap.from_config(cfg["bootstrap"]), model_name=model, progress=True)
    _write_summary(summary(harm, measures), summary_json)
    common.write_csv(measures, mitigations_csv)
    return common.write_csv(harm, harm_csv)


def _write_summary(data: dict, path) -> None:
    import json

    if path is not None:
        Path(path).write_text(json.dumps(data, indent=1))


def from_snakemake(smk):
    import torch

    # the rule's threads (1 by default): the probes and matches are many small operations, which extra threads
    # slow down when other jobs share the cores
    torch.set_num_threads(max(1, int(smk.threads)))
    return run(common.task_config(smk), smk.wildcards.model, list(smk.input.rep), smk.input.pairs,
               smk.input.pairs_rep, smk.output.harm, smk.output.mitigations, labels_csv=smk.input.labels,
               summary_json=smk.output.summary)
