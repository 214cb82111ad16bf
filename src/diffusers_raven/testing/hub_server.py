"""A small, local implementation of the Hugging Face Hub HTTP protocol, for offline tests.

:class:`LocalHubServer` answers the subset of the Hub API that the real ``huggingface_hub`` client uses to create a
model repository, push files to it (regular files inline in the commit, large or binary files through the Git LFS
batch API) and download them again (``hf_hub_download`` / ``snapshot_download``). It only uses the standard library,
listens on ``127.0.0.1`` on a free port, runs in a background thread and keeps its repositories in a directory (a
temporary one unless given).

:func:`use_hub_endpoint` points the already-imported ``huggingface_hub`` at such a server through its public HTTP
client factory (and restores everything afterwards), and the ``hub_server`` / ``local_hub`` pytest fixtures wire both
together::

    from diffusers_raven.testing.hub_server import hub_server, local_hub  # noqa: F401  (pytest fixtures)

    def test_roundtrip(local_hub):
        api = HfApi()  # talks to the local server
        api.create_repo("tester/demo")

Implemented endpoints (model repositories only)::

    GET    /api/whoami-v2
    POST   /api/repos/create                                   (409 if the repository exists)
    DELETE /api/repos/delete
    POST   /api/validate-yaml
    GET    /api/models/{namespace}/{name}[/revision/{revision}]
    POST   /api/models/{namespace}/{name}/preupload/{revision}
    POST   /api/models/{namespace}/{name}/commit/{revision}     (ndjson)
    GET    /api/models/{namespace}/{name}/tree/{revision}[/{path}]?recursive=...
    POST   /{namespace}/{name}.git/info/lfs/objects/batch       (operation "upload", transfer "basic")
    PUT    /_lfs/upload/{oid}                                   (upload target returned by the batch call)
    POST   /_lfs/verify                                         (verify target returned by the batch call)
    HEAD   /{namespace}/{name}/resolve/{revision}/{path}
    GET    /{namespace}/{name}/resolve/{revision}/{path}       (supports ``Range: bytes=a-[b]``)
    POST   /api/telemetry/...                                   (accepted and ignored)

Errors carry the ``X-Error-Code`` header (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) that the client
turns into ``RepositoryNotFoundError`` / ``RevisionNotFoundError`` / ``EntryNotFoundError``. The absolute URLs of the
answers (repository, commit, LFS upload and verify) start with the server's :attr:`~LocalHubServer.endpoint`, or with
the address named by the request's ``X-Forwarded-Host`` / ``X-Forwarded-Proto`` headers when a forwarding client
sends them.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["LocalHubServer", "hub_server", "local_hub", "use_hub_endpoint"]

#: Files with these suffixes always go through LFS (like the default ``.gitattributes`` of a new Hub repository).
LFS_SUFFIXES: tuple[str, ...] = (
    ".bin",
    ".ckpt",
    ".gguf",
    ".h5",
    ".msgpack",
    ".npy",
    ".npz",
    ".onnx",
    ".pickle",
    ".pkl",
    ".pt",
    ".pth",
    ".safetensors",
    ".tar",
    ".zip",
)

_DEFAULT_GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_FORWARDED_HOST_RE = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$")
_CHUNK = 1 << 20


class _HubError(Exception):
    """An HTTP error answer, with the ``X-Error-Code`` the Hub client understands."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


@dataclass
class _File:
    sha256: str  # key of the content in the object store
    size: int
    lfs: bool
    git_oid: str  # git blob id: of the content for regular files, of the LFS pointer for LFS files

    @property
    def pointer_size(self) -> int:
        return len(_lfs_pointer(self.sha256, self.size))


@dataclass
class _Commit:
    oid: str
    parent: str | None
    title: str
    description: str
    date: str
    files: dict[str, _File] = field(default_factory=dict)


@dataclass
class _Repo:
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def _check_path(path: str) -> str:
    """Reject paths that could escape a repository or that git would not store."""
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or parts[0] == ".git":
        raise _HubError(400, f"Invalid path in repository: {path!r}")
    return path


