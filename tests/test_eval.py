"""`scd eval` on the embedded default models, and its refusals."""

import json

from typer.testing import CliRunner

from conftest import tiny_config
from scd.checkpoints import save_model_folder
from scd.model import build_model
from scd_cli.app import app

runner = CliRunner()


def test_eval_without_arguments_scores_the_embedded_models(tmp_path):
    out = tmp_path / "e.json"
    r = runner.invoke(app, ["eval", "--clips", "2", "--context", "4", "--frames", "2", "--json", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert result["scd"]["model"].startswith("embedded") and result["baseline"]["model"].startswith("embedded")
    from scd.checkpoints import load_model

    default = load_model(None, arch="scd").config.default_steps
    assert result["steps"] == result["scd"]["steps"] == default and result["frames"] == 2 and result["context"] == 4
    for name in ("scd", "baseline", "copy_last_frame", "object_free"):
        assert len(result[name]["psnr_per_frame"]) == 2 and 5 < result[name]["psnr"] < 60
        assert 0 < result[name]["ssim"] <= 1
        agent = result[name]["objects"]["agent"]
        assert len(agent["hit_rate"]) == 2 and result[name]["agent_hit_rate_last"] == agent["hit_rate"][-1]
    assert result["object_free"]["agent_hit_rate_last"] == 0.0  # the agent is erased


def test_eval_refuses_bad_input(tmp_path):
    r = runner.invoke(app, ["eval", "--clips", "0"])
    assert r.exit_code == 2 and "--clips must be >= 1" in r.output
    wrong = save_model_folder(build_model(tiny_config(latent_size=(16, 16), frame_size=(16, 16), patch_size=8)), tmp_path / "m")
    r = runner.invoke(app, ["eval", "--model", str(wrong), "--clips", "1", "--frames", "1"])
    assert r.exit_code == 2 and "32x32" in r.output, r.output
    r = runner.invoke(app, ["eval", "--model", str(tmp_path / "missing")])
    assert r.exit_code == 2, r.output
