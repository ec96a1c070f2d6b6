"""Explorer: the time of a mitigation's first map in a layer (its fit on the run's fit images) and of later maps
(the cached fit), and of a correspondence on the harm pairs, in one Python process (no server, no browser).

    python benchmarks/bench_explorer_mitigations.py [--results results/demo] [--configfile config/demo.yaml]
"""
from __future__ import annotations

import argparse
import statistics
import time

from diffaudit.config import load_config
from diffaudit.explorer import Explorer
from diffaudit.harm.mitigations import MITIGATIONS, MitigationSettings

LAYERS = ("mid_block.resnets[0]", "up_blocks[1].upsamplers[0]", "down_blocks[0].resnets[0]")


def _ms(f) -> float:
    t = time.perf_counter()
    f()
    return (time.perf_counter() - t) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="results/demo")
    ap.add_argument("--configfile", default="config/demo.yaml")
    ap.add_argument("--model", default="mini-cal")
    args = ap.parse_args()
    cfg = load_config("params.yaml", args.configfile)
    a = cfg["anomalies"]
    ex = Explorer(args.results, probe=cfg["probe"], threshold=a["threshold"],
                  mitigation_settings=MitigationSettings(subspace_k=cfg["harm"]["subspace_k"],
                                                         threshold=a["threshold"],
                                                         channel_ratio=cfg["channels"]["ratio_threshold"]))
    r = ex.run(args.model)
    ex.norms(args.model, "baseline", LAYERS[0], [0], "none")  # open the store
    import torch  # noqa: F401 - nearest_tokens' import, once per process, not counted

    print(f"{args.model}: {len(ex.fit_images(r))} fit images; ms of Explorer.norms on 4 images, first / cached")
    for layer in LAYERS:
        row = []
        for name in MITIGATIONS[1:]:
            first = _ms(lambda: ex.norms(args.model, "baseline", layer, [0, 1, 2, 3], name))
            row.append(f"{name} {first:.0f}/{_ms(lambda: ex.norms(args.model, 'baseline', layer, [0, 1, 2, 3], name)):.0f}")
        line = f"{layer} {r.store.shape(layer)[1:]}: " + "; ".join(row)
        if ex.has_harm(r):
            n = len(ex.pairs(args.model, "baseline")["pairs"])
            ts = [_ms(lambda k=k: ex.correspondence(args.model, "baseline", layer, k % n, 1, 1, "all"))
                  for k in range(10)]
            line += f" | correspondence (all, cached fit) median {statistics.median(ts):.0f} ms"
        print(line)


if __name__ == "__main__":
    main()
