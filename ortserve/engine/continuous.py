"""Continuous batching over the model builder's decoder graph: ortserve's own decode loop.

Why not og.Engine. onnxruntime-genai 0.18 batches statically on CPU (PagedAttention has no
CPU kernel). Measured with 0.18.0: a batch forms from the requests waiting when it starts,
holds at most 4 of them whatever `max_batch_size` says, and runs until every member ends; a
Request can continue with a second turn on its kept KV only when it was alone in its batch
and its engine has run nothing since ("Continuous decoding requires exactly one resident
request in a static engine batch"). So a request arriving mid-batch waits, 8 streams never
share one forward pass, and a long generation cannot be cut into segments.

Why a loop of our own works. The builder's graph (GroupQueryAttention, no position_ids, a
shared KV buffer) takes each row's length from its attention mask (seqlens_k) and writes new
keys and values in place, at that row's own position. Rows of any length therefore share a
forward pass exactly (fp32 tokens equal a lone run), and a row can join or leave between two
steps:

- a new turn is prefilled alone, in chunks of bounded size, into the next free row of the
  batch buffer, starting after the longest prefix kept from an earlier turn (kvcache.py);
- each step then decodes one token for every prefilled row in one forward pass;
- a finished row leaves at once (the last row moves into its place) and its keys and values
  are kept for the conversation's next turn;
- with speculation on (ORTSERVE_SPECULATION=auto), a row may take several tokens in a step:
  drafts looked up in its own prompt and output (speculation.py), or proposed by a small
  draft model of the same tokenizer (draft_model.py), are verified in one forward pass with
  the logits of every fed position, and the tokens the model agrees with are kept.

The interface is og.Engine's (create_request, run; Request.begin_turn / cancel_turn / close;
events with flags, token, finish_reason, usage), as engine/adapters.py's GeneratorEngine, so
the scheduler drives it as one more kind of lane. Sampling (temperature, top-k, top-p,
repetition penalty, a per-turn seed) happens here in numpy, and turns that ask for logprobs
get them from the same logits. Guided decoding does not: og's llguidance is not reachable
from Python, so guided turns still run on og.Engine lanes. Everything here runs on the
model's scheduler thread.
"""

from __future__ import annotations

import collections
import mmap
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ortserve.engine import int8_compute, kv_int8, speculation
from ortserve.engine.adapters import GeneratorEvent, GeneratorTurn, GeneratorUsage
from ortserve.engine.kvcache import KVStore
from ortserve.engine.logprobs import step_logprobs
from ortserve.library.bundle import genai_config

# A prefill runs in chunks of this many tokens, one chunk per step, so that the decoding
# rows wait ~0.1-0.5 s for it at most, however long the prompt. A graph whose LM head runs
# on every position keeps a chunk's logits ([tokens, vocab] float32) under the byte bound
# instead: ~220 tokens at a 152k vocabulary.
_PREFILL_CHUNK = 256
_PREFILL_LOGIT_BYTES = 128 << 20
_LENGTH_STEP = 256  # the batch buffer grows its length in these steps (a growth copies it)
# Shorter turns are not worth keeping, nor shorter shared prefixes worth reusing: their
# prefill costs next to nothing (and a chat template's opening is shared by everyone).
_KEEP_MIN = 32
_PLAIN_INPUTS = {"input_ids", "attention_mask", "past_key_names", "past_value_names"}
_PLAIN_OUTPUTS = {"logits", "present_key_names", "present_value_names"}
_TAIL_INPUT = "ortserve_logit_starts"  # a pruned graph's input: -(the positions it keeps)


def graph_form(bundle: Path) -> str:
    """'builder' when the decoder batches rows of any length exactly, else 'optimum'.

    Read from the bundle, so that builder bundles pulled from the Hub count as well as
    converted ones: no position_ids input (og's padded-row position_ids are what make
    optimum graphs diverge), a shared KV buffer and GroupQueryAttention (each row's own
    length comes from the attention mask).
    """
    try:
        config = genai_config(bundle)
        decoder = config["model"]["decoder"]
        if "position_ids" in decoder.get("inputs", {}):
            return "optimum"
        if not config.get("search", {}).get("past_present_share_buffer"):
            return "optimum"
        graph = Path(bundle) / decoder.get("filename", "model.onnx")
        return "builder" if _mentions(graph, b"GroupQueryAttention") else "optimum"
    except (OSError, ValueError, KeyError, TypeError):
        return "optimum"


