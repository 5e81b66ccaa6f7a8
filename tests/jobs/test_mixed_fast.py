"""Shared work across plans (``eval.ort.shared_work``): every plan's scores and the chosen plan are those of the
plain path, where each plan's file is exported in full and scored in its own onnxruntime session."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from edgeslim.algorithms import layer_groups as lg
from edgeslim.algorithms import mixed_precision as mp
from edgeslim.algorithms import ptq
from edgeslim.config import Budget, MixedPlan, PTQConfig
from edgeslim.eval import ort as ort_eval
from edgeslim.export.onnx_qdq import to_onnx
from edgeslim.lower import lower
from edgeslim.quant.precision import LayerPrecision

SHAPE = (3, 16, 16)


def _calibrated(model, calib, config):
    gm = ptq.prepare(model, SHAPE, config)
    ptq.calibrate(gm, lambda: [calib])
    return ptq.freeze(gm, config)


def _x(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def _plans(gm, config: PTQConfig) -> list[MixedPlan | None]:
    """Uniform, both sweeps at two high precisions, and every group combination."""
    names = [r["name"] for r in mp.unit_rows(gm)]
    plans: list[MixedPlan | None] = [None]
    for high in (LayerPrecision.parse("int8"), LayerPrecision.parse("fp32")):
        plans += [mp.keep_high_plan(n, high) for n in names]
        plans += [mp.only_quantized_plan(n, high, config.default_precision) for n in names]
    groups = lg.default_groups(gm)
    for quantized in lg.group_combinations(list(groups)):
        plans.append(lg.group_plan(groups, {g: config.default_precision if g in quantized else
                                            LayerPrecision.parse("fp32") for g in groups}))
    return plans


def _files(gm, config: PTQConfig, plans) -> list[bytes]:
    """Each plan re-frozen and exported (serialized ONNX)."""
    blobs = []
    for plan in plans:
        ptq.apply_plan(gm, config, plan)
        blobs.append(to_onnx(lower(gm, SHAPE)).SerializeToString())
    return blobs


def _shared_runs(blobs: list[bytes], x: np.ndarray, batch: int, inputs: int | None = None) -> list:
    """Every file scored inside ``shared_work``; asserts each gives its own session's bits; the shared sessions."""
    plain = [ort_eval.predict_all(ort_eval.session(b, threads=1), x, batch) for b in blobs]
    with ort_eval.shared_work():
        sessions = [ort_eval.session(b, threads=1, inputs=inputs) for b in blobs]
        shared = [ort_eval.predict_all(s, x, batch) for s in sessions]
    for p, s in zip(plain, shared):
        assert p.keys() == s.keys()
        for k in p:
            np.testing.assert_array_equal(s[k], p[k])
    return sessions


@pytest.mark.parametrize("bits,runtime_graph", [(4, True), (8, True), (4, False)])
def test_shared_sessions_give_every_files_own_outputs_bit_for_bit(tiny_model, tiny_calib, bits, runtime_graph,
                                                                  monkeypatch):
    """Each plan's outputs inside ``shared_work`` equal its own file's session's, on several batches, and the
    shared path did reuse work (some plan ran from a cut past the input); cutting onnxruntime's saved graph and,
    where it cannot save one, the file's own."""
    if not runtime_graph:
        monkeypatch.setattr(ort_eval, "_runtime_graph", lambda *a: None)
    config = PTQConfig(w_bits=bits, a_bits=bits)
    gm = _calibrated(tiny_model, tiny_calib, config)
    sessions = _shared_runs(_files(gm, config, _plans(gm, config)), _x(40).numpy(), 16, ort_eval.SHARED_MIN_INPUTS)
    assert all(isinstance(s, ort_eval.SharedSession) and s.cuts.runtime == runtime_graph for s in sessions)
    assert any(position >= 0 for s in sessions for position in s.parts)


