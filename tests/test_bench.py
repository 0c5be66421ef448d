"""scd bench: the FLOP formulas against torch's own count, the report's structure, the CLI's ends."""

import importlib.util
import json
import statistics
import sys
import time

import pytest
import torch
from conftest import random_model, tiny_config
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from scd import bench as bench_lib
from scd import bench_report
from scd.checkpoints import save_model_folder
from scd.flops import frame_flops
from scd.sampling import Frame, kv_cache_bytes, stream
from scd_cli.app import app

runner = CliRunner()


def counted_frames(model, context, frames, steps, guidance=1.0, samples=1):
    """Matmul FLOPs torch counts while `stream` produces each frame. The math attention backend
    decomposes SDPA into bmm, which the counter sees (it has no formula for the CPU flash kernel)."""
    counts = []
    generated = stream(model, context, frames, steps, guidance=guidance, samples=samples)
    with sdpa_kernel(SDPBackend.MATH):
        for u in range(frames):
            with FlopCounterMode(display=False) as counter:
                next(generated)
                if u == frames - 1:  # finish the generator inside the mode it entered its own contexts in
                    assert next(generated, None) is None
            counts.append(counter.get_total_flops())
    return counts


@pytest.mark.parametrize("combine", ["token_concat", "add", "concat", "token_concat_with_proj"])
@pytest.mark.parametrize("arch", ["scd", "baseline"])
def test_frame_flops_match_counted_streaming_frames(arch, combine):
    """frame_flops(config, N, K) is what one streamed frame runs when N frames are cached before its
    clean pass: frame u >= 1 after a context of F frames has N = F + u - 1."""
    config = tiny_config(num_heads=2, head_dim=16, rope_axes=(4, 6, 6), channels=4, latent_size=(8, 8),
                         patch_size=2, layers=3, decoder_layers=1, decoder_combine=combine)
    config = config if arch == "scd" else config.matched()
    model = random_model(config)
    given, steps = 3, 2
    counts = counted_frames(model, torch.randn(1, given, 4, 8, 8), 3, steps)
    for u in (1, 2):
        predicted = frame_flops(config, given + u - 1, steps).total
        assert abs(predicted - counts[u]) / counts[u] < 0.01, (u, predicted, counts[u])
    # the steady-state average the bench reports is the mean of those frames
    average = bench_lib.steady_flops(config, given, 3, steps)["flops_per_frame"]
    assert average == pytest.approx(statistics.fmean(frame_flops(config, given + u - 1, steps).total for u in (1, 2)))


@pytest.mark.parametrize("arch", ["scd", "baseline"])
def test_steady_flops_of_a_median_of_samples_are_what_the_stream_counts(arch):
    """With K samples per frame SCD runs its context pass once and its denoising K times; the
    baseline runs all of it K times. What the bench predicts is what torch counts."""
    config = tiny_config(num_heads=2, head_dim=16, rope_axes=(4, 6, 6), channels=4, latent_size=(8, 8), layers=3)
    config = config if arch == "scd" else config.matched()
    model = random_model(config)
    counts = counted_frames(model, torch.randn(1, 3, 4, 8, 8), 3, 2, samples=4)
    predicted = bench_lib.steady_flops(config, 3, 3, 2, samples=4)["flops_per_frame"]
    assert abs(predicted - statistics.fmean(counts[1:])) / predicted < 0.01
    one = bench_lib.steady_flops(config, 3, 3, 2)
    four = bench_lib.steady_flops(config, 3, 3, 2, samples=4)
    assert four["flops_denoising"] == pytest.approx(4 * one["flops_denoising"])
    assert four["flops_context_pass"] == pytest.approx((1 if arch == "scd" else 4) * one["flops_context_pass"])


def test_frame_flops_split_guidance_and_unconditional_norm():
    config = tiny_config(num_heads=2, head_dim=16, rope_axes=(4, 6, 6), channels=4, latent_size=(8, 8),
                         encoder_norm_unconditional=True)
    scd, base = random_model(config), random_model(config.matched())
    context = torch.randn(1, 4, 4, 8, 8)
    # guidance batches the null pass with the conditioned one: twice the work
    for model in (scd, base):
        counts = counted_frames(model, context, 2, 3, guidance=2.0)
        predicted = frame_flops(model.config, 4, 3, guidance=2.0).total
        assert abs(predicted - counts[1]) / counts[1] < 0.01
    # the denoising part alone, called directly (its conditioning made per call): one decoder step, one baseline step
    t = config.tokens_per_frame
    with sdpa_kernel(SDPBackend.MATH), torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            scd.decoder(torch.randn(1, 4, 8, 8), torch.full((1,), 500.0), torch.randn(1, t, config.width))
        assert counter.get_total_flops() == pytest.approx(frame_flops(config, 4, 1, tabulated=False).denoise, rel=0.01)
        cache = base.new_cache(1, 8)
        base.append(torch.randn(1, 5, 4, 8, 8), None, cache)  # N = 4 cached + the appended previous frame
        with FlopCounterMode(display=False) as counter:
            base(torch.randn(1, 4, 8, 8), torch.full((1,), 500.0), None, cache)
        assert counter.get_total_flops() == pytest.approx(frame_flops(config.matched(), 4, 1, tabulated=False).denoise, rel=0.01)


