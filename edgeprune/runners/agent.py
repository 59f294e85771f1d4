"""edgeprune board agent: time ONNX models with ONNX Runtime and write the figures as JSON.

One self-contained file that runs on the board (Python 3.6+, stdlib + numpy + onnxruntime;
nothing of edgeprune is installed there). The host pushes it next to the models, runs::

    python3 agent.py REQUEST.json RESULT.json

and pulls RESULT.json back. ``edgeprune.runners.local.LocalRunner`` imports it and calls
:func:`run_request` in-process instead. Keep this file Python 3.6 compatible (checked by
``vermin -t=3.6-``): no dataclasses, no walrus, no ``f"{x=}"``, no postponed annotations.

Request (keys other than ``models`` are optional; defaults in ``DEFAULTS``)::

    {"models": [{"name": str, "path": str}], "warmup": int, "repeats": int,
     "time_budget_s": float|null, "threads": int|null,
     "providers": [[name, {option: value}]],
     "inputs": {"seed": int, "free_dims": {dim_name or "input:axis": int}, "npz": path|null},
     "interleave": bool, "profile": bool, "affinity": [cpu ids]|null,
     "return_outputs": bool, "progress": bool, "stop_spinning": bool}

Result::

    {"agent_version": 1,
     "env": {python, platform, machine, ort_version, available_providers, providers_used,
             threads, cpu_count, hostname, affinity},
     "models": [{"name", "path", "sha256", "inputs": {name: [shape, dtype]},
                 "samples_ms": [...], "sample_start_s": [...], "warmup_ms": [...],
                 "providers_used": [...], "metadata": {key: value},
                 "profile": [{"op_type", "node", "provider", "dur_us"}] | null,
                 "outputs": {name: nested list} | null}],
     "error": null | {"type": str, "message": str}}

``sample_start_s`` is each timed run's start in seconds since the measurement began, so the
host can check the interleaving and look for drift across models. Error types: ``ERROR_KINDS``
(BadRequest, MissingDependency, MissingProvider, ProviderNotUsed, ModelNotFound,
ModelLoadError, InputError, RunError, OutOfMemory, InternalError). Exit code 0 on success,
1 when ``error`` is set, 2 on a wrong command line. Progress, when requested, is written to
stderr as ``PROGRESS_PREFIX`` + ``"done total"`` lines. The protocol constants below are the
only definition: the host imports them.
"""
import hashlib
import json
import os
import platform
import socket
import sys
import tempfile
import time

# ---------------------------------------------------------------- protocol
# The host side (edgeprune.runners.local / ssh / results / probe) imports these; they are
# defined here only, because this file is what runs on the board.
AGENT_VERSION = 1
MIN_PYTHON = (3, 6)                              # vermin -t=3.6- checks this file against it
PROGRESS_PREFIX = "edgeprune-agent progress "    # stderr line: PREFIX + "done total"
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

# Error kinds: the result's error["type"].
BAD_REQUEST = "BadRequest"
MISSING_DEPENDENCY = "MissingDependency"
MISSING_PROVIDER = "MissingProvider"
PROVIDER_NOT_USED = "ProviderNotUsed"
MODEL_NOT_FOUND = "ModelNotFound"
MODEL_LOAD_ERROR = "ModelLoadError"
INPUT_ERROR = "InputError"
RUN_ERROR = "RunError"
OUT_OF_MEMORY = "OutOfMemory"
INTERNAL_ERROR = "InternalError"
ERROR_KINDS = (BAD_REQUEST, MISSING_DEPENDENCY, MISSING_PROVIDER, PROVIDER_NOT_USED, MODEL_NOT_FOUND,
               MODEL_LOAD_ERROR, INPUT_ERROR, RUN_ERROR, OUT_OF_MEMORY, INTERNAL_ERROR)

MIN_SAMPLES = 3
PROFILE_RUNS = 10