def supports(bundle: Path) -> bool:
    """True when ContinuousEngine can run the bundle: a plain builder text decoder."""
    if graph_form(bundle) != "builder":
        return False
    config = genai_config(bundle)
    model = config["model"]
    decoder = model["decoder"]
    if any(key in model for key in ("vision", "speech", "embedding", "encoder")):
        return False  # a stage of a multimodal pipeline, not a whole model
    if "sliding_window" in decoder or "pipeline" in decoder:
        return False  # og rotates a windowed cache; this loop keeps the whole sequence
    if decoder.get("session_options", {}).get("provider_options"):
        return False  # built for a GPU (fp16 kernels, maybe a paged cache): og runs it
    return (
        set(decoder.get("inputs", {})) <= _PLAIN_INPUTS
        and set(decoder.get("outputs", {})) <= _PLAIN_OUTPUTS
    )


def _mentions(path: Path, needle: bytes) -> bool:
    """Whether a file contains `needle` (an op type in a graph), without loading it."""
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return m.find(needle) >= 0


@dataclass
class DecoderGraph:
    """The bundle's decoder as an onnxruntime session, and what the loop needs to know."""

    session: object  # onnxruntime.InferenceSession
    names: tuple[str, str, str]  # the input_ids, attention_mask and logits names
    past: list[str]  # cache input names: layer 0 key, layer 0 value, layer 1 key, ...
    present: list[str]  # the matching outputs (bound to the same buffers)
    ids_type: type
    mask_type: type
    kv_type: type
    kv_heads: int
    head_size: int
    vocab_size: int
    context_length: int
    eos: frozenset[int]
    last_only: bool = False  # the LM head runs on the last position only
    logits_type: type = np.float32
    logits_width: int = 0  # the graph's logits last dimension (the vocabulary, maybe padded)
    int8: bool = False  # projections run as int8 products (int8_compute.py)
    kept_type: type = np.float32  # the type finished turns' keys and values are kept in

    @classmethod
    def load(
        cls, bundle: Path, threads: int | None = None, int8: Path | None = None,
        keep: str = "auto", kv_cache: Path | None = None,
    ) -> DecoderGraph:  # fmt: skip
        """The bundle's decoder as the loop runs it; `int8`: a folder to keep int8 weights
        in, to run its int4 projections as int8 products (int8_compute.py); `keep`: the
        type kept turns' keys and values are stored in (auto, f32, f16: _kept_type);
        `kv_cache`: a folder to keep int8 cache scales in, to hold keys and values in int8
        (kv_int8.py; kept turns are then int8 too)."""
        import onnxruntime as ort

        config = genai_config(bundle)
        model, decoder = config["model"], config["model"]["decoder"]
        inputs = decoder["inputs"]
        outputs = decoder["outputs"]
        graph = Path(bundle) / decoder.get("filename", "model.onnx")
        options = _session_options(decoder.get("session_options", {}), threads)
        scales = None  # where an int8 cache's scales are kept, and what calibrating feeds
        if kv_cache is not None:
            names = (inputs["input_ids"], inputs["attention_mask"])
            scales = kv_int8.Target(kv_cache, *names, int(decoder["head_size"]), Path(bundle),
                                    int(model["context_length"]))  # fmt: skip
        logits_name = outputs.get("logits", "logits")
        source, pruned, int8 = _prepared(graph, logits_name, options, int8, scales)
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        layers = int(decoder["num_hidden_layers"])
        past = [inputs[f"past_{kv}_names"] % i for i in range(layers) for kv in ("key", "value")]
        present = [outputs[f"present_{kv}_names"] % i for i in range(layers)
                   for kv in ("key", "value")]  # fmt: skip
        types = {i.name: _numpy_type(i.type) for i in session.get_inputs()}
        logits = next(o for o in session.get_outputs() if o.name == outputs.get("logits", "logits"))
        width = logits.shape[-1]
        eos = model.get("eos_token_id", [])
        return cls(
            session=session,
            names=(inputs["input_ids"], inputs["attention_mask"], outputs.get("logits", "logits")),
            past=past,
            present=present,
            ids_type=types[inputs["input_ids"]],
            mask_type=types[inputs["attention_mask"]],
            kv_type=types[past[0]],
            kv_heads=int(decoder["num_key_value_heads"]),
            head_size=int(decoder["head_size"]),
            vocab_size=int(model["vocab_size"]),
            context_length=int(model["context_length"]),
            eos=frozenset(eos if isinstance(eos, list) else [eos]),
            last_only=pruned,
            logits_type=_numpy_type(logits.type),
            logits_width=width if isinstance(width, int) else int(model["vocab_size"]),
            int8=int8,
            kept_type=_kept_type(keep, types[past[0]], graph),
        )

    @property
    def token_bytes(self) -> int:
        """Bytes of keys and values one token holds across all layers."""
        return len(self.past) * self.kv_heads * self.head_size * np.dtype(self.kv_type).itemsize

    def forward(
        self, ids: np.ndarray, mask: np.ndarray, block: KVBlock, positions: int = 1
    ) -> np.ndarray:
        """Logits [rows, positions, vocab] of the last `positions` fed tokens (every fed
        token's on an unpruned graph); keys and values are written into `block` in place."""
        ids_name, mask_name, logits_name = self.names
        if block.binding is None:
            block.binding = self._bind(block.arrays)
        binding = block.binding
        binding.bind_cpu_input(ids_name, np.ascontiguousarray(ids, dtype=self.ids_type))
        binding.bind_cpu_input(mask_name, np.ascontiguousarray(mask, dtype=self.mask_type))
        if self.last_only:
            positions = min(max(1, positions), ids.shape[1])
            binding.bind_cpu_input(_TAIL_INPUT, np.asarray([-positions], dtype=np.int64))
        else:
            positions = ids.shape[1]
        # A fresh array each pass (the caller keeps it), written by the session directly:
        # reading it back through get_outputs() would wrap every cache output too.
        logits = np.empty((ids.shape[0], positions, self.logits_width), dtype=self.logits_type)
        binding.bind_output(logits_name, "cpu", 0, logits.dtype, logits.shape, logits.ctypes.data)
        self.session.run_with_iobinding(binding)
        return logits

    def _bind(self, arrays: list[np.ndarray]):
        """An IOBinding with each cache array bound as both past and present (the shared
        buffer: written in place). Built once per block: rebuilding it every pass cost
        ~3% of a one-row decode step of a small model (170 -> 70 us of Python per pass)."""
        import onnxruntime as ort

        binding = self.session.io_binding()
        for past, present, array in zip(self.past, self.present, arrays):
            value = ort.OrtValue.ortvalue_from_numpy(array)  # wraps the memory, no copy
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        return binding