def tiny_spec(**overrides):
    spec = dict(config=tiny_config(), contexts=(2, 3), steps=(2,), batches=(1, 2), frames=3, reps=2, warmup=1,
                device="cpu", dtype="float32", matmul_size=128)
    spec.update(overrides)
    return bench_lib.BenchSpec(**spec)


def test_report_structure_and_arithmetic():
    events = list(bench_lib.run(tiny_spec()))
    assert isinstance(events[0], bench_lib.Started) and isinstance(events[-1], bench_lib.Finished)
    measured = [e for e in events if isinstance(e, bench_lib.Measured)]
    assert len(measured) == 4 * (1 + 2) * 2
    assert [e.model for e in measured[:6]] == ["scd", "baseline"] * 3
    assert [e.warmup for e in measured[:6]] == [True, True, False, False, False, False]
    report = events[-1].report
    json.dumps(report)  # JSON-ready as it is
    assert {"scd", "baseline", "speedup", "predicted_speedup", "realised_fraction", "device", "settings",
            "rows", "matmul_peak_flops_per_s", "torch"} <= set(report)
    assert report["device"] == "cpu" and report["dtype"] == "float32" and report["matmul_peak_flops_per_s"] > 0
    assert [(r["context"], r["steps"], r["batch"]) for r in report["rows"]] == [(2, 2, 1), (2, 2, 2), (3, 2, 1), (3, 2, 2)]
    assert report["settings"]["contexts"] == [2, 3] and report["settings"]["batches"] == [1, 2]
    config = tiny_config()
    for row in report["rows"]:
        n, k, b = row["context"], row["steps"], row["batch"]
        assert row["settings"]["context"] == n
        for name, c in (("scd", config), ("baseline", config.matched())):
            m = row[name]
            assert 0 < m["latency_ms_min"] <= m["latency_ms_p50"] <= m["latency_ms_p95"]
            assert m["time_to_first_frame_ms"] > 0 and m["frames_per_second"] > 0 and len(m["latency_ms_per_rep"]) == 2
            flops = statistics.fmean(frame_flops(c, n + u - 1, k).total for u in (1, 2))
            assert m["flops_per_frame"] == pytest.approx(flops)
            assert m["achieved_flops_per_s"] == pytest.approx(flops * b / (m["latency_ms_p50"] / 1000))
            assert m["fraction_of_matmul_peak"] == pytest.approx(m["achieved_flops_per_s"] / report["matmul_peak_flops_per_s"])
            model = random_model(c)
            params = sum(p.numel() * 4 for p in model.parameters())
            assert m["peak_memory_bytes"] == params + kv_cache_bytes(model, b, n + 3)
        ratios = [bl / sc for sc, bl in zip(row["scd"]["latency_ms_per_rep"], row["baseline"]["latency_ms_per_rep"])]
        assert row["speedup_per_rep"] == pytest.approx(ratios)
        assert len(row["speedup_per_frame"]) == 2 * 2  # reps x steady frames, each a pair measured back to back
        assert row["speedup"] == pytest.approx(statistics.median(row["speedup_per_frame"]))
        assert row["predicted_speedup"] == pytest.approx(row["baseline"]["flops_per_frame"] / row["scd"]["flops_per_frame"])
        assert row["realised_fraction"] == pytest.approx(row["speedup"] / row["predicted_speedup"])
        assert row["ops_speedup"] == pytest.approx(row["baseline"]["ops_per_frame"] / row["scd"]["ops_per_frame"])
        assert row["launch_bound"] == (row["realised_fraction"] < 0.9 and abs(row["speedup"] / row["ops_speedup"] - 1) < 0.15)
    head = report["rows"][0]
    assert report["speedup"] == head["speedup"] and report["setting"] == {"context": 2, "steps": 2, "batch": 1}
    assert report["scd"]["throughput_fps_by_batch"] == {
        "1": head["scd"]["frames_per_second"], "2": report["rows"][1]["scd"]["frames_per_second"]}


