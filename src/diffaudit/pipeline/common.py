"""Helpers shared by the task modules: device choice, atomic CSV writes, table reading.

Every task module imports this one, so every DVC stage depends on it: it imports nothing else from the package
(a helper that needs more belongs to the task module that uses it)."""
from __future__ import annotations

from pathlib import Path

# Downloaded reference files of the authors (sha256-checked; git-ignored).
PAPER_CACHE = Path("resources/paper")

# The tidy tables of one model that the summaries and figures read.
TABLES = ("position_probe", "token_group_similarity", "anomaly_rel_norm", "channel_outliers")


def device(cfg: dict) -> str:
    """``extraction.device``, with ``auto`` = the first CUDA device if there is one, else the CPU."""
    from ..devices import default_device

    dev = cfg["extraction"]["device"]
    return default_device() if dev == "auto" else dev


def write_csv(df, out: str | Path) -> Path:
    """Write atomically (a reader never sees half a table)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    df.to_csv(tmp, index=False, float_format="%.6g")
    tmp.replace(out)
    return out


def read_tables(table_dir: str | Path) -> dict:
    """The tidy tables of one model (a missing or empty table is None)."""
    import pandas as pd

    out = {}
    for name in TABLES:
        path = Path(table_dir) / f"{name}.csv"
        try:
            out[name] = pd.read_csv(path) if path.is_file() else None
        except pd.errors.EmptyDataError:
            out[name] = None
    return out


def stem(path: str | Path) -> str:
    """A figure output without its suffix (figures are written as .png and .svg)."""
    return str(Path(path).with_suffix(""))
