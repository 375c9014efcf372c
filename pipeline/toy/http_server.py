"""A quiet, threaded HTTP file server on the loopback interface, so img2dataset can "download" the toy world.

In Python: `base_url, stop = serve_directory(root)` serves `root` from a background thread until `stop()`.
From a shell: `python -m pipeline.toy.http_server DIR --port-file F` serves DIR, writes its base URL
(e.g. http://127.0.0.1:41234) to F once it accepts connections, and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import functools
import signal
import threading
from collections.abc import Callable
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from pipeline.common.files import write_text_atomic

LOOPBACK_HOST = "127.0.0.1"


class _QuietHandler(SimpleHTTPRequestHandler):
    """Serves files without logging a line per request (img2dataset makes thousands)."""

    def log_message(self, *args) -> None:
        pass


class _LoopbackFileServer(ThreadingHTTPServer):
    daemon_threads = True
    # img2dataset opens processes x threads connections at once; the default backlog of 5 drops the rest
    # and each dropped connection waits a full second for its SYN to be retried.
    request_queue_size = 256


def _make_server(root: str | Path, port: int) -> _LoopbackFileServer:
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"cannot serve {root}: it is not a directory")
    handler = functools.partial(_QuietHandler, directory=str(root.resolve()))
    return _LoopbackFileServer((LOOPBACK_HOST, port), handler)


def serve_directory(root: str | Path, port: int = 0) -> tuple[str, Callable[[], None]]:
    """Serve `root` over HTTP on 127.0.0.1 (a free port unless `port` is given) from a daemon thread.

    Returns the base URL (no trailing slash) and a function that stops the server and frees the port.
    """
    server = _make_server(root, port)
    thread = threading.Thread(target=server.serve_forever, name=f"http-server:{root}", daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join()

    host, bound_port = server.server_address[:2]
    return f"http://{host}:{bound_port}", stop


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a directory over HTTP on 127.0.0.1 until killed.")
    parser.add_argument("root", type=Path, help="directory to serve")
    parser.add_argument("--port-file", type=Path, required=True, help="where to write the base URL once serving")
    parser.add_argument("--port", type=int, default=0, help="port to bind (default: a free one)")
    args = parser.parse_args(argv)

    server = _make_server(args.root, args.port)
    host, bound_port = server.server_address[:2]

    def shut_down(signum: int, frame: object) -> None:
        # shutdown() blocks until serve_forever returns, so it must run outside the serving thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, shut_down)
    signal.signal(signal.SIGINT, shut_down)
    # The socket is already listening, so a client that reads the URL can connect at once.
    # A shell script polls for this file; the atomic write makes sure it never reads half a URL.
    write_text_atomic(args.port_file, f"http://{host}:{bound_port}\n")
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
