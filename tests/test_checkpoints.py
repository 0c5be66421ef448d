"""Model folders and weight files: strict loading, no code ever unpickled, corrupt or mutated files are one-line errors, references resolve as documented."""

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ODD_VALUES, random_model, tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scd.checkpoints import load_model_folder, save_model_folder
from scd.errors import CheckpointError
from scd.weights import read_tensors


def test_malicious_pickle_runs_nothing(tmp_path):
    pwned = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"x_embedder.weight": Exploit(pwned)}, f)
    with pytest.raises(CheckpointError, match="weights-only"):
        read_tensors(path)
    assert not pwned.exists()
    pickle.loads(pickle.dumps(Exploit(pwned)))  # what unpickling it would have done
    assert pwned.exists()


def test_corrupt_safetensors_are_refused_before_use(tmp_path):
    folder = save_model_folder(random_model(tiny_config()), tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model_folder(folder)
    weights.write_bytes((10 ** 12).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="header"):
        load_model_folder(folder)
    weights.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00nope!")
    with pytest.raises(CheckpointError, match="model.safetensors is not a valid safetensors file .*re-download or re-export it"):
        load_model_folder(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: cannot read .*config.json: Expecting property name"):
        load_model_folder(folder)


def test_wrong_checkpoint_names_the_tensors(tmp_path):
    folder = save_model_folder(random_model(tiny_config()), tmp_path / "m")
    other = save_model_folder(random_model(tiny_config(num_heads=4, head_dim=4, rope_axes=(0, 2, 2))), tmp_path / "o")
    (folder / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_model_folder(folder)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_config_json_loads_or_is_a_checkpoint_error(tmp_path_factory, data):
    """A model folder whose config.json has a field changed, dropped or added, or is not JSON at
    all: it loads (when the weights still fit) or stops with CheckpointError; nothing else, and a
    config declaring a huge model is refused without building it."""
    folder = tmp_path_factory.mktemp("m")
    (folder / "model.safetensors").write_bytes((WORLD_SCD / "model.safetensors").read_bytes())
    config = json.loads((WORLD_SCD / "config.json").read_text())
    kind = data.draw(st.sampled_from(["change", "drop", "add", "bytes"]))
    if kind == "bytes":
        text = data.draw(st.binary(max_size=300)).decode("latin-1")
    else:
        key = data.draw(st.sampled_from(sorted(config)))
        if kind == "change":
            config[key] = data.draw(ODD_VALUES)
        elif kind == "drop":
            del config[key]
        else:
            config[data.draw(st.text(min_size=1, max_size=8))] = 1
        text = json.dumps(config)
    (folder / "config.json").write_text(text)
    try:
        loaded = load_model_folder(folder)
    except CheckpointError:
        return
    assert sum(p.numel() for p in loaded.model.parameters()) < 10**6


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_mutated_weight_files_are_read_or_a_checkpoint_error(tmp_path, suffix):
    """Byte flips and cuts across a real safetensors file (its header first: the first 600
    mutants hit the first 200 bytes) and a real torch .pth (a zip of pickles): every one reads as
    tensors or stops with CheckpointError."""
    state = random_model(tiny_config()).state_dict()
    original = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(original))
    else:
        torch.save(state, original)
    data = original.read_bytes()
    cases = list(_mutants(data[:200], 1, 600)) if suffix == ".safetensors" else []
    cases = [c + data[200:] if len(c) == 200 else c for c in cases] + list(_mutants(data, 2, 200))
    for i, mutant in enumerate(cases):
        path = tmp_path / f"m{i}{suffix}"
        path.write_bytes(mutant)
        try:
            tensors = read_tensors(path)
        except CheckpointError:
            continue
        finally:
            path.unlink()
        assert all(isinstance(v, torch.Tensor) for v in tensors.values())


def test_a_local_folder_named_like_an_embedded_model_is_that_folder(tmp_path, monkeypatch):
    from scd.checkpoints import load_model

    save_model_folder(random_model(tiny_config()), tmp_path / "baseline")
    monkeypatch.chdir(tmp_path)
    assert load_model("baseline").source == "baseline" and load_model("baseline").config.arch == "scd"
    assert load_model("embedded:baseline").source == "embedded:baseline"
    assert load_model("embedded:baseline").config.arch == "baseline"


def test_the_embedded_models_answer_to_their_card_names_unless_a_folder_is_so_named(tmp_path, monkeypatch):
    from scd.checkpoints import load_model

    monkeypatch.chdir(tmp_path)
    assert load_model("world-scd").source == "embedded:scd" and load_model("world-scd").config.arch == "scd"
    assert load_model("world-baseline").config.arch == "baseline"
    save_model_folder(random_model(tiny_config()), tmp_path / "world-baseline")
    assert load_model("world-baseline").source == "world-baseline"
    assert load_model("world-baseline").config.arch == "scd"


class Exploit:
    """Unpickled, it makes the file `marker` (a pickle that runs a command)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


WORLD_SCD = Path(__file__).resolve().parents[1] / "scd" / "assets" / "world-scd"


def _mutants(data: bytes, seed: int, count: int, first: int = 0):
    """`count` copies of data with 1-8 bytes replaced (from byte `first` on) or cut short."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        mutant = bytearray(data)
        if rng.random() < 0.25:
            yield bytes(mutant[: int(rng.integers(0, len(data)))])
            continue
        for at in rng.integers(first, len(data), int(rng.integers(1, 9))):
            mutant[at] = int(rng.integers(0, 256))
        yield bytes(mutant)
