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
               latent_size=None) -> LoadedModel:
    """Resolve a model reference: None (the embedded default of `arch`), a local model folder, a
    reference checkpoint file (with its options, or one of FAR's published files by name), or a Hub
    repo id with optional @revision (`owner/name:path/file.pth` for a checkpoint file in it). A local
    model folder named `scd` or `baseline` is that folder; `embedded:scd` always names the embedded model."""
    name = str(ref).removeprefix("embedded:") if ref is not None else arch
    local = ref is not None and (Path(ref) / CONFIG).is_file()
    if ref is None or (name in EMBEDDED and (str(ref).startswith("embedded:") or not local)):
        loaded = load_model_folder(EMBEDDED[name])
        loaded.source = f"embedded:{name}"
        return loaded
    from scd import reference  # deferred: the reference formats build on this module

    path = Path(ref)
    if path.is_dir():
        return load_model_folder(path)
    if path.is_file():
        return reference.load_reference(path, options, latent_size)
    from scd import hub  # deferred: huggingface_hub is only needed for Hub references

    hub_ref = hub.parse_hub_ref(str(ref))
    if hub_ref is None:
        raise CheckpointError(f"no model at {ref}: give a model folder, a checkpoint with its options file, or a Hub repo id")
    if hub_ref.path_in_repo and PurePosixPath(hub_ref.path_in_repo).suffix in reference.WEIGHT_SUFFIXES:
        path, commit = hub.fetch_file(hub_ref)
        pinned = hub.HubRef(hub_ref.repo_id, commit, hub_ref.path_in_repo)
        loaded = reference.load_reference(path, options, latent_size, PurePosixPath(hub_ref.path_in_repo).name, pinned)
        loaded.source, loaded.revision = f"{hub_ref.repo_id}:{hub_ref.path_in_repo}", commit
        return loaded
    folder, revision = hub.fetch_model_folder(hub_ref)
    loaded = load_model_folder(folder)
    loaded.source, loaded.revision = hub_ref.repo_id, revision
    return loaded
