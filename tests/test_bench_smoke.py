"""The tier benchmark runs end to end on tiny sizes and reports every figure.

No timing is asserted: machines are shared and noisy. What is checked is that every section is there, every
figure is a positive number and the store returned the bytes it was given.
"""
from __future__ import annotations

import errno
import io
import json
import math
import os

import pytest

from tierkv.bench.progress import Progress
from tierkv.bench.tier import main

TINY = ["--layers", "2", "--kv-heads", "2", "--head-dim", "64", "--block-tokens", "16",  # 16 KiB blocks
        "--total-bytes", "1MiB", "--repeats", "2", "--threads", "2", "--prompt-tokens", "4096",
        "--trace-requests", "150"]


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "results" / "tier_bench.json"
    assert main([*TINY, "--disk-dir", str(tmp), "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_every_tier_reports_positive_bandwidth_beside_its_ceiling(report: dict) -> None:
    assert set(report["tiers"]) == {"host", "device", "disk"}
    for tier, section in report["tiers"].items():
        assert section["verified"], (tier, section["verify_failures"])
        assert set(section["paths"]) == {"put", "get_out", "get_fresh"}
        for op, path in section["paths"].items():
            for name in ("ours_gbps", "ceiling_gbps", "ratio", "bytes"):
                assert _positive(path[name]), (tier, op, name, path[name])
            assert len(path["ours_s"]) == len(path["ceiling_s"]) == 2
            assert all(_positive(s) for s in path["ours_s"] + path["ceiling_s"])


def test_targets_are_reported_for_the_judged_paths_only(report: dict) -> None:
    host, disk = report["tiers"]["host"]["paths"], report["tiers"]["disk"]["paths"]
    for path in (host["put"], host["get_out"], disk["put"], disk["get_out"]):
        assert path["target_ratio"] == 0.8 and path["result"] in ("PASS", "BELOW")
    assert host["get_fresh"]["target_ratio"] is None and host["get_fresh"]["result"] == "info"


def test_disk_section_says_how_the_ceiling_was_measured(report: dict) -> None:
    disk = report["tiers"]["disk"]
    assert isinstance(disk["o_direct"], bool)
    assert disk["filesystem"]["type"]
    assert "pwritev" in disk["ceiling"]


def test_block_keys_reports_reference_and_native_when_built(report: dict) -> None:
    keys = report["keys"]
    assert keys["verified"], keys["verify_failures"]
    assert keys["keys"] == 4096 // 16
    assert _positive(keys["reference_best_s"])
    if keys["native_status"].startswith("native"):
        assert _positive(keys["native_best_s"]) and _positive(keys["speedup"])
    else:
        assert keys["speedup"] is None


def test_machine_and_config_are_described(report: dict) -> None:
    machine, config = report["machine"], report["config"]
    assert _positive(machine["cpu_cores"]) and _positive(machine["memory_bytes"])
    assert machine["torch"] and machine["native_ops"]
    assert config["block_nbytes"] == 2 * 2 * 16 * 2 * 64 * 2
    assert config["blocks"] == (1 << 20) // config["block_nbytes"]
    assert _positive(report["duration_s"]) and report["verified"]


def test_tier_subset_runs_only_what_was_asked(tmp_path) -> None:
    out = tmp_path / "r.json"
    assert main([*TINY, "--tiers", "host", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["tiers"]) == {"host"} and "keys" not in data


def test_disk_ceiling_falls_back_to_buffered_io_where_o_direct_is_refused(tmp_path, monkeypatch) -> None:
    real_open = os.open

    def open_without_direct(path, flags, *args, **kwargs):  # what tmpfs on older kernels answers
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_without_direct)
    out = tmp_path / "r.json"
    assert main([*TINY, "--tiers", "disk", "--disk-dir", str(tmp_path), "--out", str(out)]) == 0
    disk = json.loads(out.read_text())["tiers"]["disk"]
    assert disk["o_direct"] is False and "buffered" in disk["ceiling"]
    assert any("O_DIRECT" in note for note in disk["notes"])
    assert all(_positive(p["ours_gbps"]) and _positive(p["ceiling_gbps"]) for p in disk["paths"].values())


def test_progress_writes_plain_lines_when_not_a_terminal() -> None:
    stream = io.StringIO()
    with Progress(2, stream=stream) as progress:
        progress.step("first")
        progress.step("second")
    assert stream.getvalue() == "[1/2] first\n[2/2] second\n"


def test_codec_lookup_and_disk_codec_sections_report_their_figures(report: dict) -> None:
    codec = report["codec"]
    assert codec["verified"], codec["verify_failures"]
    assert _positive(codec["memcpy_gbps"])
    for name in ("fp8", "int8"):
        entry = codec["codecs"][name]
        assert _positive(entry["reference_quantize_gbps"]) and _positive(entry["reference_dequantize_gbps"])
    lookup = report["lookup"]
    assert lookup["verified"], lookup["verify_failures"]
    assert lookup["blocks"] == 4096 // 16
    assert _positive(lookup["native_best_s"]) and _positive(lookup["python_best_s"])
    disk = report["disk_codec"]
    assert disk["verified"], disk["verify_failures"]
    assert disk["codecs"]["none"]["relative_rms_error"] == 0
    assert 0 < disk["codecs"]["fp8"]["relative_rms_error"] <= 0.04
    for codec_name in ("none", "fp8"):
        assert _positive(disk["codecs"][codec_name]["get_gbps"])
    assert _positive(disk["get_ratio"])


def test_policy_trace_reports_both_policies_on_the_same_requests(report: dict) -> None:
    policy = report["policy"]
    assert policy["requests"] == 150
    for name in ("lru", "relevance"):
        run = policy[name]
        assert run["policy"] == name and run["requested_blocks"] == policy["lru"]["requested_blocks"] > 0
        assert 0 <= run["cached_blocks"] <= run["requested_blocks"]
        assert run["hit_rate"] == run["cached_blocks"] / run["requested_blocks"]
        assert sum(t["hits"] for t in run["tiers"].values()) >= run["cached_blocks"]
    assert policy["gain_points"] == 100 * (policy["relevance"]["hit_rate"] - policy["lru"]["hit_rate"])


def test_async_section_reports_put_latency_and_hidden_traffic(report: dict) -> None:
    r = report["async"]
    for mode in ("write_behind", "synchronous"):
        for name in ("mean_put_s", "p50_put_s", "max_put_s", "total_s"):
            assert _positive(r[mode][name]), (mode, name, r[mode][name])
    for kind in ("device->host", "disk"):
        for name in ("compute_s", "traffic_s", "both_s"):
            assert _positive(r[kind][name]), (kind, name, r[kind][name])
        assert 0.0 <= r[kind]["hidden_share"] <= 1.0
        assert sum(r[kind]["bytes_moved"].values()) > 0
    assert not [f for f in report["verify_failures"] if f.startswith("async")]
