"""A loopback stand-in for the Hugging Face Hub HTTP API, for tests that must not touch the network.

The real ``huggingface_hub`` client (2.4) talks to it through ``HF_ENDPOINT`` (or its patched
``constants.ENDPOINT``). It implements exactly the routes that loratools' push and pull use:

    POST /api/repos/create                               create_repo      {name, organization, visibility}
    POST /api/validate-yaml                              create_commit    (README.md front matter check)
    POST /api/models/{repo}/branch/{branch}              create_branch
    POST /api/models/{repo}/preupload/{rev}              create_commit    (upload mode per file)
    POST /api/models/{repo}/commit/{rev}                 create_commit    (NDJSON: header + inline files)
    GET  /api/models/{repo}[/revision/{rev}]             model_info / repo_info
    GET  /api/models/{repo}/tree/{rev}[/{path}]          list_repo_tree   (snapshot_download)
    HEAD /{repo}/resolve/{rev}/{path}                    hf_hub_download  (X-Repo-Commit, ETag, Content-Length)
    GET  /{repo}/resolve/{rev}/{path}                    hf_hub_download  (the bytes)

Upload paths NOT exercised: the preupload answer is always ``"uploadMode": "regular"``, so every
file travels base64-inline in the commit NDJSON; the Git-LFS batch API and the Xet CAS upload and
download paths (which the real Hub uses for binary files such as ``*.safetensors``) are never hit.
Downloads are plain HTTP GETs: no ``X-Xet-Hash`` header, no LFS redirect to a CDN.

Authentication mirrors the Hub: ``Authorization: Bearer <token>`` must be one of ``tokens``; an
unknown token is a 401 with ``X-Error-Message: Invalid credentials in Authorization header``;
writes need a token whose user owns the namespace; private repos are invisible (404
``RepoNotFound``) to everyone else. ``HubServer.fail`` injects an HTTP status or a dropped
connection on the next requests matching a method and a path pattern.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
)
INVALID_TOKEN = "Invalid credentials in Authorization header"


def git_blob_oid(content: bytes) -> str:
    """The git object id of a blob: ``sha1(b"blob <size>\\0" + content)``."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    oid: str
    summary: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        """A branch name or a full commit oid → the commit."""
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)

    def commit(self, branch: str, summary: str, files: dict[str, bytes]) -> Commit:
        parent = self.branches.get(branch, "")
        digest = hashlib.sha1(f"{parent}\n{summary}\n{len(self.commits)}".encode())
        for path in sorted(files):
            digest.update(f"{path}:{git_blob_oid(files[path])}".encode())
        new = Commit(digest.hexdigest(), summary, dict(files))
        self.commits[new.oid] = new
        self.branches[branch] = new.oid
        return new


@dataclass
class Fault:
    method: str
    pattern: re.Pattern[str]
    action: int | str  # an HTTP status, or "drop" to close the connection without answering
    message: str
    remaining: int | None  # None: every matching request


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes


@dataclass
class HubState:
    tokens: dict[str, str] = field(default_factory=lambda: {"hf_stand_in_write": "tester"})
    repos: dict[str, Repo] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    requests: list[Recorded] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


