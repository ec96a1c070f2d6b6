"""Rule ``anomalies``: relative norms of labelled high-norm anomalies per layer and label source, and the
detector's precision/recall against hand labels."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..label_sources import label_sources
from . import common


def run(cfg: dict, model: str, rep_dirs: str | Path | list, out_csv: str | Path,
        detector_json: str | Path | None = None, paper_dir: str | Path | None = None,
        corrected_csv: str | Path | None = None) -> Path:
    """The table in ``anomalies.mode``, and (``corrected_csv``) its corrected-mode twin from the same pass (the
    credibility score's input; a copy when the mode is corrected)."""
    import json
    import logging

    import pandas as pd

    from ..analyses.anomalies import (detect_anomalies, load_label_file, precision_recall, relative_norms_modes,
                                      strongest_outlier_layer)
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
    labels = {}
    sources, skipped = label_sources(a, model, paper_dir)
    if skipped is not None:
        logging.getLogger(__name__).warning("%s: the authors' hand labels are not used: %s", model, skipped)
    for source, path in sources.items():
        if path is None:
            labels[source] = detect_anomalies(full, layer=a["ref_layer"], threshold=a["threshold"])
        else:
            labels[source] = load_label_file(path, n_images=full.n_images)
        by_mode = relative_norms_modes(full, labels[source], modes, ref_layer=a["ref_layer"], label_source=source,
                                       model_name=model, bootstrap=Bootstrap.from_config(cfg["bootstrap"]))
        for mode in modes:
            tables[mode].append(by_mode[mode])
    df, corrected = (pd.concat(tables[m], ignore_index=True) if tables[m] else pd.DataFrame()
                     for m in (a["mode"], modes[-1]))
    if detector_json is not None:
        evals = {f"auto_vs_{s}": precision_recall(labels["auto"], lab)
                 for s, lab in labels.items() if s != "auto" and "auto" in labels}
        summary = {"threshold": a["threshold"], "ref_layer": a["ref_layer"],
                   "ref_layer_choice": "auto (strongest 2x2 high-norm outliers)" if chosen else "configured",
                   "n_labels": {s: int(len(v)) for s, v in labels.items()}, "detector_vs_hand_labels": evals,
                   "paper_labels": ({"used": "paper" in labels} if skipped is None
                                    else {"used": False, "reason": skipped})}
        Path(detector_json).write_text(json.dumps(summary, indent=1, default=float))
    if corrected_csv is not None:
        common.write_csv(corrected, corrected_csv)
    return common.write_csv(df, out_csv)


def from_snakemake(smk):
    return run(common.task_config(smk), smk.wildcards.model, list(smk.input.rep), smk.output.table,
               smk.output.detector, paper_dir=smk.input.paper, corrected_csv=smk.output.corrected)
