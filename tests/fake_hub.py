"""A Hugging Face hub on the loopback interface: the endpoints huggingface_hub calls to list a model
repository and download its files (repo info, tree, HEAD and ranged GET on /resolve/). Downloads then go
through the real client code, its retries and Range requests, over a real socket.

`cut_after` makes the server drop the connection after that many bytes of a file's body (a lost network);
`claimed` makes it state other sizes than the real ones; `throttle_s` sleeps between 64 KiB chunks;
`hold_after` slows a body to a chunk every 0.25 s after that many bytes until `release` is set, so a test can
interrupt a download part way however slow the machine is. Every request's method, path and Range header is
kept in `requests`.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

SHA = "0123456789abcdef0123456789abcdef01234567"
CHUNK = 64 * 1024


class FakeHub:
    def __init__(self, repo_id: str, files: dict[str, bytes], lfs_from: int = 1024):
        """`files`: path -> content; files of `lfs_from` bytes or more are served as LFS (sha256 etag)."""
        self.repo_id, self.files, self.lfs_from = repo_id, files, lfs_from
        self.claimed: dict[str, int] = {}  # path -> the size the hub says, when it is not the real one
        self.cut_after: int | None = None
        self.throttle_s = 0.0
        self.hold_after: int | None = None
        self.release = threading.Event()
        self.requests: list[tuple[str, str, str | None]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args) -> None: ...

            def do_HEAD(self) -> None:
                hub._serve(self, body=False)

            def do_GET(self) -> None:
                hub._serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def etag(self, path: str) -> str:
        data = self.files[path]
        if len(data) >= self.lfs_from:
            return hashlib.sha256(data).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def _tree(self) -> list[dict]:
        out = []
        for path, data in sorted(self.files.items()):
            entry = {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            if len(data) >= self.lfs_from:
                entry["lfs"] = {"oid": self.etag(path), "size": len(data), "pointerSize": 134}
            out.append(entry)
        return out

    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(h.path).path)
        self.requests.append((h.command, path, h.headers.get("Range")))
        api = f"/api/models/{self.repo_id}"
        if path.startswith(f"{api}/revision/"):
            return self._json(h, {"id": self.repo_id, "sha": SHA,
                                  "siblings": [{"rfilename": p} for p in sorted(self.files)]})
        if path.startswith(f"{api}/tree/"):
            return self._json(h, self._tree())
        prefix = f"/{self.repo_id}/resolve/"
        if path.startswith(prefix):
            name = path[len(prefix):].split("/", 1)[1]
            if name in self.files:
                return self._file(h, name, body)
        h.send_response(404)
        h.send_header("Content-Length", "0")
        h.send_header("X-Error-Code", "EntryNotFound" if path.startswith(prefix) else "RepoNotFound")
        h.end_headers()

    def _json(self, h: BaseHTTPRequestHandler, data) -> None:
        raw = json.dumps(data).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(raw)))
        h.end_headers()
        h.wfile.write(raw)

    def _file(self, h: BaseHTTPRequestHandler, name: str, body: bool) -> None:
        data = self.files[name]
        start = 0
        wanted = h.headers.get("Range")
        if body and wanted:
            start = int(wanted.removeprefix("bytes=").split("-")[0])
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", SHA)
        h.send_header("ETag", f'"{self.etag(name)}"')
        if len(data) >= self.lfs_from:
            h.send_header("X-Linked-Etag", f'"{self.etag(name)}"')
            h.send_header("X-Linked-Size", str(self.claimed.get(name, len(data))))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Content-Length", str(len(data) - start))
        h.end_headers()
        if not body:
            return
        sent = 0
        for i in range(start, len(data), CHUNK):
            piece = data[i:i + CHUNK]
            if self.cut_after is not None and sent + len(piece) > self.cut_after:
                h.wfile.write(piece[: self.cut_after - sent])
                h.wfile.flush()
                self.cut_after = None  # once: the next request gets the rest
                h.close_connection = True
                h.connection.shutdown(2)
                return
            if self.hold_after is not None and sent + len(piece) > self.hold_after and not self.release.is_set():
                h.wfile.flush()
                self.release.wait(0.25)  # a trickle, not a stall: the client's read timeout never fires
            h.wfile.write(piece)
            sent += len(piece)
            if self.throttle_s:
                h.wfile.flush()
                time.sleep(self.throttle_s)