def test_a_file_run_on_few_inputs_gets_a_session_of_its_own(tiny_model, tiny_calib):
    """Inside ``shared_work``, a caller that runs fewer than ``SHARED_MIN_INPUTS`` inputs gets a plain onnxruntime
    session (its outputs are its file's, as ``_shared_runs`` checks); at the threshold, or not saying, a shared one."""
    config = PTQConfig(w_bits=4, a_bits=4)
    gm = _calibrated(tiny_model, tiny_calib, config)
    blob = _files(gm, config, [None])[0]
    few = _shared_runs([blob], _x(8).numpy(), 4, ort_eval.SHARED_MIN_INPUTS - 1)[0]
    assert isinstance(few, onnxruntime.InferenceSession)
    with ort_eval.shared_work():
        assert isinstance(ort_eval.session(blob), ort_eval.SharedSession)
        assert isinstance(ort_eval.session(blob, inputs=ort_eval.SHARED_MIN_INPUTS), ort_eval.SharedSession)


def test_a_float_prefix_is_cut_in_the_graph_onnxruntime_runs(tiny_model, tiny_calib):
    """Two plans with the same float (FP32) layers up to the last one: the second runs from a float tensor of
    onnxruntime's own saved graph computed by the first, and both give their files' bits."""
    config = PTQConfig(w_bits=4, a_bits=4)
    gm = _calibrated(tiny_model, tiny_calib, config)
    fp32 = LayerPrecision.parse("fp32")
    last = mp.unit_rows(gm)[-1]["name"]
    plans = (MixedPlan((("*", fp32),)), mp.only_quantized_plan(last, fp32, config.default_precision))
    sessions = _shared_runs(_files(gm, config, plans), _x(24).numpy(), 8)
    second = sessions[1]
    assert second.cuts.runtime and second.parts and min(second.parts) >= 0  # never from the input
    types = second.cuts.types
    starts = {t for position in second.parts for t in dict(second.cuts.frontiers)[position]}
    assert starts and all(types[t].tensor_type.elem_type == onnx.TensorProto.FLOAT for t in starts)


