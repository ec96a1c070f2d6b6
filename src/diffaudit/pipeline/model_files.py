"""Rule ``model_files``: where a model's weights came from, per file (from its store's provenance), for the
report: the hub id used (a mirror if the main id failed), the id asked for, the revision, the resolved commit and
each file's sha256 (checked against models.lock before the extraction's first batch)."""
from __future__ import annotations

from pathlib import Path

from . import common

COLUMNS = ["model", "source", "requested", "revision", "commit", "file", "sha256"]


def run(model: str, rep_dirs: str | Path | list, out_csv: str | Path) -> Path:
    import pandas as pd

    from ..store import open_model_stores

    attrs = open_model_stores(rep_dirs)[0].attrs
    source = attrs.get("model_source", "")
    revision = attrs.get("model_revision") or ""
    commit = revision if len(str(revision)) == 40 else ""
    files = attrs.get("model_files") or {"": ""}
    rows = [{"model": model, "source": source, "requested": attrs.get("model_source_requested", source),
             "revision": revision, "commit": commit, "file": f, "sha256": h} for f, h in sorted(files.items())]
    return common.write_csv(pd.DataFrame(rows, columns=COLUMNS), out_csv)


def from_snakemake(smk):
    return run(smk.wildcards.model, list(smk.input.rep), smk.output[0])
