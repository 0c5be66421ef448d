"""scd info: architecture, parameters and FLOPs of a reference checkpoint."""


from typer.testing import CliRunner

from scd_cli.app import app

runner = CliRunner()












def test_info_on_a_reference_checkpoint():
    from pathlib import Path

    ref = Path(__file__).parent / "fixtures" / "reference" / "case1"
    r = runner.invoke(app, ["info", str(ref / "ema.pth"), "--options", str(ref / "options.yml")])
    assert r.exit_code == 0, r.output
    assert "3 encoder + 2 decoder" in r.output and "predicted SCD speed-up" in r.output
    assert "keeps every frame" in r.output  # a reference model: no training window of its own
    r = runner.invoke(app, ["info"])  # the embedded model, trained last on 5-frame clips
    assert r.exit_code == 0 and "keeps the last 4 (its training window)" in r.output, r.output
    r = runner.invoke(app, ["info", str(ref / "ema.pth")])
    assert r.exit_code == 2 and "give its options file" in r.output
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and "scd 0.1.0" in r.output


def test_info_on_a_wan_model_folder(tmp_path):
    """A converted Self-Forcing generator: its sizes, chunk, window and FLOPs per chunk (its own
    only: a Wan model has no matched SCD counterpart)."""
    import json
    import re
    from pathlib import Path

    from scd.checkpoints import load_model
    from scd.flops import chunk_flops, parameter_count

    source = Path(__file__).parent / "fixtures" / "reference" / "sfwan0" / "generator.pt"
    out = tmp_path / "wan"
    r = runner.invoke(app, ["convert", str(source), "--to", "baseline", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["info", str(out)])
    assert r.exit_code == 0, r.output
    config = load_model(str(out)).config
    text = " ".join(r.output.split())
    assert f"{parameter_count(load_model(str(out)).model):,}" in text
    assert f"{config.tokens_per_frame} tokens/frame" in text and "1560 tokens/frame" in text
    assert "3 latent frames, 4 steps" in text and "global attention" in text
    f = chunk_flops(config, 0, 4)
    numbers = [f"{x / 1e9:,.3f}" for x in (f.context, f.denoise, f.total, f.total / 3)]
    rows = [re.findall(r"[\d,.]+", line) for line in r.output.splitlines()]
    assert ["0", *numbers] in rows, r.output  # cached frames, context pass, denoising, total, per frame
    assert "matched" not in text.replace("no matched counterpart", "")
    # a rolling window: the steady chunk, the window full, is shown too
    data = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**data, "local_attn_size": 9, "sink_size": 3}))
    r = runner.invoke(app, ["info", str(out), "--steps", "2"])
    assert r.exit_code == 0, r.output
    full = chunk_flops(load_model(str(out)).config, 9, 2)
    assert "rolling window of 9 frames, 3 sink" in r.output and "9 (window full)" in r.output
    assert f"{full.total / 1e9:,.3f}" in r.output


def test_info_on_an_scd_wan_folder_shows_its_causal_wan(tmp_path):
    """SCD from Wan: its FLOPs per chunk next to the causal Wan of its source depth, and the
    predicted speed-up by FLOPs and by ops."""
    import re
    from pathlib import Path

    from scd.bench import chunk_ops
    from scd.checkpoints import load_model
    from scd.flops import chunk_flops, matched_config

    source = Path(__file__).parent / "fixtures" / "reference" / "sfwan0" / "generator.pt"
    out = tmp_path / "scd"
    r = runner.invoke(app, ["convert", str(source), "--to", "scd", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["info", str(out), "--steps", "2"])
    assert r.exit_code == 0, r.output
    config = load_model(str(out)).config
    base = matched_config(config)
    text = " ".join(r.output.split())
    assert "1 encoder + 2 decoder" in text and "matched: the causal Wan" in text
    assert "the causal Wan it came from, 2 blocks" in text
    rows = [re.findall(r"[\d,.]+", line) for line in r.output.splitlines()]
    for c in (config, base):
        f = chunk_flops(c, 0, 2)
        assert any(row[-4:] == [f"{x / 1e9:,.3f}" for x in (f.context, f.denoise, f.total, f.total / 3)]
                   for row in rows), r.output
    speedup = chunk_flops(base, 0, 2).total / chunk_flops(config, 0, 2).total
    ops = chunk_ops(config, 2), chunk_ops(base, 2)
    assert f"predicted SCD speed-up per chunk: {speedup:.2f}x by FLOPs, {ops[1] / ops[0]:.2f}x by ops" in text
    assert f"({ops[0]:,} vs {ops[1]:,} aten ops per chunk)" in text
