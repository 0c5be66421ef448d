"""Text prompts -> umT5 embeddings on a tiny random base: the embeddings against transformers run by
hand, padding rows zero, the disk cache (a hit never loads the encoder), and the errors."""

import json
import shutil

import pytest
import torch
from wan_base import make_wan_base

from scd.errors import OutputError, TextError
from scd.text import TextEncoder, clean_prompt, default_cache_dir, encode_prompts, encoder_identity

transformers = pytest.importorskip("transformers")
pytest.importorskip("diffusers")

FOX = "A fox running through fresh snow"  # 6 words + </s>
CAT = "a cat"  # 2 words + </s>


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_wan_base(tmp_path_factory.mktemp("wan") / "base", seed=1)


@pytest.fixture
def own_base(base, tmp_path):
    """A copy of the base that a test may damage."""
    return shutil.copytree(base, tmp_path / "base")


def by_hand(base, prompts, text_len):
    """What Self-Forcing's WanTextEncoder computes, with transformers directly."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(base / "tokenizer"))
    model = transformers.UMT5EncoderModel.from_pretrained(str(base / "text_encoder")).eval()
    ids = tokenizer(prompts, padding="max_length", max_length=text_len, truncation=True, add_special_tokens=True,
                    return_attention_mask=True, return_tensors="pt")
    with torch.no_grad():
        context = model(ids.input_ids, ids.attention_mask).last_hidden_state
    for u, v in zip(context, ids.attention_mask.sum(dim=1)):
        u[v:] = 0.0
    return context


def test_embeddings_are_umt5s_with_padding_zeroed(base, tmp_path):
    out = encode_prompts(base, [FOX, CAT], text_len=16, cache_dir=tmp_path)
    assert out.embeddings.shape == (2, 16, 32) and out.embeddings.dtype == torch.float32
    assert out.lengths == (7, 3)
    assert out.cached == (False, False) and out.encoder_loaded and out.seconds > 0
    assert torch.allclose(out.embeddings, by_hand(base, [FOX, CAT], 16), atol=1e-5)
    for row, length in zip(out.embeddings, out.lengths):
        assert row[length:].abs().max() == 0
        assert (row[:length].abs().amax(dim=1) > 0).all()


def test_two_prompts_give_two_embeddings_and_a_batch_equals_singles(base):
    batch = encode_prompts(base, [FOX, CAT], text_len=16, use_cache=False).embeddings
    fox = encode_prompts(base, FOX, text_len=16, use_cache=False).embeddings
    cat = encode_prompts(base, CAT, text_len=16, use_cache=False).embeddings
    assert (batch[0, :3] - batch[1, :3]).abs().max() > 1e-2
    assert torch.allclose(batch, torch.cat([fox, cat]), atol=1e-5)


def test_text_len_defaults_to_512_and_truncates(base, tmp_path):
    out = encode_prompts(base, CAT, cache_dir=tmp_path)
    assert out.embeddings.shape == (1, 512, 32) and out.lengths == (3,)
    short = encode_prompts(base, FOX, text_len=4, cache_dir=tmp_path)
    assert short.embeddings.shape == (1, 4, 32) and short.lengths == (4,)  # 3 words and </s>
    assert torch.allclose(short.embeddings, by_hand(base, [FOX], 4), atol=1e-5)


def test_prompts_are_cleaned_as_self_forcings(base):
    assert clean_prompt("  a\tfox\n\nrunning &amp;amp; snow ") == "a fox running & snow"
    spaced = encode_prompts(base, "  A   fox running\nthrough fresh snow ", text_len=16, use_cache=False)
    assert torch.equal(spaced.embeddings, encode_prompts(base, FOX, text_len=16, use_cache=False).embeddings)


def test_a_cache_hit_never_loads_the_encoder(own_base, tmp_path):
    cache = tmp_path / "cache"
    first = encode_prompts(own_base, [FOX, CAT], text_len=16, cache_dir=cache)
    assert len(list(cache.glob("*.safetensors"))) == 2
    weights = own_base / "text_encoder" / "model.safetensors"
    weights.write_bytes(b"\0" * weights.stat().st_size)  # the same size, so the same identity, but unloadable
    second = encode_prompts(own_base, [CAT, FOX], text_len=16, cache_dir=cache)
    assert second.cached == (True, True) and not second.encoder_loaded
    assert second.lengths == (3, 7) and torch.equal(second.embeddings, first.embeddings.flip(0))
    with pytest.raises(TextError, match="cannot load the text encoder"):  # a new prompt needs the (broken) encoder
        encode_prompts(own_base, [FOX, "a dog"], text_len=16, cache_dir=cache)


def test_the_cache_key_is_encoder_text_length_and_dtype(own_base, tmp_path):
    cache = tmp_path / "cache"
    encode_prompts(own_base, CAT, text_len=16, cache_dir=cache)
    assert encode_prompts(own_base, CAT, text_len=16, cache_dir=cache).cached == (True,)
    assert encode_prompts(own_base, CAT + " ", text_len=16, cache_dir=cache).cached == (False,)  # the exact text
    assert encode_prompts(own_base, CAT, text_len=8, cache_dir=cache).cached == (False,)
    assert encode_prompts(own_base, CAT, text_len=16, cache_dir=cache, dtype=torch.bfloat16).cached == (False,)
    identity = encoder_identity(own_base)
    config = own_base / "text_encoder" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text())))  # another file: another encoder, maybe
    assert encoder_identity(own_base) != identity
    again = encode_prompts(own_base, CAT, text_len=16, cache_dir=cache)
    assert again.cached == (False,) and again.encoder_loaded
    named = encode_prompts(own_base, CAT, text_len=16, cache_dir=cache, revision="Wan-AI/Wan2.1@abc")
    assert named.cached == (False,) and encoder_identity(own_base, "Wan-AI/Wan2.1@abc") == "revision:Wan-AI/Wan2.1@abc"
    assert encode_prompts(own_base, CAT, text_len=16, cache_dir=cache, revision="Wan-AI/Wan2.1@abc").cached == (True,)


def test_a_damaged_cache_file_is_a_miss_and_is_written_again(base, tmp_path):
    first = encode_prompts(base, FOX, text_len=16, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:40])
    again = encode_prompts(base, FOX, text_len=16, cache_dir=tmp_path)
    assert again.cached == (False,) and torch.equal(again.embeddings, first.embeddings)
    assert encode_prompts(base, FOX, text_len=16, cache_dir=tmp_path).cached == (True,)


def test_no_cache_writes_nothing_and_the_default_folder_follows_scd_cache(base, tmp_path, monkeypatch):
    encode_prompts(base, CAT, text_len=16, cache_dir=tmp_path / "unused", use_cache=False)
    assert not (tmp_path / "unused").exists()
    monkeypatch.setenv("SCD_CACHE", str(tmp_path / "scd-cache"))
    assert default_cache_dir() == tmp_path / "scd-cache" / "text"
    encode_prompts(base, CAT, text_len=16)
    assert len(list((tmp_path / "scd-cache" / "text").glob("*.safetensors"))) == 1


def test_the_library_prints_nothing(base, tmp_path, capfd):
    encode_prompts(base, [FOX, CAT], text_len=16, cache_dir=tmp_path)
    encode_prompts(base, [FOX, CAT], text_len=16, cache_dir=tmp_path)
    assert capfd.readouterr() == ("", "")


def test_a_kept_encoder(base):
    encoder = TextEncoder.load(base)
    embeddings, lengths = encoder.encode([FOX, CAT], text_len=16, batch_size=1)
    assert encoder.width == 32 and lengths == [7, 3]
    assert torch.allclose(embeddings, by_hand(base, [FOX, CAT], 16), atol=1e-5)


@pytest.mark.parametrize("prompts, text_len, match, parameter", [
    ("", 16, "the prompt is empty", "prompt"),
    (["a fox", " \n "], 16, "prompt 2 of 2 is empty", "prompt"),
    ([], 16, "no prompt given", "prompt"),
    ([3], 16, "prompt 1 is int", "prompt"),
    (CAT, 0, "text_len must be a whole number >= 1", "text_len"),
])
def test_bad_prompts(base, tmp_path, prompts, text_len, match, parameter):
    with pytest.raises(TextError, match=match) as err:
        encode_prompts(base, prompts, text_len=text_len, cache_dir=tmp_path)
    assert err.value.parameter == parameter


def test_bad_base_folders(own_base, tmp_path):
    with pytest.raises(TextError, match="does not exist"):
        encode_prompts(tmp_path / "nowhere", CAT)
    config = own_base / "text_encoder" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": "t5"}))
    with pytest.raises(TextError, match="not a umT5 encoder"):
        encode_prompts(own_base, CAT, use_cache=False)
    (own_base / "text_encoder" / "model.safetensors").unlink()
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": "umt5"}))
    with pytest.raises(TextError, match="cannot load the text encoder"):
        encode_prompts(own_base, CAT, use_cache=False)
    shutil.rmtree(own_base / "text_encoder")
    with pytest.raises(TextError, match=r"no text_encoder/ folder \(the text encoder \(umT5\)\)"):
        encode_prompts(own_base, CAT)
    shutil.rmtree(own_base / "tokenizer")
    with pytest.raises(TextError, match="no tokenizer/ folder") as err:
        encode_prompts(own_base, CAT)
    assert err.value.parameter == "base"


def test_an_encoder_that_does_not_match_its_config(own_base):
    config = own_base / "text_encoder" / "config.json"
    settings = json.loads(config.read_text())
    config.write_text(json.dumps({**settings, "num_layers": 3}))  # the weights have 2
    with pytest.raises(TextError, match=r"does not match its config \(missing keys: encoder.block.2"):
        encode_prompts(own_base, CAT, use_cache=False)
    config.write_text(json.dumps({**settings, "vocab_size": 99}))
    with pytest.raises(TextError, match="its tensors do not have the shapes its config.json says"):
        encode_prompts(own_base, CAT, use_cache=False)


def test_a_cache_folder_that_cannot_be_written(base, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        encode_prompts(base, CAT, cache_dir=tmp_path / "file")


def test_a_hub_snapshot_is_identified_by_its_blobs(base, tmp_path):
    """In the Hub cache a snapshot's files are links to blobs named by their sha256: another blob of
    the same size is another encoder."""
    snapshot, blobs = tmp_path / "snapshot", tmp_path / "blobs"
    shutil.copytree(base, snapshot)
    blobs.mkdir()
    weights = snapshot / "text_encoder" / "model.safetensors"
    (blobs / "aaaa").write_bytes(weights.read_bytes())
    (blobs / "bbbb").write_bytes(weights.read_bytes())
    weights.unlink()
    weights.symlink_to(blobs / "aaaa")
    first = encoder_identity(snapshot)
    weights.unlink()
    weights.symlink_to(blobs / "bbbb")
    assert encoder_identity(snapshot) != first
    assert encoder_identity(base) not in (first, encoder_identity(snapshot))