def _prepared(
    graph: Path, logits: str, options, int8: Path | None, kv: kv_int8.Target | None = None
) -> tuple[str | bytes, bool, bool]:
    """The session's source (the graph's path, or the rewritten graph's bytes, its weights
    read from the folder set in `options`), whether the LM head runs on the last positions
    only, and whether the projections run as int8 products (their weights kept in `int8`).
    With `kv`, the cache is int8 (kv_int8.py) where it can be."""
    try:
        import onnx
    except ImportError:  # a dependency; should it be missing, the graph runs as it is
        return str(graph), False, False
    model = onnx.load(str(graph), load_external_data=False)
    head = _lm_head(model, logits)
    keep = set(head.output) if head is not None else set()
    as_int8 = int8 is not None and int8_compute.rewrite(model, graph.parent, int8, keep)
    # calibrated on the graph as it is, before `options` points at another weights folder
    kv_as_int8 = kv is not None and kv_int8.rewrite(model, graph, options, kv)
    pruned = _last_token_logits(model, logits)
    if not pruned and not as_int8 and not kv_as_int8:
        return str(graph), False, False
    key = "session.model_external_initializers_file_folder_path"
    options.add_session_config_entry(key, str(int8 if as_int8 else graph.parent))
    return model.SerializeToString(), pruned, as_int8


def _lm_head(model, logits: str):
    """The node computing the logits (through an fp16 graph's Cast), or None."""
    producers = {output: node for node in model.graph.node for output in node.output}
    head = producers.get(logits)
    while head is not None and head.op_type == "Cast":  # an fp16 graph's logits cast
        head = producers.get(head.input[0])
    return head


def _last_token_logits(model, logits: str) -> bool:
    """Cut the model's LM head to the last few positions, in place; False where it cannot.

    The builder's graph computes logits for every position of a prefill, and the loop only
    ever reads the last one, or a speculating row's last few (its verified drafts): on a
    small model with a 152k vocabulary the LM head is most of a prefill's work. A Slice
    before the head's MatMul keeps the last N positions, N -1 times the extra input
    _TAIL_INPUT.
    """
    import onnx
    from onnx import helper

    head = _lm_head(model, logits)
    if head is None or head.op_type not in ("MatMul", "MatMulNBits"):
        return False
    hidden, last = head.input[0], "/ortserve/last_position/output_0"
    constants = {"/ortserve/last_position/ends": 2**62, "/ortserve/last_position/axes": 1}
    for name, value in constants.items():
        model.graph.initializer.append(
            helper.make_tensor(name, onnx.TensorProto.INT64, [1], [value])
        )
    model.graph.input.append(helper.make_tensor_value_info(_TAIL_INPUT, onnx.TensorProto.INT64,
                                                           [1]))  # fmt: skip
    at = list(model.graph.node).index(head)  # the node order stays topological
    model.graph.node.insert(at, helper.make_node("Slice", [hidden, _TAIL_INPUT, *constants],
                                                 [last], name="/ortserve/last_position"))  # fmt: skip
    head.input[0] = last
    for output in model.graph.output:
        if output.name == logits and len(output.type.tensor_type.shape.dim) == 3:
            output.type.tensor_type.shape.dim[1].dim_param = "logit_positions"
    return True


