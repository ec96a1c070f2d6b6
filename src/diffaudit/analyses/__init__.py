"""The analyses, one module each: :mod:`.probe` (positional linear probe), :mod:`.similarity` (corner/border
token-group similarity), :mod:`.anomalies` (high-norm anomalies), :mod:`.channels` (channel-wise norm census)
and :mod:`.credibility` (per-layer hazard scores)."""