class LocalHubServer:
    """Hub-protocol server on ``127.0.0.1`` for tests (standard library only).

    Args:
        root: directory holding the repositories (``hub.json``) and the content-addressed objects (``objects/``).
            A temporary directory, removed by :meth:`stop`, when not given.
        user: name returned by ``whoami`` and namespace of repositories created without one.
        token: if given, the only accepted token; otherwise any bearer token is accepted. Writes (create, upload,
            commit, delete) always need a token; reads need one for private repositories only.
        lfs_threshold: files of at least this many bytes are uploaded through LFS. Binary files (a NUL byte in the
            first 512 bytes the client sends as sample) and files with a suffix of :data:`LFS_SUFFIXES` always are.
        max_body_bytes: largest request body accepted, to keep the server bounded.

    Use it as a context manager, or call :meth:`start` / :meth:`stop`. :attr:`endpoint` is its base URL, to give as
    ``HfApi(endpoint=...)`` or to :func:`use_hub_endpoint`.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        user: str = "tester",
        token: str | None = None,
        lfs_threshold: int = 10 * 1024 * 1024,
        max_body_bytes: int = 1 << 30,
    ) -> None:
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="local-hub-") if root is None else root)
        self.user = user
        self.token = token
        self.lfs_threshold = lfs_threshold
        self.max_body_bytes = max_body_bytes
        #: ``(method, path)`` of the requests served, newest last (bounded).
        self.requests: collections.deque[tuple[str, str]] = collections.deque(maxlen=10_000)
        #: tracebacks of unexpected server-side errors (answered with a 500), for debugging.
        self.errors: list[str] = []
        self._lock = threading.RLock()
        self._repos: dict[str, _Repo] = {}
        self._httpd: _HubHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._load()

    # ------------------------------------------------------------------ lifecycle
    @property
    def endpoint(self) -> str:
        """Base URL of the running server, e.g. ``http://127.0.0.1:54321``."""
        if self._httpd is None:
            raise RuntimeError("LocalHubServer is not started.")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LocalHubServer:
        """Bind ``127.0.0.1`` on a free port and serve in a daemon thread."""
        if self._httpd is not None:
            return self
        httpd = _HubHTTPServer(("127.0.0.1", 0), _HubRequestHandler)
        httpd.hub = self
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), name="local-hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the socket and remove the temporary storage (if the server created it)."""
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalHubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ inspection helpers
    def repo_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._repos)

    def head(self, repo_id: str, revision: str = "main") -> str:
        """Commit id ``revision`` points at."""
        with self._lock:
            return self._resolve(self._get_repo(repo_id, self.user), revision).oid

    def file_bytes(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        """Content of a file of a repository, read directly from the store."""
        with self._lock:
            entry = self._resolve(self._get_repo(repo_id, self.user), revision).files.get(path)
        if entry is None:
            raise FileNotFoundError(f"{path!r} is not in {repo_id!r} at {revision!r}")
        return self._object_path(entry.sha256).read_bytes()

    # ------------------------------------------------------------------ storage
    @property
    def _state_file(self) -> Path:
        return self.root / "hub.json"

    def _object_path(self, sha256: str) -> Path:
        return self.root / "objects" / sha256[:2] / sha256

    def _has_object(self, sha256: str, size: int | None = None) -> bool:
        path = self._object_path(sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def _store_bytes(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self._object_path(sha256)
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{sha256}.{uuid.uuid4().hex}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return sha256

    def _load(self) -> None:
        if not self._state_file.is_file():
            return
        raw = json.loads(self._state_file.read_text())
        for repo_id, repo in raw.get("repos", {}).items():
            commits = {
                oid: _Commit(**{**c, "files": {p: _File(**f) for p, f in c["files"].items()}})
                for oid, c in repo["commits"].items()
            }
            self._repos[repo_id] = _Repo(
                repo_id=repo_id,
                private=repo["private"],
                created_at=repo["created_at"],
                branches=dict(repo["branches"]),
                commits=commits,
            )

    def _save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        data = {"repos": {repo_id: asdict(repo) for repo_id, repo in self._repos.items()}}
        tmp = self._state_file.with_name(f"hub.json.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self._state_file)

    # ------------------------------------------------------------------ model
    def _check_token(self, authorization: str | None, required: bool) -> str | None:
        """User name of the request, ``None`` for anonymous reads."""
        token = None
        if authorization and authorization.lower().startswith("bearer "):
            token = authorization[7:].strip() or None
        if token is None:
            if required:
                raise _HubError(401, "Authorization header is required: pass a token.")
            return None
        if self.token is not None and token != self.token:
            raise _HubError(401, "Invalid credentials in Authorization header")
        return self.user

    def _get_repo(self, repo_id: str, user: str | None) -> _Repo:
        repo = self._repos.get(repo_id)
        if repo is None or (repo.private and user is None):
            raise _HubError(404, f"Repository {repo_id!r} not found", code="RepoNotFound")
        return repo

    def _resolve(self, repo: _Repo, revision: str, *, branch_only: bool = False) -> _Commit:
        oid = repo.branches.get(revision)
        if oid is None and not branch_only and _COMMIT_RE.fullmatch(revision):
            oid = revision if revision in repo.commits else None
        if oid is None:
            what = "branch" if branch_only else "revision"
            raise _HubError(
                404, f"Invalid rev id: {revision} ({what} not found in {repo.repo_id!r})", code="RevisionNotFound"
            )
        return repo.commits[oid]

    def _new_commit(self, repo: _Repo, parent: _Commit | None, title: str, description: str, files: dict) -> _Commit:
        seed = json.dumps([repo.repo_id, parent.oid if parent else None, title, sorted(files), uuid.uuid4().hex])
        oid = hashlib.sha1(seed.encode()).hexdigest()
        commit = _Commit(
            oid=oid, parent=parent.oid if parent else None, title=title, description=description, date=_now()
        )
        commit.files = files
        repo.commits[oid] = commit
        return commit

    def _create_repo(self, body: dict[str, Any], user: str, base_url: str | None = None) -> dict[str, Any]:
        repo_type = body.get("type") or "model"
        if repo_type != "model":
            raise _HubError(400, f"LocalHubServer only hosts model repositories, not {repo_type!r}.")
        name, namespace = body.get("name"), body.get("organization") or user
        if not isinstance(name, str) or not _NAME_RE.match(name) or not _NAME_RE.match(namespace):
            raise _HubError(400, f"Invalid repository name: {namespace}/{name}")
        repo_id = f"{namespace}/{name}"
        url = f"{base_url or self.endpoint}/{repo_id}"
        with self._lock:
            if repo_id in self._repos:
                raise _HubError(409, "You already created this model repo", headers={"X-Repo-Url": url})
            private = body.get("visibility") == "private" or bool(body.get("private"))
            repo = _Repo(repo_id=repo_id, private=private, created_at=_now())
            gitattributes = _DEFAULT_GITATTRIBUTES.encode()
            files = {
                ".gitattributes": _File(
                    self._store_bytes(gitattributes), len(gitattributes), False, _git_blob_id(gitattributes)
                )
            }
            repo.branches["main"] = self._new_commit(repo, None, "initial commit", "", files).oid
            self._repos[repo_id] = repo
            self._save()
        return {"url": url, "name": repo_id, "id": repo_id}

    def _delete_repo(self, body: dict[str, Any], user: str) -> None:
        repo_id = f"{body.get('organization') or user}/{body.get('name')}"
        with self._lock:
            self._get_repo(repo_id, user)
            del self._repos[repo_id]
            self._save()

    def _repo_info(self, repo_id: str, revision: str, user: str | None) -> dict[str, Any]:
        with self._lock:
            repo = self._get_repo(repo_id, user)
            commit = self._resolve(repo, revision)
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path, "size": entry.size, "blobId": entry.git_oid}
            if entry.lfs:
                sibling["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": entry.pointer_size}
            siblings.append(sibling)
        return {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }

    def _is_lfs(self, path: str, size: int, sample: bytes) -> bool:
        return size > 0 and (size >= self.lfs_threshold or b"\x00" in sample or path.lower().endswith(LFS_SUFFIXES))

    def _preupload(self, repo_id: str, revision: str, body: dict[str, Any], user: str) -> dict[str, Any]:
        with self._lock:
            commit = self._resolve(self._get_repo(repo_id, user), revision)
        files = body.get("files")
        if not isinstance(files, list):
            raise _HubError(400, "Expected a 'files' list.")
        answer = []
        for item in files:
            path = _check_path(str(item.get("path", "")))
            try:
                sample = base64.b64decode(item.get("sample", ""), validate=True)
            except ValueError as err:
                raise _HubError(400, f"Invalid base64 sample for {path!r}") from err
            lfs = self._is_lfs(path, int(item.get("size", 0)), sample)
            existing = commit.files.get(path)
            remote_oid = None if existing is None else (existing.sha256 if existing.lfs else existing.git_oid)
            answer.append(
                {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": remote_oid}
            )
        return {"files": answer, "commitOid": commit.oid}

    def _commit(
        self, repo_id: str, revision: str, lines: list[dict[str, Any]], user: str, base_url: str | None = None
    ) -> dict[str, Any]:
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "The first ndjson line of a commit must be its header.")
        header = lines[0].get("value") or {}
        title = str(header.get("summary") or "").strip()
        if not title:
            raise _HubError(400, "A commit needs a summary.")
        with self._lock:
            repo = self._get_repo(repo_id, user)
            head = self._resolve(repo, revision, branch_only=True)
            parent = header.get("parentCommit")
            if parent is not None and parent != head.oid:
                raise _HubError(412, f"A commit has happened since {parent}: {revision} is at {head.oid}.")
            files = dict(head.files)
            for line in lines[1:]:
                self._apply_operation(files, line.get("key"), line.get("value") or {})
            directories = {"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)}
            if clash := sorted(directories & set(files)):
                raise _HubError(400, f"{clash[0]!r} would be both a file and a folder.")
            commit = self._new_commit(repo, head, title, str(header.get("description") or ""), files)
            repo.branches[revision] = commit.oid
            self._save()
        return {
            "success": True,
            "commitOid": commit.oid,
            "commitUrl": f"{base_url or self.endpoint}/{repo_id}/commit/{commit.oid}",
            "pullRequestUrl": None,
        }

    def _apply_operation(self, files: dict[str, _File], key: str | None, value: dict[str, Any]) -> None:
        path = str(value.get("path", ""))
        if key == "file":
            _check_path(path)
            encoding = value.get("encoding", "base64")
            content = value.get("content", "")
            data = base64.b64decode(content) if encoding == "base64" else str(content).encode()
            files[path] = _File(self._store_bytes(data), len(data), False, _git_blob_id(data))
        elif key == "lfsFile":
            _check_path(path)
            oid, size = str(value.get("oid", "")), value.get("size")
            if value.get("algo", "sha256") != "sha256" or not _SHA256_RE.match(oid):
                raise _HubError(400, f"Invalid LFS oid for {path!r}.")
            if not self._has_object(oid):
                raise _HubError(422, f"LFS object {oid} of {path!r} was not uploaded (use the LFS batch API first).")
            real_size = self._object_path(oid).stat().st_size
            if size is not None and int(size) != real_size:
                raise _HubError(422, f"LFS object {oid} has {real_size} bytes, the commit says {size}.")
            files[path] = _File(oid, real_size, True, _git_blob_id(_lfs_pointer(oid, real_size)))
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise _HubError(404, f"A file with this name doesn't exist: {path!r}", code="EntryNotFound")
        elif key == "deletedFolder":
            prefix = path.rstrip("/") + "/"
            doomed = [p for p in files if p.startswith(prefix)] if prefix != "/" else list(files)
            if not doomed:
                raise _HubError(404, f"A folder with this name doesn't exist: {path!r}", code="EntryNotFound")
            for p in doomed:
                del files[p]
        else:
            raise _HubError(
                400,
                f"Unsupported commit operation {key!r} (known: file, lfsFile, deletedFile, deletedFolder).",
            )

    def _tree(self, repo_id: str, revision: str, path: str, recursive: bool, user: str | None) -> list[dict]:
        with self._lock:
            commit = self._resolve(self._get_repo(repo_id, user), revision)
        path = path.strip("/")
        prefix = f"{path}/" if path else ""
        below = {p: f for p, f in commit.files.items() if p.startswith(prefix)}
        if path and not below:
            raise _HubError(404, f"{path!r} is not a folder of {repo_id!r} at {revision!r}", code="EntryNotFound")
        folders: dict[str, list[str]] = collections.defaultdict(list)
        for p in below:
            parts = p[len(prefix) :].split("/")
            for i in range(1, len(parts)):
                folders[prefix + "/".join(parts[:i])].append(p)
        entries: list[dict[str, Any]] = []
        for folder in sorted(folders):
            if recursive or "/" not in folder[len(prefix) :]:
                tree_oid = hashlib.sha1("".join(below[p].git_oid + p for p in sorted(folders[folder])).encode())
                entries.append({"type": "directory", "oid": tree_oid.hexdigest(), "path": folder})
        for p, entry in sorted(below.items()):
            if recursive or "/" not in p[len(prefix) :]:
                item: dict[str, Any] = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": p}
                if entry.lfs:
                    item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
                entries.append(item)
        return entries

    def _lfs_batch(self, repo_id: str, body: dict[str, Any], user: str, base_url: str | None = None) -> dict[str, Any]:
        with self._lock:
            self._get_repo(repo_id, user)
        if body.get("operation") != "upload":
            raise _HubError(422, "LocalHubServer only supports the LFS 'upload' operation (downloads use /resolve).")
        transfers = body.get("transfers") or ["basic"]
        if "basic" not in transfers:
            raise _HubError(422, f"LocalHubServer only offers the 'basic' LFS transfer, not {transfers}.")
        objects = []
        for obj in body.get("objects") or []:
            oid, size = str(obj.get("oid", "")), obj.get("size")
            if not _SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
                objects.append(
                    {"oid": oid, "size": int(size or 0), "error": {"code": 422, "message": "Invalid object"}}
                )
            elif self._has_object(oid, size):
                objects.append({"oid": oid, "size": size})  # no "actions": already stored
            else:
                base = base_url or self.endpoint
                actions = {
                    "upload": {"href": f"{base}/_lfs/upload/{oid}?size={size}"},
                    "verify": {"href": f"{base}/_lfs/verify"},
                }
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": actions})
        return {"transfer": "basic", "objects": objects}

    def _lfs_store(self, oid: str, expected_size: int | None, chunks: Iterator[bytes]) -> None:
        if not _SHA256_RE.match(oid):
            raise _HubError(400, f"Invalid LFS oid {oid!r}")
        path = self._object_path(oid)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{oid}.{uuid.uuid4().hex}.tmp")
        digest, size = hashlib.sha256(), 0
        try:
            with tmp.open("wb") as out:
                for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
            if digest.hexdigest() != oid:
                raise _HubError(400, f"Uploaded content does not match oid {oid} (got {digest.hexdigest()}).")
            if expected_size is not None and size != expected_size:
                raise _HubError(400, f"Uploaded {size} bytes for {oid}, expected {expected_size}.")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _file_for_download(self, repo_id: str, revision: str, path: str, user: str | None) -> tuple[_Commit, _File]:
        with self._lock:
            commit = self._resolve(self._get_repo(repo_id, user), revision)
        entry = commit.files.get(path)
        if entry is None:
            raise _HubError(
                404,
                f"{path!r} does not exist in {repo_id!r} at {revision!r}",
                code="EntryNotFound",
                headers={"X-Repo-Commit": commit.oid},
            )
        return commit, entry


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = False
    hub: LocalHubServer


class _HubRequestHandler(BaseHTTPRequestHandler):
    """Routes one request to :class:`LocalHubServer` (HTTP/1.0: one request per connection, nothing lingers)."""

    server: _HubHTTPServer
    protocol_version = "HTTP/1.0"
    server_version = "LocalHubServer/1.0"

    # ------------------------------------------------------------------ plumbing
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (silence the default stderr log)
        pass

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    @property
    def hub(self) -> LocalHubServer:
        return self.server.hub

    def _dispatch(self, method: str) -> None:
        self.hub.requests.append((method, self.path))
        try:
            self._route(method)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away
        except _HubError as err:
            self._send_json(err.status, {"error": err.message}, headers=self._error_headers(err), method=method)
        except (ValueError, KeyError, TypeError) as err:  # malformed JSON / ndjson / base64 / numbers
            error = _HubError(400, f"Bad request: {type(err).__name__}: {err}")
            self._send_json(400, {"error": error.message}, headers=self._error_headers(error), method=method)
        except Exception as err:  # a bug of the server: answer instead of dropping the connection
            self.hub.errors.append(traceback.format_exc())
            error = _HubError(500, f"LocalHubServer error: {type(err).__name__}: {err}")
            self._send_json(500, {"error": error.message}, headers=self._error_headers(error), method=method)

    @staticmethod
    def _error_headers(err: _HubError) -> dict[str, str]:
        message = err.message.replace("\n", " ")[:500].encode("ascii", "backslashreplace").decode("ascii")
        headers = {"X-Error-Message": message, **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        return headers

    def _iter_body(self) -> Iterator[bytes]:
        """The request body by pieces, whether sent with ``Content-Length`` or chunked."""
        limit, total = self.hub.max_body_bytes, 0
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                total += size
                if total > limit:
                    raise _HubError(413, "Request body too large.")
                yield self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > limit:
            raise _HubError(413, "Request body too large.")
        while length > 0:
            chunk = self.rfile.read(min(length, _CHUNK))
            if not chunk:
                raise _HubError(400, "Request body ended early.")
            length -= len(chunk)
            yield chunk

    def _body(self) -> bytes:
        return b"".join(self._iter_body())

    def _json_body(self) -> dict[str, Any]:
        body = self._body()
        value = json.loads(body) if body.strip() else {}
        if not isinstance(value, dict):
            raise _HubError(400, "Expected a JSON object.")
        return value

    def _send_json(
        self,
        status: int,
        payload: Any,
        *,
        headers: dict[str, str] | None = None,
        method: str = "GET",
        content_type: str = "application/json",
    ) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    def _user(self, required: bool) -> str | None:
        return self.hub._check_token(self.headers.get("Authorization"), required)

    def _base_url(self) -> str:
        """The base URL the client addressed: the server's own, or the one a forwarding client names in
        ``X-Forwarded-Host`` / ``X-Forwarded-Proto`` (so that the URLs in the answers are the client's)."""
        host, proto = self.headers.get("X-Forwarded-Host"), self.headers.get("X-Forwarded-Proto") or "http"
        if host and _FORWARDED_HOST_RE.match(host) and proto in ("http", "https"):
            return f"{proto}://{host}"
        return self.hub.endpoint

    # ------------------------------------------------------------------ routes
    def _route(self, method: str) -> None:
        hub = self.hub
        split = urlsplit(self.path)
        query = parse_qs(split.query)
        segs = [unquote(s) for s in split.path.split("/")[1:]]

        if segs[:2] == ["api", "telemetry"]:
            self._body()
            return self._send_json(200, {}, method=method)
        if segs == ["api", "whoami-v2"] and method == "GET":
            user = self._user(required=True)
            return self._send_json(200, _whoami(user or hub.user))
        if segs == ["api", "repos", "create"] and method == "POST":
            user = self._user(required=True)
            try:
                return self._send_json(200, hub._create_repo(self._json_body(), user or hub.user, self._base_url()))
            except _HubError as err:
                if err.status != 409:
                    raise
                # The client reads "url" from the 409 answer when ``exist_ok=True``.
                body = {"error": err.message, "url": err.headers["X-Repo-Url"]}
                return self._send_json(409, body, headers=self._error_headers(err))
        if segs == ["api", "repos", "delete"] and method == "DELETE":
            user = self._user(required=True)
            hub._delete_repo(self._json_body(), user or hub.user)
            return self._send_json(200, {})
        if segs == ["api", "validate-yaml"] and method == "POST":
            self._body()
            return self._send_json(200, {"errors": [], "warnings": []})

        if len(segs) >= 4 and segs[0] == "api" and segs[1] in ("models", "datasets", "spaces", "kernels"):
            if segs[1] != "models":
                raise _HubError(404, "LocalHubServer only hosts model repositories.", code="RepoNotFound")
            repo_id, rest = f"{segs[2]}/{segs[3]}", segs[4:]
            if method == "GET" and (not rest or (len(rest) == 2 and rest[0] == "revision")):
                user = self._user(required=False)
                return self._send_json(200, hub._repo_info(repo_id, rest[1] if rest else "main", user))
            if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                user = self._user(required=True)
                return self._send_json(200, hub._preupload(repo_id, rest[1], self._json_body(), user or hub.user))
            if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                user = self._user(required=True)
                if query.get("create_pr", ["0"])[0] not in ("0", "", "false", "False"):
                    raise _HubError(400, "LocalHubServer does not support pull requests (create_pr).")
                lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
                return self._send_json(200, hub._commit(repo_id, rest[1], lines, user or hub.user, self._base_url()))
            if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                user = self._user(required=False)
                recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                entries = hub._tree(repo_id, rest[1], "/".join(rest[2:]), recursive, user)
                return self._send_json(200, entries)

        if segs[:1] == ["_lfs"]:
            if method == "PUT" and len(segs) == 3 and segs[1] == "upload":
                size = query.get("size", [None])[0]
                hub._lfs_store(segs[2], int(size) if size is not None else None, self._iter_body())
                return self._send_json(200, {})
            if method == "POST" and segs[1:] == ["verify"]:
                body = self._json_body()
                if not hub._has_object(str(body.get("oid", "")), body.get("size")):
                    raise _HubError(404, f"LFS object {body.get('oid')} is not stored.")
                return self._send_json(200, {})

        if (
            method == "POST"
            and len(segs) == 6
            and segs[1].endswith(".git")
            and segs[2:] == ["info", "lfs", "objects", "batch"]
        ):
            user = self._user(required=True)
            answer = hub._lfs_batch(f"{segs[0]}/{segs[1][:-4]}", self._json_body(), user or hub.user, self._base_url())
            return self._send_json(200, answer, content_type="application/vnd.git-lfs+json")

        if method in ("GET", "HEAD") and len(segs) >= 5 and segs[2] == "resolve":
            user = self._user(required=False)
            return self._send_file(method, f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]), user)

        raise _HubError(404, f"LocalHubServer has no route for {method} {split.path}")

    def _send_file(self, method: str, repo_id: str, revision: str, path: str, user: str | None) -> None:
        hub = self.hub
        commit, entry = hub._file_for_download(repo_id, revision, path, user)
        start, end, status = 0, entry.size - 1, 200
        range_header = self.headers.get("Range")
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", range_header.strip()) if range_header else None
        if match and entry.size > 0 and (match.group(1) or match.group(2)):
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), entry.size - 1) if match.group(2) else entry.size - 1
            else:  # suffix range: the last N bytes
                start = max(entry.size - int(match.group(2)), 0)
            if start > end:
                raise _HubError(416, f"Range {range_header!r} is outside of the {entry.size} bytes of {path!r}.")
            status = 206
        length = end - start + 1 if entry.size else 0
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("X-Repo-Commit", commit.oid)
        if entry.lfs:
            self.send_header("ETag", f'"{entry.sha256}"')
            self.send_header("X-Linked-Etag", f'"{entry.sha256}"')
            self.send_header("X-Linked-Size", str(entry.size))
        else:
            self.send_header("ETag", f'"{entry.git_oid}"')
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{entry.size}")
        self.end_headers()
        if method == "HEAD" or length == 0:
            return
        with hub._object_path(entry.sha256).open("rb") as handle:
            handle.seek(start)
            remaining = length
            while remaining > 0:
                chunk = handle.read(min(remaining, _CHUNK))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)


