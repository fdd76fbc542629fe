"""The `make bench` driver's table code, on canned figures: no model runs, no timing."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    path = list(sys.path)
    spec = importlib.util.spec_from_file_location("bench_driver", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_driver"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_driver", None)
        sys.path[:] = path  # the driver puts benchmarks/ on the path


SERVE = {
    "prompt_tokens": 55, "new_tokens": 128, "rounds": 3, "bundle_bytes": 80e6,
    "raw": {"ttft_s": 0.2, "decode_tps": 100.0, "decode_runs": [100.0]},
    "http": {"ttft_s": 0.21, "decode_tps": 98.0, "decode_runs": [98.0]},
    "engine": {"decode_tps": 101.0, "decode_runs": [101.0]},
    "load_s": {"raw_og_model": 0.5, "server_first_request": 1.0},
    "worker_peak_rss_bytes": 360e6, "tree_peak_pss_bytes": 330e6,
}  # fmt: skip
GRAPH = {
    "figures": {
        name: {"prefill_tps": p, "decode_tps": d, "decode_runs": [d]}
        for name, p, d in (("converted", 240, 60), ("builder", 220, 50), ("optimum", 200, 40))
    }
}
PEER = {
    "binding": "llama-cpp-cffi 0.4.42", "gguf": "gguf 0.19.0", "threads": 2, "rounds": 5,
    "prompt_tokens": 64, "new_tokens": 128, "llamacpp_rss_bytes": 200e6,
    "figures": {
        "q4_0": {"prefill_tps": 300, "decode_tps": 40, "decode_runs": [40], "load_s": 0.2,
                 "ready_s": 0.5, "file_bytes": 89e6},
        "og": {"prefill_tps": 240, "decode_tps": 60, "decode_runs": [60], "load_s": 0.4,
               "ready_s": 0.6},
        "ortserve": {"prefill_tps": 330, "decode_tps": 80, "decode_runs": [80], "load_s": 0.3,
                     "ready_s": 0.4},
    },
}  # fmt: skip
ENGINE_STDOUT = "\n".join([
    json.dumps({"after": {
        "one_stream_tps": 50.0, "aggregate_tps": {"4": 120.0, "8": 180.0, "16": 200.0},
        "aggregate_ratio": {"4": 2.4, "8": 3.6, "16": 4.0}, "lanes": ["continuous"],
        "late_arrival": {"solo_ttft_s": 0.1, "late_ttft_s": 0.2, "ratio": 2.0},
        "second_turn_engine": {"turn1_ttft_s": 8.0, "turn2_ttft_s": 0.4, "ratio": 0.05},
    }}),
    json.dumps({"machine": "2 logical CPUs"}, indent=2),
])  # fmt: skip


def test_rows_compute_ratios_and_goals(bench):
    serve = {"json": SERVE, "stdout": ""}
    rows = [
        *bench.serve_rows(serve),
        *bench.graph_rows({"json": GRAPH}),
        *bench.peer_rows(PEER, serve),
        *bench.engine_rows({"json": None, "stdout": ENGINE_STDOUT}),
    ]
    by = {row.compared: row for row in rows}
    http = next(r for r in rows if r.compared.startswith("decode tok/s, 1 stream"))
    assert http.value == pytest.approx(0.98) and http.met() == "yes"
    in_process = next(r for r in rows if "engine in-process" in r.compared)
    assert in_process.value == pytest.approx(1.01) and not in_process.goal
    builder = next(r for r in rows if "builder int4 (its defaults)" in r.compared)
    assert builder.value == pytest.approx(1.2) and builder.met() == "yes"
    llama = [r for r in rows if r.section == "peer" and r.goal]
    assert [round(r.value, 3) for r in llama] == [1.5, 0.8, 2.0, 1.1]  # og, then ortserve's loop
    assert [r.met() for r in llama] == ["yes", "NO", "yes", "yes"]
    pure = next(r for r in rows if "pure" in r.compared)
    assert pure.value is None and pure.na
    eight = next(r for r in rows if r.compared.startswith("aggregate tok/s: 8"))
    assert eight.value == 3.6 and eight.met() == "yes"
    late = next(r for r in rows if r.compared.startswith("TTFT: request arriving"))
    assert late.value == 2.0 and late.met() == "yes"
    http_turn = next(r for r in rows if "(HTTP /api/chat)" in r.compared)
    assert http_turn.value is None and http_turn.na
    assert all(r.value is not None or r.na for r in by.values())


def test_missing_benchmarks_print_na(bench):
    rows = [
        *bench.serve_rows({"na": "serve_bench.py failed: boom"}),
        *bench.peer_rows({"na": "gguf not installed"}, {"na": "x"}),
        *bench.engine_rows({"na": "benchmarks/engine_bench.py is not present"}),
    ]
    assert all(r.value is None for r in rows)
    assert {r.na for r in rows} >= {"serve_bench.py failed: boom", "gguf not installed"}
    moment = {"when": "now", "load": "0.10 0.20 0.30", "wall_s": 1.0}
    machine = {"cpu": "CPU", "cores": "2 cores", "memory": "1 GiB", "isa": "ISA: avx2",
               "software": "Python"}  # fmt: skip
    text = bench.render(rows, machine, moment, moment, False, "subject")
    assert "n/a: gguf not installed" in text and "load average" in text
    assert ">= 0.95x" in text
    table = bench.markdown(rows, machine, moment, moment, True, "subject")
    assert table.count("\n| n/a |") == len(rows) and "--quick" in table


def test_json_objects_reads_one_line_and_indented_output(bench):
    objects = bench.json_objects("noise {\n" + ENGINE_STDOUT + "\ntrailing")
    assert [next(iter(o)) for o in objects] == ["after", "machine"]


def test_supported_drops_unknown_options(bench, tmp_path):
    script = tmp_path / "fake.py"
    script.write_text(
        "import argparse\np = argparse.ArgumentParser()\n"
        "p.add_argument('--rounds')\np.add_argument('--quick', action='store_true')\n"
        "p.parse_args()\n"
    )
    kept = bench.supported(script, ["--rounds", "3", "--new-tokens", "16", "--quick", "--nope"])
    assert kept == ["--rounds", "3", "--quick"]


def test_second_turn_variants_each_get_a_row(bench):
    after = {
        "aggregate": {"one_stream_tps": 40, "aggregate_tps": {"8": 80}, "ratio": {"8": 2.0}},
        "aggregate_decode": {"ratio": {"4": 2.0, "8": 3.5, "16": 4.0}},
        "second_turn_engine": {
            "prompt_tokens": 1585,
            "rendered": {"turn1_ttft_s": 4.4, "turn2_ttft_s": 0.5, "ratio": 0.123},
            "exact": {"turn1_ttft_s": 4.3, "turn2_ttft_s": 0.1, "ratio": 0.022},
        },
        "second_turn_http": {"turn1_ttft_s": 4.0, "turn2_ttft_s": 0.2, "ratio": 0.05},
    }
    rows = bench.engine_rows({"json": {"after": after}})
    turns = [(r.value, r.met()) for r in rows if r.compared.startswith(bench.TURN)]
    assert turns == [(0.123, "NO"), (0.022, "yes"), (0.05, "yes")]
    eight = [r for r in rows if r.compared.startswith("aggregate tok/s: 8")]
    assert [(r.value, r.met()) for r in eight] == [(2.0, "NO"), (3.5, "")]
    four = rows[0]
    assert four.value is None and four.na == "no figure"
    assert len([r for r in rows if r.compared.startswith("aggregate")]) == 6


def test_extra_benchmarks_read_from_their_stdout(bench):
    convert = json.dumps({"wall_s": 90.0, "steps_s": {}, "peak_over_fp32_weights": 2.1,
                          "tree_peak_over_fp32_weights": 2.9}, indent=2)  # fmt: skip
    [row] = bench.extra_rows("convert", {"json": None, "stdout": convert + "\npeak memory 2.9x"})
    assert row.value == 2.9 and row.met() == "yes"
    adapter = json.dumps({"ratio_adapted_over_base": {"ttft_1_client": 1.1,
                                                      "decode_tps_1_client": 0.8}})  # fmt: skip
    rows = bench.extra_rows("adapter", {"json": None, "stdout": adapter})
    assert [r.value for r in rows] == [1.1, 0.8]
    [missing] = bench.extra_rows("adapter", {"na": "adapter_bench.py failed: x"})
    assert missing.value is None and missing.na == "adapter_bench.py failed: x"


def test_speculation_rows_read_spec_bench_figures(bench):
    spec = {"spec": {
        "copy": {"off_tps": 100.0, "auto_tps": 250.0, "ratio": 2.5, "drafted": 100,
                 "accepted": 90, "identical": "5/5", "off_runs": [100.0], "auto_runs": [250.0]},
        "sampled": {"off_tps": 90.0, "auto_tps": 88.0, "ratio": 0.978, "drafted": 10,
                    "accepted": 1},
    }}  # fmt: skip
    rows = bench.spec_rows({"json": spec, "stdout": ""})
    copy, sampled, streams = rows
    assert (copy.value, copy.met()) == (2.5, "yes") and "identical 5/5" in copy.figures[0]
    assert sampled.value == 0.978 and not sampled.goal
    assert streams.value is None and streams.na
    assert all(r.na for r in bench.spec_rows({"na": "spec_bench.py failed: boom"}))


def test_server_rows_read_server_peer_figures(bench):
    """issue 26's table from server_peer.py's JSON: ratios with ortserve ahead above 1 (times
    and memory inverted), the goals, and n/a when it did not run."""
    shape = {
        "shape": "0.5b",
        "medians": {"ortserve": {"decode": 60.0, "ttft_1000": 1.0, "aggregate_8": 150.0,
                                 "ttft_4000": 8.0},
                    "llama": {"decode": 30.0, "ttft_1000": 3.0, "aggregate_8": 100.0,
                              "ttft_4000": 16.0}},
        "peak_rss": {"ortserve": 1100 << 20, "llama": 1250 << 20},
        "llama_system_info": "CPU : AVX512 = 1",
    }  # fmt: skip
    rows = bench.server_rows({"json": {"results": [shape], "mlas_isa": "amx_int8"}})
    assert [round(r.value, 2) for r in rows] == [2.0, 3.0, 1.5, 2.0, 0.88]
    assert [r.met() for r in rows] == ["yes"] * 5
    assert "amx_int8" in rows[-1].figures[-1]
    missing = bench.server_rows({"na": "cmake is not installed"})
    assert all(r.value is None and "cmake" in r.na for r in missing)


def test_decode_bound_reads_llama_batched_bench_decode_rate():
    sys.path.insert(0, str(BENCH.parents[1]))
    try:
        from benchmarks.decode_bound import decode_rate
    finally:
        sys.path.remove(str(BENCH.parents[1]))
    output = """
main: n_kv_max = 1024, n_batch = 512, n_ubatch = 512, flash_attn = auto, is_pp_shared = 0

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|    20 |      8 |    1 |     28 |    0.077 |   260.64 |    0.226 |    35.35 |    0.303 |    92.40 |
"""
    assert decode_rate(output) == 35.35