@pytest.mark.parametrize("baseline_ms, launch_bound", [(25.0, True), (39.0, False), (30.0, False)])
def test_a_speedup_that_follows_the_op_ratio_is_launch_bound(baseline_ms, launch_bound):
    # FLOPs predict 4x, ops 2.5x: 2.5x measured is launch-bound; 3.9x realises the FLOPs; 3x is neither
    summaries = {"scd": {"flops_per_frame": 1e6, "ops_per_frame": 100, "time_to_first_frame_ms": 20.0},
                 "baseline": {"flops_per_frame": 4e6, "ops_per_frame": 250, "time_to_first_frame_ms": 50.0}}
    runs = {"scd": [bench_report.RunTimes(20.0, [(4.0, 6.0)] * 3, None)],
            "baseline": [bench_report.RunTimes(50.0, [(5.0, baseline_ms - 5.0)] * 3, None)]}
    row = bench_report.row_result({"context": 3, "steps": 4, "batch": 1}, summaries, runs, {})
    assert row["predicted_speedup"] == 4.0 and row["ops_speedup"] == 2.5
    assert row["speedup"] == pytest.approx(baseline_ms / 10.0)
    assert row["launch_bound"] is launch_bound


def test_run_interleaved_measures_the_models_frame_by_frame(monkeypatch):
    calls = []

    def fake_stream(model, context, frames, steps, **options):
        for u in range(frames):
            calls.append((model, u))
            time.sleep(0.004 if model == "b" else 0.002)
            yield Frame(u, None, 0.25, 0.5)

    monkeypatch.setattr(bench_lib, "stream", fake_stream)
    times = bench_lib.run_interleaved({"scd": "s", "baseline": "b"}, {"scd": torch.zeros(1), "baseline": torch.zeros(1)},
                                      frames=4, steps=1, first=1)
    # both first frames, then one frame of each, the order flipping every frame
    assert calls == [("b", 0), ("s", 0), ("b", 1), ("s", 1), ("s", 2), ("b", 2), ("b", 3), ("s", 3)]
    # latency is the wall time of each frame; its denoising part is the stream's own count
    assert all(d == 0.5 for _, d in times["scd"].steady + times["baseline"].steady)
    # at least the sleep (no upper bound: a loaded machine may take any time to wake a thread)
    assert all(2.0 <= x for x in times["scd"].latencies) and all(4.0 <= x for x in times["baseline"].latencies)
    assert len(times["scd"].latencies) == len(times["baseline"].latencies) == 3  # the frames after the first
    assert times["scd"].time_to_first_frame_ms >= 2.0 and times["baseline"].time_to_first_frame_ms >= 4.0


def test_bad_spec_is_a_config_error():
    from scd.errors import ConfigError

    for bad, message in ((dict(frames=1), "frames must be >= 2"), (dict(reps=0), "reps must be >= 1, got 0"),
                         (dict(contexts=(0,)), r"contexts must be positive integers, got \[0\]"),
                         (dict(preset="Q"), "unknown preset 'Q': choose B, M, L, XL"),
                         (dict(samples=0), "samples must be >= 1 and <= 64, got 0"),
                         (dict(preset="B"), "preset picks random-weight models: drop model/baseline")):
        with pytest.raises(ConfigError, match=message):
            list(bench_lib.run(tiny_spec(**bad)))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    config = tiny_config()
    return {"scd": str(save_model_folder(random_model(config, seed=1), root / "scd")),
            "baseline": str(save_model_folder(random_model(config.matched(), seed=2), root / "baseline"))}


def test_cli_end_to_end_json(folders, tmp_path):
    path = tmp_path / "bench.json"
    r = runner.invoke(app, ["bench", "--model", folders["scd"], "--baseline", folders["baseline"], "--context", "2",
                            "--steps", "2", "--batch", "1,2", "--frames", "2", "--reps", "1", "--warmup", "0",
                            "--device", "cpu", "--matmul-size", "128", "--json", str(path)])
    assert r.exit_code == 0, r.output
    report = json.loads(path.read_text())
    assert report["models"]["scd"]["source"] == folders["scd"]
    assert report["models"]["baseline"]["source"] == folders["baseline"]
    assert len(report["rows"]) == 2 and report["settings"]["batches"] == [1, 2]
    assert set(report["scd"]["throughput_fps_by_batch"]) == {"1", "2"}
    for name in ("scd", "baseline"):
        for key in ("latency_ms_p50", "latency_ms_p95", "time_to_first_frame_ms", "frames_per_second",
                    "flops_per_frame", "achieved_flops_per_s", "fraction_of_matmul_peak", "peak_memory_bytes"):
            assert report[name][key] > 0, (name, key)
    assert report["predicted_speedup"] > 1
    assert f"{report['speedup']:.2f}x" in r.output and f"{report['predicted_speedup']:.2f}x" in r.output
    assert "every setting" in r.output  # the sweep table


