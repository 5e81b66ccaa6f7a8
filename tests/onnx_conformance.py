"""The ONNX backend node tests, run against ``edgeslim.import_onnx``.

Every node test of the installed ``onnx`` package whose ops are all in the importer's table (``OPS``) is
imported and run with torch on its ``test_data_set_0`` inputs, and the outputs are compared with the suite's
expected outputs. The tests are read from ``onnx/backend/test/data/node/*/`` (``model.onnx`` and
``test_data_set_0/*.pb``) where the package ships that folder, else generated in memory from the
``onnx.backend.test.case.node`` modules (the same models and data).

The importer takes one activation: the first graph input stays an input (it must be float, else the test is
skipped) and every other input becomes an initializer holding its test data, as a CNN would hold it.

Each test ends in one status: ``pass``, ``refused`` (an ``EdgeslimError``: a clear refusal),
``wrong`` (a shape, dtype or value differs from the suite's), ``crash`` (any other exception) or ``skipped``.

    python -m tests.onnx_conformance            # totals per status, then every wrong / crash test
    python -m tests.onnx_conformance -v         # ... and every refusal with its message

Where the tests are generated, the fast suite generates them in a background process started when its run includes
the conformance tests (``generate_in_background``, from ``conftest.py``); without one they are generated in process.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from edgeslim.errors import EdgeslimError
from edgeslim.io.onnx_import import _op_key, import_onnx
from edgeslim.io.onnx_import_ops import OPS

RTOL, ATOL = 1e-4, 1e-5
STATUSES = ("pass", "refused", "wrong", "crash", "skipped")


@dataclass
class Result:
    name: str
    ops: tuple[str, ...]
    status: str  # one of STATUSES
    detail: str = ""
    seconds: float = field(default=0.0, repr=False)


@dataclass
class _Case:
    name: str
    model: onnx.ModelProto
    inputs: list  # numpy arrays (or other objects for sequence / optional tests), in graph-input order
    outputs: list
    rtol: float = 1e-3  # the suite's own tolerance (onnx's backend runner defaults)
    atol: float = 1e-7


def _node_dir() -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "node"


def _array(obj):
    """A test datum as a numpy array (``TensorProto`` and numpy scalars included); None for a sequence / optional."""
    if isinstance(obj, onnx.TensorProto):
        return numpy_helper.to_array(obj)
    if isinstance(obj, (np.ndarray, np.generic)):
        return np.asarray(obj)
    return None


def _read_pb(path: Path):
    tensor = onnx.TensorProto()
    try:
        tensor.ParseFromString(path.read_bytes())
        return numpy_helper.to_array(tensor)
    except Exception:  # a SequenceProto / OptionalProto: not a tensor
        return None


def _cases_from_files(root: Path) -> list[_Case]:
    cases = []
    for folder in sorted(p for p in root.iterdir() if (p / "model.onnx").is_file()):
        data = folder / "test_data_set_0"
        if not data.is_dir():
            continue
        ins = [_read_pb(p) for p in sorted(data.glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[1]))]
        outs = [_read_pb(p) for p in sorted(data.glob("output_*.pb"), key=lambda p: int(p.stem.split("_")[1]))]
        cases.append(_Case(folder.name, onnx.load(str(folder / "model.onnx")), ins, outs))
    return cases


_GENERATED: list[_Case] | None = None
_BACKGROUND: tuple[subprocess.Popen, tempfile.TemporaryDirectory] | None = None  # generate_in_background's


def _cases_from_modules() -> list[_Case]:
    """The node tests as ``onnx.backend.test.case.node`` builds them (collected once per process; taken from the
    background process of ``generate_in_background`` when one was started and succeeded)."""
    global _GENERATED, _BACKGROUND
    if _GENERATED is None and _BACKGROUND is not None:
        proc, folder = _BACKGROUND
        path = _cases_file(folder)
        if proc.wait() == 0 and path.is_file():
            _GENERATED = [_Case(name, onnx.ModelProto.FromString(model), ins, outs, rtol, atol)
                          for name, model, ins, outs, rtol, atol in pickle.loads(path.read_bytes())]
        stop_background()
    if _GENERATED is None:
        from onnx.backend.test.case.node import collect_testcases

        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            tcs = collect_testcases()
        _GENERATED = [_Case(t.name, t.model, [_array(a) for a in t.data_sets[0][0]],
                            [_array(a) for a in t.data_sets[0][1]], t.rtol, t.atol)
                      for t in tcs if t.kind == "node" and t.model is not None and t.data_sets]
    return _GENERATED


def generate_in_background() -> None:
    """Start generating the node tests in another process, for ``load_cases`` to take: onnx's reference
    implementation computes every expected output in Python (about 13 s here, most of it 3-D pooling), which a test
    run with a core to spare need not wait for. Nothing to do when the package ships the files instead."""
    global _BACKGROUND
    root = _node_dir()
    if _BACKGROUND is not None or (root.is_dir() and any(root.iterdir())):
        return
    folder = tempfile.TemporaryDirectory(prefix="edgeslim-node-tests-")
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--write-cases", str(_cases_file(folder))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _BACKGROUND = (proc, folder)


def stop_background() -> None:
    """End the background generation, if one is running, and remove what it wrote."""
    global _BACKGROUND
    if _BACKGROUND is not None:
        proc, folder = _BACKGROUND
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        folder.cleanup()
        _BACKGROUND = None


def _cases_file(folder: tempfile.TemporaryDirectory) -> Path:
    return Path(folder.name) / "cases.pickle"


def _write_cases(path: Path) -> None:
    data = [(c.name, c.model.SerializeToString(), c.inputs, c.outputs, c.rtol, c.atol) for c in _cases_from_modules()]
    part = path.with_name(path.name + ".part")
    part.write_bytes(pickle.dumps(data, protocol=5))
    part.replace(path)


def load_cases() -> list[_Case]:
    root = _node_dir()
    if root.is_dir() and any(root.iterdir()):
        return _cases_from_files(root)
    return _cases_from_modules()


def _op_types(model: onnx.ModelProto) -> tuple[str, ...]:
    return tuple(sorted({_op_key(n) for n in model.graph.node}))


def _as_initializers(case: _Case) -> tuple[onnx.ModelProto | None, str]:
    """The model with every graph input after the first turned into an initializer holding its test data, and
    why the test cannot be run as a float activation test ('' when it can); (None, why) when no model is left."""
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if not inputs:
        return None, "the graph has no inputs"
    if len(case.inputs) < len(inputs):
        return None, f"{len(inputs)} graph inputs but {len(case.inputs)} test inputs"
    arrays = case.inputs[:len(inputs)]
    if any(a is None for a in arrays):
        return None, "an input is a sequence or optional, not a tensor"
    if any(a.dtype.kind in "OUS" for a in arrays[1:]):
        return None, "an input holds strings or objects"
    for vi, arr in zip(inputs[1:], arrays[1:]):
        graph.input.remove(vi)
        graph.initializer.append(numpy_helper.from_array(arr, vi.name))
    if arrays[0].dtype not in (np.float32, np.float64, np.float16) or not inputs[0].type.HasField("tensor_type"):
        return model, f"the first input is {arrays[0].dtype}, not float"
    return model, ""


def _compare(expected: list, got: tuple, rtol: float = RTOL, atol: float = ATOL) -> str:
    """'' when ``got`` matches ``expected`` (floats within ``rtol`` / ``atol``, others exactly), else why not."""
    if len(got) != len(expected):
        return f"{len(got)} outputs, expected {len(expected)}"
    for k, (e, g) in enumerate(zip(expected, got)):
        if e is None:
            return f"output {k}: expected a sequence or optional, not a tensor"
        if not isinstance(g, torch.Tensor):
            return f"output {k}: got a {type(g).__name__}, not a tensor"
        g = g.detach().numpy()
        if g.shape != e.shape:
            return f"output {k}: shape {g.shape}, expected {e.shape}"
        if g.dtype != e.dtype:
            return f"output {k}: dtype {g.dtype}, expected {e.dtype}"
        if e.dtype.kind == "f":
            if not np.allclose(g, e, rtol=rtol, atol=atol, equal_nan=True):
                diff = np.abs(g.astype(np.float64) - e.astype(np.float64))
                return f"output {k}: max |diff| {np.nanmax(diff):.3g}"
        elif not np.array_equal(g, e):
            return f"output {k}: {int((g != e).sum())} of {e.size} values differ"
    return ""


def _run_one(case: _Case) -> Result:
    ops = _op_types(case.model)
    model, skip = _as_initializers(case)
    if model is None:
        return Result(case.name, ops, "skipped", skip)
    try:
        gm = import_onnx(model)
    except EdgeslimError as exc:
        return Result(case.name, ops, "skipped" if skip else "refused", skip or str(exc))
    except Exception as exc:  # even a test that is not run must not make the importer raise anything else
        return Result(case.name, ops, "crash", f"import: {type(exc).__name__}: {exc}")
    if skip:
        return Result(case.name, ops, "skipped", skip)
    try:
        with torch.no_grad():
            out = gm(torch.from_numpy(np.array(case.inputs[0], copy=True)))
    except Exception as exc:
        return Result(case.name, ops, "crash", f"run: {type(exc).__name__}: {exc}")
    got = out if isinstance(out, tuple) else (out,)
    why = _compare(case.outputs, got)
    if why and not _compare(case.outputs, got, max(RTOL, case.rtol), max(ATOL, case.atol)):
        # a few expected outputs are written rounded (to 4 digits): the suite's own tolerance is the bar there
        return Result(case.name, ops, "pass", f"within the suite's tolerance only (rtol {case.rtol:g}): {why}")
    return Result(case.name, ops, "wrong" if why else "pass", why)


def run_suite(ops=None, names=None) -> list[Result]:
    """Run every node test whose ops are all in the importer's table (and, given ``ops``, include one of
    ``ops``; given ``names``, is one of ``names``)."""
    results = []
    for case in load_cases():
        types = _op_types(case.model)
        if not types or any(t not in OPS for t in types):
            continue
        if ops is not None and not set(types) & set(ops):
            continue
        if names is not None and case.name not in names:
            continue
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = _run_one(case)
        result.seconds = time.perf_counter() - start
        results.append(result)
    return results


def _main(argv: list[str]) -> int:
    if argv[:1] == ["--write-cases"]:  # generate_in_background's process
        _write_cases(Path(argv[1]))
        return 0
    verbose = "-v" in argv
    ops = [a for a in argv if not a.startswith("-")] or None
    start = time.perf_counter()
    results = run_suite(ops)
    totals = Counter(r.status for r in results)
    print(f"{len(results)} node tests run in {time.perf_counter() - start:.1f} s: "
          + ", ".join(f"{s} {totals[s]}" for s in STATUSES))
    shown = ("wrong", "crash", "refused", "skipped") if verbose else ("wrong", "crash")
    for status in shown:
        for r in results:
            if r.status == status:
                print(f"  {status:8s} {r.name} [{','.join(r.ops)}]: {r.detail}")
    return 1 if totals["wrong"] or totals["crash"] else 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
