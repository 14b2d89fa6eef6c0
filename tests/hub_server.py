"""A local Hugging Face Hub for tests: dataset repos in a directory (`<root>/<org>/<name>/...`, the Hub's own layout)
served over HTTP with the endpoints `datasets` and `huggingface_hub` call when streaming, so `hf://` sources run
their real code path against a local copy (HF_ENDPOINT=<url>). Faults can be queued per file: an HTTP 500, a 503,
a stall longer than the client's timeout, or a connection dropped mid-body, to test prep's retry policy.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time
import urllib.parse
from collections import defaultdict
from pathlib import Path


class HubServer:
    """`with HubServer(root) as hub:` -> hub.url; hub.fail(path_suffix, "500", "stall", ...); hub.requests."""

    def __init__(self, root: Path, stall_s: float = 30.0):
        self.root, self.stall_s = Path(root), stall_s
        self.faults: dict[str, list[str]] = defaultdict(list)
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub.handle(self, head=True)

            def do_GET(self):
                hub.handle(self, head=False)

            def do_POST(self):
                hub.handle(self, head=False, post=True)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> "HubServer":
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def fail(self, path_suffix: str, *actions: str) -> None:
        """The next requests for a file ending in `path_suffix` get these answers, one each, in order."""
        with self.lock:
            self.faults[path_suffix].extend(actions)

    @staticmethod
    def commit(repo_dir: Path) -> str:
        """A repo's revision: a hash of its files' names and bytes (changes when any file does)."""
        h = hashlib.sha1()
        for p in sorted(repo_dir.rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(repo_dir)).encode())
                h.update(p.read_bytes())
        return h.hexdigest()

    # -- request handling ---------------------------------------------------------------------------------------

    def handle(self, req, head: bool, post: bool = False) -> None:
        url = urllib.parse.urlparse(req.path)
        path = urllib.parse.unquote(url.path)
        with self.lock:
            self.requests.append((req.command, path))
        body = b""
        if post:
            body = req.rfile.read(int(req.headers.get("Content-Length") or 0))
        parts = path.strip("/").split("/")
        try:
            if parts[:2] == ["api", "datasets"] and (len(parts) == 4 or len(parts) >= 5 and
                                                     parts[4] in ("revision", "tree", "paths-info")):
                parts = parts if len(parts) > 4 else [*parts, "revision", "main"]
                repo = self.root / parts[2] / parts[3]
                if not repo.is_dir():
                    return self.send(req, 404, b'{"error": "Repository not found"}', head=head,
                                     headers={"X-Error-Code": "RepoNotFound"})
                sha = self.commit(repo)
                if parts[4] == "revision":
                    info = {"id": f"{parts[2]}/{parts[3]}", "sha": sha, "private": False, "gated": False,
                            "siblings": [{"rfilename": str(p.relative_to(repo))} for p in sorted(repo.rglob("*"))
                                         if p.is_file()]}
                    return self.send_json(req, info, head)
                if parts[4] == "tree":
                    sub = "/".join(parts[6:])
                    recursive = "recursive=true" in (url.query or "").lower()
                    return self.send_json(req, self.tree(repo, sub, recursive), head)
                form = urllib.parse.parse_qs(body.decode()) if body else {}
                try:
                    wanted = json.loads(body).get("paths", []) if body.startswith(b"{") else form.get("paths", [])
                except json.JSONDecodeError:
                    wanted = []
                return self.send_json(req, [e for p in wanted for e in self.tree(repo, p, False, itself=True)], head)
            if parts[0] == "datasets" and len(parts) >= 6 and parts[3] == "resolve":
                repo = self.root / parts[1] / parts[2]
                rel = "/".join(parts[5:])
                return self.serve_file(req, repo, rel, head)
            return self.send(req, 404, b"not found", head=head)
        except (BrokenPipeError, ConnectionResetError):
            return

    def tree(self, repo: Path, sub: str, recursive: bool, itself: bool = False) -> list[dict]:
        base = repo / sub if sub else repo
        if itself:
            if base.is_file():
                return [self.entry(repo, base)]
            return [{"type": "directory", "path": sub, "oid": "0" * 40}] if base.is_dir() else []
        if not base.is_dir():
            return []
        children = sorted(base.rglob("*") if recursive else base.iterdir())
        return [self.entry(repo, p) for p in children]

    @staticmethod
    def entry(repo: Path, p: Path) -> dict:
        rel = str(p.relative_to(repo))
        if p.is_dir():
            return {"type": "directory", "path": rel, "oid": "0" * 40}
        return {"type": "file", "path": rel, "size": p.stat().st_size,
                "oid": hashlib.sha1(p.read_bytes()).hexdigest()}

    def serve_file(self, req, repo: Path, rel: str, head: bool) -> None:
        path = repo / rel
        if not path.is_file():
            return self.send(req, 404, b"Entry not found", head=head, headers={"X-Error-Code": "EntryNotFound"})
        data = path.read_bytes()
        headers = {"X-Repo-Commit": self.commit(repo), "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                   "Accept-Ranges": "bytes"}
        action = None
        if not head:
            with self.lock:
                for suffix, queue in self.faults.items():
                    if rel.endswith(suffix) and queue:
                        action = queue.pop(0)
                        break
        if action == "500":
            return self.send(req, 500, b"Internal Server Error", head=head)
        if action == "503":
            return self.send(req, 503, b"Service Unavailable", head=head)
        if action == "stall":
            time.sleep(self.stall_s)
            return self.send(req, 504, b"Gateway Timeout", head=head)
        start, stop = 0, len(data)
        rng = req.headers.get("Range")
        status = 200
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            if a == "":
                start = max(0, len(data) - int(b))
            else:
                start, stop = int(a), min(len(data), int(b) + 1 if b else len(data))
            status = 206
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
        chunk = data[start:stop]
        if action == "drop":  # promise the body, send half of it, close the connection
            req.send_response(status)
            for k, v in {**headers, "Content-Length": str(len(chunk))}.items():
                req.send_header(k, v)
            req.end_headers()
            req.wfile.write(chunk[: len(chunk) // 2])
            req.wfile.flush()
            req.close_connection = True
            return
        self.send(req, status, chunk, head=head, headers=headers, length=len(chunk))

    def send_json(self, req, doc, head: bool) -> None:
        self.send(req, 200, json.dumps(doc).encode(), head=head, headers={"Content-Type": "application/json"})

    @staticmethod
    def send(req, status: int, body: bytes, head: bool, headers: dict | None = None, length: int | None = None) -> None:
        req.send_response(status)
        for k, v in (headers or {}).items():
            req.send_header(k, v)
        req.send_header("Content-Length", str(len(body) if length is None else length))
        req.end_headers()
        if not head:
            req.wfile.write(body)
