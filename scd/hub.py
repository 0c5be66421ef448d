"""Hugging Face Hub references: parse `owner/name[:path][@revision]`, download, push.

Everything goes through the real `huggingface_hub` client; this module only decides what to ask
for and turns every failure into a `HubError` whose message says what to do next. Downloads land in
the standard Hub cache (`HF_HUB_CACHE`, or `HF_HOME/hub`), where `huggingface_hub` makes them
crash-safe: each file is written to a process-unique `.incomplete` file under a file lock and
renamed into place only once its size checks out, so an interrupted download never leaves a file
that a later run would use.

`huggingface_hub` reads `HF_ENDPOINT`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE` and the token location once,
at import. scd reads them from the environment at every call and passes them explicitly, so a
long-lived process (or a test) that changes them is obeyed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from scd.errors import HubError

# huggingface_hub otherwise calls its import-time endpoint for telemetry on the first request of a
# process; scd asks the Hub for the files the user named and nothing else.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

DEFAULT_ENDPOINT = "https://huggingface.co"
MODEL_FILES = ("config.json", "model.safetensors", "README.md", "codec/*")

# Hub repo ids: alphanumerics, '-', '_', '.'; neither part starts or ends with '-' or '.'.
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"{_NAME}/{_NAME}")
# Git ref names cannot contain ':', so the first ':' ends the repo id; paths in a reference cannot hold '@'.
_REF = re.compile(r"(?P<repo>[^:@]+)(?::(?P<path>[^@]*))?(?:@(?P<revision>.*))?")


@dataclass(frozen=True)
class HubRef:
    """A Hub model repository, optionally pinned to a revision and pointing at one path inside it."""

    repo_id: str
    revision: str | None = None  # branch, tag or commit sha; None is the default branch
    path_in_repo: str | None = None

    def __str__(self) -> str:
        path = f":{self.path_in_repo}" if self.path_in_repo else ""
        revision = f"@{self.revision}" if self.revision else ""
        return f"{self.repo_id}{path}{revision}"


# ----------------------------------------------------------------------------- parsing

def _looks_like_local_path(text: str) -> bool:
    return (text.startswith(("/", "./", "../", "~", "\\")) or text in (".", "..")
            or bool(re.match(r"[A-Za-z]:[\\/]", text)))


def _valid_repo_id(repo_id: str) -> bool:
    return bool(_REPO_ID.fullmatch(repo_id)) and "--" not in repo_id and ".." not in repo_id \
        and not repo_id.endswith(".git")


def _check_repo_id(repo_id: str, text: str) -> None:
    if not _valid_repo_id(repo_id):
        raise HubError(f"{text!r} is neither an existing local path nor a Hub reference: "
                       "write owner/name, owner/name@revision or owner/name:path/in/repo@revision")


def _check_revision(revision: str, text: str) -> None:
    if (not revision or re.search(r"[\s~^?*\[\\]", revision) or ".." in revision or "//" in revision
            or revision.startswith(("/", "-")) or revision.endswith(("/", ".lock", "."))):
        raise HubError(f"{text!r} has an invalid revision {revision!r}: give a branch, tag or commit sha after '@'")


def _check_path(path: str, text: str) -> None:
    parts = path.split("/")
    if not path or "\\" in path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise HubError(f"{text!r} has an invalid path {path!r}: give a relative path inside the repo after ':', "
                       "like owner/name:weights/model.pth")


def parse_hub_ref(text: str) -> HubRef | None:
    """Parse `owner/name`, `owner/name@rev`, `owner/name:path/in/repo` or `owner/name:path/in/repo@rev`.

    Returns None when `text` is an existing local path or is written as one (absolute, `./`, `~`), so
    the caller can treat it as a file or folder. Raises `HubError` for anything else that is not a
    valid reference.
    """
    text = str(text).strip()
    if not text or Path(text).expanduser().exists() or _looks_like_local_path(text):
        return None
    match = _REF.fullmatch(text)
    if match is None:
        raise HubError(f"{text!r} is not a Hub reference: write owner/name, owner/name@revision "
                       "or owner/name:path/in/repo@revision")
    repo_id, path, revision = match["repo"], match["path"], match["revision"]
    _check_repo_id(repo_id, text)
    if path is not None:
        _check_path(path, text)
    if revision is not None:
        _check_revision(revision, text)
    return HubRef(repo_id, revision, path)


# ----------------------------------------------------------------------------- environment

def _is_true(value: str | None) -> bool:
    return value is not None and value.strip().upper() in ("1", "ON", "YES", "TRUE")


def _hf_home() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(os.path.expandvars(os.environ.get("HF_HOME", str(default)))).expanduser()


def _endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _cache_dir() -> Path:
    folder = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    return Path(os.path.expandvars(folder)).expanduser() if folder else _hf_home() / "hub"


def _offline() -> bool:
    return _is_true(os.environ.get("HF_HUB_OFFLINE")) or _is_true(os.environ.get("TRANSFORMERS_OFFLINE"))


def _token() -> str | bool:
    """HF_TOKEN, else the token `hf auth login` stored under HF_HOME, else False (send none)."""
    token = os.environ.get("HF_TOKEN", "").strip()
    if token:
        return token
    stored = Path(os.path.expandvars(os.environ.get("HF_TOKEN_PATH", str(_hf_home() / "token")))).expanduser()
    try:
        token = stored.read_text().strip()
    except OSError:
        return False
    return token or False


def _silent_tqdm():
    # Library code never prints: huggingface_hub's bars would draw on stderr.
    from huggingface_hub.utils import tqdm as hf_tqdm

    class Silent(hf_tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent


# ----------------------------------------------------------------------------- errors

def _caused_by(err: BaseException, kinds) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kinds):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _elsewhere(ref: HubRef, prefetch: bool) -> str:
    """What to do when `ref` cannot be downloaded here; for a prefetch itself (`scd download`), not
    to run the very command that failed."""
    if prefetch:
        return ("download it on a machine with network access and copy its Hub cache (HF_HUB_CACHE) here, "
                "or unset HF_HUB_OFFLINE if it is set")
    return f"run `scd download {ref}` on a machine with network access first"


def _download_error(err: Exception, ref: HubRef, endpoint: str, offline: bool, token_sent: bool,
                    prefetch: bool = False) -> HubError:
    """One clear line for any failure of a download from `endpoint`."""
    import httpx2
    from huggingface_hub import errors as hf

    where = f"{ref.repo_id}@{ref.revision}" if ref.revision else ref.repo_id
    not_cached = (f"{ref} is not in the local cache and HF_HUB_OFFLINE is set (or there is no network): "
                  f"{_elsewhere(ref, prefetch)}")
    if isinstance(err, hf.GatedRepoError):
        return HubError(f"{ref.repo_id} is gated on {endpoint}: accept its conditions on the model page, "
                        "then set HF_TOKEN to a token of that account")
    if isinstance(err, hf.RepositoryNotFoundError):
        return HubError(f"repository {ref.repo_id} not found on {endpoint} (or it is private and HF_TOKEN is "
                        "missing or has no access): check the repo id, or set HF_TOKEN")
    if isinstance(err, hf.RevisionNotFoundError):
        return HubError(f"revision {ref.revision or 'main'!r} not found in {ref.repo_id}: give an existing branch, tag "
                        "or full commit sha")
    if isinstance(err, hf.RemoteEntryNotFoundError):
        return HubError(f"{ref.path_in_repo!r} not found in {where}: check the path inside the repo")
    if isinstance(err, hf.LocalEntryNotFoundError) or _caused_by(err, hf.OfflineModeIsEnabled):
        if offline or _caused_by(err, hf.OfflineModeIsEnabled):
            return HubError(not_cached)
        if _caused_by(err.__cause__, httpx2.TransportError):
            return HubError(f"cannot reach {endpoint} ({_first_line(err.__cause__ or err)}) and {ref} is not in "
                            f"the local cache: check the network and HF_ENDPOINT, or {_elsewhere(ref, prefetch)}")
        return HubError(f"{endpoint} could not serve {ref} and it is not in the local cache: "
                        f"{_first_line(err.__cause__ or err)}; try again later")
    if isinstance(err, hf.HfHubHTTPError):
        status = err.response.status_code if err.response is not None else None
        if status == 401 and not token_sent:
            return HubError(f"{endpoint} needs a token for {ref.repo_id}: set HF_TOKEN to a token with read access")
        if status == 401:
            return HubError(f"{endpoint} rejected the token in HF_TOKEN: set HF_TOKEN to a valid token, or unset it "
                            "for public repos")
        if status == 403:
            return HubError(f"{endpoint} refused access to {ref.repo_id} (403): use a token with read access "
                            "to it in HF_TOKEN")
        return HubError(f"{endpoint} answered {status} for {ref}: {err.server_message or 'no details'}; "
                        "try again later")
    if isinstance(err, (httpx2.TransportError, ConnectionError, TimeoutError)):
        return HubError(f"cannot reach {endpoint} to download {ref} ({_first_line(err)}): check the network and "
                        "HF_ENDPOINT, then run the command again")
    if isinstance(err, hf.HFValidationError):
        return HubError(f"{ref} is not a valid Hub reference ({_first_line(err)}): write owner/name[@revision]")
    if isinstance(err, OSError):
        return HubError(f"downloading {ref} failed ({_first_line(err)}): check free disk space and the network, "
                        "then run the command again (finished files are kept)")
    return HubError(f"downloading {ref} from {endpoint} failed ({type(err).__name__}: {_first_line(err)}); "
                    "run the command again")


def _snapshot_commit(path: Path, path_in_repo: str) -> str:
    """The commit sha of a cache path `.../snapshots/<sha>/<path_in_repo>`."""
    return path.parents[len(path_in_repo.split("/")) - 1].name


# ----------------------------------------------------------------------------- download

def fetch_model_folder(ref: HubRef, allow_patterns=MODEL_FILES, prefetch: bool = False) -> tuple[Path, str]:
    """Download the model-folder files of `ref` (only those matching `allow_patterns`, relative to
    `ref.path_in_repo` when it is set) into the Hub cache, or find them there.

    Returns (local folder, resolved commit sha). Offline (`HF_HUB_OFFLINE=1`) it resolves from the
    cache only. Raises `HubError` for every failure, including a folder without `config.json`;
    `prefetch` (a download for later use, as `scd download`) changes only the advice in the errors.
    """
    from huggingface_hub import snapshot_download

    endpoint, offline, token = _endpoint(), _offline(), _token()
    prefix = f"{ref.path_in_repo.strip('/')}/" if ref.path_in_repo else ""
    patterns = [prefix + pattern for pattern in allow_patterns]
    try:
        snapshot = Path(snapshot_download(
            ref.repo_id, revision=ref.revision, allow_patterns=patterns, endpoint=endpoint, token=token,
            local_files_only=offline, cache_dir=_cache_dir(), tqdm_class=_silent_tqdm()))
    except Exception as err:
        raise _download_error(err, ref, endpoint, offline, bool(token), prefetch) from err
    folder = snapshot / prefix if prefix else snapshot
    if "config.json" in allow_patterns and not (folder / "config.json").is_file():
        if offline:
            raise HubError(f"{ref} is not in the local cache and HF_HUB_OFFLINE is set (or there is no network): "
                           f"{_elsewhere(ref, prefetch)}")
        where = f"{ref.repo_id}@{snapshot.name[:12]}" + (f" under {ref.path_in_repo}" if prefix else "")
        raise HubError(f"{where} has no config.json, so it is not an scd model folder: check the repo id, the "
                       f"revision and the path; a checkpoint file in it is written {ref.repo_id}:path/to/file.pth")
    return folder, snapshot.name


def fetch_file(ref: HubRef, prefetch: bool = False) -> tuple[Path, str]:
    """Download the single file `ref.path_in_repo` of `ref` into the Hub cache, or find it there.

    Returns (local file path, resolved commit sha). Raises `HubError` for every failure (`prefetch`:
    as fetch_model_folder's).
    """
    from huggingface_hub import hf_hub_download

    if not ref.path_in_repo:
        raise HubError(f"{ref} names no file: write owner/name:path/in/repo[@revision]")
    endpoint, offline, token = _endpoint(), _offline(), _token()
    try:
        path = Path(hf_hub_download(
            ref.repo_id, ref.path_in_repo, revision=ref.revision, endpoint=endpoint, token=token,
            local_files_only=offline, cache_dir=_cache_dir(), tqdm_class=_silent_tqdm()))
    except Exception as err:
        raise _download_error(err, ref, endpoint, offline, bool(token), prefetch) from err
    return path, _snapshot_commit(path, ref.path_in_repo)


# ----------------------------------------------------------------------------- upload

def push_folder(folder: Path, repo_id: str, branch: str | None = None, private: bool = False,
                commit_message: str = "Upload scd model folder") -> str:
    """Create `repo_id` if needed (private if asked; an existing repo keeps its visibility), create
    `branch` if it is missing, and commit every file of `folder` to it in one upload.

    Returns the sha of the commit that now holds the folder, so `repo_id@sha` pins it. Needs a token
    with write access in HF_TOKEN (or from `hf auth login`). Raises `HubError` for every failure.
    """
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hf
    from huggingface_hub.utils import disable_progress_bars

    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(f"{folder} is not a folder: give the model folder to push")
    if not _valid_repo_id(repo_id):
        raise HubError(f"{repo_id!r} is not a Hub repo id: write owner/name (letters, digits, '-', '_', '.')")
    if branch is not None:
        _check_revision(branch, f"{repo_id}@{branch}")
    endpoint, token = _endpoint(), _token()
    target = f"{repo_id}@{branch}" if branch else repo_id
    if _offline():
        raise HubError(f"cannot push {target} while HF_HUB_OFFLINE is set: unset it and run the command again")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        with disable_progress_bars():  # the upload pipeline draws a live display on stderr otherwise
            api.create_repo(repo_id, private=True if private else None, exist_ok=True)  # None: the namespace default
            if branch is not None and branch != "main":
                api.create_branch(repo_id, branch=branch, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=branch,
                                     commit_message=commit_message)
    except hf.HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status in (401, 403) or isinstance(err, hf.RepositoryNotFoundError):
            raise HubError(f"{endpoint} refused to write to {target} ({status}): set HF_TOKEN to a token with "
                           "write access to that namespace") from err
        raise HubError(f"pushing {folder} to {target} failed: {endpoint} answered {status} "
                       f"({err.server_message or _first_line(err)}); try again later") from err
    except Exception as err:
        raise HubError(f"pushing {folder} to {target} failed ({type(err).__name__}: {_first_line(err)}): "
                       "check the network and HF_ENDPOINT, then run the command again") from err
    return info.oid
