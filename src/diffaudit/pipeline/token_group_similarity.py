"""Rule ``token_group_similarity``: corner/border/other similarity ratios per layer."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from . import common


def image_size(store) -> int:
    """The image size (px) the store was extracted at, as it records it (``image_size``, also in its config): an
    experiment may extract at another resolution than ``dataset.size``, and the crop variant of a layer follows
    from the extracted size."""
    size = store.attrs.get("image_size") or store.attrs.get("config", {}).get("image_size")
    if not size:
        raise UserError(f"{store.path} does not record the image size it was extracted at (attribute image_size); "
                        "re-extract it")
    return int(size)


def run(cfg: dict, model: str, rep_dirs: str | Path | list, out_csv: str | Path,
        corrected_csv: str | Path | None = None, per_image_csv: str | Path | None = None) -> Path:
    """The table in ``similarity.mode`` (``out_csv``), (``corrected_csv``) its corrected-mode twin from the same
    pass (the credibility score's input; a copy when the mode is corrected), and the corner group's per-image terms
    (``per_image_csv``, for the experiments' paired comparison; empty without cropped variants)."""
    from ..analyses.bootstrap import Bootstrap
    from ..analyses.paired import per_image_frame, store_image_size
    from ..analyses.similarity import token_group_similarity_modes
    from ..store import open_model_stores

    full, crops = open_model_stores(rep_dirs)
    if not crops:  # extraction.crops: false (or an experiment's crops: false): no control, no ratios
        import logging

        import pandas as pd

        from ..analyses.similarity import TABLE_COLUMNS

        logging.getLogger(__name__).warning("%s: no cropped variants were extracted (crops: false), so there is no "
                                            "corner/border control: the table is empty", model)
        empty = pd.DataFrame(columns=list(TABLE_COLUMNS))
        if corrected_csv is not None:
            common.write_csv(empty, corrected_csv)
        if per_image_csv is not None:
            common.write_csv(per_image_frame([], full.image_ids, store_image_size(full)), per_image_csv)
        return common.write_csv(empty, out_csv)
    layers = sorted(set().union(*(c.layers for c in crops.values())), key=full.layers.index)
    mode = cfg["similarity"]["mode"]
    modes = list(dict.fromkeys([mode] + (["corrected"] if corrected_csv is not None else [])))
    records: list = []
    tables = token_group_similarity_modes(full, crops, modes, layers=layers, image_size=image_size(full),
                                          chunk_images=cfg["similarity"]["chunk_images"], model_name=model,
                                          bootstrap=Bootstrap.from_config(cfg["bootstrap"]), image_records=records)
    if corrected_csv is not None:
        common.write_csv(tables["corrected"], corrected_csv)
    if per_image_csv is not None:
        common.write_csv(per_image_frame(records, full.image_ids, store_image_size(full)), per_image_csv)
    return common.write_csv(tables[mode], out_csv)


def from_snakemake(smk):
    return run(common.task_config(smk), smk.wildcards.model, list(smk.input.rep), smk.output.table,
               smk.output.corrected, smk.output.per_image)