DEFAULTS = {
    "warmup": 5,
    "repeats": 50,
    "time_budget_s": None,
    "threads": None,
    "providers": [["CPUExecutionProvider", {}]],
    "inputs": None,
    "interleave": True,
    "profile": False,
    "affinity": None,
    "return_outputs": False,
    "progress": False,
    "stop_spinning": True,
}

# ONNX Runtime session option: the intra-op workers stop spinning as soon as Run() returns.
# Why: each session has its own thread pool, whose workers otherwise busy-wait for a while
# after a run. Interleaved timing runs the next model right away, and on a 2-core board the
# previous session's spinning workers take its cores: measured here (StreamPETR-R50 decoder,
# 900 vs 150 queries, 2 threads) that added ~25-40 ms to *every* run of each model (the
# 150-query model 66 -> 108 ms) and cut the measured speedup from 3.7x to 2.7x. With it,
# each model runs as it would alone. ORT versions without the key ignore it.
STOP_SPINNING_KEY = "session.force_spinning_stop"

# ONNX Runtime type strings -> numpy dtype names.
ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


class AgentError(Exception):
    """An anticipated failure, reported in the result's ``error`` with ``kind`` as its type."""

    def __init__(self, kind, message):
        Exception.__init__(self, message)
        self.kind = kind


# ---------------------------------------------------------------- request


def _check_int(value, what, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AgentError(BAD_REQUEST, "%s must be an integer >= %d, got %r" % (what, minimum, value))
    return value


def _normalize_providers(providers):
    """[[name, {opts}]] or [name] -> list of (name, {str: str}) tuples as ORT takes them."""
    if not isinstance(providers, list) or not providers:
        raise AgentError(BAD_REQUEST, "providers must be a non-empty list of [name, {options}], got %r"
                         % (providers,))
    out = []
    for item in providers:
        if isinstance(item, str):
            item = [item, {}]
        if not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[1], dict):
            raise AgentError(BAD_REQUEST, "each provider must be [name, {options}], got %r" % (item,))
        out.append((str(item[0]), dict((str(k), str(v)) for k, v in item[1].items())))
    return out


def _normalize_request(request):
    """Fill defaults and check types; unknown keys are a version mismatch and are refused."""
    if not isinstance(request, dict):
        raise AgentError(BAD_REQUEST, "request must be a JSON object, got %s" % type(request).__name__)
    unknown = sorted(set(request) - set(DEFAULTS) - set(["models"]))
    if unknown:
        raise AgentError(BAD_REQUEST, "unknown request keys %s; known: %s"
                         % (unknown, sorted(list(DEFAULTS) + ["models"])))
    req = dict(DEFAULTS)
    req.update(request)
    models = req.get("models")
    if not isinstance(models, list) or not models:
        raise AgentError(BAD_REQUEST, "request needs a non-empty 'models' list of {name, path}")
    for m in models:
        if not isinstance(m, dict) or "path" not in m:
            raise AgentError(BAD_REQUEST, "each model needs a 'path' (and a 'name'), got %r" % (m,))
    _check_int(req["warmup"], "warmup", 0)
    _check_int(req["repeats"], "repeats", 1)
    if req["threads"] is not None:
        _check_int(req["threads"], "threads", 0)
    budget = req["time_budget_s"]
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0):
        raise AgentError(BAD_REQUEST, "time_budget_s must be a number > 0 or null, got %r" % (budget,))
    if not isinstance(req["stop_spinning"], bool):
        raise AgentError(BAD_REQUEST, "stop_spinning must be true or false, got %r" % (req["stop_spinning"],))
    req["providers"] = _normalize_providers(req["providers"])
    inputs = dict({"seed": 0, "free_dims": {}, "npz": None}, **(req["inputs"] or {}))
    _check_int(inputs["seed"], "inputs.seed", 0)
    if inputs["npz"] is not None and not os.path.isfile(inputs["npz"]):
        raise AgentError(INPUT_ERROR, "input file %s does not exist" % (inputs["npz"],))
    req["inputs"] = inputs
    return req