def _kept_type(keep: str, kv_type: type, graph: Path) -> type:
    """The type finished turns' keys and values are kept in (kvcache.py): float16 for a
    float32 cache of a model whose projections are quantized ("auto"), else the cache's own.

    Kept turns are most of a busy worker's memory (24 KB a token on Qwen2.5-0.5B's shape
    in float32); halving them keeps twice the conversations in ORTSERVE_KV_CACHE_SIZE. The
    rounding (a relative 2^-11, llama.cpp's own f16 cache) is far below what 4-bit weights
    change; an fp32 model keeps exact keys and values, so a continued turn of it answers
    exactly as a fresh prefill would."""
    if keep == "f16" or (keep == "auto" and _mentions(graph, b"MatMulNBits")):
        return np.float16 if kv_type == np.float32 else kv_type
    return kv_type


def _session_options(config: dict, threads: int | None = None):
    """The bundle's session options; where it sets no thread count, `threads`, else og's
    own default (half the logical cores, at most 16), so that both paths compare."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(
        config.get("intra_op_num_threads") or threads or max(1, min(16, (os.cpu_count() or 2) // 2))
    )
    if config.get("inter_op_num_threads"):
        options.inter_op_num_threads = int(config["inter_op_num_threads"])
    options.log_severity_level = 3  # og's logs stay quiet too; failures raise anyway
    return options


def _numpy_type(onnx_type: str) -> type:
    return {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
            "tensor(float16)": np.float16, "tensor(int8)": np.int8}[onnx_type]  # fmt: skip


@dataclass
class KVBlock:
    """Some rows of the batch's cache arrays, as one forward pass reads and writes them."""

    arrays: list[np.ndarray]
    binding: object = None  # DecoderGraph's IOBinding of these arrays, made on first use


