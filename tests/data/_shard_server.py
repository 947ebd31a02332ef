"""A local HTTP server for the remote-shard tests: the standard library's http.server in a thread,
serving a folder on 127.0.0.1, with fault modes (drop the connection mid-file, stall mid-file)."""
from __future__ import annotations

import contextlib
import functools
import http.server
import socket
import threading
import time
from collections import Counter
from pathlib import Path


class ShardServer:
    """``url`` is the folder's base URL; ``hits[path]`` counts GET requests; ``drop[name] = n``
    makes the next n GETs of a file send half of it (with the full Content-Length) and close the
    connection (-1: every GET); ``stall[name] = seconds`` sends half and then waits."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.hits: Counter = Counter()
        self.drop: dict[str, int] = {}
        self.stall: dict[str, float] = {}
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(server.folder), **kw)

            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                name = self.path.lstrip("/").split("?", 1)[0]
                server.hits[name] += 1
                path = server.folder / name
                left = server.drop.get(name, 0)
                if path.is_file() and (left or name in server.stall):
                    data = path.read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/x-tar")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                    if left:
                        server.drop[name] = left - 1 if left > 0 else left
                    else:
                        time.sleep(server.stall[name])
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=functools.partial(self.httpd.serve_forever, 0.05), daemon=True)

    def __enter__(self) -> "ShardServer":
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)
