"""Model folders and model references.

A model folder is `config.json` + `model.safetensors` (+ optional `codec/`, `README.md`). A model
reference is a folder, a Hub repo id, or a reference checkpoint (FAR's, the official SCD trainer's;
their formats are `scd.reference`). Every load is strict: a missing, unexpected or mis-shaped tensor
is an error that names it.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import torch
from safetensors.torch import save_file

from scd import files
from scd.errors import CheckpointError, ConfigError
from scd.loaded import LoadedModel
from scd.models import ModelConfig
from scd.weights import model_from_tensors, read_tensors

ASSETS = Path(__file__).parent / "assets"
EMBEDDED = {"scd": ASSETS / "world-scd", "baseline": ASSETS / "world-baseline"}
# the embedded models also answer to the names their cards and docs/training.md give them
EMBEDDED_ALIASES = {folder.name: name for name, folder in EMBEDDED.items()}
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


# ----------------------------------------------------------------------------- model folders

def save_model_folder(model: torch.nn.Module, folder: Path, card: str | None = None,
                      dtype: torch.dtype | None = None) -> Path:
    """Write config.json, model.safetensors (and README.md) atomically into `folder`."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: (v.to(dtype) if dtype and v.is_floating_point() else v).detach().contiguous().cpu()
                 for k, v in model.state_dict().items()}
        files.atomic_write(folder / WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}), CheckpointError)
        files.write_text(folder / CONFIG, model.config.to_json(), CheckpointError)
        if card is not None:
            files.write_text(folder / "README.md", card, CheckpointError)
    except OSError as err:
        raise CheckpointError(f"cannot write model folder {folder}: {err.strerror or err}") from None
    return folder


