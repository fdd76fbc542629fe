"""llama.cpp as a peer: the bench checkpoint as GGUF Q4_0 vs the converter's int4 bundle.

The checkpoint (safetensors, fp32) is written as GGUF f16 with the `gguf` package, then
quantized to Q4_0 by llama.cpp's own `llama_model_quantize` (block 32, as the converter's
int4; llama.cpp's default keeps the tied embedding/output matrix at Q6_K, what
`llama-quantize ... Q4_0` and Ollama's q4_0 models give; the pure file, built unless
--no-pure, has it at Q4_0 too). In one process, llama.cpp and og (the bundle given with
--bundle) are then run alternately for --rounds rounds on the same prompt ids, greedy, with
the same number of threads: prefill tokens/s (the prompt through to the first token) and
decode tokens/s (the remaining tokens). Also: load time (model and context, then to the
first token, cold) and the process's RSS once the Q4_0 file has been loaded and run.

The llama.cpp binding, both driven through llama.cpp's C API (the same calls):
  - llama-cpp-python (`import llama_cpp`): PyPI has no Linux wheel; `--build` builds one for
    this CPU from its source distribution (25+ minutes on 2 cores, AMX left out: see
    cmake_args) into .cache/bench/wheels, and `--install` installs a wheel found there;
  - llama-cpp-cffi: a prebuilt CPU library (an AVX2 build), installed by `--install`. Its
    library needs `__cxa_call_terminate` (libstdc++ of GCC 13), which Debian 12's libstdc++
    lacks; it is referenced only through the PLT, so the library is loaded with lazy binding
    (RTLD_LAZY): the symbol would be resolved only if a C++ exception escaped a noexcept
    function, where the process ends either way.
`--install` puts them, with gguf, under .cache/bench/llamacpp, apart from the project's
environment. llama-cpp-python is taken when both are there; LLAMACPP_PEER_BINDING=cffi or
=python picks one. LLAMACPP_PEER_EXTRA_BUFFERS=0 turns llama.cpp's weight repacking off
(llama-cpp-python only).

    python benchmarks/llamacpp_peer.py --checkpoint DIR --bundle DIR [--keep DIR] [--json F]
    python benchmarks/llamacpp_peer.py --install [--build]

The driver (benchmarks/bench.py) calls `peer_figures()`, which runs this file as a child
process and returns its figures, or {"na": why} when the peer cannot run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import importlib.util
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PEER_DIR = ROOT / ".cache" / "bench" / "llamacpp"  # --install puts the bindings here
WHEELS = ROOT / ".cache" / "bench" / "wheels"  # --build puts llama-cpp-python's wheel here
CFFI_VERSION = "0.4.42"
GGUF_VERSION = "0.19.0"
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
PIP = [sys.executable, "-m", "pip"]
FTYPE_F16, FTYPE_Q4_0 = 1, 2  # llama_ftype: LLAMA_FTYPE_MOSTLY_F16, LLAMA_FTYPE_MOSTLY_Q4_0


# -- the binding ---------------------------------------------------------------------------


class Session:
    """One loaded model with its context."""

    def eval(self, ids: list[int]) -> int:
        """Decode `ids` after what is in the KV cache; return the greedy next token."""
        raise NotImplementedError

    def reset(self) -> None:
        """Empty the KV cache."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class Backend:
    """The few llama.cpp calls the peer needs, over either binding."""

    name = ""

    def quantize(self, source: Path, out: Path, ftype: int, threads: int, pure: bool) -> None:
        raise NotImplementedError

    def load(self, path: Path, n_ctx: int, n_batch: int, threads: int) -> Session:
        raise NotImplementedError