def _whoami(user: str) -> dict[str, Any]:
    return {
        "type": "user",
        "id": hashlib.sha1(user.encode()).hexdigest()[:24],
        "name": user,
        "fullname": user,
        "email": f"{user}@localhost",
        "emailVerified": True,
        "canPay": False,
        "isPro": False,
        "periodEnd": None,
        "avatarUrl": "",
        "orgs": [],
        "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}},
    }


# ---------------------------------------------------------------------- pointing the client at the server
_MISSING = object()


class _RefusedHost(RuntimeError):
    """A request to a host that is neither the Hub nor the local server (tests never leave the machine)."""


def _forwarding_client_factory(endpoint: str):
    """A ``huggingface_hub`` HTTP client factory whose clients send the Hub's requests to ``endpoint``.

    Requests to the client's configured Hub host (``constants.ENDPOINT``, read when the client is made) go to the
    local server, with ``X-Forwarded-Host`` / ``X-Forwarded-Proto`` naming the address the client used, so that the
    URLs in the answers (repository, commit and LFS upload URLs) are the ones the client expects; the response keeps
    the original request. Requests to the server itself pass through; any other host is refused. Environment proxies
    are not used (an explicit transport ignores them). Like the default client, it refuses every request in offline
    mode, follows redirects and has no timeout.
    """
    import httpx2
    from huggingface_hub import constants, is_offline_mode
    from huggingface_hub.errors import OfflineModeIsEnabled

    target = httpx2.URL(endpoint)

    class ForwardingTransport(httpx2.BaseTransport):
        def __init__(self) -> None:
            self.hub_host = (urlsplit(constants.ENDPOINT).hostname or "").lower()
            self.transport = httpx2.HTTPTransport()

        def handle_request(self, request: httpx2.Request) -> httpx2.Response:
            url = request.url
            if url.host == self.hub_host and (url.host, url.port) != (target.host, target.port):
                headers = request.headers.copy()
                headers["Host"] = target.netloc.decode("ascii")
                headers["X-Forwarded-Host"] = url.netloc.decode("ascii")
                headers["X-Forwarded-Proto"] = url.scheme
                url = url.copy_with(scheme=target.scheme, host=target.host, port=target.port)
                request = httpx2.Request(
                    request.method, url, headers=headers, stream=request.stream, extensions=request.extensions
                )
            elif (url.host, url.port) != (target.host, target.port):
                raise _RefusedHost(f"The client pointed at {endpoint} does not reach other hosts; got {url}.")
            return self.transport.handle_request(request)

        def close(self) -> None:
            self.transport.close()

    def refuse_offline(request: httpx2.Request) -> None:
        if is_offline_mode():
            raise OfflineModeIsEnabled(f"Cannot reach {request.url}: offline mode is enabled.")

    def factory() -> httpx2.Client:
        return httpx2.Client(
            transport=ForwardingTransport(),
            event_hooks={"request": [refuse_offline]},
            follow_redirects=True,
            timeout=None,
        )

    return factory


