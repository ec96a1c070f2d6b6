"""Rule ``anomalies``: relative norms of labelled high-norm anomalies per layer and label source, and the
detector's precision/recall against hand labels.

Every run also writes the label positions it used (``anomaly_labels.csv``) and the per-image terms of the relative
norms (``anomaly_rel_norm_per_image.csv``). An experiment's run reads the baseline's label positions
(``baseline_labels``) and adds rows ``baseline:<source>``: its own stores at the baseline's positions, the
paired anomaly comparison (:mod:`diffaudit.analyses.paired`); where that is impossible (another resolution,
other images) it logs why and records it in the detector summary."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..label_sources import label_sources
from . import common


def run(cfg: dict, model: str, rep_dirs: str | Path | list, out_csv: str | Path,
        detector_json: str | Path | None = None, paper_dir: str | Path | None = None,
        corrected_csv: str | Path | None = None, labels_csv: str | Path | None = None,
        per_image_csv: str | Path | None = None, baseline_labels_csv: str | Path | None = None) -> Path:
    """The table in ``anomalies.mode``, and (``corrected_csv``) its corrected-mode twin from the same pass (the
    credibility score's input; a copy when the mode is corrected)."""
    import json
    import logging

    import pandas as pd

    from ..analyses import paired
    from ..analyses.anomalies import (detect_anomalies, load_label_file, precision_recall, reference_grid,
                                      relative_norms_modes, strongest_outlier_layer)
    from ..analyses.bootstrap import Bootstrap
    from ..store import open_model_stores

    full, _ = open_model_stores(rep_dirs)
    a = dict(cfg["anomalies"])
    chosen = a["ref_layer"] == "auto"
    if chosen:
        a["ref_layer"] = strongest_outlier_layer(full)
        logging.getLogger(__name__).info("%s: anomalies.ref_layer auto -> %s", model, a["ref_layer"])
    if a["ref_layer"] not in full.layers:
        raise UserError(f"anomalies.ref_layer {a['ref_layer']!r} was not extracted; add it to `layers` "
                        "(or set anomalies.ref_layer: auto)")
    modes = list(dict.fromkeys([a["mode"]] + (["corrected"] if corrected_csv is not None else [])))
    tables: dict[str, list] = {mode: [] for mode in modes}
    labels, records = {}, []
    boot = Bootstrap.from_config(cfg["bootstrap"])
    image_size = paired.store_image_size(full)

    def add(lab, source, grid=None):  # every mode from one pass; the per-image terms in the run's own mode
        by_mode = relative_norms_modes(full, lab, modes, ref_layer=a["ref_layer"], label_source=source,
                                       model_name=model, bootstrap=boot, ref_grid=grid, image_records=records)
        for mode in modes:
            tables[mode].append(by_mode[mode])

    sources, skipped = label_sources(a, model, paper_dir)
    if skipped is not None:
        logging.getLogger(__name__).warning("%s: the authors' hand labels are not used: %s", model, skipped)
    for source, path in sources.items():
        if path is None:
            labels[source] = detect_anomalies(full, layer=a["ref_layer"], threshold=a["threshold"])
        else:
            labels[source] = load_label_file(path, n_images=full.n_images)
        add(labels[source], source)
    baseline_used = None
    if baseline_labels_csv is not None:
        table = paired.read_table(baseline_labels_csv)
        at_base, why = paired.baseline_labels(table, full.image_ids, image_size)
        if why:
            logging.getLogger(__name__).warning("%s: the baseline's anomaly labels are not evaluated on this run (the "
                                                "rel_norm difference stays empty): %s", model, why)
        for source, (lab, grid) in at_base.items():
            add(lab, source, grid)
        baseline_used = {"used": not why, "sources": list(at_base)} if not why else {"used": False, "reason": why}
    df, corrected = (pd.concat(tables[m], ignore_index=True) if tables[m] else pd.DataFrame()
                     for m in (a["mode"], modes[-1]))
    if labels_csv is not None:
        common.write_csv(paired.label_table(labels, reference_grid(full, a["ref_layer"]), image_size,
                                            full.image_ids), labels_csv)
    if per_image_csv is not None:
        common.write_csv(paired.per_image_frame(records, full.image_ids, image_size), per_image_csv)
    if detector_json is not None:
        evals = {f"auto_vs_{s}": precision_recall(labels["auto"], lab)
                 for s, lab in labels.items() if s != "auto" and "auto" in labels}
        summary = {"threshold": a["threshold"], "ref_layer": a["ref_layer"],
                   "ref_layer_choice": "auto (strongest 2x2 high-norm outliers)" if chosen else "configured",
                   "n_labels": {s: int(len(v)) for s, v in labels.items()}, "detector_vs_hand_labels": evals,
                   "paper_labels": ({"used": "paper" in labels} if skipped is None
                                    else {"used": False, "reason": skipped})}
        if baseline_used is not None:
            summary["baseline_labels"] = baseline_used
        Path(detector_json).write_text(json.dumps(summary, indent=1, default=float))
    if corrected_csv is not None:
        common.write_csv(corrected, corrected_csv)
    return common.write_csv(df, out_csv)


def from_snakemake(smk):
    base = list(smk.input.baseline_labels) if "baseline_labels" in smk.input.keys() else []
    return run(common.task_config(smk), smk.wildcards.model, list(smk.input.rep), smk.output.table,
               smk.output.detector, paper_dir=smk.input.paper, corrected_csv=smk.output.corrected,
               labels_csv=smk.output.labels, per_image_csv=smk.output.per_image,
               baseline_labels_csv=base[0] if base else None)