# ---------------------------------------------------------------- environment


def _import_ort():
    try:
        import numpy  # noqa: F401  (checked here so the error names it)
        import onnxruntime
    except ImportError as exc:
        raise AgentError(MISSING_DEPENDENCY, "%s; install numpy and onnxruntime (or onnxruntime-gpu) "
                         "for %s on this board" % (exc, sys.executable))
    return onnxruntime


def _affinity_now():
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return None


def _environment(ort, req):
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "ort_version": ort.__version__,
        "available_providers": list(ort.get_available_providers()),
        "providers_used": None,
        "threads": req["threads"],
        "cpu_count": os.cpu_count(),
        "hostname": socket.gethostname(),
        "affinity": _affinity_now(),
        "stop_spinning": bool(req["stop_spinning"]),
    }


class _Affinity(object):
    """Pin this process (and the ORT threads it creates later) to ``cpus``; restore on exit."""

    def __init__(self, cpus):
        self.cpus = cpus
        self.saved = None

    def __enter__(self):
        if self.cpus is None:
            return self
        if not hasattr(os, "sched_setaffinity"):
            raise AgentError(BAD_REQUEST, "CPU affinity %s requested but this OS has no sched_setaffinity"
                             % (self.cpus,))
        self.saved = os.sched_getaffinity(0)
        try:
            os.sched_setaffinity(0, [int(c) for c in self.cpus])
        except (OSError, ValueError) as exc:
            raise AgentError(BAD_REQUEST, "cannot pin to CPUs %s (%s); this process may use CPUs %s"
                             % (self.cpus, exc, sorted(self.saved)))
        return self

    def __exit__(self, *exc_info):
        if self.saved is not None:
            os.sched_setaffinity(0, self.saved)
        return False


# ---------------------------------------------------------------- sessions


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_providers(ort, providers):
    available = list(ort.get_available_providers())
    missing = [name for name, _ in providers if name not in available]
    if missing:
        raise AgentError(MISSING_PROVIDER, "execution provider(s) %s not available in onnxruntime %s; "
                         "available: %s (install the onnxruntime build that has them, or choose one "
                         "of the available)" % (missing, ort.__version__, available))


def _is_oom(exc):
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "bad_alloc" in text or "failed to allocate" in text \
        or "out of memory" in text


def _session(ort, path, req, profile_prefix=None):
    """Create one InferenceSession; fail when ORT silently dropped a requested provider."""
    if not os.path.isfile(path):
        raise AgentError(MODEL_NOT_FOUND, "model file %s does not exist" % path)
    so = ort.SessionOptions()
    if req["threads"] is not None:
        so.intra_op_num_threads = req["threads"]
    if req["stop_spinning"] and hasattr(so, "add_session_config_entry"):
        so.add_session_config_entry(STOP_SPINNING_KEY, "1")
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    try:
        sess = ort.InferenceSession(path, sess_options=so, providers=req["providers"])
    except Exception as exc:  # ORT raises its own pybind types (Fail, InvalidGraph, ...)
        kind = OUT_OF_MEMORY if _is_oom(exc) else MODEL_LOAD_ERROR
        raise AgentError(kind, "cannot load %s with providers %s: %s: %s"
                         % (path, [p[0] for p in req["providers"]], type(exc).__name__, exc))
    used = list(sess.get_providers())
    dropped = [name for name, _ in req["providers"] if name not in used]
    if dropped:
        raise AgentError(PROVIDER_NOT_USED, "onnxruntime did not enable %s for %s (enabled: %s); its "
                         "libraries (CUDA/cuDNN/TensorRT) or options are probably wrong, see the board's "
                         "onnxruntime log" % (dropped, path, used))
    return sess


# ---------------------------------------------------------------- inputs


