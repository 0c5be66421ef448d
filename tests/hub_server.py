"""A small Hugging Face Hub look-alike on 127.0.0.1, for testing `scd.hub` against the real client.

It serves the part of the Hub HTTP API that huggingface_hub 2.x uses to download and upload:

    GET  /api/models/{repo}[/revision/{rev}]       model info (sha, siblings)
    GET  /api/models/{repo}/tree/{rev}[/{path}]    file listing (oid, size, lfs)
    HEAD /{repo}/resolve/{rev}/{path}              file metadata (X-Repo-Commit, ETag, Content-Length)
    GET  /{repo}/resolve/{rev}/{path}              file content (Range supported)
    POST /api/repos/create, /api/validate-yaml, /api/models/{repo}/{preupload,commit,branch}/{rev}

Files named like weights (`*.safetensors`, `*.pth`, `*.pt`, `*.bin`, `*.ckpt`) are stored "in LFS":
`/resolve` answers 302 with X-Linked-Etag (sha256) and X-Linked-Size, and the bytes come from a
second server on another port, as from the Hub's CDN (a different origin, so the client drops the
Authorization header). Nothing advertises Xet storage, and preupload always answers "regular", so
the client uses plain HTTP both ways. Errors carry X-Error-Code (RepoNotFound, RevisionNotFound,
EntryNotFound, GatedRepo) as the Hub does.

    with HubServer() as hub:
        sha = hub.add_repo("owner/model", {"config.json": b"{}"})
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        ...
        assert "config.json" in hub.downloaded()
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
DATE = "2025-01-01T00:00:00.000Z"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.pth filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    oid = hashlib.sha256(data).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n".encode()


def is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


@dataclass
class Commit:
    sha: str
    files: dict[str, bytes]
    message: str


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    gated: bool = False
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    """One answered request: what the client asked for and what it got."""

    method: str
    path: str  # URL path and query as sent
    status: int
    file: str | None  # the repo file it concerned (resolve and CDN requests)
    range: str | None
    authorization: str | None
    server: str  # "hub" or "cdn"


class HubError(Exception):
    """An HTTP error answer: status, Hub error code and message."""

    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None, **body):
        super().__init__(message)
        self.status, self.code, self.message, self.commit, self.body = status, code, message, commit, body


class HubServer:
    """The Hub look-alike: repositories with full commit history, a request log and fault switches.

    `token` is the one valid token; writes always need it, reads need it when `require_token` is
    set or the repo is private (and gated repos need it for file content).
    """

    def __init__(self, token: str = "hf_test_token", require_token: bool = False):
        self.token = token
        self.require_token = require_token
        self.repos: dict[str, Repo] = {}
        self.log: list[Request] = []
        self.stalled = threading.Event()  # set when a "stall" fault has sent half a file and is waiting
        self._lock = threading.Condition()
        self._release = threading.Event()
        self._faults: list[tuple[str, str | None]] = []
        self._holds: dict[str, tuple[int, float]] = {}
        self._counter = 0
        self._connections: set[socket.socket] = set()
        self._servers: list[ThreadingHTTPServer] = []
        self.url = self.cdn_url = ""

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "HubServer":
        for name in ("hub", "cdn"):
            handler = type(f"{name}Handler", (_Handler,), {"hub": self, "role": name})
            server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
            self._servers.append(server)
        hub, cdn = (f"http://127.0.0.1:{s.server_address[1]}" for s in self._servers)
        self.url, self.cdn_url = hub, cdn
        return self

    def stop(self) -> None:
        """Stop answering: close the listening sockets and every open connection (keep-alive included)."""
        self._release.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._servers.clear()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ repositories

    def add_repo(self, repo_id: str, files: dict[str, bytes] | Path, branch: str = "main", message: str = "add files",
                 private: bool = False, gated: bool = False) -> str:
        """Commit `files` (a dict, or every file under a folder) as the whole content of `branch`,
        creating the repo if needed. Returns the new commit sha; older commits stay fetchable by sha."""
        if isinstance(files, Path):
            files = {p.relative_to(files).as_posix(): p.read_bytes() for p in sorted(files.rglob("*")) if p.is_file()}
        with self._lock:
            repo = self.repos.setdefault(repo_id, Repo(repo_id))
            repo.private, repo.gated = private, gated
            return self._commit(repo, branch, dict(files), message)

    def head(self, repo_id: str, branch: str = "main") -> str:
        return self.repos[repo_id].branches[branch]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return dict(repo.commits[repo.branches.get(revision, revision)].files)

    def _commit(self, repo: Repo, branch: str, files: dict[str, bytes], message: str) -> str:
        self._counter += 1
        digest = hashlib.sha1(f"{repo.repo_id}\0{branch}\0{message}\0{self._counter}".encode())
        for path in sorted(files):
            digest.update(f"\0{path}\0{git_blob_id(files[path])}".encode())
        sha = digest.hexdigest()
        repo.commits[sha] = Commit(sha, files, message)
        repo.branches[branch] = sha
        return sha

    # ------------------------------------------------------------------ log and faults

    def downloaded(self, server: str | None = None) -> list[str]:
        """Repo paths whose bytes were sent (GET answered 200/206), in order, repeats included."""
        return [r.file for r in self.log if r.method == "GET" and r.file and r.status in (200, 206)
                and (server is None or r.server == server)]

    def requested(self) -> set[str]:
        """Every repo path the client asked anything about (HEAD or GET, any answer)."""
        return {r.file for r in self.log if r.file}

    def fail_downloads(self, count: int = 1, mode: str = "truncate", path: str | None = None) -> None:
        """Make the next `count` content downloads (of `path`, or of any file) break halfway:
        "truncate" closes the connection after half the bytes; "stall" sends half, sets `stalled`
        and hangs until `release()` or `stop()`, then closes."""
        assert mode in ("truncate", "stall")
        if mode == "stall":
            self._release.clear()
            self.stalled.clear()
        with self._lock:
            self._faults.extend([(mode, path)] * count)

    def release(self) -> None:
        self._release.set()

    def hold_downloads(self, path: str, until_heads: int, timeout: float = 20.0) -> None:
        """Delay sending the bytes of `path` until `until_heads` HEAD requests for it have arrived,
        so that several clients are provably downloading it at the same time."""
        with self._lock:
            self._holds[path] = (until_heads, timeout)

    def _take_fault(self, path: str) -> str | None:
        with self._lock:
            for i, (mode, only) in enumerate(self._faults):
                if only is None or only == path:
                    del self._faults[i]
                    return mode
        return None

    def _wait_hold(self, path: str) -> None:
        with self._lock:
            if path not in self._holds:
                return
            heads, timeout = self._holds[path]
            self._lock.wait_for(lambda: sum(r.method == "HEAD" and r.file == path for r in self.log) >= heads, timeout)

    def _record(self, request: Request) -> None:
        with self._lock:
            self.log.append(request)
            self._lock.notify_all()

    # ------------------------------------------------------------------ lookups used by the handler

    def repo(self, repo_id: str, authorization: str | None, write: bool = False) -> Repo:
        self.check_auth(authorization, required=write)
        repo = self.repos.get(repo_id)
        # As on the Hub, a repo the caller may not see is indistinguishable from a missing one.
        hidden = (repo is not None and repo.private) or self.require_token
        if repo is None or (hidden and authorization != f"Bearer {self.token}"):
            if authorization:
                raise HubError(404, "RepoNotFound", "Repository not found")
            raise HubError(401, "RepoNotFound", "Invalid username or password.")
        return repo

    def check_auth(self, authorization: str | None, required: bool) -> None:
        if authorization is not None and authorization != f"Bearer {self.token}":
            raise HubError(401, None, "Invalid credentials in Authorization header")
        if required and authorization is None:
            raise HubError(401, None, "Invalid username or password.")

    @staticmethod
    def resolve(repo: Repo, revision: str) -> Commit:
        sha = repo.branches.get(revision, revision)
        if sha not in repo.commits:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo.commits[sha]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    hub: HubServer
    role: str
    _file: str | None = None

    def setup(self):
        super().setup()
        with self.hub._lock:
            self.hub._connections.add(self.connection)

    def finish(self):
        try:
            super().finish()
        finally:
            with self.hub._lock:
                self.hub._connections.discard(self.connection)

    def log_message(self, *args):  # quiet: the request log is `hub.log`
        pass

    # ------------------------------------------------------------------ plumbing

    def send_response(self, code, message=None):
        self.hub._record(Request(self.command, self.path, code, self._file, self.headers.get("Range"),
                                 self.headers.get("Authorization"), self.role))
        super().send_response(code, message)

    def _reply(self, status: int, body: bytes = b"", headers: dict | None = None,
               content_type: str = "application/json") -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, value, status: int = 200, headers: dict | None = None) -> None:
        self._reply(status, json.dumps(value).encode(), headers)

    def _error(self, err: HubError) -> None:
        headers = {"X-Error-Message": err.message}
        if err.code:
            headers["X-Error-Code"] = err.code
        if err.commit:
            headers["X-Repo-Commit"] = err.commit
        self._json({"error": err.message, **err.body}, err.status, headers)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self) -> None:
        self._file = None
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        body = self._body() if self.command == "POST" else b""
        try:
            if self.role == "cdn":
                return self._cdn(parts, query)
            return self._route(parts, query, body)
        except HubError as err:
            self._error(err)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    do_GET = do_HEAD = do_POST = _dispatch

    # ------------------------------------------------------------------ routes

    def _route(self, parts: list[str], query: dict, body: bytes) -> None:
        auth, method = self.headers.get("Authorization"), self.command
        if parts[:2] == ["api", "whoami-v2"]:
            self.hub.check_auth(auth, required=True)
            return self._json({"type": "user", "name": "tester", "auth": {"accessToken": {"role": "write"}}})
        if parts[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo(json.loads(body or b"{}"), auth)
        if parts[:2] == ["api", "validate-yaml"] and method == "POST":
            return self._json({"errors": [], "warnings": []})
        if len(parts) >= 4 and parts[:2] == ["api", "models"]:
            repo = self.hub.repo(f"{parts[2]}/{parts[3]}", auth, write=method == "POST")
            rest = parts[4:]
            if method == "GET" and not rest:
                return self._info(repo, self.hub.resolve(repo, "main"))
            if method == "GET" and rest[0] == "revision" and len(rest) == 2:
                return self._info(repo, self.hub.resolve(repo, rest[1]))
            if method == "GET" and rest[0] == "tree" and len(rest) >= 2:
                return self._tree(repo, rest[1], "/".join(rest[2:]), query.get("recursive") in ("true", "True", "1"))
            if method == "POST" and rest[0] == "preupload" and len(rest) == 2:
                return self._preupload(repo, rest[1], json.loads(body))
            if method == "POST" and rest[0] == "commit" and len(rest) == 2:
                return self._commit(repo, rest[1], body)
            if method == "POST" and rest[0] == "branch" and len(rest) == 2:
                return self._branch(repo, rest[1], json.loads(body or b"{}"))
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            self._file = "/".join(parts[4:])
            return self._resolve(self.hub.repo(f"{parts[0]}/{parts[1]}", auth), parts[3], self._file, auth)
        raise HubError(404, None, f"no route for {method} {self.path}")

    def _info(self, repo: Repo, commit: Commit) -> None:
        self._json({
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id, "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0], "sha": commit.sha, "lastModified": DATE, "createdAt": DATE,
            "private": repo.private, "gated": "auto" if repo.gated else False, "disabled": False, "downloads": 0,
            "likes": 0, "tags": [], "library_name": "scd", "siblings": [{"rfilename": p} for p in sorted(commit.files)],
        })

    def _tree(self, repo: Repo, revision: str, under: str, recursive: bool) -> None:
        commit = self.hub.resolve(repo, revision)
        prefix = f"{under}/" if under else ""
        if under and not any(p.startswith(prefix) for p in commit.files):
            raise HubError(404, "EntryNotFound", f"{under} does not exist on {revision}", commit.sha)
        entries, folders = [], set()
        for path in sorted(commit.files):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):].split("/")
            for depth in range(1, len(rest)):
                folders.add(prefix + "/".join(rest[:depth]))
            if len(rest) > 1 and not recursive:
                continue
            data = commit.files[path]
            entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_id(data)}
            if is_lfs(path):
                pointer = lfs_pointer(data)
                entry["oid"] = git_blob_id(pointer)
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": len(pointer)}
            entries.append(entry)
        if not recursive:
            folders = {f for f in folders if "/" not in f[len(prefix):]}
        entries += [{"type": "directory", "path": f, "size": 0, "oid": hashlib.sha1(f.encode()).hexdigest()}
                    for f in sorted(folders)]
        self._json(entries)

    def _resolve(self, repo: Repo, revision: str, path: str, auth: str | None) -> None:
        commit = self.hub.resolve(repo, revision)
        if path not in commit.files:
            raise HubError(404, "EntryNotFound", f"{path} does not exist on {revision}", commit.sha)
        if repo.gated and auth != f"Bearer {self.hub.token}":
            raise HubError(401, "GatedRepo", f"Access to model {repo.repo_id} is restricted. You must have access "
                                             "to it and be authenticated to access it. Please log in.")
        data = commit.files[path]
        if is_lfs(path):
            sha256 = hashlib.sha256(data).hexdigest()
            location = f"{self.hub.cdn_url}/lfs/{repo.repo_id}/{sha256}?path={quote(path)}"
            return self._reply(302, b"", {
                "Location": location, "X-Repo-Commit": commit.sha, "ETag": f'"{git_blob_id(lfs_pointer(data))}"',
                "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": len(data)}, "text/plain")
        self._content(data, {"X-Repo-Commit": commit.sha, "ETag": f'"{git_blob_id(data)}"'})

    def _cdn(self, parts: list[str], query: dict) -> None:
        # /lfs/{owner}/{name}/{sha256}?path=...: content-addressed, signed-URL style, no auth.
        if len(parts) != 4 or parts[0] != "lfs" or self.command not in ("GET", "HEAD"):
            raise HubError(404, None, "no such object")
        self._file = query.get("path")
        repo = self.hub.repos.get(f"{parts[1]}/{parts[2]}")
        for commit in (repo.commits.values() if repo else ()):
            for data in commit.files.values():
                if hashlib.sha256(data).hexdigest() == parts[3]:
                    return self._content(data, {"ETag": f'"{parts[3]}"'})
        raise HubError(404, None, "no such object")

    def _content(self, data: bytes, headers: dict) -> None:
        """Send `data` (or the requested byte range), breaking halfway if a fault is armed."""
        start, end = 0, len(data) - 1
        status, headers = 200, {**headers, "Accept-Ranges": "bytes"}
        requested = self.headers.get("Range")
        if requested and requested.startswith("bytes="):
            first, _, last = requested[len("bytes="):].split(",")[0].partition("-")
            start = int(first) if first else max(len(data) - int(last), 0)
            end = min(int(last), len(data) - 1) if first and last else len(data) - 1
            if start >= len(data):
                return self._reply(416, b"", {"Content-Range": f"bytes */{len(data)}"}, "text/plain")
            status, headers["Content-Range"] = 206, f"bytes {start}-{end}/{len(data)}"
        body = data[start:end + 1]
        if self.command == "HEAD":
            return self._reply(status, body, headers, "application/octet-stream")
        self.hub._wait_hold(self._file)
        fault = self.hub._take_fault(self._file)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, str(value))
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if fault is None:
            self.wfile.write(body)
            return
        self.wfile.write(body[:len(body) // 2])
        self.wfile.flush()
        if fault == "stall":
            self.hub.stalled.set()
            self.hub._release.wait(timeout=60)
        self.close_connection = True  # the client sees the body end early

    # ------------------------------------------------------------------ writes

    def _create_repo(self, payload: dict, auth: str | None) -> None:
        self.hub.check_auth(auth, required=True)
        repo_id = f"{payload.get('organization') or 'tester'}/{payload['name']}"
        url = f"{self.hub.url}/{repo_id}"
        with self.hub._lock:
            if repo_id in self.hub.repos:
                raise HubError(409, None, "You already created this model repo", url=url)  # the client reads url
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            repo = self.hub.repos[repo_id] = Repo(repo_id, private=private)
            self.hub._commit(repo, "main", {".gitattributes": GITATTRIBUTES}, "initial commit")
        self._json({"url": url, "name": repo_id, "id": hashlib.md5(repo_id.encode()).hexdigest()[:24]})

    def _preupload(self, repo: Repo, revision: str, payload: dict) -> None:
        commit = self.hub.resolve(repo, revision)
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                  "oid": git_blob_id(commit.files[f["path"]]) if f["path"] in commit.files else None}
                 for f in payload["files"]]
        self._json({"files": files, "commitOid": commit.sha})

    def _commit(self, repo: Repo, branch: str, body: bytes) -> None:
        if branch not in repo.branches:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {branch}")
        message, operations = "", []
        for line in body.splitlines():
            if line.strip():
                item = json.loads(line)
                if item["key"] == "header":
                    message = item["value"]["summary"]
                    parent = item["value"].get("parentCommit")
                    if parent and parent != repo.branches[branch]:
                        raise HubError(412, None, "A commit has happened since. Please refresh and try again.")
                elif item["key"] == "lfsFile":
                    raise HubError(400, None, "this test server takes regular uploads only")
                else:
                    operations.append(item)
        with self.hub._lock:
            files = dict(repo.commits[repo.branches[branch]].files)
            for op in operations:
                path = op["value"]["path"]
                if op["key"] == "file":
                    files[path] = base64.b64decode(op["value"]["content"])
                elif op["key"] == "deletedFile":
                    files.pop(path, None)
                elif op["key"] == "deletedFolder":
                    files = {p: d for p, d in files.items() if not p.startswith(path.rstrip("/") + "/")}
            sha = self.hub._commit(repo, branch, files, message)
        self._json({"success": True, "commitOid": sha, "commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{sha}",
                    "pullRequestUrl": None})

    def _branch(self, repo: Repo, branch: str, payload: dict) -> None:
        with self.hub._lock:
            if branch in repo.branches:
                raise HubError(409, None, f"Reference refs/heads/{branch} already exists")
            repo.branches[branch] = self.hub.resolve(repo, payload.get("startingPoint") or "main").sha
        self._json({"success": True})