def test_without_onnxruntimes_graph_only_integer_codes_are_cut_at(tiny_model, tiny_calib, monkeypatch):
    """Where onnxruntime cannot save its graph, the file's own graph is cut: a float cut there would change the
    bits, so the all-float plan's only cuts are its input and its outputs."""
    monkeypatch.setattr(ort_eval, "_runtime_graph", lambda *a: None)
    config = PTQConfig(w_bits=4, a_bits=4)
    gm = _calibrated(tiny_model, tiny_calib, config)
    ptq.apply_plan(gm, config, MixedPlan((("*", LayerPrecision.parse("fp32")),)))
    model = to_onnx(lower(gm, SHAPE))
    with ort_eval.shared_work():
        s = ort_eval.session(model.SerializeToString())
    assert not s.cuts.runtime
    cut_tensors = {t for _, frontier in s.cuts.frontiers for t in frontier}
    ends = {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
    assert cut_tensors <= ends and ends <= cut_tensors


def test_sweeps_and_search_score_and_choose_as_the_plain_path(tiny_model, tiny_calib, monkeypatch):
    """``sensitivity`` rows and ``search``'s steps, candidates and chosen plan are identical with and without
    shared work (onnxruntime scoring; 64 held-out inputs, shared as if they were many)."""
    monkeypatch.setattr(ort_eval, "SHARED_MIN_INPUTS", 64)
    made, shared_session = [], ort_eval.SharedSession

    class Counted(shared_session):
        def __init__(self, *a, **k):
            made.append(1)
            shared_session.__init__(self, *a, **k)
    monkeypatch.setattr(ort_eval, "SharedSession", Counted)
    config = PTQConfig(w_bits=3, a_bits=3)
    gm = _calibrated(tiny_model, tiny_calib, config)
    x = _x(64)
    y = mp.fp32_outputs(gm, x)[0].argmax(1).numpy()
    high = LayerPrecision.parse("fp32")

    def run():
        outputs = mp.onnx_outputs(SHAPE, batch_size=24)
        sens = mp.sensitivity(gm, config, x, y, high=high, outputs=outputs)
        res = mp.search(gm, config, x, y, Budget(max_drop=1.0), input_shape=SHAPE, high=high,
                        order=mp.promotion_order(sens), outputs=outputs)
        return sens, res

    plain_sens, plain = run()
    with ort_eval.shared_work():
        shared_sens, shared = run()
    drop = ("total_seconds", "seconds")
    assert {k: v for k, v in shared_sens.items() if k not in drop} == \
        {k: v for k, v in plain_sens.items() if k not in drop}
    assert shared.chosen.to_dict() == plain.chosen.to_dict()
    assert [c.to_dict() for c in shared.steps] == [c.to_dict() for c in plain.steps]
    assert [c.to_dict() for c in shared.candidates] == [c.to_dict() for c in plain.candidates]
    assert len(made) > len(shared.candidates)  # every plan of the sweep and the search ran shared


def test_a_small_cache_drops_values_and_outputs_stay_the_files(tiny_model, tiny_calib):
    """A cache too small for the plans' values drops the least recently used ones (never holding more than its
    size), and every output is still the file's own."""
    config = PTQConfig(w_bits=4, a_bits=4)
    gm = _calibrated(tiny_model, tiny_calib, config)
    blobs = _files(gm, config, _plans(gm, config)[:12])
    x = _x(16).numpy()
    plain = [ort_eval.predict_all(ort_eval.session(b, threads=1), x, 16) for b in blobs]
    size = 4 * 16 * 8 * 16 * 16  # four 8-channel 16x16 code tensors of a batch of 16
    with ort_eval.shared_work(max_bytes=size) as cache:
        sessions, shared, held = [ort_eval.session(b, threads=1) for b in blobs], [], []
        for s in sessions:
            shared.append(ort_eval.predict_all(s, x, 16))
            held.append(cache.bytes)
    for p, s in zip(plain, shared):
        for k in p:
            np.testing.assert_array_equal(s[k], p[k])
    assert max(held) <= size and held[-1] > 0
    assert cache.bytes == sum(cache.pinned_bytes.values()) + sum(v.nbytes for v in cache.later.values())


def _values(*sizes: int) -> dict[bytes, np.ndarray]:
    return {bytes([i]) * 16: np.zeros(n, np.uint8) for i, n in enumerate(sizes)}


def test_the_cache_pins_each_inputs_first_run_and_drops_the_least_recently_used():
    cache = ort_eval.TensorCache(max_bytes=100, shares=4)  # pinned: at most 25 bytes per input
    first = _values(10, 10, 10)                            # the third does not fit the share: kept as a later value
    cache.put(b"a", first)
    assert set(cache.pinned[b"a"]) == set(list(first)[:2]) and set(cache.later) == {(b"a", list(first)[2])}
    later = {bytes([9]) * 16: np.zeros(30, np.uint8)}
    cache.put(b"a", later)                                 # a second run on the same input: never pinned
    assert (b"a", bytes([9]) * 16) in cache.later and cache.bytes == 60
    cache.put(b"b", _values(20))                           # another input's first run: pinned
    assert cache.get((b"a", list(first)[0])) is not None   # reading a's pinned values makes them recent
    cache.put(b"b", {bytes([7]) * 16: np.zeros(30, np.uint8)})  # 110 > 100: the oldest item goes
    assert (b"a", list(first)[2]) not in cache.later       # a's oldest later value, not its (recent) pinned ones
    assert b"a" in cache.pinned and cache.bytes <= 100
    cache.put(b"c", {bytes([5]) * 16: np.zeros(90, np.uint8)})  # 90 > c's share: a later value; the rest must go
    assert cache.bytes <= 100 and cache.get((b"c", bytes([5]) * 16)) is not None
    assert cache.get((b"b", bytes([0]) * 16)) is None      # b's pinned value went before ...
    assert cache.bytes == sum(cache.pinned_bytes.values()) + sum(v.nbytes for v in cache.later.values())
    cache.put(b"d", {b"x" * 16: np.zeros(101, np.uint8)})  # larger than the whole cache: not kept
    assert cache.get((b"d", b"x" * 16)) is None
