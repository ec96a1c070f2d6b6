"""Rule ``anomalies``: relative norms of labelled high-norm anomalies per layer and label source, and the
detector's precision/recall against hand labels."""
from __future__ import annotations

from pathlib import Path

from . import common


def label_sources(cfg: dict, model: str) -> dict[str, str | None]:
    """The anomaly label sources that apply to ``model``: name -> label file (None: computed here).

    ``auto`` is the detector; ``paper`` the authors' hand labels, which exist for sd15, sd21 and sdturbo and
    only mean something on the paper's image set (elsewhere they are skipped, so the table has no ``paper``
    rows); any other entry is a user's label file, named ``user:<file name>``.
    """
    from ..analyses.anomalies import PAPER_LABELS

    spec = cfg["anomalies"]["labels"]
    out: dict[str, str | None] = {}
    for src in [spec] if isinstance(spec, str) else spec:
        if src == "auto":
            out["auto"] = None
        elif src == "paper":
            if model in PAPER_LABELS and cfg["dataset"]["source"] == "imagenet_subset":
                out["paper"] = str(common.PAPER_CACHE / f"high_norm_anomalies_{model}.npy")
        else:
            out[f"user:{Path(src).name}"] = src
    return out


def run(cfg: dict, model: str, rep_dirs: str | Path | list, out_csv: str | Path,
        detector_json: str | Path | None = None) -> Path:
    import json

    import pandas as pd

    from ..analyses.anomalies import (detect_anomalies, fetch_paper_labels, load_label_file, precision_recall,
                                      relative_norms)
    from ..store import open_model_stores

    a = cfg["anomalies"]
    full, _ = open_model_stores(rep_dirs)
    if a["ref_layer"] not in full.layers:
        raise ValueError(f"anomalies.ref_layer {a['ref_layer']!r} was not extracted; add it to `layers`")
    tables, labels = [], {}
    for source, path in label_sources(cfg, model).items():
        if path is None:
            labels[source] = detect_anomalies(full, layer=a["ref_layer"], threshold=a["threshold"])
        else:
            if source == "paper":
                path = fetch_paper_labels(model, common.PAPER_CACHE)
            labels[source] = load_label_file(path, n_images=full.n_images)
        tables.append(relative_norms(full, labels[source], ref_layer=a["ref_layer"], mode=a["mode"],
                                     label_source=source, model_name=model))
    df = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    if detector_json is not None:
        evals = {f"auto_vs_{s}": precision_recall(labels["auto"], lab)
                 for s, lab in labels.items() if s != "auto" and "auto" in labels}
        summary = {"threshold": a["threshold"], "ref_layer": a["ref_layer"],
                   "n_labels": {s: int(len(v)) for s, v in labels.items()}, "detector_vs_hand_labels": evals}
        Path(detector_json).write_text(json.dumps(summary, indent=1, default=float))
    return common.write_csv(df, out_csv)


def from_snakemake(smk):
    return run(smk.config, smk.wildcards.model, list(smk.input.rep), smk.output.table, smk.output.detector)
