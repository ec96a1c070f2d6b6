"""Figures drawn from the tidy result tables and representation stores.

* :mod:`diffaudit.figures.quantitative` -- the paper's 3-panel per-layer figure (probe accuracy, corner/border
  similarity ratio, anomaly relative norm), its paper overlay and the cross-model variant.
* :mod:`diffaudit.figures.qualitative` -- token-similarity, corner, norm-map and PCA views of a store.
"""
