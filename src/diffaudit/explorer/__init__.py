"""``diffaudit explore``: a browser explorer and anomaly labeller over the representation stores of a results
directory (docs/explorer.md)."""
from .data import METRICS, Explorer, RequestError
from .server import make_server, serve_in_thread

__all__ = ["METRICS", "Explorer", "RequestError", "make_server", "serve_in_thread"]
