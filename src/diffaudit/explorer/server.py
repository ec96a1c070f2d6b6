"""The explorer's HTTP server: the standard library's threading HTTP server, JSON endpoints, static files.

Endpoints (all GET unless said; parameters in the query string; errors are JSON ``{"error": message}`` with a
4xx status, never a traceback):

    /                       the page (static/index.html); /static/<name> its script and style
    /files/<path>           a file under the results directory (dataset images); ``..``, absolute paths and
                            symlinks that leave the results directory are refused
    /api/meta               models, runs (baseline + experiments), layers, images, metrics, label files
    /api/similarity         model, run, layer, ref, y, x, images=0,1,2, metric, mitigation
    /api/strip              model, run, layer, ref, y, x, image, metric, mitigation: every stored layer
    /api/norms              model, run, layer, images, mitigation
    /api/pairs              model, run: the run's harm pairs (404 without them)
    /api/correspondence     model, run, layer, pair, y, x, mitigation: the nearest token on the pair's second
                            image and the ground truth
    /api/curves             model, run
    /api/labels             model;  POST /api/labels  {"model", "image", "x", "y"} toggles a 2x2 patch
"""
from __future__ import annotations

import json
import mimetypes
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from .data import Explorer, RequestError

STATIC = {"index.html": "text/html; charset=utf-8", "explorer.js": "text/javascript; charset=utf-8",
          "explorer.css": "text/css; charset=utf-8"}
MAX_BODY = 16 * 1024


def _static(name: str) -> bytes:
    return resources.files("diffaudit.explorer").joinpath("static", name).read_bytes()


def safe_file(root: Path, rel: str) -> Path:
    """``rel`` (URL-decoded) resolved under ``root``; RequestError (403/404) for anything else."""
    if not rel or "\x00" in rel or "\\" in rel:
        raise RequestError("bad file path", 400)
    if rel.startswith("/") or (len(rel) > 1 and rel[1] == ":"):
        raise RequestError("absolute paths are refused", 403)
    parts = rel.split("/")
    if any(p in ("..", ".") for p in parts):
        raise RequestError("'..' and '.' are refused in file paths", 403)
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise RequestError("outside the results directory", 403)
    if not path.is_file():
        raise RequestError(f"no such file: {rel}", 404)
    return path