class BatchCache:
    """The batch's keys and values: per cache input one [rows, kv_heads, length, head] array.

    Row i belongs to the i-th decoding turn; rows are kept contiguous (0..n-1), so a forward
    pass over n rows takes the first n rows of each array, which is one contiguous block.
    The arrays are views of ONE allocation: freed, it goes back to the system at once. Many
    smaller arrays, reallocated at every growth, stayed in the C heap's free lists instead:
    a lone 4000-token prefill left the worker 1.3 GB larger (Qwen2.5-0.5B's shape).
    """

    def __init__(self, graph: DecoderGraph, capacity: int):
        self._graph = graph
        self.capacity = capacity
        self.buffer: np.ndarray | None = None  # [cache inputs, rows, kv_heads, length, head]
        self.arrays: list[np.ndarray] = []  # buffer[i] for each cache input i
        self._blocks: dict[tuple[int, int], KVBlock] = {}  # views of the current arrays

    @property
    def rows(self) -> int:
        return self.arrays[0].shape[0] if self.arrays else 0

    @property
    def length(self) -> int:
        return self.arrays[0].shape[2] if self.arrays else 0

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.nbytes

    def reserve(self, rows: int, length: int) -> None:
        """Room for `rows` rows of `length` tokens (no more rows than asked: the caller
        counts the turns about to join); growing copies what is there."""
        if rows <= self.rows and length <= self.length:
            return
        limit = self._graph.context_length
        if length > limit:
            raise ValueError(f"{length} tokens exceed the context length of {limit}")
        rows = max(rows, self.rows)
        length = min(limit, -(-max(length, self.length) // _LENGTH_STEP) * _LENGTH_STEP)
        graph = self._graph
        shape = (len(graph.past), rows, graph.kv_heads, length, graph.head_size)
        # zeros: what the attention reads beyond a row's length must be finite
        fresh = np.zeros(shape, dtype=graph.kv_type)
        if self.buffer is not None:
            old = self.buffer
            fresh[:, : old.shape[1], :, : old.shape[3]] = old
        self.release()  # the old buffer goes before the views of the new one are taken
        self.buffer, self.arrays = fresh, list(fresh)

    def view(self, start: int, stop: int) -> KVBlock:
        """Rows start..stop of every array (kept, with its binding, until the arrays change)."""
        block = self._blocks.get((start, stop))
        if block is None:
            block = self._blocks[start, stop] = KVBlock([a[start:stop] for a in self.arrays])
        return block

    def move(self, source: int, target: int, tokens: int) -> None:
        self.buffer[:, target, :, :tokens] = self.buffer[:, source, :, :tokens]

    def load(self, row: int, layers: list[np.ndarray], tokens: int) -> None:
        for array, kept in zip(self.arrays, layers):
            array[row, :, :tokens] = kept[:, :tokens]

    def save(self, row: int, tokens: int) -> list[np.ndarray]:
        """A row's first `tokens` keys and values, copied into one allocation (as the buffer,
        so that a dropped entry goes back to the system whole), in the graph's kept type
        (load() casts them back)."""
        return list(self.buffer[:, row, :, :tokens].astype(self._graph.kept_type))

    def release(self) -> None:
        self.buffer, self.arrays = None, []
        self._blocks.clear()


class ContinuousTurn(GeneratorTurn):
    """og.TurnOptions' setters; this engine also honours a per-turn seed."""

    def __init__(self, request: ContinuousRequest | None = None):
        super().__init__()
        self.seed: int | None = None

    def set_seed(self, seed: int | None) -> None:
        self.seed = None if seed is None else int(seed)


class ContinuousRequest:
    """One turn on a ContinuousEngine (og.Request's interface)."""

    def __init__(self, engine: ContinuousEngine):
        self._engine = engine
        self.prompt = np.zeros(0, dtype=np.int32)
        self.turn = ContinuousTurn()
        self.turn_id = 0
        self.cancelled = False
        self.started = False  # its prefill has begun (it holds the row after the decoding ones)
        self.context: list[int] = []  # the tokens whose keys and values its row holds
        self.next_token = 0  # sampled and not yet fed
        self.generated = 0
        self.reused = 0  # prompt tokens whose keys and values came from a kept turn
        self.seen: np.ndarray | None = None  # sorted ids the repetition penalty applies to
        self.rng: np.random.Generator | None = None
        self.lookup: speculation.PromptLookup | None = None  # drafts' source, when speculating
        self.drafting: speculation.DraftLength | None = None
        self.draft_state: Any = None  # its row of the draft model (draft_model.DraftState)
        self.draft_seconds = 0.0  # what drafting with the draft model took this step

    def begin_turn(self, tokens: np.ndarray, turn: ContinuousTurn) -> int:
        self.prompt = np.asarray(tokens, dtype=np.int32).reshape(-1)
        self.turn = turn
        self.turn_id += 1
        self._engine.queue.append(self)
        return self.turn_id

    def cancel_turn(self, turn_id: int) -> None:
        self.cancelled = True

    def close(self) -> None:
        self._engine.discard(self)


class ContinuousEngine:
    """og.Engine's interface over a builder graph; turns join and leave at any step."""

    def __init__(
        self, graph: DecoderGraph, capacity: int, store: KVStore, speculative: str = "auto",
        draft: Any = None,  # a draft_model.DraftModel (which imports this module)
    ):  # fmt: skip
        self.graph = graph
        self.speculate = speculative != "off"  # prompt-lookup drafts (speculation.py)
        # drafts from a small model of the same tokenizer instead (draft_model.py)
        self.draft = draft if self.speculate else None
        if self.draft is not None:
            self.draft.target(graph)
        self.drafted = self.accepted = 0  # draft tokens proposed and kept, since the start
        self.rates = speculation.PassRates()  # when a row's own draft pass pays in a batch
        self.capacity = capacity
        self.store = store
        self.cache = BatchCache(graph, capacity)
        self.rows: list[ContinuousRequest] = []  # decoding; rows[i] owns cache row i
        self.queue: collections.deque[ContinuousRequest] = collections.deque()  # to prefill
        self.chunk = _PREFILL_CHUNK
        if not graph.last_only:
            self.chunk = max(64, min(512, _PREFILL_LOGIT_BYTES // (graph.vocab_size * 4)))

    # ---- og.Engine's interface ------------------------------------------------------------

    def create_event_buffer(self, size: int) -> None:
        return None

    def create_request(self, options=None) -> ContinuousRequest:
        return ContinuousRequest(self)

    def turn_options(self, request: ContinuousRequest) -> ContinuousTurn:
        return ContinuousTurn(request)

    def has_pending_requests(self) -> bool:
        return bool(self.rows or self.queue)

    def run(self, buffer=None) -> Iterator[GeneratorEvent]:
        """One step: cancellations, a bounded amount of prefill, one token for every row."""
        events: list[GeneratorEvent] = []
        self._cancel(events)
        self._prefill(events)
        if self.rows:
            self._decode(events)  # raises when the batch fails: the scheduler recovers
        if not self.has_pending_requests():
            self.cache.release()  # idle: give the memory back
        return iter(events)

    def discard(self, request: ContinuousRequest) -> None:
        """Forget a turn without an event (og's Request.close)."""
        if request in self.rows:
            self._leave(request, keep=False)
        elif request in self.queue:
            self.queue.remove(request)
        self._release_draft(request)

    def reset(self) -> None:
        """After a failed step: no rows, nothing queued, the buffer freed; kept turns stay."""
        for request in (*self.rows, *self.queue):
            self._release_draft(request)
        self.rows.clear()
        self.queue.clear()
        self.cache.release()

    # ---- steps ------------------------------------------------------------------------------

    def _cancel(self, events: list[GeneratorEvent]) -> None:
        import onnxruntime_genai as og

        for request in [r for r in (*self.rows, *self.queue) if r.cancelled]:
            if request in self.rows:
                self._leave(request, keep=True)  # what it computed is still a valid prefix
            else:
                self.queue.remove(request)
            self._release_draft(request)
            events.append(self._finish(request, og.FinishReason.CANCELLED, None))

    def _prefill(self, events: list[GeneratorEvent]) -> None:
        """Prefill queued turns, oldest first, up to one chunk of tokens in all."""
        budget = self.chunk
        while self.queue and budget > 0 and len(self.rows) < self.capacity:
            request = self.queue[0]
            row = len(self.rows)
            try:
                if not request.started:
                    self._start(request, row)
                take = min(budget, len(request.prompt) - len(request.context))
                logits = self._prefill_chunk(request, row, take)
            except Exception as exc:  # this turn alone: its row is not part of the batch yet
                self.queue.popleft()
                events.append(_failed(request, exc))
                continue
            budget -= take
            if len(request.context) < len(request.prompt):
                return  # part-way: the rest in later steps, the decoding rows go on meanwhile
            self.queue.popleft()
            event, finished = self._advance(request, logits)
            events.append(event)
            if finished:
                self._keep(request, row)
            else:
                self.rows.append(request)  # its cache row is len(rows): it is row `row`

    def _start(self, request: ContinuousRequest, row: int) -> None:
        """Take the row; copy in the longest kept prefix of its prompt."""
        request.started = True
        search = request.turn.search
        if search.get("repetition_penalty", 1.0) != 1.0:
            ids = request.prompt
            request.seen = np.unique(ids[(ids >= 0) & (ids < self.graph.vocab_size)])
        if search.get("do_sample"):
            request.rng = np.random.default_rng(request.turn.seed)
        if self.speculate:
            request.lookup, request.drafting = speculation.PromptLookup(), speculation.DraftLength()
        if not self.store.enabled:
            return
        entry, length = self.store.match(request.prompt, minimum=_KEEP_MIN)
        length = min(length, len(request.prompt) - 1)  # one token at least runs: its logits
        if entry is None or length <= 0:
            return
        self._reserve(row + 1, self._prompt_room(request))
        self.cache.load(row, entry.layers, length)
        request.context = request.prompt[:length].tolist()
        request.reused = length

    def _prefill_chunk(self, request: ContinuousRequest, row: int, take: int) -> np.ndarray:
        done = len(request.context)
        tokens = request.prompt[done : done + take]
        # room for the whole prompt and its first token at once: growing by chunks copied
        # the buffer at each one
        self._reserve(row + 1, self._prompt_room(request))
        mask = np.ones((1, done + take), dtype=np.int64)
        logits = self.graph.forward(tokens[None, :], mask, self.cache.view(row, row + 1))
        request.context.extend(tokens.tolist())
        return logits[0, -1]

    def _decode(self, events: list[GeneratorEvent]) -> None:
        """One token for every decoding row, in one forward pass; rows with drafts get them
        verified too (speculation.py). A row alone feeds its token and drafts in that pass.
        Among others it cannot: onnxruntime's CPU GroupQueryAttention takes several tokens
        per row only in a batch of one row. So the shared pass feeds every row its token,
        and a row whose first draft that pass confirmed feeds its drafts in a pass of its own
        (a one-row chunk, like a prefill's) right after."""
        rows = self.rows
        drafts = [self._drafts(request) for request in rows]
        lengths = np.fromiter((len(r.context) for r in rows), dtype=np.int64, count=len(rows))
        longest = max(int(n) + 1 + len(d) for n, d in zip(lengths, drafts))
        self._reserve(len(rows) + (1 if self.queue and self.queue[0].started else 0), longest)
        if len(rows) == 1 and drafts[0]:
            logits = self._feed(0, [rows[0].next_token, *drafts[0]])
        else:
            width = int(lengths.max()) + 1
            ids = np.fromiter((r.next_token for r in rows), dtype=np.int64, count=len(rows))
            # row i attends to its own tokens and the one fed now; GroupQueryAttention reads
            # each row's length from this mask, so shorter rows are never padded into
            mask = np.arange(width)[None, :] <= lengths[:, None]
            started = time.perf_counter()
            logits = self.graph.forward(ids[:, None], mask, self.cache.view(0, len(rows)))
            self.rates.shared(len(rows), time.perf_counter() - started)
        finished = []
        for i, request in enumerate(list(rows)):
            if self._take(i, request, logits[i], drafts[i], events):
                finished.append(request)
        for request in finished:
            self._leave(request, keep=True)

    def _take(
        self, row: int, request: ContinuousRequest, logits: np.ndarray, drafts: list[int],
        events: list[GeneratorEvent],
    ) -> bool:  # fmt: skip
        """A row's tokens from its logits (one per fed position) and, when its drafts hold
        beyond what those logits reach, from a pass of its own over the drafts. True when
        the turn ended."""
        done, kept = self._accept(request, logits, drafts, events)
        wasted = bool(drafts) and len(self.rows) > 1 and request.draft_seconds > 0
        if not done and kept == len(logits) <= len(drafts):
            if len(self.rows) > 1 and not self.rates.pays(request.drafting):
                drafts = drafts[:kept]  # the shared pass verified these; no pass of its own
            else:
                wasted = False
                started = time.perf_counter()
                more = self._feed(row, drafts[kept - 1 :])  # the confirmed draft, the rest
                done, further = self._accept(request, more[0], drafts[kept:], events)
                kept += further
                if len(self.rows) > 1:  # the draft model's passes are part of its cost
                    seconds = time.perf_counter() - started + request.draft_seconds
                    self.rates.own(request.drafting, further + 1, seconds)
        if wasted and not done:  # the draft model's passes gave no token beyond the shared one
            self.rates.own(request.drafting, 0, request.draft_seconds)
        if drafts:
            accepted = min(kept, len(drafts))
            request.drafting.update(len(drafts), accepted)
            self.drafted, self.accepted = self.drafted + len(drafts), self.accepted + accepted
        return done

    def _accept(
        self, request: ContinuousRequest, logits: np.ndarray, drafts: list[int],
        events: list[GeneratorEvent],
    ) -> tuple[bool, int]:  # fmt: skip
        """Tokens from successive fed positions' logits: each position's own token, going on
        while that token is the draft fed after it. (Whether the turn ended, positions whose
        token was their draft.) Rejected drafts' keys and values stay in the row past its
        length, where the tokens fed later write over them."""
        for j in range(len(logits)):
            request.context.append(request.next_token)  # the token fed at position j
            draft = drafts[j] if j < len(drafts) else None
            event, done = self._advance(request, logits[j], draft)
            events.append(event)
            matched = draft is not None and event.token == draft
            if done or not matched:
                return done, j + int(matched)
        return False, len(logits)

    def _feed(self, row: int, tokens: list[int]) -> np.ndarray:
        """One row alone feeds `tokens` after its context: their logits, [1, n, vocab]."""
        total = len(self.rows[row].context) + len(tokens)
        self._reserve(len(self.rows), total)
        ids = np.asarray(tokens, dtype=np.int64)[None, :]
        mask = np.ones((1, total), dtype=np.int64)
        return self.graph.forward(ids, mask, self.cache.view(row, row + 1), len(tokens))

    def _prompt_room(self, request: ContinuousRequest) -> int:
        return min(len(request.prompt) + 1, self.graph.context_length)

    def _reserve(self, rows: int, length: int) -> None:
        """Cache room for `rows` rows of `length` tokens; when it must grow, room for the
        queued turns' prompts too (they join soon: one growth and one copy of the buffer,
        not one per arrival), and no more rows than will be used."""
        if rows <= self.cache.rows and length <= self.cache.length:
            return
        joining = list(self.queue)[: max(0, self.capacity - len(self.rows))]
        length = max([length, *(self._prompt_room(r) for r in joining)])
        self.cache.reserve(max(rows, len(self.rows) + len(joining)), length)

    def _drafts(self, request: ContinuousRequest) -> list[int]:
        """A row's draft tokens for this step, within its token and context budgets."""
        if request.drafting is None:
            return []
        room = min(request.turn.max_generated - request.generated - 1,
                   self.graph.context_length - len(request.context) - 1)  # fmt: skip
        k = min(request.drafting.wanted(), room)
        if k <= 0:
            return []
        if self.draft is not None:
            return self._model_drafts(request, k)
        lookup = request.lookup
        lookup.extend(request.context[len(lookup.tokens) :])
        return lookup.draft(request.next_token, k)

    def _model_drafts(self, request: ContinuousRequest, k: int) -> list[int]:
        """k drafts from the draft model. They cost k of its passes, so in a batch a row
        drafts only where its own verification pass pays (PassRates, which counts them)."""
        request.draft_seconds = 0.0
        if len(self.rows) > 1 and not self.rates.pays(request.drafting):
            return []
        started = time.perf_counter()
        if request.draft_state is None:
            request.draft_state = self.draft.start()
        sequence = [*request.context, request.next_token]
        drafts = self.draft.propose(request.draft_state, sequence, k)
        request.draft_seconds = time.perf_counter() - started
        return drafts

    def _release_draft(self, request: ContinuousRequest) -> None:
        """Free a turn's draft-model row (when it leaves the batch, ends or fails)."""
        if request.draft_state is not None:
            self.draft.release(request.draft_state)
            request.draft_state = None

    def _advance(
        self, request: ContinuousRequest, logits: np.ndarray, draft: int | None = None
    ) -> tuple[GeneratorEvent, bool]:
        """Choose the next token from a row's logits (at a drafted position, by speculative
        sampling's rule): its event, and whether the turn ended."""
        import onnxruntime_genai as og

        token = choose(logits, request.turn.search, request.seen, request.rng, draft)
        if token in self.graph.eos:
            return self._finish(request, og.FinishReason.EOS, None), True
        k = request.turn.logprobs
        scores = None if k is None else step_logprobs(logits, token, k)
        request.generated += 1
        request.next_token = token
        if request.seen is not None and not _holds(request.seen, token):
            request.seen = np.insert(request.seen, np.searchsorted(request.seen, token), token)
        if request.generated >= request.turn.max_generated:
            reason = og.FinishReason.MAX_GENERATED_TOKENS
        elif len(request.context) >= self.graph.context_length:
            reason = og.FinishReason.MAX_SESSION_TOKENS  # no room to feed it
        else:
            flags = int(og.EngineEventFlags.TOKEN)
            return GeneratorEvent(
                request, flags, token, og.FinishReason.NONE, logprobs=scores
            ), False
        return self._finish(request, reason, token, scores), True

    def _leave(self, request: ContinuousRequest, *, keep: bool) -> None:
        """Take a decoding turn out of the batch; the last row moves into its place."""
        row = self.rows.index(request)
        self._release_draft(request)
        if keep:
            self._keep(request, row)
        last = len(self.rows) - 1
        if row != last:
            moved = self.rows[last]
            self.cache.move(last, row, len(moved.context))
            self.rows[row] = moved
        self.rows.pop()
        if self.queue and self.queue[0].started:  # a part-way prefill sits right after
            self.cache.move(last + 1, last, len(self.queue[0].context))

    def _keep(self, request: ContinuousRequest, row: int) -> None:
        """Keep a finished turn's keys and values for the conversation's next turn."""
        if self.store.enabled and len(request.context) >= _KEEP_MIN:
            self.store.keep(request.context, self.cache.save(row, len(request.context)))

    def _finish(self, request: ContinuousRequest, reason, token: int | None, scores=None):
        import onnxruntime_genai as og

        flags = int(og.EngineEventFlags.TURN_FINISHED)
        if token is not None:
            flags |= int(og.EngineEventFlags.TOKEN)
        usage = GeneratorUsage(len(request.prompt), request.generated, request.reused)
        return GeneratorEvent(request, flags, token, reason, usage, logprobs=scores)


def _holds(sorted_ids: np.ndarray, token: int) -> bool:
    at = int(np.searchsorted(sorted_ids, token))
    return at < sorted_ids.size and int(sorted_ids[at]) == token


def _failed(request: ContinuousRequest, exc: Exception) -> GeneratorEvent:
    import onnxruntime_genai as og

    flags = int(og.EngineEventFlags.FAILED)
    usage = GeneratorUsage(len(request.prompt), request.generated, request.reused)
    code = og.EngineErrorCode.REQUEST_UNSERVICEABLE
    return GeneratorEvent(request, flags, None, og.FinishReason.FAILED, usage, code, error=str(exc))


def choose(
    logits: np.ndarray,
    search: dict,
    seen: np.ndarray | None,
    rng: np.random.Generator | None,
    draft: int | None = None,
) -> int:
    """The next token: repetition penalty on `seen` ids, then greedy, or top-k, temperature,
    top-p and a draw. Per row and token on the scheduler thread, so the whole vocabulary is
    touched only by the penalty's copy and one partition (~0.5 ms at 152k). At a drafted
    position (`draft`), a sampled turn keeps the draft by speculative sampling's rule."""
    scores = np.asarray(logits, dtype=np.float32)
    penalty = float(search.get("repetition_penalty", 1.0))
    if seen is not None and seen.size and penalty != 1.0:
        scores = scores.copy()  # the raw logits stay as they are for logprobs
        picked = scores[seen]
        scores[seen] = np.where(picked > 0, picked / penalty, picked * penalty)
    if not search.get("do_sample") or rng is None:
        return int(scores.argmax())
    ids, probs = _distribution(scores, search)
    if draft is not None:
        return speculation.accept(ids, probs, draft, rng)
    return int(ids[min(int(np.searchsorted(np.cumsum(probs), rng.random())), ids.size - 1)])


def _distribution(scores: np.ndarray, search: dict) -> tuple[np.ndarray, np.ndarray]:
    """The ids a sampled turn draws from and their probabilities (top-k, temperature, top-p)."""
    ids = _candidates(scores, int(search.get("top_k", 0)))
    # temperature keeps the order: it only needs to scale the candidates
    values = scores[ids] / max(float(search.get("temperature", 1.0)), 1e-5)
    order = np.argsort(-values, kind="stable")
    ids, values = ids[order], values[order]
    probs = np.exp(values - values[0])
    probs /= probs.sum()
    top_p = float(search.get("top_p", 1.0))
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), top_p)) + 1
        ids, probs = ids[:keep], probs[:keep] / probs[:keep].sum()
    return ids, probs


def _candidates(scores: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k highest scores, unordered; every id when k is 0 or not below the size."""
    if 0 < k < scores.size:
        return np.argpartition(scores, scores.size - k)[scores.size - k :]
    return np.arange(scores.size)
