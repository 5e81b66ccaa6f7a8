"""eval.ort's paired latency sampling: interleaved rounds, and the early stop of a time-bounded measurement."""

from __future__ import annotations

import torch

from edgeslim.eval import ort as ort_eval


def _tiny_onnx(path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()).eval()
    torch.onnx.export(model, (torch.zeros(1, 3, 8, 8),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False)
    return path


def test_latency_samples_run_every_round_or_stop_after_the_budget(tmp_path):
    path = _tiny_onnx(tmp_path / "m.onnx")
    paths = {"a": path, "b": path}
    full = ort_eval.latency_samples(paths, (3, 8, 8), 2, rounds=30, warmup=2)
    assert [len(v) for v in full.values()] == [30, 30]
    # a budget every round exceeds: exactly min_rounds paired rounds, both models measured in each
    short = ort_eval.latency_samples(paths, (3, 8, 8), 2, rounds=30, warmup=2, seconds=1e-12, min_rounds=7)
    assert [len(v) for v in short.values()] == [7, 7]
    assert all(t > 0 for v in short.values() for t in v)


def test_warm_up_is_cut_short_after_two_rounds_past_its_seconds(tmp_path, monkeypatch):
    """A long warm-up budget in rounds stops after two rounds once ``warmup_seconds`` passed; every asked-for round
    is still measured. Runs are counted on the sessions themselves."""
    path = _tiny_onnx(tmp_path / "m.onnx")
    runs = []
    real = ort_eval._plain_session

    def counting(p, **kw):
        s = real(p, **kw)
        run = s.run
        s.run = lambda *a, **k: (runs.append(1), run(*a, **k))[1]
        return s

    monkeypatch.setattr(ort_eval, "_plain_session", counting)
    got = ort_eval.latency_samples({"a": path, "b": path}, (3, 8, 8), 1, rounds=5, warmup=50, warmup_seconds=0.0)
    assert [len(v) for v in got.values()] == [5, 5] and len(runs) == 2 * (2 + 5)
    runs.clear()
    got = ort_eval.latency_samples({"a": path, "b": path}, (3, 8, 8), 1, rounds=5, warmup=4, warmup_seconds=1e9)
    assert [len(v) for v in got.values()] == [5, 5] and len(runs) == 2 * (4 + 5)


def test_paired_latencies_time_models_in_groups_beside_the_reference(monkeypatch):
    """Five models in groups of at most two: every group holds the reference, the time bound grows with the group,
    each ratio is the median of the per-round ratios inside its group and the reference's median pools every
    group's rounds (known samples stand in for the timings)."""
    calls = []
    per_round = {"a": [2.0, 4.0, 6.0], "b": [1.0, 1.0, 9.0], "c": [3.0, 3.0, 3.0], "d": [5.0, 1.0, 2.0],
                 "e": [8.0, 8.0, 8.0]}
    refs = iter([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0], [4.0, 4.0, 4.0]])

    def fake(paths, input_shape, batch, *, threads, rounds, seconds):
        calls.append((list(paths), seconds))
        ref_key = next(k for k in paths if k not in per_round)
        return {ref_key: next(refs), **{k: per_round[k] for k in paths if k != ref_key}}

    monkeypatch.setattr(ort_eval, "latency_samples", fake)
    ref_ms, lat = ort_eval.paired_latencies({k: f"{k}.onnx" for k in "abcde"}, "fp32.onnx", (3, 8, 8), 1,
                                            seconds=2.0, group=2)
    assert [c[0][1:] for c in calls] == [["a", "b"], ["c", "d"], ["e"]]
    assert all(c[0][0] not in "abcde" for c in calls) and [c[1] for c in calls] == [3.0, 3.0, 2.0]
    assert lat["a"] == (4.0, 2.0)  # ratios 2, 2, 2 against the first group's reference 1, 2, 3
    assert lat["b"] == (1.0, 1.0)  # ratios 1, 0.5, 3
    assert lat["d"] == (2.0, 1.0)  # ratios 2.5, 0.5, 1 against 2, 2, 2
    assert lat["e"] == (8.0, 2.0)
    assert ref_ms == 2.0  # median of 1, 2, 3, 2, 2, 2, 4, 4, 4


def test_paired_latencies_measure_real_files(tmp_path):
    path = _tiny_onnx(tmp_path / "m.onnx")
    ref_ms, lat = ort_eval.paired_latencies({"x": path, "y": path, "z": path}, path, (3, 8, 8), 2, rounds=5, group=2)
    assert set(lat) == {"x", "y", "z"} and ref_ms > 0
    assert all(ms > 0 and ratio > 0 for ms, ratio in lat.values())