class Handler(BaseHTTPRequestHandler):
    server_version = "diffaudit-explorer/1"
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"  # answer even a malformed request line with a status line
    explorer: Explorer  # set on the subclass by make_server
    quiet = True

    def log_message(self, fmt, *args):  # noqa: D401 - quiet unless asked
        if not self.quiet:
            super().log_message(fmt, *args)

    # -- responses -----------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200, t0: float | None = None) -> None:
        extra = {"Server-Timing": f"app;dur={(time.perf_counter() - t0) * 1000:.2f}"} if t0 is not None else None
        self._send(status, json.dumps(obj, allow_nan=False).encode(), "application/json", extra)

    def _error(self, status: int, message: str) -> None:
        self.close_connection = True
        self._json({"error": message}, status)

    def send_error(self, code, message=None, explain=None):  # malformed request lines etc.: JSON, one line
        if code == 505:  # an unknown HTTP version is a malformed request like any other
            code, message = 400, f"unsupported HTTP version: {message}"
        try:
            self.close_connection = True
            body = json.dumps({"error": message or HTTPStatus(code).phrase}).encode()
            self.send_response(code, message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD" and code >= 200 and code not in (204, 304):
                self.wfile.write(body)
        except OSError:
            pass

    # -- dispatch ------------------------------------------------------------------------------
    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        t0 = time.perf_counter()
        try:
            url = urlsplit(self.path)
            raw_path = url.path
            try:
                q = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True, strict_parsing=False,
                                                    errors="strict").items()}
            except (UnicodeDecodeError, ValueError):
                raise RequestError("malformed query string") from None
            if method == "POST":
                self._post(raw_path, t0)
            else:
                self._get(raw_path, q, t0)
        except RequestError as e:
            self._error(e.status, str(e))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - a bug must not kill the server nor show a traceback
            sys.stderr.write(f"explorer: {self.command} {self.path!r}: {type(e).__name__}: {e}\n")
            try:
                self._error(500, f"internal error ({type(e).__name__}); see the server's log")
            except OSError:
                pass

    def _get(self, path: str, q: dict, t0: float) -> None:
        ex = self.explorer
        if path in ("/", "/index.html"):
            return self._send(200, _static("index.html"), STATIC["index.html"])
        if path.startswith("/static/"):
            name = path[len("/static/"):]
            if name not in STATIC:
                raise RequestError(f"no such static file: {name}", 404)
            return self._send(200, _static(name), STATIC[name])
        if path.startswith("/files/"):
            f = safe_file(ex.root, unquote(path[len("/files/"):], errors="strict"))
            ctype = mimetypes.guess_type(f.name)[0] or "application/octet-stream"
            return self._send(200, f.read_bytes(), ctype)
        if path == "/favicon.ico":
            return self._send(204, b"", "image/x-icon")
        api = {
            "/api/meta": lambda: ex.meta(),
            "/api/similarity": lambda: ex.similarity_maps(_req(q, "model"), q.get("run"), _req(q, "layer"),
                                                          _req(q, "ref"), _req(q, "y"), _req(q, "x"),
                                                          _ints(q, "images"), q.get("metric", "cosine"),
                                                          q.get("mitigation")),
            "/api/strip": lambda: ex.strip(_req(q, "model"), q.get("run"), _req(q, "layer"), _req(q, "ref"),
                                           _req(q, "y"), _req(q, "x"), _req(q, "image"),
                                           q.get("metric", "cosine"), q.get("mitigation")),
            "/api/norms": lambda: ex.norms(_req(q, "model"), q.get("run"), _req(q, "layer"), _ints(q, "images"),
                                           q.get("mitigation")),
            "/api/pairs": lambda: ex.pairs(_req(q, "model"), q.get("run")),
            "/api/correspondence": lambda: ex.correspondence(_req(q, "model"), q.get("run"), _req(q, "layer"),
                                                             _req(q, "pair"), _req(q, "y"), _req(q, "x"),
                                                             q.get("mitigation")),
            "/api/curves": lambda: ex.curves(_req(q, "model"), q.get("run")),
            "/api/labels": lambda: ex.labels(_req(q, "model")),
        }
        if path not in api:
            raise RequestError(f"no such page: {path}", 404)
        self._json(api[path](), t0=t0)

    def _post(self, path: str, t0: float) -> None:
        if path != "/api/labels":
            raise RequestError(f"POST is only accepted on /api/labels, not {path}", 405)
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError("POST needs a Content-Length", 411)
        n = int(length)
        if n > MAX_BODY:
            raise RequestError(f"body too large ({n} bytes > {MAX_BODY})", 413)
        body = self.rfile.read(n)
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        if ctype != "application/json":
            raise RequestError("POST /api/labels takes application/json", 415)
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise RequestError("body is not valid JSON") from None
        if not isinstance(data, dict):
            raise RequestError("body must be a JSON object {model, image, x, y}")
        self._json(self.explorer.toggle_label(_req(data, "model"), _req(data, "image"), _req(data, "x"),
                                              _req(data, "y")), t0=t0)


def _req(q: dict, key: str):
    if key not in q or q[key] in ("", None):
        raise RequestError(f"missing parameter {key!r}")
    v = q[key]
    if not isinstance(v, (str, int)) or isinstance(v, bool):
        raise RequestError(f"parameter {key!r} must be a string or an integer")
    return v


def _ints(q: dict, key: str) -> list[int]:
    raw = str(_req(q, key))
    try:
        return [int(s) for s in raw.split(",") if s.strip() != ""]
    except ValueError:
        raise RequestError(f"{key} must be a comma-separated list of integers, got {raw!r}") from None


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


def make_server(explorer: Explorer, host: str = "127.0.0.1", port: int = 8765, quiet: bool = True) -> Server:
    handler = type("ExplorerHandler", (Handler,), {"explorer": explorer, "quiet": quiet})
    return Server((host, port), handler)


def serve_in_thread(explorer: Explorer, host: str = "127.0.0.1", port: int = 0):
    """Start a server on a background thread (tests, benchmark); returns ``(server, base_url)``."""
    srv = make_server(explorer, host, port)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://{host}:{srv.server_address[1]}"


def url_of(srv: Server) -> str:
    host, port = srv.server_address[:2]
    return f"http://{host}:{port}/"


def main(results_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8765, labels: str | None = None,
         ref_layer: str | None = None, threshold: float | None = None, verbose: bool = False,
         probe: dict | None = None, mitigation_settings=None) -> None:
    kw = {}
    if probe:
        kw["probe"] = probe
    if mitigation_settings is not None:
        kw["mitigation_settings"] = mitigation_settings
    if labels:
        kw["labels"] = labels
    if ref_layer:
        kw["ref_layer"] = ref_layer
    if threshold is not None:
        kw["threshold"] = threshold
    ex = Explorer(results_dir, **kw)
    if not ex.runs:
        raise RequestError(f"{results_dir} holds no representation store ({{model}}/representations/full.zarr); "
                           "run the workflow (make demo) first")
    srv = make_server(ex, host, port, quiet=not verbose)
    print(f"diffaudit explorer: {url_of(srv)}  (results {ex.root}, models {', '.join(ex.runs)}; Ctrl-C stops)",
          flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
