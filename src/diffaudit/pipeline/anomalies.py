"""Rule ``anomalies``: relative norms of labelled high-norm anomalies per layer and label source, and the
detector's precision/recall against hand labels."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from . import common


def _sources(a: dict) -> list[str]:
    spec = a["labels"]
    return [spec] if isinstance(spec, str) else list(spec)


def user_label_files(a: dict) -> list[str]:
    """The user's label files named in ``anomalies.labels`` (every entry but ``paper`` and ``auto``)."""
    return [s for s in _sources(a) if s not in ("paper", "auto")]


def label_sources(a: dict, model: str, paper_dir: str | Path | None) -> tuple[dict[str, str | None], str | None]:
    """The anomaly label sources for ``model``: name -> label file (None: computed here), and why the authors'
    labels are left out (None when they are used or not asked for).

    ``a`` is the ``anomalies`` config section. ``auto`` is the detector; ``paper`` the authors' hand labels, used
    only when rule ``paper_reference`` found that they apply to this run (``paper_dir``/status.json: their own
    extraction of sd15, sd21 or sdturbo, or ``paper_reference: force``); any other entry is a user's label file,
    named ``user:<file name>``.
    """
    from .paper_reference import paper_file, read_status

    out: dict[str, str | None] = {}
    skipped = None
    for src in _sources(a):
        if src == "auto":
            out["auto"] = None
        elif src == "paper":
            status = read_status(paper_dir) if paper_dir is not None else {"applies": False,
                                                                           "reason": "no paper_reference folder"}
            if status["applies"]:
                out["paper"] = str(paper_file(paper_dir, model, "labels"))
            else:
                skipped = status["reason"]
        else:
            out[f"user:{Path(src).name}"] = src
    return out, skipped


def run(cfg: dict, model: str, rep_dirs: str | Path | list, out_csv: str | Path,
        detector_json: str | Path | None = None, paper_dir: str | Path | None = None) -> Path:
    import json
    import logging

    import pandas as pd

    from ..analyses.anomalies import (detect_anomalies, load_label_file, precision_recall, relative_norms,
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
    tables, labels = [], {}
    sources, skipped = label_sources(a, model, paper_dir)
    if skipped is not None:
        logging.getLogger(__name__).warning("%s: the authors' hand labels are not used: %s", model, skipped)
    for source, path in sources.items():
        if path is None:
            labels[source] = detect_anomalies(full, layer=a["ref_layer"], threshold=a["threshold"])
        else:
            labels[source] = load_label_file(path, n_images=full.n_images)
        tables.append(relative_norms(full, labels[source], ref_layer=a["ref_layer"], mode=a["mode"],
                                     label_source=source, model_name=model,
                                     bootstrap=Bootstrap.from_config(cfg["bootstrap"])))
    df = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    if detector_json is not None:
        evals = {f"auto_vs_{s}": precision_recall(labels["auto"], lab)
                 for s, lab in labels.items() if s != "auto" and "auto" in labels}
        summary = {"threshold": a["threshold"], "ref_layer": a["ref_layer"],
                   "ref_layer_choice": "auto (strongest 2x2 high-norm outliers)" if chosen else "configured",
                   "n_labels": {s: int(len(v)) for s, v in labels.items()}, "detector_vs_hand_labels": evals,
                   "paper_labels": ({"used": "paper" in labels} if skipped is None
                                    else {"used": False, "reason": skipped})}
        Path(detector_json).write_text(json.dumps(summary, indent=1, default=float))
    return common.write_csv(df, out_csv)


def from_snakemake(smk):
    return run(common.task_config(smk), smk.wildcards.model, list(smk.input.rep), smk.output.table,
               smk.output.detector, paper_dir=smk.input.paper)
