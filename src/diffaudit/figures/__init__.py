"""Figures drawn from the tidy result tables and representation stores.

* :mod:`diffaudit.figures.quantitative` -- the paper's 3-panel per-layer figure (probe accuracy, corner/border
  similarity ratio, anomaly relative norm) and its paper overlay.
* :mod:`diffaudit.figures.cross_model` -- the same panels with one line per model (shared or relative depth axis).
* :mod:`diffaudit.figures.experiments` -- the panels with a model's baseline and experiments overlaid.
* :mod:`diffaudit.figures.harm` -- downstream harm: correspondence PCK and position following per layer, task and
  mitigation.
* :mod:`diffaudit.figures.style` -- the shared colours, layer axis, drawing helpers and PNG/SVG output.
* :mod:`diffaudit.figures.layer_labels` -- short block and type labels of layer names for the layer axis.
* :mod:`diffaudit.figures.qualitative` -- token-similarity, corner, norm-map and PCA views of a store.
"""
