"""The on-device runtime: open an artifact, plan ranks for a memory budget, run.

>>> rt = Runtime.load("model.stn", mem_limit="50%")          # doctest: +SKIP
>>> print(rt.plan.table())                                     # doctest: +SKIP
>>> y = rt.run({"input": x})["logits"]                         # doctest: +SKIP
>>> rt.rescale(mem_limit="25%")                                # doctest: +SKIP
"""
from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Mapping

import numpy as np

from stn_edge.activations import activation_bytes as peak_activations
from stn_edge.device.backends import Backend, Executable, available_backends, get_backend
from stn_edge.device.memory import counted_plan, engine_memory, release_free_memory
from stn_edge.device.remote import HttpSource, is_url
from stn_edge.errors import ArtifactError, BackendError, BudgetError, ChunkedBatchWarning, InputError
from stn_edge.format import ArtifactReader
from stn_edge.graph import DTYPES, Graph, graph_from_dict
from stn_edge.lowering import CORRECTION, apply_correction, assemble, assembled_shapes, corrected_factor, lower, stored_rows
from stn_edge.cost import engine_cost, rest_us
from stn_edge.latency import LayerLatency, plan_within_latency
from stn_edge.plan import PLANNERS, Plan, ladder_specs, plan_ranks

#: engines tried by ``backend="auto"``, in order, with why. Measured on a 2-core x86 CPU
#: (docs/BENCHMARKS.md): onnxruntime is fastest on ResNet-class convolutions, LiteRT+XNNPACK on
#: small and depthwise networks but it holds ~3x the weights; torch is the choice for CUDA.
_AUTO_ORDER = {
    "cpu": ("onnxruntime", "tflite", "torch", "numpy"),
    "cuda": ("onnxruntime", "torch"),
}
_AUTO_WHY = {
    "onnxruntime": "onnxruntime is the fastest engine installed on {device} for convolutional and transformer graphs",
    "tflite": "LiteRT with XNNPACK is the fastest engine installed on {device} (onnxruntime is not installed)",
    "torch": "torch is the fastest engine installed on {device} (onnxruntime and LiteRT are not installed)",
    "numpy": "numpy is the only engine installed on {device}; pip install 'stn-edge[onnxruntime]' for 5-20x speed",
}


