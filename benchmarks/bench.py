"""`make bench`: the speed goals as ratios measured side by side in one run, on one machine.

Runs each benchmark as a child process, all on one shared --keep directory (checkpoints,
bundles and GGUF files are built once and kept), and prints one table of ratios, each line
saying what was compared and the goal next to it, then the absolute figures behind them and
the machine (CPU, cores, load average at the start and the end):

  serve    benchmarks/serve_bench.py: ortserve over HTTP vs the raw og.Engine, same bundle;
           model load; the server's peak memory
  graph    benchmarks/graph_bench.py: converted int4 vs the ORT GenAI model builder's int4
           (and optimum's), og directly, alternated
  peer     benchmarks/llamacpp_peer.py: converted int4 (og) vs llama.cpp Q4_0 of the same
           weights, alternated in one process ("n/a: why" when llama.cpp is not installed)
  engine   benchmarks/engine_bench.py: aggregate tokens/s of 4/8/16 mixed-length streams over
           one stream, late-arrival TTFT over solo, second-turn TTFT over first
  spec     benchmarks/spec_bench.py: ortserve's loop with speculative decoding (prompt-lookup
           drafts) vs without, same bundle, alternated: copy-heavy greedy decode, sampled
           decode, 4 streams
  server   benchmarks/server_peer.py: `ortserve serve` vs llama.cpp's llama-server (built
           once under .cache/bench/), the same random Qwen2.5-0.5B- and 1.5B-shaped weights
           (int4 / Q4_0), one HTTP client: issue 26's table (decode, 1000- and 4000-token
           TTFT, 8 mixed streams, peak RSS), with ortserve's defaults
  convert, adapter   (only with --with): benchmarks/convert_bench.py, adapter_bench.py

A missing or failing benchmark prints "n/a: <why>" on its lines; the rest still run.

    python benchmarks/bench.py [--quick] [--only serve,graph,peer,engine,spec,server]
                               [--with convert,adapter]
                               [--keep .cache/bench] [--json F] [--update-docs]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

SECTIONS = ("serve", "graph", "peer", "engine", "spec", "server")
EXTRAS = ("convert", "adapter")
DOCS = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

# Per section: (flags at the default size, flags with --quick). Flags a script's --help
# does not list are dropped, so a benchmark that changes its options still runs.
ARGS: dict[str, tuple[list[str], list[str]]] = {
    "serve": (["--rounds", "7", "--new-tokens", "256"], ["--rounds", "1", "--new-tokens", "16"]),
    "graph": (["--rounds", "5", "--new-tokens", "128"], ["--rounds", "1", "--new-tokens", "16"]),
    "engine": (["--configs", "after"],
               ["--configs", "after", "--new-tokens", "16", "--no-http"]),
    "spec": (["--rounds", "5", "--new-tokens", "256"], ["--rounds", "1", "--new-tokens", "16"]),
    "server": (["--shapes", "0.5b,1.5b", "--rounds", "3"],
               ["--shapes", "0.5b", "--rounds", "1", "--new-tokens", "16"]),
    "convert": ([], ["--no-verify"]),
    "adapter": ([], []),
}  # fmt: skip
PEER = (
    {"rounds": 5, "new_tokens": 128, "pure": True},
    {"rounds": 1, "new_tokens": 16, "pure": False},
)
TIMEOUT = {"serve": 900, "graph": 1800, "peer": 1200, "engine": 1800, "spec": 1200,
           "server": 5400, "convert": 3600, "adapter": 3600}  # fmt: skip


# -- the table -----------------------------------------------------------------------------


@dataclass
class Row:
    """One ratio: what was compared, its value (None: n/a), and the goal if the issue sets one."""

    section: str
    compared: str
    value: float | None = None
    goal: str = ""  # ">= 1.0" or "<= 3"
    na: str = ""
    figures: list[str] = field(default_factory=list)  # the absolute numbers behind it

    def met(self) -> str:
        if self.value is None or not self.goal:
            return ""
        op, bound = self.goal.split()
        ok = self.value >= float(bound) if op == ">=" else self.value <= float(bound)
        return "yes" if ok else "NO"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


def fmt_ratio(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}x" if value < 10 else f"{value:.1f}x"


def render(rows: list[Row], machine: dict, started: dict, ended: dict, quick: bool,
           subject: str) -> str:  # fmt: skip
    """The report: the ratio table, then the figures behind it, then the machine."""
    lines = [
        f"ortserve bench{' (--quick: smoke sizes, not figures)' if quick else ''}"
        f" · {started['when']}",
        f"subject: {subject}",
        "",
        f"{'ratio':>9}  {'goal':<9} {'met':<4} compared",
    ]
    for row in rows:
        goal = f"{row.goal}x" if row.goal else ""
        lines.append(f"{fmt_ratio(row.value):>9}  {goal:<9} {row.met():<4} {row.compared}")
        if row.na:
            lines.append(f"{'':>9}  {'':<9} {'':<4}   n/a: {row.na}")
    busy = busy_note(machine, started, ended)
    lines += [f"WARNING: {busy}"] if busy else []
    lines += ["", "figures behind the ratios:"]
    for row in rows:
        for text in row.figures:
            lines.append(f"  [{row.section}] {text}")
    lines += ["", f"machine: {machine['cpu']}; {machine['cores']}; {machine['memory']}",
              f"  {machine['isa']}; {machine['software']}",
              f"  load average (1/5/15 min) at start {started['load']}, at end {ended['load']};"
              f" wall {ended['wall_s']:.0f} s"]  # fmt: skip
    return "\n".join(lines)


def markdown(rows: list[Row], machine: dict, started: dict, ended: dict, quick: bool,
             subject: str) -> str:  # fmt: skip
    """The same report as Markdown, for docs/performance.md."""
    out = [
        f"Run {started['when']}" + (" with `--quick` (smoke sizes: NOT figures)" if quick else ""),
        f"on {machine['cpu']}, {machine['cores']}, {machine['memory']}; {machine['isa']};"
        f" {machine['software']}. Load average (1/5/15 min) {started['load']} at the start,"
        f" {ended['load']} at the end; {ended['wall_s']:.0f} s in all. Subject: {subject}.",
        "",
        *([f"**{busy}**", ""] if (busy := busy_note(machine, started, ended)) else []),
        "| ratio | goal | met | compared |",
        "|---:|---|---|---|",
    ]
    for row in rows:
        compared = row.compared + (f" (n/a: {row.na})" if row.na else "")
        goal = f"{row.goal}x" if row.goal else ""
        out.append(f"| {fmt_ratio(row.value)} | {goal} | {row.met()} | {compared} |")
    out += ["", "Figures behind the ratios:", ""]
    for row in rows:
        out += [f"- [{row.section}] {text}" for text in row.figures]
    return "\n".join(out) + "\n"


# -- the machine ---------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    flags = set(flags[1].split()) if flags else set()
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    logical = os.cpu_count() or 0
    physical, memory = logical, "memory unknown"
    with contextlib.suppress(ImportError):
        import psutil

        physical = psutil.cpu_count(logical=False) or logical
        memory = f"{psutil.virtual_memory().total / 2**30:.0f} GiB memory"
    versions = [f"Python {platform.python_version()}"]
    for package in ("onnxruntime", "onnxruntime-genai"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions.append(f"{package} {version(package)}")
    return {
        "cpu": model[1].strip() if model else platform.processor() or "unknown CPU",
        "cores": f"{physical} cores ({logical} logical)",
        "memory": memory,
        "isa": "ISA: " + (" ".join(isa) or "no AVX2"),
        "software": ", ".join(versions),
        "logical": logical,
    }


def busy_note(machine: dict, started: dict, ended: dict) -> str:
    """A warning when the machine was busy with other work (1-min load over half the CPUs
    as the run starts; at the end the benchmark's own processes are in the average)."""
    loads = [float(m["load"].split()[0]) for m in (started, ended)]
    if loads[0] <= 0.5 * machine.get("logical", os.cpu_count() or 1):
        return ""
    return (f"the machine was busy (1-min load average {loads[0]:.1f} at the start,"
            f" {loads[1]:.1f} at the end, on {machine['cores']}): these figures are noise;"
            " rerun on a quiet machine")  # fmt: skip


def moment(begun: float | None = None) -> dict[str, Any]:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return {"when": now, "load": load, "wall_s": time.perf_counter() - begun if begun else 0.0}


# -- running the benchmarks ----------------------------------------------------------------


def supported(script: Path, args: list[str]) -> list[str]:
    """`args` without the options `script --help` does not list (each option with its value)."""
    try:
        text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                              text=True, timeout=120, cwd=ROOT).stdout  # fmt: skip
    except subprocess.TimeoutExpired:
        return args
    known = set(re.findall(r"--[\w-]+", text))
    kept, i = [], 0
    while i < len(args):
        takes_value = i + 1 < len(args) and not args[i + 1].startswith("--")
        if args[i] in known:
            kept += args[i : i + 1 + takes_value]
        i += 1 + takes_value
    return kept