def _current_client_factory():
    """The client factory in use, to give back to ``set_client_factory`` afterwards (there is no public getter)."""
    from huggingface_hub.utils import _http

    return _http._GLOBAL_CLIENT_FACTORY


def _client_settings(endpoint: str, offline: bool) -> tuple[dict[str, str], list[tuple[Any, str, Any]]]:
    """Environment variables (for subprocesses) and the ``huggingface_hub.constants`` without a runtime setting."""
    from huggingface_hub import constants

    host = urlsplit(endpoint).hostname or "127.0.0.1"
    no_proxy = ",".join(x for x in (os.environ.get("NO_PROXY") or os.environ.get("no_proxy"), host, "localhost") if x)
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "1" if offline else "0",
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    }
    constant_values: list[tuple[Any, str, Any]] = [
        (constants, "HF_HUB_DISABLE_XET", True),
        (constants, "HF_HUB_OFFLINE", offline),
    ]
    return env, constant_values


@contextmanager
def use_hub_endpoint(endpoint: str, *, offline: bool = False) -> Iterator[str]:
    """Point the (already imported) ``huggingface_hub`` client at ``endpoint``; restore everything on exit.

    ``huggingface_hub`` reads its environment variables once, when it is imported. Where it has a public setting,
    this uses it; the rest it sets and restores by hand:

    * the HTTP client, through the public ``huggingface_hub.set_client_factory``: its clients send every request
      for the configured Hub host (``https://huggingface.co`` unless ``HF_ENDPOINT`` said otherwise at import) to
      ``endpoint``, refuse any other host but ``endpoint`` itself and ignore environment proxies. So the module-level
      functions (``create_repo``, ``upload_folder``, ``hf_hub_download``, ``snapshot_download``, ... as called by
      ``transformers.Trainer.push_to_hub`` and diffusers' ``push_to_hub`` / ``from_pretrained``) and every
      ``HfApi()``, made before or inside the block, reach the local server while ``constants.ENDPOINT`` and
      ``HfApi().endpoint`` keep their value. Code that takes an endpoint can be given ``endpoint`` directly
      (``HfApi(endpoint=...)``, ``hf_hub_download(..., endpoint=...)``, ``snapshot_download(endpoint=...)``). On exit
      the previous factory is set again (read from ``huggingface_hub.utils._http``, which has no public getter);
    * the environment variables ``HF_ENDPOINT``, ``HF_HUB_DISABLE_XET``, ``HF_HUB_OFFLINE`` and ``NO_PROXY`` (the
      loopback host added), read at import by ``huggingface_hub`` in a subprocess, which then talks to ``endpoint``
      directly;
    * ``constants.HF_HUB_OFFLINE`` (to ``offline``), which has no runtime setting: the client refuses every request
      while it is true, and the tests' ``conftest.py`` turns it on for the session;
    * ``constants.HF_HUB_DISABLE_XET = True``, which has no runtime or per-call setting: with ``hf_xet`` installed the
      client uploads through the Xet protocol, decided on the client side only (``is_xet_available``), which a
      local server does not speak; disabled, the client uses the regular and LFS paths the server implements.

    Values set by someone else *inside* the block are overwritten by the restoration on exit: in pytest, prefer the
    ``local_hub`` fixture, which applies the same settings through ``monkeypatch``.
    """
    from huggingface_hub import set_client_factory

    endpoint = endpoint.rstrip("/")
    env, constant_values = _client_settings(endpoint, offline)
    saved_env = {key: os.environ.get(key) for key in env}
    saved_constants = [(obj, name, getattr(obj, name, _MISSING)) for obj, name, _ in constant_values]
    saved_factory = _current_client_factory()
    try:
        os.environ.update(env)
        for obj, name, value in constant_values:
            setattr(obj, name, value)
        set_client_factory(_forwarding_client_factory(endpoint))
        yield endpoint
    finally:
        set_client_factory(saved_factory)
        for key, old in saved_env.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
        for obj, name, old in reversed(saved_constants):
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)


