"""The serving-trace benchmark (``tierkv bench trace``) and its parts: the workload, the prefill model, the
replay's bookkeeping. Tiny models and tiers; nothing about speed is asserted (machines are shared and noisy)."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import tierkv
from tierkv.bench import trace as trace_bench
from tierkv.bench.models import PRESETS, PrefillModel, measure_prefill_flops
from tierkv.bench.plots import plots_available
from tierkv.bench.workload import WorkloadShape, generate

TINY_MODEL = ["--model", "llama-3-8b", "--layers", "2", "--kv-heads", "2", "--head-dim", "64"]  # 16 KiB blocks
TINY_TRACE = [*TINY_MODEL, "--profile", "quick", "--sessions", "2,8", "--requests", "40",
              "--requests-per-session", "3", "--device-bytes", "1MiB", "--host-bytes", "2MiB",
              "--disk-bytes", "8MiB", "--max-context", "4096"]


# --------------------------------------------------------------------------------------------- workload

def test_the_workload_is_deterministic_for_a_seed() -> None:
    shape = WorkloadShape(sessions=8, requests=60)
    a, b = list(generate(shape, 7)), list(generate(shape, 7))
    assert [(r.at, r.session, r.turn) for r in a] == [(r.at, r.session, r.turn) for r in b]
    assert all(np.array_equal(x.prompt, y.prompt) for x, y in zip(a, b))
    assert [r.session for r in generate(shape, 8)] != [r.session for r in a]


def test_conversations_come_back_with_their_whole_history() -> None:
    requests = list(generate(WorkloadShape(sessions=4, requests=80, mean_turns=50), 0))
    assert [r.at for r in requests] == sorted(r.at for r in requests)
    last: dict[int, object] = {}
    followups = 0
    for r in requests:
        prev = last.get(r.session)
        if prev is not None:
            history = np.concatenate([prev.prompt, prev.reply])
            assert r.turn == prev.turn + 1
            assert np.array_equal(r.prompt[:len(history)], history), "a turn must extend the previous prompt + reply"
            assert len(r.prompt) > len(history)
            followups += 1
        last[r.session] = r
    assert followups >= 60


def test_sessions_share_system_prompts_and_documents() -> None:
    shape = WorkloadShape(sessions=32, requests=200, system_prompts=3, documents=2, document_share=0.5)
    requests = list(generate(shape, 1))
    prefixes = {r.prompt[:r.shared_prefix].tobytes() for r in requests}
    assert len(prefixes) <= 3 + 3 * 2  # every session starts from one of the shared prefixes
    assert {r.kind for r in requests} == {"chat", "document"}
    sessions_per_prefix = {}
    for r in requests:
        sessions_per_prefix.setdefault(r.prompt[:r.shared_prefix].tobytes(), set()).add(r.session)
    assert max(len(s) for s in sessions_per_prefix.values()) >= 5


def test_prompts_stay_within_the_context_limit() -> None:
    shape = WorkloadShape(sessions=4, requests=300, max_context=4096, mean_turns=100,
                          system_tokens=(256, 1024), document_tokens=(1024, 2560))
    assert max(len(r.prompt) for r in generate(shape, 0)) <= 4096


@pytest.mark.parametrize("bad, fragment", [
    (dict(sessions=0), "sessions >= 1"),
    (dict(document_share=1.5), "document_share in [0, 1]"),
    (dict(user_tokens=(10, 5)), "user_tokens as (low, high)"),
    (dict(max_context=100), "max_context >="),
])
def test_bad_workload_shapes_say_what_was_expected(bad: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match="expected") as info:
        WorkloadShape(**bad)
    assert fragment in str(info.value)


# --------------------------------------------------------------------------------------------- prefill model

def test_prefill_flops_follow_the_kaplan_count() -> None:
    p = PRESETS["llama-3-8b"]
    assert 6.9e9 < p.params < 7.0e9  # non-embedding parameters of Llama-3-8B
    d_attn = p.q_heads * p.head_dim
    n = 1000
    assert p.prefill_flops(0, n) == pytest.approx(2 * p.params * n + 4 * p.layers * d_attn * n * (n - 1) / 2)
    # splitting a prompt at any point costs the same as computing it whole
    assert p.prefill_flops(0, 600) + p.prefill_flops(600, 1000) == pytest.approx(p.prefill_flops(0, 1000))
    assert p.prefill_flops(500, 500) == 0.0
    assert p.kv_bytes_per_token == 32 * 2 * 8 * 128 * 2


def test_the_prefill_presets_and_a_given_throughput() -> None:
    p = PRESETS["llama-3-8b"]
    h100 = PrefillModel.from_peak(p, mfu=0.5)
    assert 20_000 < h100.tokens_per_s(2048) < 50_000  # one H100 at half its dense BF16 peak
    assert PRESETS["llama-3-70b"].gpus == 8
    given = PrefillModel.from_tokens_per_s(p, 10_000, at_tokens=2048)
    assert given.tokens_per_s(2048) == pytest.approx(10_000)
    with pytest.raises(ValueError, match="expected an MFU"):
        PrefillModel.from_peak(p, mfu=0)


def test_measured_prefill_runs_a_layer_of_the_models_width() -> None:
    small = replace(PRESETS["qwen2.5-7b"], hidden=256, q_heads=4, kv_heads=2, head_dim=64, intermediate=512)
    flops, info = measure_prefill_flops(small, prompt_tokens=64, layers=1, repeats=1)
    assert flops > 0 and math.isfinite(flops)
    assert info["layers_timed"] == 1 and info["prompt_tokens"] == 64


# --------------------------------------------------------------------------------------------- replay

@pytest.fixture(scope="module")
def trace_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("trace")
    out = tmp / "out"
    assert trace_bench.main([*TINY_TRACE, "--disk-dir", str(tmp), "--out-dir", str(out)]) == 0
    report = json.loads((out / "trace.json").read_text())
    report["_out"] = str(out)
    return report


def test_every_level_replays_every_configuration(trace_report: dict) -> None:
    trace = trace_report["trace"]
    assert trace_report["verified"], trace_report["verify_failures"]
    assert [level["sessions"] for level in trace["levels"]] == [2, 8]
    for level in trace["levels"]:
        assert set(level["configs"]) == {"tiered", "dram-only"}
        assert level["workload"]["requests"] == max(40, math.ceil(3 * level["sessions"]))
        for section in level["configs"].values():
            assert len(section["records"]) == level["workload"]["requests"]


def test_ttft_is_restore_plus_recompute_of_the_missed_tokens(trace_report: dict) -> None:
    trace = trace_report["trace"]
    block_tokens = trace["layout"]["block_tokens"]
    seen_hit = False
    for level in trace["levels"]:
        for section in level["configs"].values():
            for r in section["records"]:
                assert r["ttft_s"] == pytest.approx(r["restore_s"] + r["recompute_s"])
                assert 0 <= r["hit_blocks"] <= r["prompt_blocks"]
                assert sum(r["hit_by_tier"].values()) == r["hit_blocks"]
                assert r["recompute_s"] <= r["recompute_all_s"] + 1e-12
                if r["hit_blocks"]:
                    seen_hit = True
                    assert r["recompute_s"] < r["recompute_all_s"]
                    assert r["restore_s"] > 0
                else:
                    assert r["recompute_s"] == pytest.approx(r["recompute_all_s"])
                assert r["prompt_blocks"] == r["prompt_tokens"] // block_tokens
                assert r["restored_bytes"] == r["hit_blocks"] * trace["block_nbytes"]
                assert r["saved_bytes"] == r["saved_blocks"] * trace["block_nbytes"]
    assert seen_hit, "a multi-turn trace must hit the cache"


def test_summaries_add_up(trace_report: dict) -> None:
    for level in trace_report["trace"]["levels"]:
        for name, section in level["configs"].items():
            s, recs = section["summary"], section["records"]
            requested = sum(r["prompt_blocks"] for r in recs)
            assert s["hit_rate"] == pytest.approx(sum(r["hit_blocks"] for r in recs) / requested)
            assert sum(s["hit_rate_by_tier"].values()) == pytest.approx(s["hit_rate"])
            assert s["ttft_s"]["p50"] <= s["ttft_s"]["p99"]
            assert s["ttft_ratio_vs_recompute"] == pytest.approx(
                s["ttft_s"]["mean"] / s["recompute_all_ttft_s"]["mean"])
            if name == "dram-only":
                assert s["ttft_ratio_vs_dram_only"] == pytest.approx(1.0)
                assert s["hit_rate_by_tier"]["disk"] == 0 and s["hit_rate_by_tier"]["device"] == 0
            cost = s["cost_per_1m_tokens"]
            assert cost["recomputed"]["gpu_seconds"] > 0
            assert cost["recomputed"]["usd"] == pytest.approx(cost["recomputed"]["gpu_seconds"] / 3600 * 2.0)


def test_a_tiered_store_serves_from_every_tier_when_the_working_set_outgrows_memory(trace_report: dict) -> None:
    tiered = [level["configs"]["tiered"]["summary"]["hit_rate_by_tier"] for level in trace_report["trace"]["levels"]]
    tiers = ("device", "host", "disk") if torch.cuda.is_available() else ("host", "disk")  # no HBM: no device tier
    for tier in tiers:
        assert any(share[tier] > 0 for share in tiered), (tier, tiered)


def test_the_dram_only_store_holds_the_same_total_bytes(trace_report: dict) -> None:
    level = trace_report["trace"]["levels"][0]
    tiered, dram = level["configs"]["tiered"]["store"], level["configs"]["dram-only"]["store"]
    assert dram["host_bytes"] == tiered["device_bytes"] + tiered["host_bytes"] + tiered["disk_bytes"]
    if not torch.cuda.is_available():
        assert tiered["device_bytes"] == 0 and tiered["host_bytes"] == (1 + 2) << 20
    assert dram["disk_bytes"] == 0 and dram["device_bytes"] == 0


@pytest.mark.skipif(not plots_available()[0], reason="matplotlib is not installed")
def test_trace_plots_are_written(trace_report: dict) -> None:
    from pathlib import Path

    for name in ("trace_ttft.png", "trace_hit_rate.png"):
        data = (Path(trace_report["_out"]) / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_restored_blocks_are_checked_against_their_keys() -> None:
    layout = tierkv.KVLayout(num_layers=1, num_kv_heads=1, head_dim=64, block_tokens=4, dtype="bfloat16")
    bufs = trace_bench._Buffers(layout, 4, torch.device("cpu"), np.random.default_rng(0))
    keys = tierkv.block_keys(np.arange(16, dtype=np.uint32), block_tokens=4)
    with tierkv.BlockStore(layout, tierkv.StoreConfig(device_bytes=0, host_bytes=1 << 20)) as store:
        store.put(keys, bufs.stamped(keys))
        store.get(keys, out=bufs.out[:4])
        assert bufs.check(keys)
        store.get(keys[::-1], out=bufs.out[:4])  # the right blocks in the wrong order
        assert not bufs.check(keys)


def test_bad_trace_options_exit_with_what_was_expected(capsys: pytest.CaptureFixture) -> None:
    for argv, fragment in ((["--sessions", "0"], "session counts >= 1"),
                           (["--configs", "tiered,ssd"], "expected --configs"),
                           (["--host-bytes", "lots"], "expected"),
                           (["--profile", "quick", "--max-context", "10"], "max_context")):
        with pytest.raises(SystemExit) as info:
            trace_bench.main(argv)
        assert info.value.code == 2
        assert fragment in capsys.readouterr().err