def run_script(name: str, script: Path, args: list[str], logs: Path) -> dict[str, Any]:
    """Run one benchmark; {"json": its --json file or None, "stdout": text} or {"na": why}."""
    if not script.is_file():
        return {"na": f"{script.relative_to(ROOT)} is not present"}
    out = logs / f"{name}.json"
    out.unlink(missing_ok=True)
    args = supported(script, [*args, "--json", str(out)])
    command = [sys.executable, str(script), *args]
    print(f"[bench] {name}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                              timeout=TIMEOUT[name])  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        (logs / f"{name}.log").write_text(stdout)
        return {"na": f"ran past {TIMEOUT[name]} s", "stdout": stdout}
    (logs / f"{name}.log").write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    print(f"[bench] {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return {"na": f"{script.name} failed: {tail[-200:]}", "stdout": done.stdout}
    figures = json.loads(out.read_text()) if out.is_file() else None
    return {"json": figures, "stdout": done.stdout}


def json_objects(text: str) -> list[dict]:
    """Every JSON object printed in `text`: one-line ones and indented ones alike."""
    decoder, found, i = json.JSONDecoder(), [], 0
    while (i := text.find("{", i)) != -1:
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            i += 1
            continue
        if isinstance(value, dict):
            found.append(value)
        i = end
    return found


def last_json(result: dict) -> dict | None:
    if result.get("json") is not None:
        return result["json"]
    objects = json_objects(result.get("stdout", ""))
    return objects[-1] if objects else None


# -- from figures to rows ------------------------------------------------------------------


def get(data: Any, *keys: Any) -> Any:
    """data[k1][k2]... or None; integer keys also tried as strings (JSON's dict keys)."""
    for key in keys:
        if isinstance(data, dict):
            data = data.get(key, data.get(str(key)))
        else:
            return None
    return data


def mb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.0f} MB"


def serve_rows(result: dict) -> list[Row]:
    rows = [
        Row("serve", "decode tok/s, 1 stream: ortserve over HTTP / raw og.Engine, same bundle",
            goal=">= 0.95"),
        Row("serve", "TTFT, 1 stream: ortserve over HTTP / raw og.Engine (no goal)"),
        Row("serve", "model load: ortserve server (first request) / og.Model in-process"),
        Row("serve", "peak RSS: ortserve server worker (model loaded, serving) / bundle on disk"),
        Row("serve", "decode tok/s, 1 stream: ortserve's engine in-process / raw og.Engine "
            "(no goal: the loop without HTTP)"),
    ]  # fmt: skip
    data = last_json(result) if "na" not in result else None
    if data is None:
        for row in rows:
            row.na = result.get("na", "no figures")
        return rows
    raw, http = data.get("raw", {}), data.get("http", {})
    rows[0].value = ratio(http.get("decode_tps"), raw.get("decode_tps"))
    rows[0].figures = [
        f"decode tok/s: HTTP {http.get('decode_tps')} {http.get('decode_runs')},"
        f" raw {raw.get('decode_tps')} {raw.get('decode_runs')}"
        f" ({data.get('prompt_tokens')}-token prompt, {data.get('new_tokens')}"
        f" new tokens, median of {data.get('rounds')} alternated rounds)"
    ]
    rows[1].value = ratio(http.get("ttft_s"), raw.get("ttft_s"))
    rows[1].figures = [f"TTFT: HTTP {http.get('ttft_s')} s, raw {raw.get('ttft_s')} s"]
    load = data.get("load_s", {})
    rows[2].value = ratio(load.get("server_first_request"), load.get("raw_og_model"))
    rows[2].figures = [
        f"load: server {load.get('server_first_request')} s, og.Model {load.get('raw_og_model')} s"
    ]
    rss = data.get("worker_peak_rss_bytes")
    rows[3].value = ratio(rss, data.get("bundle_bytes"))
    rows[3].figures = [
        f"worker peak RSS {mb(rss)}, tree peak PSS"
        f" {mb(data.get('tree_peak_pss_bytes'))}, bundle {mb(data.get('bundle_bytes'))}"
    ]
    engine = data.get("engine", {})
    rows[4].value = ratio(engine.get("decode_tps"), raw.get("decode_tps"))
    rows[4].figures = [f"decode tok/s: engine in-process {engine.get('decode_tps')}"
                       f" {engine.get('decode_runs')}"]  # fmt: skip
    if rows[4].value is None:
        rows[4].na = "no in-process figures"
    return rows


def graph_rows(result: dict) -> list[Row]:
    rows = [
        Row("graph", "decode tok/s: converted int4 / ORT GenAI model builder int4 (its defaults)",
            goal=">= 1.0"),
        Row("graph", "prefill tok/s: converted int4 / model builder int4 (no goal)"),
        Row("graph", "decode tok/s: converted int4 / optimum int4 (the former graph)"),
    ]  # fmt: skip
    data = last_json(result) if "na" not in result else None
    figures = (data or {}).get("figures")
    if not figures:
        for row in rows:
            row.na = result.get("na", "no figures")
        return rows
    pairs = [("converted", "builder", "decode_tps"), ("converted", "builder", "prefill_tps"),
             ("converted", "optimum", "decode_tps")]  # fmt: skip
    for row, (a, b, key) in zip(rows, pairs):
        row.value = ratio(get(figures, a, key), get(figures, b, key))
    rows[0].figures = [
        f"{name}: prefill {get(f, 'prefill_tps') or 0:.1f} tok/s, decode"
        f" {get(f, 'decode_tps') or 0:.1f} tok/s, decode runs {get(f, 'decode_runs')}"
        for name, f in figures.items()
    ]
    return rows


def peer_rows(peer: dict, serve: dict) -> list[Row]:
    rows = [
        Row("peer", "decode tok/s: converted int4 (og) / llama.cpp Q4_0, same weights",
            goal=">= 1.0"),
        Row("peer", "prefill tok/s: converted int4 (og) / llama.cpp Q4_0", goal=">= 1.0"),
        Row("peer", "decode tok/s: converted int4 (og) / llama.cpp Q4_0 pure (output Q4_0 too)"),
        Row("peer", "model load to first token: og.Model / llama.cpp (mmap), cold process"),
        Row("peer", "decode tok/s: converted int4 (ortserve's own loop) / llama.cpp Q4_0",
            goal=">= 1.0"),
        Row("peer", "prefill tok/s: converted int4 (ortserve's own loop) / llama.cpp Q4_0",
            goal=">= 1.0"),
        Row("peer", "RSS: ortserve server worker (peak) / llama.cpp process (Q4_0 loaded, run)"),
    ]  # fmt: skip
    figures = peer.get("figures")
    if not figures:
        for row in rows:
            row.na = peer.get("na", "no figures")
        return rows
    og, q4, pure = figures.get("og", {}), figures.get("q4_0", {}), figures.get("q4_0_pure", {})
    rows[0].value = ratio(og.get("decode_tps"), q4.get("decode_tps"))
    rows[1].value = ratio(og.get("prefill_tps"), q4.get("prefill_tps"))
    rows[2].value = ratio(og.get("decode_tps"), pure.get("decode_tps"))
    if not pure:
        rows[2].na = "the pure Q4_0 file is built at the default size only"
    rows[3].value = ratio(og.get("ready_s"), q4.get("ready_s"))
    own = figures.get("ortserve", {})
    rows[4].value = ratio(own.get("decode_tps"), q4.get("decode_tps"))
    rows[5].value = ratio(own.get("prefill_tps"), q4.get("prefill_tps"))
    if not own:
        for row in rows[4:6]:
            row.na = "not a builder bundle ortserve's loop runs"
    if not og:
        for row in rows[:6]:
            row.na, row.value = "no og bundle to compare", None
    rows[0].figures = [
        f"{peer.get('binding')}, {peer.get('gguf')}, {peer.get('threads')} threads,"
        f" {peer.get('prompt_tokens')}-token prompt, {peer.get('new_tokens')} new tokens,"
        f" median of {peer.get('rounds')} alternated rounds"
    ] + [
        f"{name}: prefill {f['prefill_tps']:.1f} tok/s, decode {f['decode_tps']:.1f} tok/s,"
        f" runs {f['decode_runs']}, load {f['load_s']:.2f} s, to first token {f['ready_s']:.2f} s"
        + (f", file {mb(f['file_bytes'])}" if "file_bytes" in f else "")
        for name, f in figures.items()
    ]  # fmt: skip
    worker = get(last_json(serve) or {}, "worker_peak_rss_bytes") if "na" not in serve else None
    rows[6].value = ratio(worker, peer.get("llamacpp_rss_bytes"))
    rows[6].figures = [
        f"llama.cpp process RSS {mb(peer.get('llamacpp_rss_bytes'))}"
        f" (Python, the Q4_0 file loaded and run), ortserve worker peak {mb(worker)}"
    ]
    if worker is None:
        rows[6].na = "no serve figures"
    return rows


TURN = "TTFT, ~1400-token conversation: second turn / first turn"
TURN_KINDS = {  # engine_bench.py's variants of the second turn, as it names them
    "rendered": "the conversation re-rendered by the chat template",
    "exact": "continued with the generated ids exactly",
}


def turn_rows(data: Any, where: str) -> list[Row]:
    """Second-turn rows of one figure: {"ratio": ...} or {variant: {"ratio": ...}, ...}."""
    if isinstance(data, dict) and "ratio" in data:
        return [Row("engine", f"{TURN} ({where})", data["ratio"], goal="<= 0.1", figures=[
            f"second turn ({where}): {data}"])]  # fmt: skip
    rows = []
    for kind, figures in (data or {}).items():
        if isinstance(figures, dict) and "ratio" in figures:
            label = f"{TURN} ({where}: {TURN_KINDS.get(kind, kind)})"
            rows.append(Row("engine", label, figures["ratio"], goal="<= 0.1",
                            figures=[f"second turn ({where}, {kind}): {figures}"]))  # fmt: skip
    return rows or [Row("engine", f"{TURN} ({where})", goal="<= 0.1", na="no figures")]


AGGREGATES = {  # engine_bench.py's aggregate figures, as it names them: what the streams are
    "aggregate": "mixed-length streams",
    "aggregate_decode": "streams of 8-token prompts (decoding alone)",
}


def aggregate_rows(data: dict) -> list[Row]:
    """Rows for {"aggregate": {"ratio": {N: x}, ...}, ...}, or the older flat layout
    {"aggregate_ratio": {N: x}, "one_stream_tps": ..., "aggregate_tps": ...}."""
    figures = {key: data[key] for key in AGGREGATES if isinstance(data.get(key), dict)}
    if not figures and "aggregate_ratio" in data:
        figures = {"aggregate": {"ratio": data["aggregate_ratio"], **data}}
    figures = figures or {"aggregate": {}}
    rows = []
    for key, f in figures.items():
        what = AGGREGATES[key]
        for n in (4, 8, 16):
            goal = ">= 3" if key == "aggregate" and n == 8 else ""
            value = get(f, "ratio", n)
            rows.append(Row("engine", f"aggregate tok/s: {n} {what} / 1 stream", value, goal,
                            na="" if value is not None else "no figure"))  # fmt: skip
        rows[-3].figures = [
            f"{what}: one stream (the 8-stream prompts one at a time) {f.get('one_stream_tps')}"
            f" tok/s, aggregate {f.get('aggregate_tps')} tok/s; lanes {data.get('lanes')}"
        ]
    return rows


def engine_rows(result: dict) -> list[Row]:
    late = Row("engine", "TTFT: request arriving during a 300-token generation / same request solo",
               goal="<= 3")  # fmt: skip
    data = None
    if "na" not in result:
        for obj in json_objects(result.get("stdout", "")):  # per-config lines, then the report
            data = obj.get("after", data)
    if result.get("json"):
        data = result["json"].get("after", data)
    if not data:
        rows = [*aggregate_rows({}), late, Row("engine", f"{TURN} (engine)", goal="<= 0.1"),
                Row("engine", f"{TURN} (HTTP /api/chat)", goal="<= 0.1")]  # fmt: skip
        for row in rows:
            row.na = result.get("na", "no figures for the default configuration ('after')")
        return rows
    late.value = get(data, "late_arrival", "ratio")
    late.figures = [f"late arrival {data.get('late_arrival')}"]
    turns = turn_rows(data.get("second_turn_engine"), "engine")
    if data.get("second_turn_http") is None:
        turns.append(Row("engine", f"{TURN} (HTTP /api/chat)", goal="<= 0.1",
                         na="not run (--quick skips it)"))  # fmt: skip
    else:
        turns += turn_rows(data["second_turn_http"], "HTTP /api/chat")
    return [*aggregate_rows(data), late, *turns]


SPEC_LINES = {  # spec_bench.py's lines: what was decoded, and the goal (issue 26)
    "copy": ("decode tok/s, 1 stream, copy-heavy greedy (output that repeats): speculation on / "
             "off, same bundle", ">= 1.8"),
    "sampled": ("decode tok/s, 1 stream, sampled (Ollama's defaults): speculation on / off", ""),
    "streams": ("aggregate tok/s, 4 copy-heavy greedy streams: speculation on / off", ""),
}  # fmt: skip


def spec_rows(result: dict) -> list[Row]:
    data = get(last_json(result) if "na" not in result else None, "spec") or {}
    rows = []
    for key, (compared, goal) in SPEC_LINES.items():
        figures = data.get(key)
        row = Row("spec", compared, get(figures, "ratio"), goal)
        if figures:
            kept = f", drafts kept {figures.get('accepted')}/{figures.get('drafted')}"
            same = f", tokens identical {figures['identical']}" if "identical" in figures else ""
            row.figures = [f"{key}: off {figures.get('off_tps')} tok/s {figures.get('off_runs')}, "
                           f"on {figures.get('auto_tps')} tok/s {figures.get('auto_runs')}"
                           f"{kept}{same}"]  # fmt: skip
        row.na = "" if row.value is not None else result.get("na", "no figures")
        rows.append(row)
    return rows


# issue 26's table: (figure key, what it compares, goal, lower is better)
SERVER_LINES = (
    ("decode", "single-stream decode tok/s", ">= 1.2", False),
    ("ttft_1000", "TTFT of a 1000-token prompt (llama-server / ortserve)", ">= 1.2", True),
    ("aggregate_8", "8 concurrent mixed streams, aggregate tok/s", ">= 1.5", False),
    ("ttft_4000", "TTFT of a 4000-token prompt (llama-server / ortserve)", ">= 1.0", True),
)


def server_rows(result: dict) -> list[Row]:
    """ortserve serve / llama-server per shape, each figure ortserve-ahead-when-above-1, and
    the peak RSS of both process trees (lower is better)."""
    data = (last_json(result) if "na" not in result else None) or {}
    shapes = data.get("results") or [{"shape": "0.5b"}]
    rows = []
    for shape in shapes:
        name = f"Qwen2.5-{shape['shape'].upper()} shape"
        medians = shape.get("medians") or {}
        ours, peer = medians.get("ortserve", {}), medians.get("llama", {})
        for key, compared, goal, lower in SERVER_LINES:
            a, b = ours.get(key), peer.get(key)
            row = Row("server", f"{compared}: ortserve / llama-server, {name}",
                      ratio(b, a) if lower else ratio(a, b), goal)  # fmt: skip
            if a is not None and b is not None:
                row.figures = [f"{name} {key}: ortserve {a:.2f}, llama-server {b:.2f}"]
            rows.append(row)
        rss = shape.get("peak_rss") or {}
        row = Row("server", f"peak RSS of the process trees: ortserve / llama-server, {name}",
                  ratio(rss.get("ortserve"), rss.get("llama")), "<= 1.0")  # fmt: skip
        if rss:
            row.figures = [f"{name} peak RSS: ortserve {mb(rss['ortserve'])}, "
                           f"llama-server {mb(rss['llama'])}"]  # fmt: skip
        rows.append(row)
    for row in rows:
        row.na = "" if row.value is not None else result.get("na", "no figures")
    if data.get("mlas_isa"):
        rows[-1].figures.append(f"ISA: onnxruntime MLAS {data['mlas_isa']}; llama.cpp "
                                f"{shapes[0].get('llama_system_info', 'n/a')}")  # fmt: skip
    return rows


def extra_rows(name: str, result: dict) -> list[Row]:
    data = last_json(result) if "na" not in result else None
    if name == "convert":
        row = Row("convert", "peak memory of converting Qwen2-0.5B to int4 / its fp32 weights",
                  goal="<= 3")  # fmt: skip
        if data:
            row.value = max(data.get("peak_over_fp32_weights", 0),
                            data.get("tree_peak_over_fp32_weights", 0))  # fmt: skip
            row.figures = [f"wall {data.get('wall_s')} s, steps {data.get('steps_s')}"]
        else:
            row.na = result.get("na", "no figures")
        return [row]
    rows = []
    ratios = (data or {}).get("ratio_adapted_over_base", {"decode_tps_1_client": None})
    for key, value in ratios.items():
        row = Row("adapter", f"{key.replace('_', ' ')}: rank-16 LoRA model / its base", value)
        row.na = "" if data else result.get("na", "no figures")
        rows.append(row)
    return rows


def subject_line(keep: Path) -> str:
    config = keep / "qwen2-h512-l8-random" / "config.json"
    if not config.is_file():
        return "Qwen2-shaped random checkpoint (not built)"
    c = json.loads(config.read_text())
    return (f"Qwen2-shaped random checkpoint, hidden {c['hidden_size']}, {c['num_hidden_layers']}"
            f" layers, intermediate {c['intermediate_size']}, vocab {c['vocab_size']}; int4"
            f" (block 32) / GGUF Q4_0; greedy")  # fmt: skip


def converted_bundle(keep: Path) -> Path | None:
    """The converted int4 bundle graph_bench.py or serve_bench.py left in keep/library."""
    with contextlib.suppress(Exception):
        from ortserve.library import Library

        library = Library(keep / "library")
        if library.exists("bench:converted"):
            return library.get("bench:converted").path
    return None


def update_docs(text: str) -> None:
    doc = DOCS.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{DOCS} lacks the {BEGIN} ... {END} markers")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOCS.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny rounds and tokens")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"sections to run, of {','.join(SECTIONS)}")  # fmt: skip
    parser.add_argument("--with", dest="extras", default="",
                        help=f"also run these (slow, Qwen2-0.5B): {','.join(EXTRAS)}")  # fmt: skip
    parser.add_argument("--keep", type=Path, default=ROOT / ".cache" / "bench",
                        help="where checkpoints, bundles and GGUF files are kept")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the table and figures here")
    parser.add_argument("--update-docs", action="store_true",
                        help=f"write the table into {DOCS.relative_to(ROOT)}")  # fmt: skip
    args = parser.parse_args()
    only = [s for s in args.only.split(",") if s]
    extras = [s for s in args.extras.split(",") if s]
    for name in only + extras:
        if name not in SECTIONS + EXTRAS:
            parser.error(f"unknown section {name!r}")
    keep = args.keep.resolve()
    logs = keep / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    begun = time.perf_counter()
    started, info = moment(), machine()
    print(f"[bench] {info['cpu']}, {info['cores']}, load {started['load']}", file=sys.stderr)

    pick = 1 if args.quick else 0
    results: dict[str, dict] = {}
    skipped = {"na": "not run (--only)"}
    # serve first: it converts bench:converted if graph_bench has not, so the peer has it
    for name in ("serve", "graph"):
        if name in only:
            results[name] = run_script(name, HERE / f"{name}_bench.py",
                                       [*ARGS[name][pick], "--keep", str(keep)], logs)  # fmt: skip
    if "peer" in only:
        from llamacpp_peer import peer_figures

        print("[bench] peer: llama.cpp", file=sys.stderr, flush=True)
        checkpoint = keep / "qwen2-h512-l8-random"
        if not (checkpoint / "config.json").is_file():
            results["peer"] = {"na": "the subject checkpoint was not built (run serve or graph)"}
        else:
            results["peer"] = peer_figures(checkpoint, converted_bundle(keep), keep,
                                           timeout=TIMEOUT["peer"], **PEER[pick])  # fmt: skip
    if "engine" in only:
        results["engine"] = run_script("engine", HERE / "engine_bench.py",
                                       [*ARGS["engine"][pick], "--keep", str(keep)], logs)  # fmt: skip
    if "spec" in only:
        results["spec"] = run_script("spec", HERE / "spec_bench.py",
                                     [*ARGS["spec"][pick], "--keep", str(keep)], logs)  # fmt: skip
    if "server" in only:
        results["server"] = run_script("server", HERE / "server_peer.py",
                                       [*ARGS["server"][pick]], logs)  # fmt: skip
    for name in extras:
        script = HERE / f"{name}_bench.py"
        results[name] = run_script(name, script, [*ARGS[name][pick], "--keep", str(keep)], logs)

    rows = [
        *serve_rows(results.get("serve", skipped)),
        *graph_rows(results.get("graph", skipped)),
        *peer_rows(results.get("peer", skipped), results.get("serve", skipped)),
        *engine_rows(results.get("engine", skipped)),
        *spec_rows(results.get("spec", skipped)),
        *server_rows(results.get("server", skipped)),
    ]
    for name in extras:
        rows += extra_rows(name, results[name])
    ended = moment(begun)
    subject = subject_line(keep)
    print(render(rows, info, started, ended, args.quick, subject))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "quick": args.quick, "machine": info, "start": started, "end": ended,
            "subject": subject,
            "rows": [{"section": r.section, "compared": r.compared, "ratio": r.value,
                      "goal": r.goal, "met": r.met(), "na": r.na, "figures": r.figures}
                     for r in rows],
            "results": {k: {key: v for key, v in r.items() if key != "stdout"}
                        for k, r in results.items()},
        }, indent=2))  # fmt: skip
    if args.update_docs:
        update_docs(markdown(rows, info, started, ended, args.quick, subject))


if __name__ == "__main__":
    main()