# ---------------------------------------------------------------------- pytest fixtures
try:
    import pytest
except ImportError:  # pragma: no cover - pytest is a test dependency only
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture
    def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHubServer]:
        """A started :class:`LocalHubServer` (storage in a pytest temporary directory), stopped after the test."""
        with LocalHubServer(tmp_path_factory.mktemp("local-hub")) as server:
            yield server

    @pytest.fixture
    def local_hub(
        hub_server: LocalHubServer, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
    ) -> Iterator[LocalHubServer]:
        """:func:`hub_server`, with ``huggingface_hub`` pointed at it, online, and a private, empty HF home/cache.

        Online: ``HF_HUB_OFFLINE=0`` and ``huggingface_hub.constants.HF_HUB_OFFLINE = False`` for this test only
        (``tests/conftest.py`` turns the offline mode on for the session). Nothing is read from or written to the
        user's Hugging Face cache or token: ``HF_HOME``/``HF_HUB_CACHE`` point at a temporary directory and
        ``HF_TOKEN`` is unset. ``huggingface_hub`` reads those variables at import only, and its cache and token
        paths have no runtime setting, so the matching ``constants`` (``HF_HOME``, ``HF_HUB_CACHE``,
        ``HF_TOKEN_PATH``, ``HF_STORED_TOKENS_PATH``) are set too, for the downloads and uploads that take no
        ``cache_dir`` / ``token`` argument (``from_pretrained`` without ``cache_dir``, ``Trainer.push_to_hub``).
        """
        from huggingface_hub import constants, set_client_factory

        home = tmp_path_factory.mktemp("hf-home")
        cache = home / "hub"
        monkeypatch.setenv("HF_HOME", str(home))
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HOME", str(home))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
        # the same settings as ``use_hub_endpoint``, through ``monkeypatch`` so that they unwind in order with the
        # test's own ``monkeypatch`` calls (e.g. ``monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)``)
        env, constant_values = _client_settings(hub_server.endpoint, offline=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        for obj, name, value in constant_values:
            monkeypatch.setattr(obj, name, value)
        saved_factory = _current_client_factory()
        set_client_factory(_forwarding_client_factory(hub_server.endpoint))
        try:
            yield hub_server
        finally:
            set_client_factory(saved_factory)