def read_folder_config(folder: Path) -> ModelConfig:
    """The config of a model folder, after checking that its weights file is there too."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise CheckpointError(f"{folder} is not a model folder: it has no {CONFIG}")
    if not (folder / WEIGHTS).is_file():
        raise CheckpointError(f"the model folder {folder} has no {WEIGHTS}")
    try:
        return ModelConfig.load(folder / CONFIG)
    except ConfigError as err:
        raise CheckpointError(f"{folder / CONFIG}: {err}") from None


def load_model_folder(folder: Path) -> LoadedModel:
    folder = Path(folder)
    config = read_folder_config(folder)
    model = model_from_tensors(config, read_tensors(folder / WEIGHTS), str(folder / WEIGHTS))
    return LoadedModel(model.eval(), config, str(folder), folder)


def load_model(ref: str | Path | None = None, options: Path | None = None, arch: str = "scd",
               latent_size=None, base: str | Path | None = None) -> LoadedModel:
    """Resolve a model reference: None (the embedded default of `arch`), a local model folder, a
    reference checkpoint file (with its options, or one of FAR's published files by name), or a Hub
    repo id with optional @revision (`owner/name:path/file.pth` for a checkpoint file in it). A local
    model folder named `scd` or `baseline` is that folder; `embedded:scd` always names the embedded model
    (`world-scd` and `world-baseline`, the names on their cards, name them too unless such a folder exists).

    A causal Wan2.1 checkpoint (a Self-Forcing `.pt`, Wan2.1 or diffusers safetensors) loads with
    `base`, the Wan base folder or Hub repo whose text encoder and VAE it runs with (and whose
    transformer config sizes it); a known generator repo (`gdhe17/Self-Forcing`) needs neither a
    path nor a base: its file and its base (Wan-AI/Wan2.1-T2V-1.3B-Diffusers) are known."""
    name = str(ref).removeprefix("embedded:") if ref is not None else arch
    name = EMBEDDED_ALIASES.get(name, name)
    local = ref is not None and (Path(ref) / CONFIG).is_file()
    if ref is None or (name in EMBEDDED and (str(ref).startswith("embedded:") or not local)):
        loaded = load_model_folder(EMBEDDED[name])
        loaded.source = f"embedded:{name}"
        return loaded
    from scd import reference  # deferred: the reference formats build on this module

    from scd import wan_reference  # deferred as reference: it builds on this module's loaders

    path = Path(ref)
    if path.is_dir() and not (base is not None and not (path / CONFIG).is_file()):
        return _with_base(load_model_folder(path), base)
    if path.exists() and (base is not None or wan_reference.is_wan_source(path)):
        return _load_wan_generator(path, base, str(ref))
    if path.is_file():
        return reference.load_reference(path, options, latent_size)
    from scd import hub  # deferred: huggingface_hub is only needed for Hub references

    hub_ref = hub.parse_hub_ref(str(ref))
    if hub_ref is None:
        raise CheckpointError(f"no model at {ref}: give a model folder, a checkpoint with its options file, or a Hub repo id")
    known = wan_reference.KNOWN_GENERATORS.get(hub_ref.repo_id)
    if known is not None and not hub_ref.path_in_repo:
        hub_ref = hub.HubRef(hub_ref.repo_id, hub_ref.revision, known[0])
    if hub_ref.path_in_repo and PurePosixPath(hub_ref.path_in_repo).suffix in reference.WEIGHT_SUFFIXES:
        path, commit = hub.fetch_file(hub_ref)
        if base is not None or known is not None or wan_reference.is_wan_source(path):
            loaded = _load_wan_generator(path, base or (known[1] if known else None), str(ref))
            loaded.source, loaded.revision = f"{hub_ref.repo_id}:{hub_ref.path_in_repo}", commit
            return loaded
        pinned = hub.HubRef(hub_ref.repo_id, commit, hub_ref.path_in_repo)
        loaded = reference.load_reference(path, options, latent_size, PurePosixPath(hub_ref.path_in_repo).name, pinned)
        loaded.source, loaded.revision = f"{hub_ref.repo_id}:{hub_ref.path_in_repo}", commit
        return loaded
    folder, revision = hub.fetch_model_folder(hub_ref)
    loaded = _with_base(load_model_folder(folder), base)
    loaded.source, loaded.revision = hub_ref.repo_id, revision
    return loaded


def _with_base(loaded: LoadedModel, base: str | Path | None) -> LoadedModel:
    """A model folder run with another base than the one its config names (a Wan model)."""
    if base is None:
        return loaded
    if getattr(loaded.config, "base", "") == "":
        raise ConfigError("this model has no base: drop base", parameter="base")
    import dataclasses

    local = Path(str(base)).expanduser()
    named = str(local.resolve()) if local.is_dir() else str(base)
    try:
        loaded.config = dataclasses.replace(loaded.config, base=named)
    except TypeError:
        raise ConfigError("this model takes no base (it has no text encoder or VAE of Wan's): drop base",
                          parameter="base") from None
    loaded.model.config = loaded.config
    return loaded


def download(ref: str) -> list[tuple[str, str, Path]]:
    """Prefetch a Hub reference into the cache and everything it runs with: a model folder or one
    file, and for a Wan generator (a known repo such as gdhe17/Self-Forcing, or a folder whose config
    names a base) its base's tokenizer, text encoder, VAE and configs. Returns (what, commit, local
    path) per fetched item; nothing for a local path."""
    from scd import hub, wan_reference  # deferred: huggingface_hub is only needed here

    hub_ref = hub.parse_hub_ref(str(ref))
    if hub_ref is None:
        return []
    fetched = []
    known = wan_reference.KNOWN_GENERATORS.get(hub_ref.repo_id)
    if known is not None and not hub_ref.path_in_repo:
        hub_ref = hub.HubRef(hub_ref.repo_id, hub_ref.revision, known[0])
    if hub_ref.path_in_repo:
        path, commit = hub.fetch_file(hub_ref, prefetch=True)
        fetched.append((str(hub_ref), commit, path))
        base = known[1] if known is not None else None
    else:
        path, commit = hub.fetch_model_folder(hub_ref, prefetch=True)
        fetched.append((hub_ref.repo_id, commit, path))
        config = read_folder_config(path) if (path / CONFIG).is_file() else None
        base = getattr(config, "base", None)
    if base is not None and not Path(base).is_dir():
        folder, base_commit = wan_reference.resolve_base(base, wan_reference.BASE_FILES)
        fetched.append((str(base), base_commit, folder))
    return fetched


def _load_wan_generator(path: Path, base: str | Path | None, source: str, ema: bool = True) -> LoadedModel:
    """A causal Wan checkpoint file, sized by the config beside it or by its base (`base`: a folder
    or a Hub repo, which the config then names, so its text encoder and VAE are found again)."""
    from scd import wan_reference

    folder = revision = None
    if base is not None:
        folder, revision = wan_reference.resolve_base(base, wan_reference.BASE_CONFIG_FILES)
    local = base is not None and Path(str(base)).expanduser().is_dir()
    named = None
    if base is not None:  # a Hub base pinned at the commit its config came from
        named = str(Path(str(base)).expanduser().resolve()) if local else (
            str(base) if "@" in str(base) or revision is None else f"{base}@{revision}")
    config = wan_reference.wan_config(path, folder, base=named)
    model = model_from_tensors(config, wan_reference.read_generator(path, ema), source).eval()
    return LoadedModel(model, config, source, None, base_folder=folder if local else None, base_revision=revision)