class CffiBackend(Backend):
    """llama-cpp-cffi's compiled CPU module, loaded by path (its Python package is not)."""

    def __init__(self, library: Path) -> None:
        flags = sys.getdlopenflags()
        sys.setdlopenflags(os.RTLD_LAZY | os.RTLD_LOCAL)  # see the module docstring
        try:
            spec = importlib.util.spec_from_file_location("_llama_cpp_cpu", library)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        finally:
            sys.setdlopenflags(flags)
        self.lib, self.ffi = module.lib, module.ffi
        self._silent = self.ffi.callback(
            "void(enum ggml_log_level, char *, void *)", lambda *_: None
        )  # kept referenced: llama.cpp calls it for as long as the library is loaded
        self.lib.llama_log_set(self._silent, self.ffi.NULL)
        self.lib.llama_backend_init()
        version = importlib.metadata.version("llama-cpp-cffi")
        self.name = f"llama-cpp-cffi {version} (its prebuilt CPU library)"

    def quantize(self, source: Path, out: Path, ftype: int, threads: int, pure: bool) -> None:
        params = self.ffi.new("struct llama_model_quantize_params *")
        params[0] = self.lib.llama_model_quantize_default_params()
        params.nthread, params.ftype, params.pure = threads, ftype, pure
        if self.lib.llama_model_quantize(str(source).encode(), str(out).encode(), params):
            raise RuntimeError(f"llama_model_quantize failed on {source}")

    def load(self, path: Path, n_ctx: int, n_batch: int, threads: int) -> Session:
        return CffiSession(self, path, n_ctx, n_batch, threads)


class CffiSession(Session):
    def __init__(self, owner: CffiBackend, path: Path, n_ctx: int, n_batch: int,
                 threads: int) -> None:  # fmt: skip
        self.lib, self.ffi = lib, ffi = owner.lib, owner.ffi
        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = 0
        self.model = lib.llama_model_load_from_file(str(path).encode(), model_params)
        if self.model == ffi.NULL:
            raise RuntimeError(f"llama.cpp could not load {path}")
        params = lib.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_batch, n_batch
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, params)
        if self.ctx == ffi.NULL:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))

    def eval(self, ids: list[int]) -> int:
        tokens = self.ffi.new("int32_t[]", ids)
        if self.lib.llama_decode(self.ctx, self.lib.llama_batch_get_one(tokens, len(ids))):
            raise RuntimeError("llama_decode failed")
        logits = self.lib.llama_get_logits_ith(self.ctx, -1)
        return int(np.frombuffer(self.ffi.buffer(logits, 4 * self.n_vocab), np.float32).argmax())

    def reset(self) -> None:
        self.lib.llama_kv_self_clear(self.ctx)

    def close(self) -> None:
        if self.ctx is not None:
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.model = self.ctx = None


class PythonBackend(Backend):
    """llama-cpp-python's ctypes C API (the same calls as CffiSession, not its `Llama` class)."""

    def __init__(self) -> None:
        import logging

        import llama_cpp

        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # its log callback
        self.llama_cpp = llama_cpp
        llama_cpp.llama_backend_init()
        self.name = f"llama-cpp-python {llama_cpp.__version__}"
        # llama.cpp's extra buffer types (weight repacking, AMX); off: --no-extra-buffers
        self.extra_buffers = os.environ.get("LLAMACPP_PEER_EXTRA_BUFFERS", "1") != "0"
        if not self.extra_buffers:
            self.name += " (no extra buffer types)"

    def quantize(self, source: Path, out: Path, ftype: int, threads: int, pure: bool) -> None:
        import ctypes

        params = self.llama_cpp.llama_model_quantize_default_params()
        params.nthread, params.ftype, params.pure = threads, ftype, pure
        if self.llama_cpp.llama_model_quantize(
            str(source).encode(), str(out).encode(), ctypes.byref(params)
        ):
            raise RuntimeError(f"llama_model_quantize failed on {source}")

    def load(self, path: Path, n_ctx: int, n_batch: int, threads: int) -> Session:
        return PythonSession(self, path, n_ctx, n_batch, threads)


class PythonSession(Session):
    def __init__(self, owner: PythonBackend, path: Path, n_ctx: int, n_batch: int,
                 threads: int) -> None:  # fmt: skip
        self.api = api = owner.llama_cpp
        model_params = api.llama_model_default_params()
        model_params.n_gpu_layers = 0
        if hasattr(model_params, "use_extra_bufts"):
            model_params.use_extra_bufts = owner.extra_buffers
        self.model = api.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        params = api.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_batch, n_batch
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        self.ctx = api.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = api.llama_vocab_n_tokens(api.llama_model_get_vocab(self.model))

    def eval(self, ids: list[int]) -> int:
        api = self.api
        tokens = (api.llama_token * len(ids))(*ids)
        if api.llama_decode(self.ctx, api.llama_batch_get_one(tokens, len(ids))):
            raise RuntimeError("llama_decode failed")
        logits = api.llama_get_logits_ith(self.ctx, -1)
        return int(np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())

    def reset(self) -> None:
        self.api.llama_memory_clear(self.api.llama_get_memory(self.ctx), True)

    def close(self) -> None:
        if self.ctx is not None:
            self.api.llama_free(self.ctx)
            self.api.llama_model_free(self.model)
            self.model = self.ctx = None