def _resolve_shape(inp, free_dims):
    """Concrete shape of one session input; free dims come from ``free_dims``."""
    shape = []
    for axis, dim in enumerate(inp.shape):
        key = "%s:%d" % (inp.name, axis)
        if key in free_dims:
            dim = free_dims[key]
        elif isinstance(dim, str) and dim in free_dims:
            dim = free_dims[dim]
        if isinstance(dim, bool) or not isinstance(dim, int):
            label = ("free dimension '%s'" % dim) if isinstance(dim, str) else "an unnamed free dimension"
            raise AgentError(INPUT_ERROR, "input '%s' axis %d is %s with no value; give it with "
                             "--free-dim %s=N (known: %s)"
                             % (inp.name, axis, label, dim if isinstance(dim, str) else key,
                                sorted(free_dims) or "none"))
        if dim < 1:
            raise AgentError(INPUT_ERROR, "input '%s' axis %d must be >= 1, got %d" % (inp.name, axis, dim))
        shape.append(dim)
    return tuple(shape)


def _random_array(np, rng, shape, dtype):
    """Seeded values a model can digest: normal floats, small ints, all-False masks.

    Boolean inputs are padding masks in these models (True = ignore); random ones could mask
    every key of a query and turn the softmax into NaN, so they are all False.
    """
    if dtype in ("float32", "float16", "float64"):
        return rng.standard_normal(shape).astype(dtype)
    if dtype == "bool":
        return np.zeros(shape, dtype=bool)
    return rng.randint(0, 2, size=shape).astype(dtype)


def _npz_array(np, npz, inp, shape_hint, dtype):
    if inp.name not in npz:
        raise AgentError(INPUT_ERROR, "input '%s' is not in the .npz (it has %s); save it under that name"
                         % (inp.name, sorted(npz.keys())))
    arr = npz[inp.name]
    if len(arr.shape) != len(inp.shape) or any(
            isinstance(d, int) and d != a for d, a in zip(inp.shape, arr.shape)):
        raise AgentError(INPUT_ERROR, "input '%s' of the .npz has shape %s, the model wants %s"
                         % (inp.name, list(arr.shape), list(shape_hint)))
    if str(arr.dtype) != dtype:
        if arr.dtype.kind == "f" and dtype.startswith("float"):
            arr = arr.astype(dtype)  # fp32 inputs for an fp16 model and vice versa
        else:
            raise AgentError(INPUT_ERROR, "input '%s' of the .npz is %s, the model wants %s"
                             % (inp.name, arr.dtype, dtype))
    return arr


def _make_feeds(np, sess, spec):
    """Input arrays for one session, from the .npz or seeded random (same seed = same values)."""
    rng = np.random.RandomState(spec["seed"])
    npz = np.load(spec["npz"], allow_pickle=False) if spec["npz"] else None
    feeds = {}
    for inp in sess.get_inputs():
        if inp.type not in ORT_DTYPES:
            raise AgentError(INPUT_ERROR, "input '%s' has type %s; supported: %s"
                             % (inp.name, inp.type, sorted(ORT_DTYPES)))
        dtype = ORT_DTYPES[inp.type]
        if npz is not None:
            feeds[inp.name] = _npz_array(np, npz, inp, inp.shape, dtype)
        else:
            feeds[inp.name] = _random_array(np, rng, _resolve_shape(inp, spec["free_dims"]), dtype)
    return feeds


# ---------------------------------------------------------------- timing


def _timed_run(sess, feeds):
    start = time.perf_counter()
    outputs = sess.run(None, feeds)
    return (time.perf_counter() - start) * 1000.0, outputs


