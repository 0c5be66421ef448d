"""scd.hub against a local Hub look-alike (tests/hub_server.py) driven by the real huggingface_hub client."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
from hub_server import HubServer

from scd.errors import HubError
from scd.hub import HubRef, fetch_file, fetch_model_folder, parse_hub_ref, push_folder

ROOT = Path(__file__).resolve().parents[1]
MODEL_FILES = {"config.json", "model.safetensors", "README.md", "codec/config.json"}

# Fetches a model in a separate process and prints what it got; argv: repo id.
CHILD = """
import hashlib, json, sys
from scd.hub import HubRef, fetch_model_folder
folder, sha = fetch_model_folder(HubRef(sys.argv[1]))
files = {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
         for p in sorted(folder.rglob("*")) if p.is_file()}
print(json.dumps({"sha": sha, "files": files}))
"""


def model_files(seed: int = 0, weights_size: int = 256 * 1024) -> dict[str, bytes]:
    """A model folder as a repo holds it, plus files scd must never fetch."""
    rng = hashlib.sha256(str(seed).encode()).digest()
    weights = (rng * (weights_size // len(rng) + 1))[:weights_size]
    return {
        "config.json": json.dumps({"arch": "scd", "seed": seed}).encode(),
        "model.safetensors": weights,
        "README.md": f"# model {seed}\n".encode(),
        "codec/config.json": b'{"kind": "identity"}',
        "training_state.pth": b"\0" * 300_000,
        "samples/clip.txt": b"not part of a model folder",
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def env(hub_env):
    return hub_env


@pytest.fixture
def hub(env):
    with HubServer() as server:
        env.setenv("HF_ENDPOINT", server.url)
        yield server


def run_children(n: int, repo_id: str) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", CHILD, repo_id], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(n)]


# ----------------------------------------------------------------------------- references

@pytest.mark.parametrize("text, ref", [
    ("owner/name", HubRef("owner/name", None, None)),
    ("owner/name@main", HubRef("owner/name", "main", None)),
    ("owner/name@" + "a" * 40, HubRef("owner/name", "a" * 40, None)),
    ("owner/name@refs/pr/1", HubRef("owner/name", "refs/pr/1", None)),
    ("owner/name:ckpt/ema.pth", HubRef("owner/name", None, "ckpt/ema.pth")),
    ("owner/my-model.v2:ema.pth@v1.0", HubRef("owner/my-model.v2", "v1.0", "ema.pth")),
])
def test_parse_hub_ref(text, ref):
    assert parse_hub_ref(text) == ref
    assert str(ref) == text


def test_parse_hub_ref_local_paths_are_not_refs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "small").mkdir(parents=True)
    assert parse_hub_ref("models/small") is None  # exists: a local folder wins over a repo id
    assert parse_hub_ref(str(tmp_path)) is None
    assert parse_hub_ref("./missing/model") is None  # written as a path: the caller reports it missing


@pytest.mark.parametrize("text, words", [
    ("owner/", "neither an existing local path nor a Hub reference"),
    ("a/b/c", "neither an existing local path nor a Hub reference"),
    ("owner/na--me", "neither an existing local path nor a Hub reference"),
    ("owner/name@", "invalid revision"),
    ("owner/name@bad..rev", "invalid revision"),
    ("owner/name:", "invalid path"),
    ("owner/name:../escape.pth", "invalid path"),
])
def test_parse_hub_ref_rejects_invalid_forms(text, words):
    with pytest.raises(HubError, match="^" + ".*" + words.replace(".", r"\.")):
        parse_hub_ref(text)


# ----------------------------------------------------------------------------- downloads

def test_fetch_model_folder_fetches_only_model_files(hub):
    files = model_files()
    sha = hub.add_repo("owner/model", files)

    folder, commit = fetch_model_folder(HubRef("owner/model", None, None))

    assert commit == sha
    assert folder.name == sha and folder.parent.name == "snapshots"
    assert Path(os.environ["HF_HUB_CACHE"]) in folder.parents  # the call-time cache, not the import-time one
    assert folder_bytes(folder) == {p: files[p] for p in MODEL_FILES}
    assert sorted(hub.downloaded()) == sorted(MODEL_FILES)
    assert hub.requested() == MODEL_FILES  # the 300 kB training state was never even asked about
    assert hub.downloaded("cdn") == ["model.safetensors"]  # weights came through the LFS redirect


def test_fetch_model_folder_subfolder(hub):
    files = {f"small/{p}": data for p, data in model_files().items()} | {"large/config.json": b"{}"}
    hub.add_repo("owner/zoo", files)
    folder, _ = fetch_model_folder(parse_hub_ref("owner/zoo:small"))
    assert folder.name == "small"
    assert folder_bytes(folder) == {p: files[f"small/{p}"] for p in MODEL_FILES}
    assert "large/config.json" not in hub.requested()


def test_revision_pinning(hub):
    old = hub.add_repo("owner/model", model_files(seed=1), message="v1")
    new = hub.add_repo("owner/model", model_files(seed=2), message="v2")
    assert old != new

    pinned, pinned_sha = fetch_model_folder(HubRef("owner/model", old, None))
    latest, latest_sha = fetch_model_folder(HubRef("owner/model", None, None))
    branch, branch_sha = fetch_model_folder(HubRef("owner/model", "main", None))

    assert (pinned_sha, latest_sha, branch_sha) == (old, new, new)
    assert json.loads((pinned / "config.json").read_text())["seed"] == 1
    assert json.loads((latest / "config.json").read_text())["seed"] == 2
    assert branch == latest
    assert sha256(pinned / "model.safetensors") == hashlib.sha256(model_files(seed=1)["model.safetensors"]).hexdigest()


def test_fetch_file(hub):
    old = hub.add_repo("owner/far", {"ckpt/ema.pth": b"old weights", "options.yaml": b"a: 1"})
    new = hub.add_repo("owner/far", {"ckpt/ema.pth": b"new weights", "options.yaml": b"a: 1"})

    path, commit = fetch_file(parse_hub_ref(f"owner/far:ckpt/ema.pth@{old}"))
    assert (path.read_bytes(), commit) == (b"old weights", old)
    path, commit = fetch_file(parse_hub_ref("owner/far:ckpt/ema.pth"))
    assert (path.read_bytes(), commit) == (b"new weights", new)
    assert hub.requested() == {"ckpt/ema.pth"}
    with pytest.raises(HubError, match="names no file"):
        fetch_file(HubRef("owner/far", None, None))


def test_offline_uses_the_cache(hub, env):
    sha = hub.add_repo("owner/model", model_files())
    hub.add_repo("owner/other", model_files(seed=3))
    online, _ = fetch_model_folder(HubRef("owner/model", None, None))
    fetch_file(parse_hub_ref("owner/model:README.md"))
    hub.stop()
    env.setenv("HF_HUB_OFFLINE", "1")
    requests = len(hub.log)

    assert fetch_model_folder(HubRef("owner/model", None, None)) == (online, sha)  # branch, via the cached ref
    assert fetch_model_folder(HubRef("owner/model", sha, None)) == (online, sha)
    assert fetch_file(parse_hub_ref(f"owner/model:README.md@{sha}"))[0].read_bytes() == b"# model 0\n"
    assert len(hub.log) == requests
    message = ("owner/other is not in the local cache and HF_HUB_OFFLINE is set (or there is no network): "
               "run `scd download owner/other` on a machine with network access first")
    with pytest.raises(HubError) as err:
        fetch_model_folder(HubRef("owner/other", None, None))
    assert str(err.value) == message
    with pytest.raises(HubError, match="is not in the local cache and HF_HUB_OFFLINE is set"):
        fetch_file(parse_hub_ref("owner/model:config.json@dev"))


def test_unreachable_server(hub, env):
    hub.add_repo("owner/model", model_files())
    cached, sha = fetch_model_folder(HubRef("owner/model", None, None))
    hub.stop()
    # Online but the server is gone: the cached snapshot still resolves, anything else says why it cannot.
    assert fetch_model_folder(HubRef("owner/model", None, None)) == (cached, sha)
    with pytest.raises(HubError, match=r"^cannot reach http://127\.0\.0\.1:\d+ .* is not in the local cache"):
        fetch_model_folder(HubRef("owner/unseen", None, None))


def test_unknown_repo_revision_and_file(hub):
    sha = hub.add_repo("owner/model", model_files())
    hub.add_repo("owner/not-a-model", {"notes.txt": b"hello"})
    cases = [
        (lambda: fetch_model_folder(HubRef("owner/missing", None, None)),
         r"^repository owner/missing not found on http"),
        (lambda: fetch_model_folder(HubRef("owner/model", "no-such-branch", None)),
         r"^revision 'no-such-branch' not found in owner/model"),
        (lambda: fetch_model_folder(HubRef("owner/model", "0" * 40, None)), r"^revision '0{40}' not found"),
        (lambda: fetch_file(parse_hub_ref("owner/model:ckpt/missing.pth")),
         r"^'ckpt/missing\.pth' not found in owner/model: check the path"),
        (lambda: fetch_file(parse_hub_ref("owner/missing:ema.pth")), r"^repository owner/missing not found"),
        (lambda: fetch_model_folder(HubRef("owner/not-a-model", None, None)),
         r"^owner/not-a-model@\w{12} has no config\.json, so it is not an scd model folder"),
    ]
    for call, message in cases:
        with pytest.raises(HubError, match=message) as err:
            call()
        assert "\n" not in str(err.value)
    assert hub.head("owner/model") == sha


def test_token_is_sent_when_required(env):
    with HubServer(require_token=True) as hub:
        env.setenv("HF_ENDPOINT", hub.url)
        hub.add_repo("owner/private", model_files())
        with pytest.raises(HubError, match="not found on .* set HF_TOKEN"):
            fetch_model_folder(HubRef("owner/private", None, None))
        env.setenv("HF_TOKEN", "hf_wrong")
        with pytest.raises(HubError, match="rejected the token in HF_TOKEN"):
            fetch_model_folder(HubRef("owner/private", None, None))
        env.setenv("HF_TOKEN", hub.token)
        folder, _ = fetch_model_folder(HubRef("owner/private", None, None))
        assert (folder / "config.json").is_file()
        sent = [r for r in hub.log if r.status < 400]
        assert all(r.authorization == f"Bearer {hub.token}" for r in sent if r.server == "hub")
        assert all(r.authorization is None for r in sent if r.server == "cdn")  # never leaked to the CDN


def test_token_file_and_gated_repo(hub, env, tmp_path):
    hub.add_repo("owner/gated", model_files(), gated=True)
    with pytest.raises(HubError, match="owner/gated is gated on .*: accept its conditions .* set HF_TOKEN"):
        fetch_model_folder(HubRef("owner/gated", None, None))
    # `hf auth login` stores the token under HF_HOME; it is read at call time too.
    (tmp_path / "hf-home").mkdir(exist_ok=True)
    (tmp_path / "hf-home" / "token").write_text(hub.token + "\n")
    folder, _ = fetch_model_folder(HubRef("owner/gated", None, None))
    assert (folder / "model.safetensors").read_bytes() == model_files()["model.safetensors"]


# ----------------------------------------------------------------------------- crash safety and concurrency

def test_dropped_connection_resumes_with_range(hub, env):
    # The client hands bytes to the file in chunks of DOWNLOAD_CHUNK_SIZE (10 MB) and resumes from the
    # last whole chunk; with small chunks a 256 kB file cut in half resumes from 128 kB.
    env.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    files = model_files()
    hub.add_repo("owner/model", files)
    hub.fail_downloads(1, "truncate", path="model.safetensors")

    folder, _ = fetch_model_folder(HubRef("owner/model", None, None))

    assert sha256(folder / "model.safetensors") == hashlib.sha256(files["model.safetensors"]).hexdigest()
    gets = [r for r in hub.log if r.method == "GET" and r.file == "model.safetensors"]
    assert [r.status for r in gets] == [200, 206]
    assert gets[1].range == f"bytes={len(files['model.safetensors']) // 2}-"


def test_killed_download_leaves_nothing_a_later_run_uses(hub):
    files = model_files()
    hub.add_repo("owner/model", files)
    hub.fail_downloads(1, "stall", path="model.safetensors")
    (child,) = run_children(1, "owner/model")
    try:
        assert hub.stalled.wait(30), child.stderr.read() if child.poll() is not None else "child never stalled"
    finally:
        child.kill()
        child.wait()
    weights = hashlib.sha256(files["model.safetensors"]).hexdigest()
    repo = Path(os.environ["HF_HUB_CACHE"]) / "models--owner--model"
    leftovers = [p.name for p in (repo / "blobs").iterdir() if p.name.startswith(weights)]
    assert leftovers and all(name.endswith(".incomplete") for name in leftovers)  # only a partial, by name
    assert not list(repo.glob("snapshots/*/model.safetensors"))
    hub.release()

    folder, _ = fetch_model_folder(HubRef("owner/model", None, None))

    assert sha256(folder / "model.safetensors") == weights
    assert (folder / "model.safetensors").resolve() == repo / "blobs" / weights


def test_two_processes_fetch_the_same_model_at_once(hub):
    files = model_files(weights_size=1024 * 1024)
    sha = hub.add_repo("owner/model", files)
    hub.hold_downloads("model.safetensors", until_heads=2)  # bytes flow only once both processes asked

    children = run_children(2, "owner/model")
    results = [child.communicate(timeout=60) for child in children]

    for child, (out, err) in zip(children, results):
        assert child.returncode == 0, err
    first, second = (json.loads(out) for out, _ in results)
    assert first == second
    assert first["sha"] == sha
    assert first["files"] == {p: hashlib.sha256(files[p]).hexdigest() for p in MODEL_FILES}
    assert [r.method for r in hub.log if r.file == "model.safetensors"].count("HEAD") == 2
    assert hub.downloaded().count("model.safetensors") == 1  # the file lock let one process download it


# ----------------------------------------------------------------------------- upload

def test_push_folder_round_trip(hub, env, tmp_path):
    source = tmp_path / "export"
    for path, data in model_files().items():
        if path in MODEL_FILES:
            (source / path).parent.mkdir(parents=True, exist_ok=True)
            (source / path).write_bytes(data)

    with pytest.raises(HubError, match="refused to write to me/world .*set HF_TOKEN to a token with write access"):
        push_folder(source, "me/world")
    env.setenv("HF_TOKEN", hub.token)
    first = push_folder(source, "me/world", private=True)
    folder, commit = fetch_model_folder(HubRef("me/world", None, None))
    assert commit == first == hub.head("me/world")
    assert folder_bytes(folder) == folder_bytes(source)
    assert hub.repos["me/world"].private

    (source / "config.json").write_text('{"arch": "scd", "seed": 9}')
    second = push_folder(source, "me/world", commit_message="retrain")
    assert second != first and hub.repos["me/world"].commits[second].message == "retrain"
    # A new branch starts at main; pushing the same files again makes no empty commit.
    assert push_folder(source, "me/world", branch="dev") == second
    (source / "README.md").write_text("# experiment\n")
    dev = push_folder(source, "me/world", branch="dev")

    assert dev not in (first, second) and hub.head("me/world") == second
    assert json.loads((fetch_model_folder(HubRef("me/world", first, None))[0] / "config.json").read_text())["seed"] == 0
    folder, commit = fetch_model_folder(HubRef("me/world", "dev", None))
    assert commit == dev and (folder / "README.md").read_text() == "# experiment\n"


def test_push_folder_errors(hub, env, tmp_path):
    env.setenv("HF_TOKEN", hub.token)
    with pytest.raises(HubError, match="is not a folder"):
        push_folder(tmp_path / "missing", "me/world")
    with pytest.raises(HubError, match="'not a repo' is not a Hub repo id: write owner/name"):
        push_folder(tmp_path, "not a repo")
    env.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="cannot push me/world while HF_HUB_OFFLINE is set"):
        push_folder(tmp_path, "me/world")


def test_generate_and_info_with_a_hub_model(hub, env, tmp_path):
    """`scd generate --model owner/name@sha` end to end through the real client, then offline from the cache."""
    import numpy as np
    from conftest import random_model, tiny_config
    from typer.testing import CliRunner

    from scd.checkpoints import save_model_folder
    from scd.mp4 import write_video
    from scd.video import read_video
    from scd_cli.app import app

    folder = save_model_folder(random_model(tiny_config(latent_size=(8, 8), frame_size=(8, 8))), tmp_path / "m")
    sha = hub.add_repo("owner/tiny-scd", folder)
    hub.add_repo("owner/tiny-scd", {**folder_bytes(folder), "extra.bin": b"\0" * 1024})
    env.setenv("HF_ENDPOINT", hub.url)
    prompt = write_video(tmp_path / "p.mp4", np.full((3, 8, 8, 3), 90, np.uint8), fps=4)
    runner = CliRunner()
    r = runner.invoke(app, ["generate", "--model", f"owner/tiny-scd@{sha}", "--prompt-frames", str(prompt),
                            "--frames", "2", "--out", str(tmp_path / "o.mp4")])
    assert r.exit_code == 0, r.output
    assert f"owner/tiny-scd @ {sha}" in r.output
    assert read_video(tmp_path / "o.mp4").frames.shape[0] == 2
    assert "extra.bin" not in hub.requested()
    env.setenv("HF_HUB_OFFLINE", "1")
    r = runner.invoke(app, ["info", f"owner/tiny-scd@{sha}"])
    assert r.exit_code == 0 and "predicted SCD speed-up" in r.output
    r = runner.invoke(app, ["info", "owner/never-fetched"])
    assert r.exit_code == 2 and "HF_HUB_OFFLINE" in r.output