def _cffi_library() -> Path | None:
    """The llama-cpp-cffi CPU module: under PEER_DIR (--install), else wherever installed."""
    for base in [PEER_DIR, *map(Path, sys.path)]:
        found = sorted((base / "llama").glob("_llama_cpp_cpu*.so")) if base.is_dir() else []
        if found:
            return found[0]
    return None


def _use_peer_dir() -> None:
    if PEER_DIR.is_dir() and str(PEER_DIR) not in sys.path:
        sys.path.append(str(PEER_DIR))  # after the project's own packages: it cannot shadow them


def unavailable() -> str | None:
    """Why the peer cannot run here, or None when it can (checked without loading it)."""
    _use_peer_dir()
    missing = []
    if importlib.util.find_spec("llama_cpp") is None and _cffi_library() is None:
        missing.append("llama.cpp binding (llama-cpp-python or llama-cpp-cffi)")
    elif importlib.util.find_spec("llama_cpp") is None and not importlib.util.find_spec(
        "_cffi_backend"
    ):
        missing.append("cffi (for llama-cpp-cffi)")
    if importlib.util.find_spec("gguf") is None:
        missing.append("gguf")
    if missing:
        return (
            f"{' and '.join(missing)} not installed; run "
            f"`{python()} benchmarks/llamacpp_peer.py --install` "
            "(see docs/performance.md)"
        )
    return None


def python() -> str:
    """This interpreter as a command to show: relative to the repository when inside it."""
    executable = Path(sys.executable)
    with contextlib.suppress(ValueError):
        return str(executable.relative_to(ROOT))
    return str(executable)


def backend() -> Backend:
    """llama-cpp-python when it imports, else llama-cpp-cffi; LLAMACPP_PEER_BINDING=cffi or
    =python picks one."""
    _use_peer_dir()
    chosen = os.environ.get("LLAMACPP_PEER_BINDING", "")
    if chosen == "python" or (chosen != "cffi" and importlib.util.find_spec("llama_cpp")):
        return PythonBackend()
    library = _cffi_library()
    if library is None:
        raise RuntimeError(unavailable() or "no llama.cpp binding")
    return CffiBackend(library)


# -- installing ----------------------------------------------------------------------------


def run(command: list[str], env: dict | None = None) -> int:
    print("+ " + " ".join(command), file=sys.stderr, flush=True)
    return subprocess.call(command, env=env)


def install() -> int:
    """The bindings and gguf into PEER_DIR, apart from the project's environment (--no-deps:
    llama-cpp-cffi pins huggingface-hub < 0.29, which the project cannot take)."""
    PEER_DIR.mkdir(parents=True, exist_ok=True)
    target = ["install", "--quiet", "--no-deps", "--upgrade", "--target", str(PEER_DIR)]
    status = run([*PIP, *target, f"llama-cpp-cffi=={CFFI_VERSION}", f"gguf=={GGUF_VERSION}",
                  "cffi"])  # fmt: skip
    wheels = sorted(WHEELS.glob("llama_cpp_python-*.whl"))
    if wheels and not status:
        status = run([*PIP, *target, str(wheels[-1]), "diskcache"])
    return status


