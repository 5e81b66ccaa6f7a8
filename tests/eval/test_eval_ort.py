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
