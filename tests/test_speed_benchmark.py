"""benchmarks/bench_speed.py (issue 10's table) and its transcription of upstream's network."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

from models import MAEST, MAESTConfig

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_speed  # noqa: E402
from upstream_passt import UpstreamMAEST  # noqa: E402


def test_the_upstream_transcription_computes_our_logits_from_our_weights():
    """The "upstream" timing is of the same computation: same state dict, same logits."""
    torch.manual_seed(0)
    ours = MAEST(MAESTConfig(n_classes=7, input_t=200, embed_dim=64, depth=2, num_heads=4)).eval()
    upstream = UpstreamMAEST(img_size=(96, 200), num_classes=7, embed_dim=64, depth=2, num_heads=4).eval()
    upstream.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 96, 180)
    with torch.no_grad():
        logits, features = upstream(x)
        torch.testing.assert_close(logits, ours(x), rtol=1e-5, atol=1e-5)
        tokens = ours.forward_features(x)
        torch.testing.assert_close(features, (tokens[:, 0] + tokens[:, 1]) / 2, rtol=1e-5, atol=1e-5)
    upstream.s_patchout_t = 5
    upstream.train()
    assert upstream(x)[0].shape == (2, 7)  # its training patchout runs


def test_quick_run_prints_and_writes_the_table_with_shares_of_the_measured_ceiling(tmp_path, capsys):
    out = tmp_path / "speed.json"
    report = bench_speed.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    rows = report["rows"]
    assert [(r["work"], r["impl"], r["precision"]) for r in rows] == [v for n, v in bench_speed.VARIANTS.items() if n not in bench_speed.COMPILED]
    ceiling = report["ceiling_gflops"]
    assert set(ceiling) == {"fp32", "bf16"} and min(ceiling.values()) > 0
    for r in rows:
        assert set(r) == set(report["columns"])
        assert r["seconds"] > 0 and r["peak_mb"] > 0
        flops = report["meta"]["forward_flops" if r["work"] == "forward" else "train_flops"]
        assert r["gflops"] == pytest.approx(flops / r["seconds"] / 1e9)
        name = next(n for n, v in bench_speed.VARIANTS.items() if v == (r["work"], r["impl"], r["precision"]))
        assert r["ceiling_gflops"] == report["raw"][name]["ceiling_gflops"] > 0  # measured in the variant's run
        assert r["share_of_ceiling"] == pytest.approx(r["gflops"] / r["ceiling_gflops"])
        best = report["best_ceiling_gflops"][r["precision"]]
        assert best >= max(ceiling[r["precision"]], r["ceiling_gflops"])
        assert r["share_of_run_ceiling"] == pytest.approx(r["gflops"] / best)
        upstream = next(u for u in rows if u["work"] == r["work"] and u["impl"] == "upstream")
        assert r["speedup_vs_upstream_fp32"] == pytest.approx(upstream["seconds"] / r["seconds"])
        assert r["peak_vs_upstream_fp32"] == pytest.approx(r["peak_mb"] / upstream["peak_mb"])
    printed = capsys.readouterr().out
    assert "| work | code | precision | seconds | peak MB | vs upstream fp32 |" in printed
    assert printed.count("| ours |") == 4 and "matmul ceiling on cpu" in printed
    assert "| ours, module.release_freed_memory=False | bf16 |" in printed  # the config key README's table names
    # the machine is named, with its matrix units (AMX or not changes the bf16 ceiling several times over)
    assert report["meta"]["cpu"] == bench_speed.cpu_description() and report["meta"]["cpu"] in printed


def test_a_run_whose_ceilings_swing_says_its_figures_are_unreliable():
    results = {"forward-ours-fp32": {"ceilings": [180.0, 175.0]}, "forward-ours-bf16": {"ceilings": [400.0, 120.0]}}
    lines = bench_speed.unsteady_ceilings(results, {"fp32": 190.0, "bf16": 390.0})
    assert lines == ["the bf16 ceiling ranged from 120 to 400 GFLOP/s in this run: other work shared the machine, so times "
                     "and shares are unreliable; rerun when it is idle"]
    assert bench_speed.unsteady_ceilings({"forward-ours-fp32": {"ceilings": [180.0]}}, {"fp32": 190.0, "bf16": 390.0}) == []


def test_cpu_description_names_the_model_and_matrix_units(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n\n")
    real_path = bench_speed.Path
    monkeypatch.setattr(bench_speed, "Path", lambda p: real_path(cpuinfo) if p == "/proc/cpuinfo" else real_path(p))
    assert bench_speed.cpu_description() == "Some Xeon (AMX, AVX-512 BF16, AVX-512)"
    cpuinfo.write_text("model name\t: AMD EPYC\nflags\t\t: fpu avx512f avx512_bf16\n")
    assert bench_speed.cpu_description() == "AMD EPYC (AVX-512 BF16, AVX-512, no AMX)"
    cpuinfo.write_text("model name\t: Old CPU\nflags\t\t: fpu sse2 avx2\n")
    assert bench_speed.cpu_description() == "Old CPU (no AVX-512 or AMX listed)"


def test_block_parts_reports_linears_and_attention_against_the_ceiling(capsys):
    import bench_block_parts

    rows = bench_block_parts.main(["--rounds", "1", "--tokens", "40", "--precision", "fp32"])
    assert len(rows) == 1
    row = rows[0]
    assert row["precision"] == "fp32" and min(row["ceiling_gflops"], row["linears_gflops"], row["attention_gflops"]) > 0
    assert 0 < row["attention_time_share"] < 1
    # the block's rate lies between its two parts' rates (a FLOP-weighted harmonic mean)
    assert min(row["linears_gflops"], row["attention_gflops"]) <= row["block_gflops"] <= max(row["linears_gflops"], row["attention_gflops"])
    # attention's two matmuls at the fused kernel's blocks, and its exponentials as a share of its time
    assert min(row["qk_block_gflops"], row["pv_block_gflops"]) > 0 and row["exp_share_of_attention"] > 0
    printed = capsys.readouterr().out
    assert "fp32: ceiling" in printed and "Q K^T blocks" in printed and "of attention's time" in printed


def test_optimizer_benchmark_times_the_three_adamw_kernels(capsys):
    import bench_optimizer

    best = bench_optimizer.main(["--rounds", "1", "--arch", "maest-tiny"])
    assert set(best) == {"loop", "foreach", "fused"} and min(best.values()) > 0
    assert capsys.readouterr().out.count("x the loop") == 3


def test_attention_backward_benchmark_times_both_backwards_and_their_errors(capsys):
    import bench_attention_backward

    from models import layers

    attention, step = bench_attention_backward.main(["--quick"])
    for row in (attention, step):
        assert min(row["matmul_backward_median_ms"], row["sdpa_backward_median_ms"], row["speedup_paired_median"]) > 0
        assert row["matmul_backward_min_ms"] <= row["matmul_backward_median_ms"]
    assert 0 < attention["matmul_grad_max_abs_error"] < 0.01 * attention["grad_max_abs"]
    assert 0 < attention["sdpa_grad_max_abs_error"] < 0.01 * attention["grad_max_abs"]
    assert layers.MATMUL_ATTENTION_BACKWARD is True  # the switch is put back
    assert capsys.readouterr().out.count("speed-up, median of paired rounds") == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only (reuse_freed_memory does nothing elsewhere)")
def test_heap_benchmark_pairs_forwards_with_and_without_reusing_freed_memory(tmp_path, capsys):
    import bench_heap

    out = tmp_path / "heap.json"
    rows = bench_heap.main(["--arch", "maest-tiny", "--frames", "316", "--pairs", "2", "--precisions", "fp32",
                            "--batches", "2", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == rows
    (row,) = rows
    assert (row["precision"], row["batch"], row["arch"]) == ("fp32", 2, "maest-tiny")
    assert len(row["glibc_s"]) == len(row["reuse_s"]) == 2 and min(row["glibc_s"] + row["reuse_s"]) > 0
    assert row["speedup_paired_median"] == pytest.approx(statistics.median(g / r for g, r in zip(row["glibc_s"], row["reuse_s"])))
    assert row["glibc_faults_median"] >= 0 and row["reuse_faults_median"] >= 0  # tiny tensors: a few faults either way (tests/test_heap.py checks the effect)
    assert "x with reuse (median of 2 paired forwards)" in capsys.readouterr().out