class _Progress(object):
    """Counts timed runs; reports to a callback and/or stderr at most twice a second."""

    def __init__(self, total, callback, to_stderr):
        self.total = total
        self.done = 0
        self.callback = callback
        self.to_stderr = to_stderr
        self.last = 0.0

    def step(self):
        self.done += 1
        if self.callback is not None:
            self.callback(self.done, self.total)
        now = time.time()
        if self.to_stderr and (now - self.last > 0.5 or self.done == self.total):
            self.last = now
            sys.stderr.write("%s%d %d\n" % (PROGRESS_PREFIX, self.done, self.total))
            sys.stderr.flush()


def _run_guarded(state, feeds, name):
    try:
        return _timed_run(state["sess"], feeds)
    except Exception as exc:  # ORT raises its own pybind types
        kind = OUT_OF_MEMORY if _is_oom(exc) else RUN_ERROR
        raise AgentError(kind, "running %s failed: %s: %s" % (name, type(exc).__name__, exc))


def _measure(states, req, progress, t0):
    """Timed runs of ``states`` (one round = each model once), in order, until done.

    Stops after ``repeats`` rounds, or after the round that passes ``budget`` seconds once every
    model has MIN_SAMPLES samples.
    """
    budget = req["time_budget_s"]
    start = time.perf_counter()
    rounds = 0
    while True:
        for state in states:
            state["starts"].append(time.perf_counter() - t0)
            ms, outputs = _run_guarded(state, state["feeds"], state["name"])
            state["samples"].append(ms)
            state["last_outputs"] = outputs
            progress.step()
        rounds += 1
        if rounds >= req["repeats"]:
            return
        if budget is not None and time.perf_counter() - start >= budget and rounds >= MIN_SAMPLES:
            return


def _time_all(states, req, progress):
    for state in states:
        for _ in range(req["warmup"]):
            state["warmup"].append(_run_guarded(state, state["feeds"], state["name"])[0])
    t0 = time.perf_counter()
    if req["interleave"]:
        _measure(states, req, progress, t0)
        return
    each = dict(req)
    if req["time_budget_s"] is not None:
        each["time_budget_s"] = float(req["time_budget_s"]) / len(states)
    for state in states:
        _measure([state], each, progress, t0)


# ---------------------------------------------------------------- profiling


def _profile(ort, np, path, feeds, req):
    """Per-node kernel time (us per run) from a separate profiling session.

    A separate session keeps profiling overhead out of the timed samples. It gets as many
    warm-up runs as the timed sessions (at least one), and their kernel events (inside the
    first ``model_run`` windows) are dropped. Why: a new session's first runs grow its memory
    arena, so its large tensors are written to fresh pages; on the 24000-key decoder one such
    run took 2 s and the next 0.7 s against 0.35 s later, and a single warm-up left a 134 MB
    Gather profiled at 38 ms instead of its steady 5 ms.
    """
    tmpdir = tempfile.mkdtemp(prefix="edgeprune-prof-")
    try:
        sess = _session(ort, path, req, profile_prefix=os.path.join(tmpdir, "ort"))
        runs = max(1, min(req["repeats"], PROFILE_RUNS))
        warmup = max(1, req["warmup"])
        for _ in range(runs + warmup):
            sess.run(None, feeds)
        trace = sess.end_profiling()
        with open(trace) as f:
            events = json.load(f)
    finally:
        for name in os.listdir(tmpdir):
            os.remove(os.path.join(tmpdir, name))
        os.rmdir(tmpdir)
    return _aggregate_events(events, runs, warmup)


def _aggregate_events(events, runs, warmup=1):
    model_runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                        if e.get("cat") == "Session" and e.get("name") == "model_run")
    warm_end = model_runs[min(warmup, len(model_runs)) - 1][1] if model_runs else -1
    rows = {}
    order = []
    for e in events:
        name = e.get("name", "")
        if e.get("cat") != "Node" or not name.endswith("_kernel_time") or e["ts"] <= warm_end:
            continue
        node = name[:-len("_kernel_time")]
        args = e.get("args", {})
        if node not in rows:
            order.append(node)
            rows[node] = {"op_type": args.get("op_name", "?"), "node": node,
                          "provider": args.get("provider"), "dur_us": 0.0}
        rows[node]["dur_us"] += float(e["dur"])
    for node in order:
        rows[node]["dur_us"] /= runs
    return [rows[node] for node in order]


