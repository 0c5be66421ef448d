import pytest
import torch
from hypothesis import strategies as st

from scd.models import ModelConfig, build_model

pytest_plugins = ["ci_rules", "pytester"]  # under CI a skip fails (ci_rules.py); pytester checks that rule
torch.set_num_threads(1)  # CI has 2 cores; tiny models gain nothing from more threads


def tiny_config(**overrides) -> ModelConfig:
    """A few-thousand-parameter model: 2 heads of 8, 4x4 latents of 3 channels, patch 2 (4 tokens/frame)."""
    base = dict(arch="scd", num_heads=2, head_dim=8, channels=3, patch_size=2, rope_axes=(2, 2, 4), layers=3,
                decoder_layers=1, condition="action", num_classes=4, latent_size=(4, 4), frame_size=(4, 4),
                fps=4.0, action_names=("up", "down", "left", "right"), default_steps=3, context_frames=3)
    base.update(overrides)
    if base["arch"] == "baseline":
        base["decoder_layers"] = 0
    return ModelConfig(**base)


def random_model(config: ModelConfig, seed: int = 0):
    """A model whose every parameter is random (the references zero-initialise the adaLN layers,
    which would make many code paths invisible to a test)."""
    torch.manual_seed(seed)
    model = build_model(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def assert_resumes_bit_identically(config, folder, make, steps: int, half: int) -> None:
    """A world run of `steps` steps equals one stopped at `half` and resumed (`make(steps)`: its settings)."""
    from scd import data
    from scd import train as training

    batches = data.world_batches(make(steps), config)
    straight = [p.loss for p in training.train(config, folder / "a", make(steps), batches)]
    first = [p.loss for p in training.train(config, folder / "b", make(half), batches)]
    rest = [p.loss for p in training.train(config, folder / "b", make(steps), batches, resume=True)]
    assert first + rest == straight and len(straight) == steps


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """A clean Hub environment in tmp_path: the cache, HF_HOME, no token, online, no telemetry."""
    import huggingface_hub.constants  # a submodule: not an attribute of the package until imported

    for name in ("HF_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # for the child processes
    # huggingface_hub fetches an "agent harness" registry from its import-time endpoint (huggingface.co
    # here) once per process when it builds a user agent; tests never leave 127.0.0.1.
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    return monkeypatch


# odd JSON/YAML values for fuzzing config and options files (hypothesis)
ODD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2, 2), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                       st.text(max_size=12), st.lists(st.integers(-10, 10**6), max_size=4), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


def stream_inputs(config, batch: int, context: int, frames: int, seed: int = 1):
    """Random context latents (B, F, C, H, W), actions for context + generated frames (B, F + U) and
    initial noise (B, U, C, H, W) for a model of `config`, from `seed`."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, context, config.channels, *config.latent_size, generator=g)
    actions = torch.randint(0, config.num_classes, (batch, context + frames), generator=g)
    noise = torch.randn(batch, frames, config.channels, *config.latent_size, generator=g)
    return latents, actions, noise
