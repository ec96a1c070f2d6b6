"""The anomaly label sources of a run: the detector (``auto``), the authors' hand labels (``paper``, where rule
``paper_reference`` found they apply) and users' label files, as named in the ``anomalies.labels`` config.

Used by the tasks of rules ``anomalies`` and ``qualitative_figures`` and by the workflow's rules (the user label
files are inputs of rule ``anomalies``).
"""
from __future__ import annotations

from pathlib import Path


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
    from .paper_files import paper_file, read_status

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
