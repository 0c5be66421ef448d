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
    r = runner.invoke(app, ["info"])  # the embedded model, trained on 4-frame clips
    assert r.exit_code == 0 and "keeps the last 3 (its training window)" in r.output, r.output
    r = runner.invoke(app, ["info", str(ref / "ema.pth")])
    assert r.exit_code == 2 and "give its options file" in r.output
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and "scd 0.1.0" in r.output
