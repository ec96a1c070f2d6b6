"""Rule ``paper_comparison``: our tables next to the authors' published numbers, and the overlay figure.

Runs for every model. Where the authors' numbers do not apply (status.json of rule ``paper_reference``: another
model or another extraction than theirs), the table has no rows and the figure shows our curves only, with the
reason in its title."""
from __future__ import annotations

import logging
from pathlib import Path

from . import common


def run(model: str, table_dir: str | Path, paper_dir: str | Path, out_csv: str | Path,
        out_stem: str | Path) -> None:
    import pandas as pd

    from ..analyses.paper_comparison import COMPARISON_COLUMNS, compare_with_paper
    from ..figures.quantitative import plot_quantitative
    from ..paper_files import paper_tables, read_status

    t = common.read_tables(table_dir)
    status = read_status(paper_dir)
    if status["applies"]:
        paper = paper_tables(model, paper_dir)
        common.write_csv(compare_with_paper(t, paper), out_csv)
        title = f"{model}: ours vs paper" + (" (forced: not the authors' run)" if status["forced"] else "")
    else:
        logging.getLogger(__name__).warning("%s: not compared with the published numbers: %s", model,
                                            status["reason"])
        paper = None
        common.write_csv(pd.DataFrame(columns=COMPARISON_COLUMNS), out_csv)
        title = f"{model}: no published numbers apply\n({status['reason']})"
    plot_quantitative(t["position_probe"], t["token_group_similarity"], t["anomaly_rel_norm"], out_stem,
                      model=title, reference=paper)


def from_snakemake(smk):
    return run(smk.wildcards.model, Path(smk.input.tables[0]).parent, smk.input.paper, smk.output.table,
               common.stem(smk.output.figure[0]))
