"""A minimal in-memory Hugging Face Hub for tests of ``hf_capgap.hub``.

It serves exactly the routes huggingface_hub 2.4 uses for ``create_repo``, ``create_branch``,
``upload_folder`` (README validation, preupload, NDJSON commit) and for reading back
(``model_info``, ``list_repo_tree``, ``resolve``). Preupload answers ``uploadMode: regular`` for
every file, so content travels base64-encoded inside the commit and neither LFS nor Xet storage is
involved. It records every request with its Authorization header, stops after ``max_requests``
requests or ``lifetime_s`` seconds, and can be told to fail a route with a status code.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_REV = r"(?P<rev>[^/?]+)"
ROUTES = {
    ("POST", "create"): re.compile(r"^/api/repos/create$"),
    ("POST", "validate-yaml"): re.compile(r"^/api/validate-yaml$"),
    ("POST", "branch"): re.compile(rf"^/api/models/{_REPO}/branch/{_REV}$"),
    ("POST", "preupload"): re.compile(rf"^/api/models/{_REPO}/preupload/{_REV}$"),
    ("POST", "commit"): re.compile(rf"^/api/models/{_REPO}/commit/{_REV}$"),
    ("GET", "tree"): re.compile(rf"^/api/models/{_REPO}/tree/{_REV}$"),
    ("GET", "info"): re.compile(rf"^/api/models/{_REPO}(?:/revision/{_REV})?$"),
    ("GET", "resolve"): re.compile(rf"^/{_REPO}/resolve/{_REV}/(?P<path>.+)$"),
}
# huggingface_hub fetches its AI-agent registry from the endpoint, without a token, whenever it
# formats terminal output and has no fresh copy cached: not a request of the upload protocol under
# test, so it is answered with an empty registry and left out of ``requests``.
AGENT_REGISTRY_PATH = "/api/agent-harnesses"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    heads: dict[str, str] = field(default_factory=lambda: {"main": "0" * 40})


@dataclass
class SeenRequest:
    method: str
    path: str
    authorization: str | None


class FakeHub:
    """Start with ``FakeHub().start()``; ``url`` is the endpoint to give huggingface_hub."""

    def __init__(self, *, max_requests: int = 200, lifetime_s: float = 60.0) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[SeenRequest] = []
        self.failures: dict[str, int] = {}
        self.max_requests = max_requests
        self.lifetime_s = lifetime_s
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._deadline = threading.Timer(lifetime_s, self.stop)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        self._thread.start()
        self._deadline.start()
        return self

    def stop(self) -> None:
        self._deadline.cancel()
        self._server.shutdown()
        self._server.server_close()

    def fail(self, route: str, status: int = 500) -> None:
        """Answer every later request to ``route`` (a ROUTES name) with ``status``."""
        self.failures[route] = status

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id].branches[revision])

    # -- route handlers: (status, JSON or bytes, extra headers) ------------------------------------

    def handle(self, route: str, match: re.Match, body: bytes, base: str) -> tuple[int, object, dict]:
        if route in self.failures:
            return self.failures[route], {"error": f"injected failure on {route}"}, {}
        return getattr(self, "_" + route.replace("-", "_"))(match, body, base)

    def _create(self, match, body, base):
        payload = json.loads(body)
        repo_id = f"{payload['organization']}/{payload['name']}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{base}/{repo_id}"}, {}
        self.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        return 200, {"url": f"{base}/{repo_id}", "name": repo_id}, {}

    def _validate_yaml(self, match, body, base):
        return 200, {"errors": [], "warnings": []}, {}

    def _branch(self, match, body, base):
        repo = self.repos[match["repo"]]
        branch = unquote(match["rev"])
        if branch in repo.branches:
            return 409, {"error": "Reference already exists"}, {}
        repo.branches[branch] = dict(repo.branches["main"])
        repo.heads[branch] = repo.heads["main"]
        return 200, {}, {}

    def _preupload(self, match, body, base):
        if match["repo"] not in self.repos:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        files = json.loads(body)["files"]
        return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}, {}

    def _commit(self, match, body, base):
        repo = self.repos[match["repo"]]
        branch = unquote(match["rev"])
        tree = repo.branches[branch]
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                tree[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                tree.pop(item["value"]["path"], None)
            elif item["key"] != "header":
                return 400, {"error": f"unsupported commit operation {item['key']}"}, {}
        digest = hashlib.sha1(repo.heads[branch].encode())
        for path in sorted(tree):
            digest.update(path.encode() + git_blob_sha1(tree[path]).encode())
        repo.heads[branch] = digest.hexdigest()
        oid = repo.heads[branch]
        return 200, {"commitUrl": f"{base}/{match['repo']}/commit/{oid}", "commitOid": oid}, {}

    def _resolve_revision(self, repo: Repo, rev: str | None) -> str:
        rev = unquote(rev or "main")
        for branch, head in repo.heads.items():
            if rev in (branch, head):
                return branch
        raise KeyError(rev)

    def _info(self, match, body, base):
        repo = self.repos.get(match["repo"])
        if repo is None:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        branch = self._resolve_revision(repo, match["rev"])
        siblings = [{"rfilename": path} for path in sorted(repo.branches[branch])]
        return 200, {"id": match["repo"], "sha": repo.heads[branch], "private": repo.private, "siblings": siblings}, {}

    def _tree(self, match, body, base):
        repo = self.repos[match["repo"]]
        tree = repo.branches[self._resolve_revision(repo, match["rev"])]
        entries = [
            {"type": "file", "path": p, "size": len(d), "oid": git_blob_sha1(d)} for p, d in sorted(tree.items())
        ]
        return 200, entries, {}

    def _resolve(self, match, body, base):
        repo = self.repos.get(match["repo"])
        if repo is None:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        branch = self._resolve_revision(repo, match["rev"])
        data = repo.branches[branch].get(unquote(match["path"]))
        if data is None:
            return 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}
        return 200, data, {"X-Repo-Commit": repo.heads[branch], "ETag": f'"{git_blob_sha1(data)}"'}


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = 10

        def log_message(self, format: str, *args: object) -> None:
            """Keep test output quiet."""

        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            path = urlsplit(self.path).path
            if path == AGENT_REGISTRY_PATH:
                self._reply(200, {"standardEnvVars": [], "harnesses": {}}, {})
                return
            with hub._lock:
                hub.requests.append(SeenRequest(self.command, path, self.headers.get("Authorization")))
                if len(hub.requests) > hub.max_requests:
                    status, payload, headers = 503, {"error": "request budget exhausted"}, {}
                else:
                    status, payload, headers = 404, {"error": f"no route {method} {path}"}, {}
                    for (verb, route), pattern in ROUTES.items():
                        if verb == method and (match := pattern.match(path)):
                            status, payload, headers = hub.handle(route, match, body, hub.url)
                            break
            self._reply(status, payload, headers)

        def _reply(self, status: int, payload: object, headers: dict) -> None:
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header(
                "Content-Type", "application/octet-stream" if isinstance(payload, bytes) else "application/json"
            )
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def do_GET(self) -> None:
            self._serve("GET")

        def do_HEAD(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

    return Handler