class Runtime:
    """A model loaded from an artifact at a memory budget, ready to run on one backend.

    Create it with :meth:`load`. ``plan`` says what each layer holds; ``bytes_read`` counts the
    artifact bytes read so far; ``rescale`` moves to another budget without reopening the file.
    """

    def __init__(self, reader: ArtifactReader, backend: Backend, device: str, backend_reason: str):
        self._reader = reader
        self._backend = backend
        self.device = device
        self.backend_reason = backend_reason
        header = reader.header
        self.layers: list[dict[str, Any]] = header["layers"]
        self.full_bytes = int(header["full_bytes"])
        try:
            self._template = graph_from_dict(header["model"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{reader.name}: model graph is malformed ({exc})") from None
        self._check_graph()
        self._specs, self._fixed_bytes = ladder_specs(reader, engine_cost(backend.name))
        self._tensors: dict[str, np.ndarray] | None = None
        self._held: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._exe: Executable | None = None
        self._lowered: Graph | None = None
        self._latency: tuple[Any, float] | None = None  # (LayerLatency, limit in ms)
        self.plan: Plan | None = None
        self._planner = plan_ranks
        self.batch_size = 1
        self._active: tuple[Executable | None, int] = (None, 1)
        self._warned_chunks = False  # ChunkedBatchWarning once per runtime
        self._value_shapes = header.get("value_shapes")
        # the inputs chunked along axis 0, and the outputs that could not be joined (no batch axis)
        self._batched_inputs = tuple(v.name for v in self._template.inputs if _batch_axis(v.shape))
        self._unbatched_outputs = [v.name for v in self._template.outputs if not _batch_axis(v.shape)]
        self._activation_cache: dict[tuple, int] = {}

    # ------------------------------------------------------------------ construction

    @classmethod
    def load(
        cls,
        source: str | os.PathLike | bytes | BinaryIO,
        mem_limit: int | float | str | None = None,
        backend: str = "auto",
        device: str = "cpu",
        verify: bool = True,
        cache_dir: str | os.PathLike | None = None,
        planner: str = "greedy",
        latency_limit_ms: float | None = None,
        profile: Any = None,
        batch_size: int = 1,
    ) -> "Runtime":
        """Open ``source`` and prepare it to run within ``mem_limit``.

        Parameters
        ----------
        source : path, bytes or binary file object of a ``.stn`` artifact, an ``http(s)://`` URL
            (read by range requests, see :mod:`stn_edge.device.remote`), or a ``ByteSource``.
        mem_limit : memory the model may use: an int, ``"12MB"``, ``"3MiB"``, ``"35%"`` of the full
            model, ``"auto"`` / ``"auto-256MB"`` (available memory minus a headroom), or None for
            the full model. It counts the weights at the chosen ranks times the copies this engine
            keeps plus the activation buffers of one inference at ``batch_size``
            (``docs/RELIABILITY.md``, "What mem_limit counts"); percentages are of the weights, with
            the activations on top. A budget below the smallest feasible model raises
            :class:`~stn_edge.errors.BudgetError` stating that smallest budget.
        backend : ``"numpy"``, ``"onnxruntime"``, ... or ``"auto"`` (fastest installed engine).
        device : ``"cpu"`` or ``"cuda"`` where the backend supports it.
        verify : check the SHA-256 of every block read.
        cache_dir : for URL sources, a folder that keeps fetched byte ranges between loads.
        planner : ``"greedy"`` (least predicted loss within the budget) or ``"uniform"`` (one rank
            ratio for all layers; a baseline for comparisons).
        latency_limit_ms : also keep the predicted latency at batch 1 within this, here and on every
            :meth:`rescale` (see :func:`stn_edge.latency.plan_within_latency`): layers run dense
            where dense is faster and the budget holds it, then the moves that save the most time
            per unit of predicted loss are taken. Without it the plan is the most accurate one within
            ``mem_limit`` (``plan.table()`` says where a layer runs slower than dense).
        profile : the per-layer latency table of this backend and device (a file written by
            ``stn-edge profile --per-layer``, its dict, or a ``LayerLatency``); without it, the
            engine's cost model (:mod:`stn_edge.cost`) predicts from the header.
        batch_size : the largest batch one engine call runs. Activations are counted at this size,
            and :meth:`run` splits a larger batch into chunks of ``batch_size`` (results are
            concatenated), so memory stays within ``mem_limit`` whatever batch is passed.
        """
        _check_batch_size(batch_size)
        if planner not in PLANNERS:
            raise BudgetError(f"unknown planner {planner!r}; available: {', '.join(PLANNERS)}")
        if is_url(source):
            source = HttpSource(source, cache_dir=cache_dir)
        reader = ArtifactReader(source, verify=verify)
        try:
            engine, reason = _choose_backend(backend, device)
            rt = cls(reader, engine, device, reason)
            rt._planner = PLANNERS[planner]
            rt.batch_size = batch_size
            if latency_limit_ms is not None:
                rt.limit_latency(latency_limit_ms, profile)
            rt.rescale(mem_limit)
        except BaseException:
            reader.close()
            raise
        return rt

    def limit_latency(self, latency_limit_ms: float | None, profile: Any = None) -> None:
        """Keep every later plan's predicted latency at batch 1 within ``latency_limit_ms`` (None:
        no limit, the most accurate plan within the memory budget), predicted by ``profile`` (see
        :meth:`load`) or, without one, by this engine's cost model. Takes effect at the next
        :meth:`rescale` or :meth:`plan_for`."""
        if latency_limit_ms is None:
            self._latency = None
            return
        table = self._cost_model() if profile is None else LayerLatency.for_engine(profile, self._backend.name, self.device)
        self._latency = (table, float(latency_limit_ms))

    def predict_latency_ms(self, plan: Plan | None = None) -> float:
        """Predicted milliseconds of one batch-1 inference of ``plan`` (default: the current one), by
        the latency table in force (:meth:`limit_latency`) or this engine's cost model."""
        plan = plan or self.plan
        table = self._latency[0] if self._latency is not None else self._cost_model()
        return table.predict(plan)

    def _cost_model(self) -> LayerLatency:
        """This engine's cost model as a latency table, from the header alone (:mod:`stn_edge.cost`)."""
        name = self._backend.name
        return LayerLatency.from_cost_model(self._specs, rest_us(self._reader.header, engine_cost(name)), name, self.device)

    def _check_graph(self) -> None:
        names = {n.name for n in self._template.nodes}
        tensors = self._reader.header["tensors"]
        for l in self.layers:
            if l["node"] not in names:
                raise ArtifactError(f"{self._reader.name}: layer {l['name']!r} points at missing node {l['node']!r}")
            if l["weight"] in tensors:
                raise ArtifactError(f"{self._reader.name}: layer weight {l['weight']!r} is also stored as a dense tensor")

    # ------------------------------------------------------------------ planning

    @property
    def backend(self) -> str:
        """Name of the backend that runs this model."""
        return self._backend.name

    @property
    def bytes_read(self) -> int:
        """Artifact bytes read so far (header included)."""
        return self._reader.bytes_read

    @property
    def header(self) -> dict[str, Any]:
        return self._reader.header

    def plan_for(self, mem_limit: int | float | str | None, batch_size: int | None = None) -> Plan:
        """The plan a budget would get at ``batch_size`` (default: the current one), without
        loading anything. ``plan.budget`` is the weight budget."""
        batch = self.batch_size if batch_size is None else _check_batch_size(batch_size)
        plan = counted_plan(
            lambda weights: self._planner(self._specs, self._fixed_bytes, weights, self.full_bytes), mem_limit,
            full_bytes=self.full_bytes, engine=engine_memory(self._backend), held=self.footprint(),
            first=self.plan is None, activations=lambda p: self.activation_bytes(p, batch),
        )
        if self._latency is not None:
            plan = plan_within_latency(plan, self._specs, *self._latency)
            plan.activation_bytes = self.activation_bytes(plan, batch)
        plan.batch_size = batch
        return plan

    def footprint(self, plan: Plan | None = None) -> int:
        """Bytes ``plan`` (default: the current one) counts against ``mem_limit`` on this engine:
        its weights x the engine's copies + its activation peak at ``batch_size``."""
        plan = plan or self.plan
        if plan is None:
            return 0
        engine = engine_memory(self._backend)
        return engine.footprint(plan.total_bytes) + engine.activation_footprint(plan.activation_bytes)

    def activation_bytes(self, plan: Plan | None = None, batch_size: int | None = None) -> int:
        """Peak bytes of the values one inference of ``plan`` (default: the current one) holds at
        ``batch_size`` (default: the current one); 0 for artifacts baked without value shapes
        (before format 1.1)."""
        plan = plan or self.plan
        if plan is None or not self._value_shapes:
            return 0
        batch = self.batch_size if batch_size is None else batch_size
        key = (batch, tuple(c.level for c in plan.layers))
        if key not in self._activation_cache:
            graph = lower(Graph(self._template.nodes, self._template.inputs, self._template.outputs,
                                self._shape_only_tensors(), self._template.opset),
                          self.layers, {l["name"]: self._shape_only(l, plan.choice(l["name"])) for l in self.layers})
            workspace = engine_memory(self._backend).workspace
            self._activation_cache[key] = peak_activations(graph, self._value_shapes, batch, workspace).peak
        return self._activation_cache[key]

    def _shape_only_tensors(self) -> dict[str, np.ndarray]:
        """The dense tensors as arrays of the right shape that hold no memory (for shape walks)."""
        return {k: _placeholder(r["shape"], r["dtype"]) for k, r in self.header["tensors"].items()}

    def _shape_only(self, layer: dict[str, Any], choice: Any) -> Any:
        """What :meth:`_hold` would hold for ``choice``, as memory-free placeholders."""
        if choice.dense:
            return _placeholder(layer["dense"]["shape"], layer["dense"]["dtype"])
        refs = layer["factors"]
        shapes = assembled_shapes(layer, choice.level, {k: [ref["row_ends"][choice.level]] + list(ref["shape"][1:])
                                                        for k, ref in refs.items()})
        out = {k: _placeholder(shape, refs[k]["dtype"]) for k, shape in shapes.items()}
        if "corrections" in layer:
            ref = layer["corrections"]
            out[CORRECTION] = _placeholder(ref["shape"][1:], ref["dtype"])
        return out

    def rescale(self, mem_limit: int | float | str | None, batch_size: int | None = None) -> Plan:
        """Move to the plan for ``mem_limit`` (at ``batch_size``, default: the current one) without
        reopening the artifact.

        Going down drops factor rows (and frees them); going up reads only the missing rows. Calls
        to :meth:`run` from other threads run entirely on the old plan (and its batch size) or
        entirely on the new one.
        """
        plan = self.plan_for(mem_limit, batch_size)
        with self._lock:
            moves = self._moves(plan)
            reads = [read for move in moves.values() for read in move.reads]
            if self._tensors is None:
                reads = [(ref, 0, None) for ref in self.header["tensors"].values()] + reads
            self._reader.prefetch(reads)  # remote sources: a few range requests
            if self._tensors is None:
                self._tensors = {k: self._reader.read_array(r) for k, r in self.header["tensors"].items()}
            held = {layer["name"]: self._hold(layer, moves[layer["name"]]) for layer in self.layers}
            graph = lower(Graph(self._template.nodes, self._template.inputs, self._template.outputs,
                                self._tensors, self._template.opset), self.layers,
                          {name: data for name, (_, data) in held.items()})
            exe = self._backend.prepare(graph, self.device)
            self._held, self._exe, self.plan, self._lowered = held, exe, plan, graph
            self.batch_size = plan.batch_size
            self._active = (exe, plan.batch_size)  # what run() reads, in one go
        release_free_memory()  # what the old plan held leaves the process's RSS, not only Python's heap
        return plan

    def _moves(self, plan: Plan) -> dict[str, "_Move"]:
        """What each layer does to move from what it holds to ``plan``: the one place for the rules.

        Reuses what is held: going down keeps a shorter prefix (copied, so the dropped rows are
        freed), going up reads only the missing row segments. The factor that carries the level's
        output correction (:func:`stn_edge.lowering.corrected_factor`) is read again whenever the
        level changes, so weights after any sequence of rescales equal a fresh load's, bit for bit.
        """
        moves: dict[str, _Move] = {}
        for layer in self.layers:
            choice = plan.choice(layer["name"])
            old_level, old = self._held.get(layer["name"], (None, None))
            if choice.dense:
                keep = old is not None and old_level is None
                moves[layer["name"]] = _Move(None, [] if keep else [(layer["dense"], 0, None)])
                continue
            if old is not None and old_level == choice.level:
                moves[layer["name"]] = _Move(choice.level, [])
                continue
            want = choice.level + 1
            have = 0 if old is None or old_level is None else old_level + 1
            scaled = corrected_factor(layer)
            move = _Move(choice.level, [])
            for name, ref in layer["factors"].items():
                start = 0 if name == scaled else min(have, want)
                move.factors[name] = start
                if start < want:
                    move.reads.append((ref, start, want))
            if "corrections" in layer:
                move.reads.append((layer["corrections"], choice.level, want))
            moves[layer["name"]] = move
        return moves

    def _hold(self, layer: dict[str, Any], move: "_Move") -> tuple[int | None, Any]:
        """``(level, data)`` after ``move``: the dense weight (level None) or each factor as
        :func:`~stn_edge.lowering.assemble` holds it at the level (plus the level's correction).

        The row prefixes of what is held come back from it (:func:`~stn_edge.lowering.stored_rows`)
        to be extended by the rows read or trimmed; the new level is assembled from them afresh, so
        what is held after any sequence of moves is what a fresh load holds, bit for bit.
        """
        old_level, old = self._held.get(layer["name"], (None, None))
        if move.level is None:
            return None, old if not move.reads else self._reader.read_array(layer["dense"])
        if not move.factors:  # the level it holds already
            return old_level, old
        want = move.level + 1
        refs = layer["factors"]
        kept = {k for k, start in move.factors.items() if start > 0}
        old_rows = stored_rows(layer, old_level, {k: old[k] for k in kept}) if kept else {}
        rows = {}
        for k, ref in refs.items():
            start = move.factors[k]
            if start == 0:
                rows[k] = self._reader.read_rows(ref, 0, want)
            elif start >= want:  # a shorter prefix of what is held
                rows[k] = old_rows[k][: ref["row_ends"][want - 1]]
            else:
                rows[k] = np.concatenate([old_rows[k], self._reader.read_rows(ref, start, want)])
        del old_rows
        if "corrections" in layer:
            corr = self._reader.read_rows(layer["corrections"], move.level, want)[0]
            rows = apply_correction(layer, rows, corr)
        held = assemble(layer, move.level, rows)
        for k in kept:  # a prefix still in an old array would keep all of it alive: copied, so the rest is freed
            if np.may_share_memory(held[k], old[k]):
                held[k] = held[k].copy()
        return move.level, held

    def lowered_graph(self) -> Graph:
        """The plain-op graph the backend runs for the current plan (factors at the planned ranks).

        Its initializers share memory with what the runtime holds; treat them as read-only.
        """
        return self._lowered

    # ------------------------------------------------------------------ running

    @property
    def input_names(self) -> list[str]:
        return [v.name for v in self._template.inputs]

    @property
    def output_names(self) -> list[str]:
        return [v.name for v in self._template.outputs]

    def run(self, inputs: Mapping[str, np.ndarray] | np.ndarray | list | tuple) -> dict[str, np.ndarray]:
        """Run the model; return ``{output name: array}``.

        ``inputs`` is a mapping of input name to array, or (for convenience) one array per model
        input in declaration order. Shapes and dtypes are checked against the artifact.

        A batch larger than ``batch_size`` (the one the memory plan counts) runs in chunks of
        ``batch_size`` along axis 0, on one plan, and the outputs are concatenated.
        """
        feeds = self._feeds(inputs)
        exe, batch = self._active  # one read: a concurrent rescale swaps executable and batch size together
        n = self._batch_of(feeds, batch)
        if n <= batch:
            return exe.run(feeds)
        if not self._warned_chunks:
            self._warned_chunks = True
            warnings.warn(ChunkedBatchWarning(
                f"a batch of {n} runs in {-(-n // batch)} chunks of at most {batch}: the memory plan counts the "
                f"activations of batch_size={batch}; Runtime.load(..., batch_size={n}) (or rescale(..., "
                f"batch_size={n})) runs it whole, with its activations in mem_limit"), stacklevel=2)
        batched = self._batched_inputs
        parts = [exe.run({k: v[i : i + batch] if k in batched else v for k, v in feeds.items()})
                 for i in range(0, n, batch)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _batch_of(self, feeds: dict[str, np.ndarray], batch_size: int) -> int:
        """The batch of ``feeds``: the common axis-0 size of the inputs declared with a symbolic
        first axis (0 when none is). Raises InputError when they disagree, or when the batch
        exceeds ``batch_size`` and some output has no batch axis to concatenate along."""
        sizes = {name: feeds[name].shape[0] for name in self._batched_inputs}
        if not sizes:
            return 0
        if len(set(sizes.values())) > 1:
            raise InputError(f"inputs disagree on the batch size (axis 0): {sizes}")
        n = next(iter(sizes.values()))
        fixed = self._unbatched_outputs
        if n > batch_size and fixed:
            raise InputError(
                f"a batch of {n} exceeds batch_size={batch_size}, and output(s) {fixed} have no batch axis to "
                f"join chunks along; load with batch_size={n} (its activations are counted in mem_limit)"
            )
        return n

    __call__ = run

    def _feeds(self, inputs: Any) -> dict[str, np.ndarray]:
        specs = self._template.inputs
        if isinstance(inputs, Mapping):
            unknown = set(inputs) - {s.name for s in specs}
            if unknown:
                raise InputError(f"unknown input(s) {sorted(unknown)}; the model takes {[s.name for s in specs]}")
            feeds = dict(inputs)
        else:
            arrays = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
            if len(arrays) != len(specs):
                raise InputError(f"the model takes {len(specs)} input(s) {[s.name for s in specs]}, got {len(arrays)}")
            feeds = {s.name: a for s, a in zip(specs, arrays)}
        for spec in specs:
            if spec.name not in feeds:
                raise InputError(f"missing input {spec.name!r} (shape {spec.shape}, {spec.dtype})")
            arr = np.asarray(feeds[spec.name])
            want = DTYPES[spec.dtype]
            if arr.dtype != want:
                if arr.dtype.kind == want.kind and np.can_cast(arr.dtype, want, "same_kind"):
                    arr = arr.astype(want)
                else:
                    raise InputError(f"input {spec.name!r} has dtype {arr.dtype}, the model expects {spec.dtype}")
            if arr.ndim != len(spec.shape) or any(
                isinstance(d, int) and d != s for d, s in zip(spec.shape, arr.shape)
            ):
                raise InputError(f"input {spec.name!r} has shape {list(arr.shape)}, the model expects {spec.shape}")
            feeds[spec.name] = np.asarray(arr, order="C")
        return feeds

    # ------------------------------------------------------------------ checking

    def verify(self) -> dict[str, float]:
        """Run the artifact's calibration set; return the largest relative error per output.

        The reference outputs were computed by the original model at full rank on the host, so at
        a smaller budget the error includes the truncation's effect, not only the backend's.
        """
        if not self.header.get("calibration"):
            raise ArtifactError(f"{self._reader.name}: the artifact holds no calibration set")
        refs = self.calibration("outputs")
        out = self.run(self.calibration("inputs"))
        return {k: relative_error(out[k], ref) for k, ref in refs.items()}

    def calibration(self, part: str = "inputs") -> dict[str, np.ndarray]:
        """The artifact's stored calibration ``"inputs"``, or the ``"outputs"`` the original model gave
        for them on the host, by name; read (and hash-checked) now, empty when the artifact has none.

        >>> feeds = rt.calibration()                      # doctest: +SKIP
        >>> errors = rt.verify()                          # doctest: +SKIP
        """
        if part not in ("inputs", "outputs"):
            raise ValueError(f"calibration part must be 'inputs' or 'outputs', got {part!r}")
        cal = self.header.get("calibration") or {}
        return {k: self._reader.read_array(r) for k, r in (cal.get(part) or {}).items()}

    def close(self) -> None:
        """Close the artifact file."""
        self._reader.close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        plan = self.plan.summary() if self.plan else "no plan"
        return f"Runtime({self._reader.name!r}, backend={self.backend!r}, device={self.device!r}: {plan})"


@dataclass
class _Move:
    """One layer's move to a new plan: its level (None: dense), the ``(ref, start, stop)`` row
    segments to read (``stop`` None: a whole array), and per factor the first row segment read
    (0: all of it, afresh; at or past the level: none, a prefix of what is held is kept). No
    factors: the layer keeps what it holds."""

    level: int | None
    reads: list[tuple[dict[str, Any], int, int | None]]
    factors: dict[str, int] = field(default_factory=dict)


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, not {batch_size!r}")
    return batch_size


def _batch_axis(shape: list[int | str]) -> bool:
    """True when axis 0 of a declared shape is symbolic (a batch axis)."""
    return bool(shape) and isinstance(shape[0], str)


def _placeholder(shape: list[int], dtype: str) -> np.ndarray:
    """A read-only array of ``shape`` whose elements all share one byte of storage (value 1)."""
    return np.broadcast_to(np.ones((), dtype=DTYPES[dtype]), tuple(int(d) for d in shape))


def relative_error(x: np.ndarray, ref: np.ndarray) -> float:
    """``max|x - ref| / max(max|ref|, tiny)``: the error measure used by ``verify``."""
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if x.shape != ref.shape:
        return float("inf")
    return float(np.max(np.abs(x - ref), initial=0.0) / max(np.max(np.abs(ref), initial=0.0), 1e-12))


def _choose_backend(name: str, device: str) -> tuple[Backend, str]:
    if name != "auto":
        return get_backend(name, device), f"requested {name!r}"
    for candidate in _AUTO_ORDER.get(device, ()):
        try:
            engine = get_backend(candidate, device)
        except BackendError:
            continue
        return engine, "auto: " + _AUTO_WHY[candidate].format(device=device)
    raise BackendError(
        f"no backend can run on device {device!r}; installed for cpu: {', '.join(available_backends('cpu')) or 'none'}"
    )