# ---------------------------------------------------------------- driver


def _load_states(ort, np, req, env):
    states = []
    for i, m in enumerate(req["models"]):
        name = str(m.get("name") or "model%d" % i)
        sess = _session(ort, m["path"], req)
        if env["providers_used"] is None:
            env["providers_used"] = list(sess.get_providers())
        feeds = _make_feeds(np, sess, req["inputs"])
        states.append({"name": name, "path": m["path"], "sess": sess, "feeds": feeds,
                       "samples": [], "starts": [], "warmup": [], "last_outputs": None})
    return states


def _model_result(ort, np, state, req):
    sess = state["sess"]
    result = {
        "name": state["name"],
        "path": state["path"],
        "sha256": _sha256(state["path"]),
        "inputs": dict((k, [list(v.shape), str(v.dtype)]) for k, v in state["feeds"].items()),
        "samples_ms": state["samples"],
        "sample_start_s": state["starts"],
        "warmup_ms": state["warmup"],
        "providers_used": list(sess.get_providers()),
        "metadata": dict(sess.get_modelmeta().custom_metadata_map),
        "profile": None,
        "outputs": None,
    }
    if req["return_outputs"]:
        names = [o.name for o in sess.get_outputs()]
        result["outputs"] = dict((n, np.asarray(a).tolist()) for n, a in zip(names, state["last_outputs"]))
    if req["profile"]:
        result["profile"] = _profile(ort, np, state["path"], state["feeds"], req)
    return result


def _run(request, progress_callback):
    ort = _import_ort()
    import numpy as np
    req = _normalize_request(request)
    env = _environment(ort, req)
    _check_providers(ort, req["providers"])
    with _Affinity(req["affinity"]):
        env["affinity"] = _affinity_now()
        states = _load_states(ort, np, req, env)
        total = req["repeats"] * len(states)
        _time_all(states, req, _Progress(total, progress_callback, req["progress"]))
        models = [_model_result(ort, np, s, req) for s in states]
    return env, models


def run_request(request, progress=None):
    """Run one benchmark request; never raises for board-side failures (see ``error``).

    ``progress(done, total)`` is called after every timed run (``total`` is the upper bound
    ``repeats * models``; a time budget may end the run earlier).
    """
    result = {"agent_version": AGENT_VERSION, "env": None, "models": [], "error": None}
    try:
        result["env"], result["models"] = _run(request, progress)
    except AgentError as exc:
        result["error"] = {"type": exc.kind, "message": str(exc)}
    except MemoryError as exc:
        result["error"] = {"type": OUT_OF_MEMORY, "message": "out of memory: %s" % (exc,)}
    except Exception as exc:  # the board must answer in JSON, never with a bare traceback
        result["error"] = {"type": INTERNAL_ERROR, "message": "%s: %s" % (type(exc).__name__, exc)}
    return result


def _write_json(path, obj):
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".agent-result.", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
        os.rename(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv):
    if len(argv) != 3:
        sys.stderr.write("usage: python3 agent.py REQUEST.json RESULT.json\n")
        return EXIT_USAGE
    try:
        with open(argv[1]) as f:
            request = json.load(f)
    except (OSError, IOError, ValueError) as exc:
        result = {"agent_version": AGENT_VERSION, "env": None, "models": [],
                  "error": {"type": BAD_REQUEST, "message": "cannot read request %s: %s" % (argv[1], exc)}}
    else:
        result = run_request(request)
    _write_json(argv[2], result)
    if result["error"] is not None:
        sys.stderr.write("edgeprune-agent: %s: %s\n" % (result["error"]["type"], result["error"]["message"]))
        return EXIT_ERROR
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv))