def test_cli_baseline_as_model_gets_a_random_matched_scd(folders, tmp_path):
    path = tmp_path / "b.json"
    r = runner.invoke(app, ["bench", "-m", folders["baseline"], "--frames", "2", "--reps", "1", "--warmup", "0",
                            "--batch", "1", "--device", "cpu", "--matmul-size", "128", "--quiet", "--json", str(path)])
    assert r.exit_code == 0, r.output
    assert r.output == ""
    report = json.loads(path.read_text())
    assert report["models"]["baseline"]["source"] == folders["baseline"]
    assert report["models"]["scd"]["source"] == "matched, random weights"
    # the named model's own context and steps are the defaults
    assert report["setting"] == {"context": 3, "steps": 3, "batch": 1}


@pytest.mark.parametrize("args, message", [
    (["--context", "0"], "--context must be >= 1"),
    (["--context", "16,x"], "--context takes a comma list of integers"),
    (["--steps", ""], "--steps takes a comma list"),
    (["--batch", "0,8"], "--batch must be >= 1"),
    (["--frames", "1"], "--frames must be >= 2"),
    (["--reps", "three"], "--reps takes an integer"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--matmul-size", "1.5"], "--matmul-size takes an integer"),
    (["--preset", "Q"], "unknown preset 'Q'"),
    (["--preset", "B", "--model", "somewhere"], "--preset picks random-weight models: drop model/baseline"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--dtype", "int8"], "unknown dtype 'int8'"),
    (["--json", "/nonexistent-dir/b.json"], "/nonexistent-dir does not exist"),
    (["--json", "/dev/null"], "not a regular file"),
    (["--plot", "latency.gif"], "--plot writes .png"),
    (["--model", "/nonexistent-model-dir"], "no model at"),
])
def test_bad_options_are_one_line_exit_2(args, message):
    r = runner.invoke(app, ["bench", *args])
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_baseline_option_must_be_a_baseline(folders):
    r = runner.invoke(app, ["bench", "--baseline", folders["scd"], "--device", "cpu"])
    assert r.exit_code == 2 and "is an SCD model" in r.output


def test_plot_without_matplotlib_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    r = runner.invoke(app, ["bench", "--plot", str(tmp_path / "p.png")])
    assert r.exit_code == 2 and "--plot needs matplotlib" in r.output and "pip install matplotlib" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_plot_writes_a_png(tmp_path):
    """matplotlib is in the [test] extra: the plot is drawn, never skipped."""
    import numpy as np
    from PIL import Image

    report = bench_lib.bench(tiny_spec(contexts=(2, 3), steps=(1, 2), batches=(1,), frames=2, reps=1, warmup=0))
    path = tmp_path / "latency.png"
    bench_report.plot(report, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert min(image.shape[:2]) > 200
    ink = (image.max(-1) - image.min(-1) > 60) | (image.sum(-1) < 300)  # coloured lines or dark text on white
    assert 0.002 < ink.mean() < 0.5  # something drawn, not a blank (or black) canvas


def test_ops_per_frame_grow_by_one_step_of_ops_per_step():
    """count_ops counts what a frame dispatches: each extra denoising step adds the same number,
    fewer for SCD (a 1-block decoder) than for its baseline (3 blocks against the cache)."""
    config = tiny_config()
    context = torch.randn(1, 2, 3, 4, 4)
    scd = [bench_lib.count_ops(random_model(config), context, k) for k in (1, 2, 3)]
    ops = [c["ops_per_frame"] for c in scd]
    assert ops[2] - ops[1] == ops[1] - ops[0] > 0, ops
    assert scd[0]["kernel_launches_per_frame"] is None  # no CUDA here
    base = [bench_lib.count_ops(random_model(config.matched()), context, k)["ops_per_frame"] for k in (1, 2)]
    assert 2 * (ops[1] - ops[0]) < base[1] - base[0]


def test_compiled_bench_reports_compiled_against_eager():
    report = bench_lib.bench(tiny_spec(contexts=(2,), batches=(1,), frames=2, reps=1, warmup=0, compiled="eager"))
    assert report["report_version"] == 2 and report["settings"]["compiled"] == "eager"
    for name in ("scd", "baseline", "scd_compiled", "baseline_compiled"):
        m = report[name]
        assert m["latency_ms_p50"] > 0 and m["ops_per_frame"] > 0 and m["context_ms_p50"] >= 0 and m["denoise_ms_p50"] > 0
    row = report["rows"][0]
    assert set(report["compiled_speedup"]) == {"scd", "baseline"}
    assert row["compiled_speedup"] == report["compiled_speedup"] and all(v > 0 for v in row["compiled_speedup"].values())
    assert report["compiled_pair"]["realised_fraction"] == pytest.approx(
        report["compiled_pair"]["speedup"] / report["predicted_speedup"])
    runs = {r["model"]: r for r in report["compile"]["runs"]}
    assert set(runs) == {"scd_compiled", "baseline_compiled"} and report["compile"]["backend"] == "eager"
    assert all(r["first_run_s"] > 0 and r["recompiles_while_measuring"] == 0 for r in runs.values())


# ----------------------------------------------------------------------------- the Wan family, benched alone

def wan_config(**overrides):
    from scd.models import WanConfig

    sizes = dict(dim=32, ffn_dim=48, freq_dim=16, num_heads=2, num_layers=2, text_dim=24, text_len=6, channels=4,
                 latent_size=(4, 6), frame_size=(32, 48), chunk_frames=2, denoising_steps=(1000, 500))
    return WanConfig(**{**sizes, **overrides})


@pytest.mark.parametrize("window", [None, (4, 1)])
def test_wan_model_is_benched_alone_chunk_by_chunk(window, tmp_path):
    """A model without a counterpart: one summary per row, per chunk, with FLOPs from flops.py, the
    cache after every chunk (flat under a rolling window) and the frames rounded up to chunks."""
    from scd.flops import chunk_flops, stream_flops
    from scd.models import build_model

    local, sinks = window or (None, 0)
    config = wan_config(local_attn_size=local, sink_size=sinks)
    spec = bench_lib.BenchSpec(config=config, frames=7, reps=2, warmup=1, batches=(1, 2), device="cpu",
                               dtype="float32", matmul_size=128)
    events = list(bench_lib.run(spec))
    assert isinstance(events[0], bench_lib.Started) and events[0].alone and events[0].scd == "random weights"
    measured = [e for e in events if isinstance(e, bench_lib.Measured)]
    assert len(measured) == 2 * (1 + 2) and {(e.model, e.per) for e in measured} == {("model", "chunk")}
    report = events[-1].report
    assert report["alone"] and report["complete"] and "scd" not in report and "speedup" not in report
    assert report["settings"]["frames"] == 8 and report["settings"]["chunks"] == 4  # 7 frames: 4 chunks of 2
    assert report["models"]["model"]["chunk_frames"] == 2 and report["models"]["model"]["window"] == local
    assert [r["batch"] for r in report["rows"]] == [1, 2] and set(report["model"]["throughput_fps_by_batch"]) == {"1", "2"}
    m = report["model"]
    # chunks 1..3 are steady: N = 0, 2, 4 frames cached before their clean pass
    counts = [chunk_flops(config, n, 2) for n in (0, 2, 4)]
    assert m["flops_per_chunk"] == pytest.approx(statistics.fmean(c.total for c in counts))
    assert m["flops_denoising"] == pytest.approx(statistics.fmean(c.denoise for c in counts))
    assert m["flops_per_frame"] == pytest.approx(m["flops_per_chunk"] / 2)
    assert m["flops_once_per_stream"] == stream_flops(config) > 0
    model = build_model(config)
    assert m["parameters"] == sum(p.numel() for p in model.parameters())
    assert m["cache_bytes_by_chunk"] == [model.cache_bytes(1, f, torch.float32) for f in (2, 4, 6, 8)]
    assert m["cache_bytes_flat"] is (window is not None)
    if window:
        assert m["cache_bytes_by_chunk"][1:] == [m["cache_bytes_by_chunk"][1]] * 3
    assert [f for f, _ in m["memory_by_chunk"]] == [2, 4, 6, 8]
    assert m["peak_memory_bytes"] == m["parameter_bytes"] + max(m["cache_bytes_by_chunk"])
    for key in ("latency_ms_per_chunk_p50", "latency_ms_per_frame_p50", "denoise_ms_p50", "time_to_first_chunk_ms",
                "achieved_flops_per_s", "fraction_of_matmul_peak", "ops_per_chunk", "frames_per_second"):
        assert m[key] > 0, key
    assert m["latency_ms_per_frame_p50"] == pytest.approx(m["latency_ms_per_chunk_p50"] / 2)
    assert m["achieved_flops_per_s"] == pytest.approx(m["flops_per_chunk"] / (m["latency_ms_per_chunk_p50"] / 1000))
    if window is None and importlib.util.find_spec("matplotlib"):
        bench_report.plot(report, tmp_path / "wan.png")
        assert (tmp_path / "wan.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    """`scd convert` of the Self-Forcing fixture, at 8 x 8 latents so that a bench takes a second."""
    from pathlib import Path

    source = Path(__file__).parent / "fixtures" / "reference" / "sfwan0" / "generator.pt"
    out = tmp_path_factory.mktemp("wan") / "wan"
    r = runner.invoke(app, ["convert", str(source), "--to", "baseline", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    data = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**data, "latent_size": [8, 8], "frame_size": [64, 64]}))
    return str(out)


def test_cli_benches_a_wan_folder_alone(wan_folder, tmp_path):
    from scd.checkpoints import load_model
    from scd.flops import chunk_flops

    path = tmp_path / "wan.json"
    r = runner.invoke(app, ["bench", "--model", wan_folder, "--steps", "2", "--frames", "4", "--batch", "1",
                            "--reps", "1", "--warmup", "0", "--device", "cpu", "--matmul-size", "128",
                            "--json", str(path)])
    assert r.exit_code == 0, r.output
    report = json.loads(path.read_text())
    config = load_model(wan_folder).config
    assert report["alone"] and report["models"]["model"]["source"] == wan_folder
    assert report["models"]["model"]["tokens_per_frame"] == 16 and report["settings"]["text"] == "random normal, 8 x 32"
    m = report["model"]
    assert report["settings"]["frames"] == 6 and len(m["cache_bytes_by_chunk"]) == 2  # 4 frames: 2 chunks of 3
    assert m["flops_per_chunk"] == chunk_flops(config, 0, 2).total  # the one steady chunk: N = 0
    text = " ".join(r.output.split())
    assert "latency per chunk of 3, p50 ms" in text and f"{m['latency_ms_per_chunk_p50']:,.1f}" in text
    assert f"{m['flops_per_chunk'] / 1e9:,.2f}" in text and "benched alone" in text and "SCD" not in text
    for args, message in ((["--baseline", wan_folder], "drop --baseline: this model"),
                          (["--compile"], "drop --compile")):
        r = runner.invoke(app, ["bench", "--model", wan_folder, "--device", "cpu", *args])
        assert r.exit_code == 2 and message in r.output, r.output


def test_wan_preset_is_the_real_size_benched_alone(monkeypatch):
    """`--preset WAN-1.3B` benches Wan2.1-T2V-1.3B's sizes at 480x832 alone (checked here up to the
    model it builds: the real size is for GPUs)."""
    from scd.errors import ConfigError

    built = []

    def refuse(config, *args, **kwargs):
        built.append(config)
        raise ConfigError("stop: the test only checks the config")

    monkeypatch.setattr(bench_lib, "build_model", refuse)
    with pytest.raises(ConfigError, match="stop"):
        list(bench_lib.run(bench_lib.BenchSpec(preset="wan-1.3B", device="cpu")))
    (config,) = built
    assert (config.family, config.dim, config.num_layers, config.ffn_dim, config.num_heads) == ("wan", 1536, 30, 8960, 12)
    assert (config.latent_size, config.chunk_frames, config.default_steps, config.tokens_per_frame) == ((60, 104), 3, 4, 1560)
    assert config.local_attn_size is None and config.text_len == 512 and config.text_dim == 4096


def test_the_bench_takes_the_thread_default_of_every_command_and_says_it(folders, tmp_path, monkeypatch):
    """Issue 26.4: without --threads the bench runs on the CPUs the machine leaves idle (here a load
    that leaves one), not torch's one per core, and its report and first line say how many."""
    import os

    from scd.devices import available_cpus

    monkeypatch.setattr(os, "getloadavg", lambda: (available_cpus() - 0.5, 0.0, 0.0))  # a busy machine
    before = torch.get_num_threads()
    torch.set_num_threads(available_cpus())
    try:
        path = tmp_path / "bench.json"
        r = runner.invoke(app, ["bench", "--model", folders["scd"], "--baseline", folders["baseline"], "--context", "2",
                                "--steps", "2", "--batch", "1", "--frames", "2", "--reps", "1", "--warmup", "0",
                                "--device", "cpu", "--matmul-size", "64", "--json", str(path)])
        assert torch.get_num_threads() == available_cpus()  # put back after the bench
    finally:
        torch.set_num_threads(before)
    assert r.exit_code == 0, r.output
    report = json.loads(path.read_text())
    assert report["threads"] == 1 and report["device_name"].endswith(", 1 thread")
    assert "1 CPU threads" in r.output


def test_the_bench_prints_no_profiler_marks(folders, tmp_path):
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "scd_cli", "bench", "--model", folders["scd"], "--baseline", folders["baseline"],
                           "--context", "2", "--steps", "2", "--batch", "1", "--frames", "2", "--reps", "1", "--warmup", "0",
                           "--device", "cpu", "--matmul-size", "64", "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "USDT" not in proc.stdout + proc.stderr and "profiler_start" not in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------- SCD from Wan against its causal Wan

def test_scd_wan_is_benched_against_its_causal_wan_chunk_by_chunk():
    """An SCD-Wan config: both it and the causal Wan of its source depth (random weights) stream
    interleaved; per model a per-chunk summary with flops.py's FLOPs, the speed-up per chunk beside
    the FLOPs' and the ops' prediction. `chunk_frames` 1 streams both frame-wise."""
    from scd.flops import chunk_flops, matched_config

    config = wan_config(arch="scd", num_layers=3, encoder_layers=2, decoder_layers=1)
    spec = bench_lib.BenchSpec(config=config, frames=5, reps=2, warmup=1, batches=(1,), device="cpu",
                               dtype="float32", matmul_size=128)
    events = list(bench_lib.run(spec))
    started = events[0]
    assert not started.alone and (started.scd, started.baseline) == ("random weights", "matched, random weights")
    measured = [e for e in events if isinstance(e, bench_lib.Measured)]
    assert len(measured) == 2 * 3 and {(e.model, e.per) for e in measured} == {("scd", "chunk"), ("baseline", "chunk")}
    report = events[-1].report
    assert report["chunked"] and report["complete"] and not report.get("alone")
    assert report["settings"]["chunks"] == 3 and report["settings"]["frames"] == 6
    models = report["models"]
    assert (models["scd"]["arch"], models["baseline"]["arch"]) == ("scd", "baseline")
    assert models["baseline"]["layers"] == "2" and matched_config(config).num_layers == 2
    base = matched_config(config)
    for name, c in (("scd", config), ("baseline", base)):
        counts = [chunk_flops(c, n, 2) for n in (0, 2)]  # steady chunks 1, 2
        assert report[name]["flops_per_chunk"] == pytest.approx(statistics.fmean(x.total for x in counts))
        assert report[name]["ops_per_chunk"] > 0 and report[name]["latency_ms_per_chunk_p50"] > 0
        assert len(report[name]["latency_ms_per_rep"]) == 2
    assert report["predicted_speedup"] == pytest.approx(report["baseline"]["flops_per_chunk"]
                                                        / report["scd"]["flops_per_chunk"])
    assert report["ops_speedup"] == report["baseline"]["ops_per_chunk"] / report["scd"]["ops_per_chunk"]
    # an eager op count does not depend on the sizes: `chunk_ops` (scd info's prediction) counts a shrunk copy
    assert report["scd"]["ops_per_chunk"] == bench_lib.chunk_ops(config, 2)
    assert report["baseline"]["ops_per_chunk"] == bench_lib.chunk_ops(base, 2)
    assert report["realised_fraction"] == pytest.approx(report["speedup"] / report["predicted_speedup"])
    row = report["rows"][0]
    assert len(row["speedup_per_chunk"]) == 2 * 2 and report["speedup"] == statistics.median(row["speedup_per_chunk"])
    assert isinstance(report["launch_bound"], bool)
    # frame-wise: both models' chunk overridden
    spec = bench_lib.BenchSpec(config=config, frames=3, reps=1, warmup=0, batches=(1,), device="cpu",
                               dtype="float32", matmul_size=128, chunk_frames=1)
    report = bench_lib.bench(spec)
    assert report["settings"]["chunk_frames"] == 1 and report["settings"]["chunk_frames_overridden"]
    assert report["models"]["baseline"]["chunk_frames"] == 1 and report["settings"]["chunks"] == 3
    frame_wise = wan_config(arch="scd", num_layers=3, encoder_layers=2, decoder_layers=1, chunk_frames=1)
    assert report["scd"]["flops_per_chunk"] == pytest.approx(
        statistics.fmean(chunk_flops(frame_wise, n, 2).total for n in (0, 1)))


def test_bench_refuses_what_the_wan_pair_cannot_run():
    from scd.errors import ConfigError

    config = wan_config(arch="scd", num_layers=3, encoder_layers=2, decoder_layers=1)
    for spec, words in ((bench_lib.BenchSpec(config=config, compiled=True, device="cpu"), "drop compiled"),  # the library names the parameter; the CLI its flag
                        (bench_lib.BenchSpec(chunk_frames=2, device="cpu"), "one frame at a time"),
                        (bench_lib.BenchSpec(config=config, chunk_frames=0, device="cpu"), "chunk_frames must be")):
        with pytest.raises(ConfigError, match=words):
            list(bench_lib.run(spec))


@pytest.fixture(scope="module")
def scd_wan_folder(tmp_path_factory):
    """`scd convert --to scd` of the Self-Forcing fixture (its 2 blocks: encoder 0, decoder 0, 1), at 8 x 8 latents."""
    from pathlib import Path

    source = Path(__file__).parent / "fixtures" / "reference" / "sfwan0" / "generator.pt"
    out = tmp_path_factory.mktemp("scdwan") / "scd"
    r = runner.invoke(app, ["convert", str(source), "--to", "scd", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    data = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**data, "latent_size": [8, 8], "frame_size": [64, 64]}))
    return str(out)


def test_cli_benches_an_scd_wan_folder_against_its_causal_wan(scd_wan_folder, wan_folder, tmp_path):
    from scd.checkpoints import load_model
    from scd.flops import chunk_flops

    path = tmp_path / "pair.json"
    args = ["bench", "--model", scd_wan_folder, "--baseline", wan_folder, "--steps", "2", "--frames", "4",
            "--batch", "1", "--reps", "1", "--warmup", "0", "--device", "cpu", "--matmul-size", "128"]
    r = runner.invoke(app, [*args, "--json", str(path)])
    assert r.exit_code == 0, r.output
    report = json.loads(path.read_text())
    assert report["chunked"] and report["settings"]["weights"] == {"scd": scd_wan_folder, "baseline": wan_folder}
    assert report["warnings"] == []  # the pair is matched: same sizes, source depth 2 = the causal 2 blocks
    scd_config, base_config = load_model(scd_wan_folder).config, load_model(wan_folder).config
    assert report["scd"]["flops_per_chunk"] == chunk_flops(scd_config, 0, 2).total
    assert report["baseline"]["flops_per_chunk"] == chunk_flops(base_config, 0, 2).total
    text = " ".join(r.output.split())
    assert "SCD-Wan" in text and "causal Wan" in text and f"{report['speedup']:.2f}x faster per chunk" in text
    assert f"FLOPs predict {report['predicted_speedup']:.2f}x" in text and f"ops {report['ops_speedup']:.2f}x" in text
    r = runner.invoke(app, [*args, "--chunk-frames", "1", "--json", str(path), "-q"])
    assert r.exit_code == 0 and r.output == "", r.output
    assert json.loads(path.read_text())["scd"]["chunk_frames"] == 1
    for extra, message in ((["--chunk-frames", "0"], "--chunk-frames must be >= 1"), (["--compile"], "drop --compile")):
        r = runner.invoke(app, [*args, *extra])
        assert r.exit_code == 2 and message in r.output, r.output
    r = runner.invoke(app, ["bench", "--baseline", wan_folder, "--device", "cpu"])
    assert r.exit_code == 2 and "give that as --model" in r.output, r.output
    r = runner.invoke(app, ["bench", "--model", scd_wan_folder, "--baseline", scd_wan_folder, "--device", "cpu"])
    assert r.exit_code == 2 and "is not a causal Wan" in r.output, r.output


def test_scd_wan_preset_is_the_papers_split_of_the_real_size(monkeypatch):
    """`--preset SCD-WAN-1.3B`: the paper's split of Wan2.1-T2V-1.3B (encoder 0-24, decoder 0-4 and
    25-29) against WAN-1.3B, both built (checked here up to the models it builds)."""
    from scd.errors import ConfigError

    built = []

    def record(config, *args, **kwargs):
        built.append(config)
        if len(built) == 2:
            raise ConfigError("stop: the test only checks the configs")

    monkeypatch.setattr(bench_lib, "build_model", record)
    with pytest.raises(ConfigError, match="stop"):
        list(bench_lib.run(bench_lib.BenchSpec(preset="scd-wan-1.3B", device="cpu")))
    scd, base = built
    assert (scd.arch, scd.encoder_layers, scd.decoder_layers, scd.dim, scd.tokens_per_frame) == ("scd", 25, 10, 1536, 1560)
    assert scd.source_blocks == (tuple(range(25)), (0, 1, 2, 3, 4, 25, 26, 27, 28, 29))
    assert (base.arch, base.num_layers, base.ffn_dim, base.chunk_frames, base.default_steps) == ("baseline", 30, 8960, 3, 4)
