"""``tierkv bench paths`` and the ``tierkv bench`` dispatcher on tiny sweeps: every path is there with its
ceiling, the sweep covers every block size and thread count asked for, bytes are verified. No speed is
asserted (machines are shared and noisy)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tierkv.bench import paths as paths_bench
from tierkv.bench.main import main as bench_main
from tierkv.bench.models import PRESETS
from tierkv.bench.plots import plots_available

# Llama-3-8B blocks of 1 and 2 tokens: 128 KiB and 256 KiB; 8 blocks per measurement.
TINY = ["--block-sizes", "128KiB,256KiB", "--io-threads", "1,2", "--total-bytes", "1MiB", "--repeats", "2"]


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("paths")
    out = tmp / "out"
    assert paths_bench.main([*TINY, "--disk-dir", str(tmp), "--out-dir", str(out)]) == 0
    data = json.loads((out / "paths.json").read_text())
    data["_out"] = str(out)
    return data


def test_every_path_is_measured_at_every_block_size(report: dict) -> None:
    rows = report["paths"]["rows"]
    assert report["verified"], report["verify_failures"]
    kinds = {r["path"] for r in rows}
    assert {"host put", "host get (out=)", "disk put+flush", "disk get cold (out=)", "fp8 quantize",
            "fp8 dequantize", "int8 quantize", "int8 dequantize"} <= kinds
    assert any(k.startswith("device put") for k in kinds) == torch.cuda.is_available()
    assert any(k.startswith("h2d get") for k in kinds) == torch.cuda.is_available()
    assert {r["block_bytes"] for r in rows} == {128 << 10, 256 << 10}
    for r in rows:
        for name in ("ours_gbps", "ceiling_gbps", "ratio"):
            assert _positive(r[name]), r
        assert len(r["ours_s"]) == len(r["ceiling_s"]) == 2
        assert r["ratio"] == pytest.approx(r["ours_gbps"] / r["ceiling_gbps"])


def test_disk_paths_sweep_thread_counts_against_a_ceiling_with_as_many_threads(report: dict) -> None:
    disk = [r for r in report["paths"]["rows"] if r["path"].startswith("disk")]
    assert {(r["block_bytes"], r["threads"]) for r in disk} == {(b, t) for b in (128 << 10, 256 << 10)
                                                               for t in (1, 2)}
    for r in disk:
        assert f"{r['threads']} threads" in r["ceiling"]
        assert r["target"] == 0.8 and r["result"] in ("PASS", "BELOW")


def test_judged_paths_are_counted(report: dict) -> None:
    paths = report["paths"]
    judged = [r for r in paths["rows"] if r["target"] is not None]
    assert paths["judged"] == len(judged)
    assert paths["passed"] + len(paths["below"]) == len(judged)
    codec = [r for r in paths["rows"] if "quantize" in r["path"]]
    assert codec and all(r["target"] is None and r["result"] == "info" for r in codec)


def test_the_machine_is_described(report: dict) -> None:
    assert _positive(report["machine"]["cpu_cores"]) and report["machine"]["torch"]
    assert report["paths"]["disk"]["filesystem"]["type"]


@pytest.mark.skipif(not plots_available()[0], reason="matplotlib is not installed")
def test_the_bandwidth_plot_is_written(report: dict) -> None:
    data = (Path(report["_out"]) / "paths_bandwidth.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"


def test_block_sizes_become_whole_tokens_of_the_models_layout() -> None:
    layouts = paths_bench.block_layouts(PRESETS["llama-3-8b"], (256 << 10, 2 << 20, 2 << 20, 32 << 20, 1))
    assert [l.block_tokens for l in layouts] == [1, 2, 16, 256]  # 1 byte rounds up to one token
    assert layouts[2].block_nbytes == 2 << 20


def test_quick_profile_fills_in_only_what_is_not_given() -> None:
    argv = paths_bench.apply_profile(["--profile", "quick", "--repeats", "7"])
    a = paths_bench.build_parser().parse_args(argv)
    assert a.repeats == 7
    assert a.block_sizes == paths_bench.QUICK["block_sizes"]
    assert a.io_threads == paths_bench.QUICK["threads"]


def test_bad_paths_options_exit_with_what_was_expected(capsys: pytest.CaptureFixture) -> None:
    for argv, fragment in ((["--paths", "host,tape"], "expected --paths"),
                           (["--io-threads", "0"], "thread counts >= 1"),
                           (["--block-sizes", "big"], "expected")):
        with pytest.raises(SystemExit) as info:
            paths_bench.main(argv)
        assert info.value.code == 2
        assert fragment in capsys.readouterr().err


def test_the_bench_command_dispatches_subcommands(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert bench_main(["paths", *TINY, "--paths", "host", "--no-plots", "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "paths.json").exists()
    assert bench_main(["tape"]) == 2
    assert "expected a subcommand" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        bench_main(["--sections", "paths,coffee"])
    assert info.value.code == 2