REPO = r"(?P<repo>[^/]+/[^/]+)"
ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("POST", re.compile(rf"^/api/models/{REPO}/branch/(?P<rev>[^/]+)$"), "create_branch"),
    ("POST", re.compile(rf"^/api/models/{REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("GET", re.compile(rf"^/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$"), "tree"),
    ("GET", re.compile(rf"^/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?$"), "model_info"),
    ("HEAD", re.compile(rf"^/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("GET", re.compile(rf"^/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's pooled client expects
    server: StandInServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    # -- plumbing ------------------------------------------------------------------------------

    def _handle(self, method: str) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        url = urlsplit(self.path)
        state = self.server.state
        with state.lock:
            state.requests.append(
                Recorded(method, url.path, {k.lower(): v for k, v in self.headers.items()}, body)
            )
            fault = self._take_fault(method, url.path)
        if fault is not None and fault.action == "drop":
            self.close_connection = True  # no status line at all: the client sees a disconnect
            return
        try:
            if fault is not None:
                raise HubError(int(fault.action), fault.message)
            for route_method, pattern, name in ROUTES:
                match = pattern.match(url.path)
                if route_method == method and match:
                    params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    with state.lock:
                        getattr(self, f"_{name}")(params, body, parse_qs(url.query), method)
                    return
            raise HubError(404, f"no route for {method} {url.path}")
        except HubError as exc:
            self._send_json({"error": exc.message, **exc.extra}, exc.status, self._error_headers(exc))

    def _take_fault(self, method: str, path: str) -> Fault | None:
        for fault in self.server.state.faults:
            if fault.method == method and fault.pattern.search(path) and fault.remaining != 0:
                if fault.remaining is not None:
                    fault.remaining -= 1
                return fault
        return None

    @staticmethod
    def _error_headers(exc: HubError) -> dict[str, str]:
        headers = {"X-Error-Message": exc.message}
        if exc.code:
            headers["X-Error-Code"] = exc.code
        return headers

    def _send(self, status: int, body: bytes, headers: dict[str, str], method: str = "GET") -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)

    def _send_json(self, document: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(
            status, json.dumps(document).encode(), {"Content-Type": "application/json", **(headers or {})}
        )

    def _user(self) -> str | None:
        """The user behind the bearer token; None when anonymous. An unknown token is a 401."""
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.server.state.tokens:
            raise HubError(401, INVALID_TOKEN)
        return self.server.state.tokens[token]

    def _repo(self, repo_id: str, *, write: bool = False) -> Repo:
        user = self._user()
        repo = self.server.state.repos.get(repo_id)
        visible = repo is not None and (not repo.private or user == repo_id.split("/")[0])
        if not visible:
            raise HubError(404, "Repository not found", "RepoNotFound")
        assert repo is not None
        if write and user is None:
            raise HubError(401, "You must be authenticated to write to this repository")
        if write and user != repo_id.split("/")[0]:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    @staticmethod
    def _commit_of(repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # -- routes --------------------------------------------------------------------------------

    def _create_repo(self, params: dict[str, str], body: bytes, query: Any, method: str) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to create a repository")
        payload = json.loads(body)
        namespace = payload.get("organization") or user
        if namespace != user:
            raise HubError(
                403, f"You don't have the rights to create a model under the namespace {namespace}"
            )
        repo_id = f"{namespace}/{payload['name']}"
        url = f"{self.server.url}/{repo_id}"
        if repo_id in self.server.state.repos:
            raise HubError(409, "You already created this model repo", url=url)  # the client reads url
        repo = Repo(repo_id, private=payload.get("visibility") == "private")
        repo.commit("main", "initial commit", {".gitattributes": GITATTRIBUTES})
        self.server.state.repos[repo_id] = repo
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, params: dict[str, str], body: bytes, query: Any, method: str) -> None:
        content = json.loads(body)["content"]
        match = re.match(r"^---\n(.*?)\n---\n", content, re.DOTALL)
        try:
            metadata = yaml.safe_load(match[1]) if match else {}
        except yaml.YAMLError as exc:
            self._send_json({"errors": [{"message": str(exc)}]}, 400)
            return
        if not isinstance(metadata, dict):
            self._send_json({"errors": [{"message": "metadata must be a mapping"}]}, 400)
            return
        self._send_json({"errors": [], "warnings": []})

    def _create_branch(self, params: dict[str, str], body: bytes, query: Any, method: str) -> None:
        repo = self._repo(params["repo"], write=True)
        if params["rev"] in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{params['rev']}")
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        repo.branches[params["rev"]] = self._commit_of(repo, start).oid
        self._send_json({})

    def _preupload(self, params: dict[str, str], body: bytes, query: Any, method: str) -> None:
        repo = self._repo(params["repo"], write=True)
        current = self._commit_of(repo, params["rev"]).files
        files = [
            {
                "path": f["path"],
                "uploadMode": "regular",  # never "lfs": see the module docstring
                "shouldIgnore": False,
                "oid": git_blob_oid(current[f["path"]]) if f["path"] in current else None,
            }
            for f in json.loads(body)["files"]
        ]
        self._send_json({"files": files})

    def _commit(self, params: dict[str, str], body: bytes, query: Any, method: str) -> None:
        repo = self._repo(params["repo"], write=True)
        files = dict(self._commit_of(repo, params["rev"]).files)
        summary = ""
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                summary = item["value"]["summary"]
            elif item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                files.pop(item["value"]["path"], None)
            else:
                raise HubError(400, f"the stand-in does not support {item['key']} operations")
        commit = repo.commit(params["rev"], summary, files)
        url = f"{self.server.url}/{repo.repo_id}/commit/{commit.oid}"
        self._send_json({"success": True, "commitOid": commit.oid, "commitUrl": url, "hookOutput": ""})

    def _model_info(self, params: dict[str, str], body: bytes, query: Any, method: str) -> None:
        repo = self._repo(params["repo"])
        commit = self._commit_of(repo, params.get("rev", "main"))
        self._send_json(
            {
                "id": repo.repo_id,
                "sha": commit.oid,
                "private": repo.private,
                "tags": [],
                "siblings": [{"rfilename": path} for path in sorted(commit.files)],
            }
        )

    def _tree(self, params: dict[str, str], body: bytes, query: Any, method: str) -> None:
        repo = self._repo(params["repo"])
        commit = self._commit_of(repo, params["rev"])
        prefix = params.get("path", "").strip("/")
        entries, folders = [], set()
        for path, content in sorted(commit.files.items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            parts = path.split("/")
            folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
            entries.append({"type": "file", "oid": git_blob_oid(content), "size": len(content), "path": path})
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)]
        self._send_json(entries)

    def _resolve(self, params: dict[str, str], body: bytes, query: Any, method: str) -> None:
        repo = self._repo(params["repo"])
        commit = self._commit_of(repo, params["rev"])
        if params["path"] not in commit.files:
            raise HubError(404, f"Entry not found: {params['path']}", "EntryNotFound")
        content = commit.files[params["path"]]
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{git_blob_oid(content)}"',
            "Content-Type": "application/octet-stream",
        }
        self._send(200, content, headers, method)


class StandInServer(ThreadingHTTPServer):
    daemon_threads = True
    state: HubState
    url: str


class HubServer:
    """Run the stand-in on 127.0.0.1 (an ephemeral port) in a thread; use as a context manager.

    Example:
        >>> with HubServer() as hub:
        ...     monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    """

    def __init__(self) -> None:
        self.state = HubState()
        self._server = StandInServer(("127.0.0.1", 0), Handler)
        self._server.state = self.state
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._server.url = self.url
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def token(self) -> str:
        """A token with write access to the namespace ``tester``."""
        return next(iter(self.state.tokens))

    def fail(
        self,
        method: str,
        path_pattern: str,
        action: int | str,
        *,
        message: str = "",
        times: int | None = None,
    ) -> None:
        """Answer requests matching ``method`` and ``path_pattern`` (a regex searched in the path)
        with the HTTP status ``action``, or close the connection unanswered when ``action == "drop"``."""
        text = message or f"injected failure {action}"
        self.state.faults.append(Fault(method, re.compile(path_pattern), action, text, times))

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``revision`` as the server holds them."""
        commit = self.state.repos[repo_id].resolve(revision)
        assert commit is not None, f"{repo_id} has no revision {revision}"
        return commit.files

    def requests(self, method: str | None = None, path_pattern: str = "") -> list[Recorded]:
        """Recorded requests, optionally filtered."""
        return [
            r
            for r in self.state.requests
            if (method is None or r.method == method) and re.search(path_pattern, r.path)
        ]
