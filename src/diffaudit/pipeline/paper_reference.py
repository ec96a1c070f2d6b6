"""Rule ``paper_reference``: the authors' published files for one model, and whether they apply to this run.

Writes ``{results_dir}/{model}/paper_reference/``: ``status.json`` (the verdict of
:func:`diffaudit.paper_run.verdict` on the configuration and on the device and precision the extraction
recorded: ``applies``, ``forced``, ``differences``, ``reason``, and the sha256 of each file) and, when the files apply, copies of the authors' files (per-layer numbers and hand labels), each
sha256-checked. They are downloaded once into ``resources/paper`` (or put there beforehand by
``diffaudit prefetch``); offline with that cache empty the rule stops with one line naming ``diffaudit prefetch``.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from .. import layout
from ..paper_files import STATUS
from . import common

log = logging.getLogger(__name__)


def run(cfg: dict, model: str, out_dir: str | Path, rep_dirs: list | None = None,
        cache_dir: str | Path = layout.PAPER_CACHE, url_base: str | None = None) -> Path:
    """The verdict for ``model`` (with ``rep_dirs``: on the extraction as its stores recorded it) and, where the
    authors' files apply, those files, into ``out_dir``."""
    from ..paper_files import KINDS, PAPER_FILES, ReferenceFetchError, fetch
    from ..paper_run import verdict

    extraction = None
    if rep_dirs:
        from ..store import open_model_stores

        extraction = dict(open_model_stores(rep_dirs)[0].attrs)
    status = verdict(cfg, model, cfg["model_sources"][model], extraction)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = {}
    if status["applies"]:
        if status["forced"]:
            log.warning("%s: using the authors' files although this is not their run (%s)", model,
                        "; ".join(status["differences"]))
        for kind in KINDS:
            try:
                path = fetch(model, kind, cache_dir, url_base=url_base)
            except ReferenceFetchError as e:
                raise ReferenceFetchError(f"{e}. Without internet here, run `diffaudit prefetch` on a machine "
                                          f"with internet and copy {cache_dir} over") from None
            shutil.copyfile(path, tmp / path.name)
            files[path.name] = PAPER_FILES[(model, kind)][1]
        log.info("%s: the authors' files apply (%s)", model, status["reason"])
    else:
        log.info("%s: the authors' labels and numbers are not used: %s", model, status["reason"])
    status["files"] = files
    (tmp / STATUS).write_text(json.dumps(status, indent=1) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)
    return out_dir


def from_snakemake(smk):
    return run(common.task_config(smk), smk.wildcards.model, smk.output[0], rep_dirs=list(smk.input.rep))