def cmake_args() -> str:
    """llama.cpp's CPU flags for this CPU, AMX left out: GGML_NATIVE would build llama.cpp's
    AMX kernels on a CPU that has AMX, and in llama-cpp-python 0.3.36 the first Q4_0 matmul
    there died of SIGSEGV (ggml_backend_amx_mul_mat) on this machine."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    found = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    flags = set(found[1].split()) if found else set()
    wanted = {"AVX": "avx", "AVX2": "avx2", "FMA": "fma", "F16C": "f16c", "BMI2": "bmi2",
              "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi", "AVX512_VNNI": "avx512_vnni",
              "AVX512_BF16": "avx512_bf16", "AVX_VNNI": "avx_vnni"}  # fmt: skip
    chosen = [f"-DGGML_{name}={'ON' if flag in flags else 'OFF'}" for name, flag in wanted.items()]
    return " ".join(["-DGGML_NATIVE=OFF", *chosen, "-DGGML_AMX_INT8=OFF", "-DLLAVA_BUILD=OFF",
                     "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                     "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_CURL=OFF"])  # fmt: skip


def build() -> None:
    """llama-cpp-python's wheel built from its source distribution, into WHEELS."""
    WHEELS.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CMAKE_ARGS": cmake_args()}
    print(f"CMAKE_ARGS={env['CMAKE_ARGS']}", file=sys.stderr)
    command = [*PIP, "wheel", "--no-deps", "--no-cache-dir", "--wheel-dir", str(WHEELS),
               f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"]  # fmt: skip
    if run(command, env):
        raise SystemExit("building llama-cpp-python failed")


# -- GGUF ----------------------------------------------------------------------------------


def write_gguf(checkpoint: Path, out: Path) -> Path:
    """The Qwen2 checkpoint as GGUF f16 (2-D weights f16, norms and biases f32), tokenizer too.

    What llama.cpp's convert_hf_to_gguf.py writes for Qwen2, without its pre-tokenizer
    detection by hash (the tiny tokenizer's hash is unknown to it; it is byte-level BPE with
    Qwen2's regex, so "qwen2").
    """
    import gguf
    from safetensors import safe_open

    config = json.loads((checkpoint / "config.json").read_text())
    if config["model_type"] != "qwen2":
        raise ValueError(f"the peer converts qwen2 checkpoints, not {config['model_type']}")
    layers = config["num_hidden_layers"]
    writer = gguf.GGUFWriter(str(out), "qwen2")
    writer.add_name(checkpoint.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(FTYPE_F16)

    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text(encoding="utf-8"))
    pieces = dict(tokenizer["model"]["vocab"])
    special = {t["content"] for t in tokenizer.get("added_tokens", []) if t.get("special")}
    pieces.update({t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])})
    by_id = {i: piece for piece, i in pieces.items()}
    tokens, types = [], []
    for i in range(config["vocab_size"]):
        piece = by_id.get(i)
        tokens.append(piece if piece is not None else f"[PAD{i}]")
        types.append(
            gguf.TokenType.USER_DEFINED if piece is None
            else gguf.TokenType.CONTROL if piece in special
            else gguf.TokenType.NORMAL
        )  # fmt: skip
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    vocab = gguf.SpecialVocab(checkpoint, load_merges=True, n_vocab=len(tokens))
    vocab.add_to_gguf(writer)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, layers)
    # one file, or shards listed by model.safetensors.index.json (checkpoints over 5 GB)
    shards = sorted(checkpoint.glob("model*.safetensors"))
    for shard in shards:
        with safe_open(str(shard), framework="np") as weights:
            for key in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key == "lm_head.weight" and config.get("tie_word_embeddings"):
                    continue
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise ValueError(f"no GGUF name for {key}")
                data = weights.get_tensor(key)
                writer.add_tensor(name, data.astype(np.float16 if data.ndim == 2 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def gguf_files(engine: Backend, checkpoint: Path, work: Path, threads: int,
               pure: bool) -> dict[str, Path]:  # fmt: skip
    """{label: path}: Q4_0 (llama.cpp's default mix) and, with `pure`, all-Q4_0; kept."""
    work.mkdir(parents=True, exist_ok=True)
    f16 = work / f"{checkpoint.name}-f16.gguf"
    if not f16.is_file():
        print("writing GGUF f16 ...", file=sys.stderr, flush=True)
        write_gguf(checkpoint, f16.with_suffix(".partial"))
        f16.with_suffix(".partial").rename(f16)
    files = {"q4_0": work / f"{checkpoint.name}-q4_0.gguf"}
    if pure:
        files["q4_0_pure"] = work / f"{checkpoint.name}-q4_0-pure.gguf"
    for label, path in files.items():
        if not path.is_file():
            print(f"quantizing to {label} ...", file=sys.stderr, flush=True)
            engine.quantize(f16, path.with_suffix(".partial"), FTYPE_Q4_0, threads,
                            pure=label.endswith("pure"))  # fmt: skip
            path.with_suffix(".partial").rename(path)
    return files


# -- measuring -----------------------------------------------------------------------------


def resident() -> int:
    """This process's resident set size now, in bytes."""
    with contextlib.suppress(ImportError):
        import psutil

        return psutil.Process().memory_info().rss
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prompt_ids(vocab: int, count: int) -> list[int]:
    """`count` ids that are ordinary words of the tiny tokenizer's filled vocabulary (the
    same ids benchmarks/graph_bench.py uses for 64)."""
    return [int(i) for i in np.random.default_rng(0).integers(600, vocab, count)]


def llama_run(session: Session, ids: list[int], new_tokens: int) -> tuple[float, float, list]:
    """(prefill tok/s, decode tok/s, tokens) of one greedy run from an empty cache."""
    session.reset()
    started = time.perf_counter()
    token = session.eval(ids)
    first = time.perf_counter()
    out = [token]
    while len(out) < new_tokens:
        token = session.eval([token])
        out.append(token)
    end = time.perf_counter()
    return len(ids) / (first - started), (len(out) - 1) / (end - first), out


def og_run(model, ids: list[int], new_tokens: int) -> tuple[float, float, list]:
    """The same with og.Generator, timed as benchmarks/graph_bench.py times its bundles."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from graph_bench import run_once

    return (*run_once(model, ids, new_tokens), [])


def engine_run(graph, ids: list[int], new_tokens: int) -> tuple[float, float, list]:
    """The same with ortserve's own decode loop (engine/continuous.py's forward pass: the
    LM head on the last position only, keys and values in place), as `ortserve serve` runs a
    builder bundle on the CPU; greedy, one row."""
    from ortserve.engine.continuous import BatchCache

    cache = BatchCache(graph, 1)
    cache.reserve(1, len(ids) + new_tokens)
    started = time.perf_counter()
    mask = np.ones((1, len(ids)), dtype=np.int64)
    token = int(graph.forward(np.asarray([ids]), mask, cache.view(0, 1))[0, -1].argmax())
    first = time.perf_counter()
    out = [token]
    while len(out) < new_tokens:
        mask = np.ones((1, len(ids) + len(out)), dtype=np.int64)
        logits = graph.forward(np.asarray([[token]]), mask, cache.view(0, 1))
        token = int(logits[0, -1].argmax())
        out.append(token)
    end = time.perf_counter()
    return len(ids) / (first - started), (len(out) - 1) / (end - first), out


def measure(checkpoint: Path, bundle: Path | None, work: Path, *, rounds: int, new_tokens: int,
            prompt_tokens: int, threads: int, pure: bool) -> dict[str, Any]:  # fmt: skip
    engine = backend()
    vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    ids = prompt_ids(vocab, prompt_tokens)
    files = gguf_files(engine, checkpoint, work, threads, pure)
    n_ctx = -(-(prompt_tokens + new_tokens + 8) // 256) * 256
    sessions: dict[str, Session] = {}
    loads: dict[str, dict] = {}
    rss = 0
    for label, path in files.items():
        started = time.perf_counter()
        sessions[label] = engine.load(path, n_ctx, max(512, prompt_tokens), threads)
        loaded = time.perf_counter()
        sessions[label].eval(ids)
        loads[label] = {"load_s": loaded - started, "ready_s": time.perf_counter() - started}
        rss = rss or resident()  # Q4_0 alone loaded and run (GGUF writing is over: not a peak)
    models = {}
    if bundle is not None:
        import onnxruntime_genai as og

        started = time.perf_counter()
        config = og.Config(str(bundle))  # the same thread count as llama.cpp
        config.overlay(json.dumps(
            {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}
        ))  # fmt: skip
        models["og"] = og.Model(config)
        loaded = time.perf_counter()
        og_run(models["og"], ids, 1)
        loads["og"] = {"load_s": loaded - started, "ready_s": time.perf_counter() - started}
        from ortserve.engine.continuous import DecoderGraph, supports

        if supports(bundle):
            started = time.perf_counter()
            models["ortserve"] = DecoderGraph.load(bundle, threads)
            loaded = time.perf_counter()
            engine_run(models["ortserve"], ids, 1)
            loads["ortserve"] = {"load_s": loaded - started,
                                 "ready_s": time.perf_counter() - started}  # fmt: skip
    runners = {label: (lambda s=s: llama_run(s, ids, new_tokens)) for label, s in sessions.items()}
    runners.update({"og": lambda: og_run(models["og"], ids, new_tokens)} if models else {})
    if "ortserve" in models:
        runners["ortserve"] = lambda: engine_run(models["ortserve"], ids, new_tokens)
    for run in runners.values():  # warm-up: allocation, weight repacking
        run()
    results: dict[str, list] = {label: [] for label in runners}
    for _ in range(rounds):
        for label, run in runners.items():
            time.sleep(0.2)  # let the other engine's spinning threads go idle
            results[label].append(run())
    for session in sessions.values():
        session.close()
    figures = {
        label: {
            "prefill_tps": statistics.median(r[0] for r in runs),
            "decode_tps": statistics.median(r[1] for r in runs),
            "decode_runs": [round(r[1], 1) for r in runs],
            **loads[label],
        }
        for label, runs in results.items()
    }
    for label, path in files.items():
        figures[label]["file_bytes"] = path.stat().st_size
    return {
        "binding": engine.name,
        "gguf": f"gguf {importlib.metadata.version('gguf')}",
        "threads": threads,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "rounds": rounds,
        "llamacpp_rss_bytes": rss,
        "figures": figures,
    }


# -- the driver's entry point --------------------------------------------------------------


def peer_figures(checkpoint: Path, bundle: Path | None, work: Path, *, rounds: int = 5,
                 new_tokens: int = 128, prompt_tokens: int = 64, threads: int | None = None,
                 pure: bool = True, timeout: float = 900) -> dict[str, Any]:  # fmt: skip
    """Run the peer in a child process; its figures, or {"na": why}."""
    why = unavailable()
    if why:
        return {"na": why}
    out = work / "logs" / "peer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--checkpoint", str(checkpoint), "--keep", str(work),
               "--rounds", str(rounds), "--new-tokens", str(new_tokens),
               "--prompt-tokens", str(prompt_tokens), "--json", str(out),
               "--threads", str(threads or default_threads())]  # fmt: skip
    if bundle is not None:
        command += ["--bundle", str(bundle)]
    if not pure:
        command.append("--no-pure")
    log = work / "logs" / "peer.log"
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"na": f"the llama.cpp peer ran past {timeout:.0f} s"}
    log.write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    if done.returncode < 0:
        signal_name = signal.Signals(-done.returncode).name
        return {"na": f"the llama.cpp peer died of {signal_name} (log: {log})"}
    if done.returncode != 0 or not out.is_file():
        tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return {"na": f"the llama.cpp peer failed: {tail[-200:]} (log: {log})"}
    return json.loads(out.read_text())


def default_threads() -> int:
    """One per physical core, as onnxruntime's default intra-op pool."""
    with contextlib.suppress(ImportError):
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return os.cpu_count() or 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--install", action="store_true",
                        help=f"install llama-cpp-cffi, gguf (and a llama-cpp-python wheel found"
                             f" in {WHEELS}) into {PEER_DIR}")  # fmt: skip
    parser.add_argument("--build", action="store_true",
                        help=f"build llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} for this CPU"
                             " (25+ minutes on 2 cores), then --install")  # fmt: skip
    parser.add_argument("--checkpoint", type=Path, help="a Qwen2 checkpoint directory")
    parser.add_argument("--bundle", type=Path, help="an og bundle of it to run alternately")
    parser.add_argument("--keep", type=Path, default=ROOT / ".cache" / "bench",
                        help="where the GGUF files are written and kept")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--no-pure", dest="pure", action="store_false",
                        help="skip the all-Q4_0 file (llama.cpp's default mix only)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.build:
        build()
    if args.install or args.build:
        raise SystemExit(install())
    if args.checkpoint is None:
        parser.error("--checkpoint is required")
    why = unavailable()
    if why:
        raise SystemExit(f"n/a: {why}")
    report = measure(args.checkpoint, args.bundle, args.keep / "gguf", rounds=args.rounds,
                     new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens,
                     threads=args.threads, pure=args.pure)  # fmt: skip
    gc.collect()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
