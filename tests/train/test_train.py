"""The shared training loop (``edgeslim.train``): one distillation loss, atomic checkpoints, exact mid-epoch
resume for QAT and for fine-tuning, refusal of a checkpoint from another run, and the module layering.

Oracles: the loss by hand; an uninterrupted run (the resumed run must end with the same tensors, bit for bit);
the file system (symlinks, leftover temporary files)."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import edgeslim
from edgeslim import api
from edgeslim.algorithms import pruning, qat
from edgeslim.algorithms.finetune import finetune
from edgeslim.config import FinetuneConfig, PTQConfig, QATConfig
from edgeslim.errors import EdgeslimError
from edgeslim.train.checkpoint import Checkpoint, params_digest, save_atomic
from edgeslim.train.data import TrainData, epoch_order
from edgeslim.train.loop import Recipe, fit
from edgeslim.train.losses import distillation_loss

from conftest import make_tiny_resnet


class Killed(Exception):
    """Stands for a kill -9 in the middle of a step: nothing after it runs."""


def _tensors_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _no_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("seconds", "train_seconds")} for row in history]


# -- the loss ----------------------------------------------------------------------------------------------

def test_kd_loss_is_the_temperature_scaled_kl():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    p, logq = torch.softmax(t / 2, 1), torch.log_softmax(s / 2, 1)
    kl = (p * (torch.log(p) - logq)).sum(1).mean() * 4
    ce = F.cross_entropy(s, y)
    assert float(distillation_loss(s, y, t, weight=0.7, temperature=2.0)) == pytest.approx(float(0.7 * kl + 0.3 * ce),
                                                                                           rel=1e-5)
    assert torch.equal(distillation_loss(s, y, None, weight=0.7, temperature=2.0), ce)


# -- exact resume ------------------------------------------------------------------------------------------

@pytest.fixture
def images() -> TrainData:
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((64, 3, 16, 16)).astype(np.float32))
    return TrainData(x, torch.arange(64) % 5, torch.zeros(3))


def _qat_model(cfg: QATConfig, x: torch.Tensor):
    gm = api.quantize(make_tiny_resnet(), x, PTQConfig(w_bits=cfg.w_bits, a_bits=cfg.a_bits)).model
    qat.attach(gm, cfg)
    return gm


def test_qat_killed_mid_epoch_and_resumed_equals_the_uninterrupted_run(images, tmp_path):
    # EWGS with distillation: Hessian probes from the step generators, deltas in buffers, the teacher every step;
    # 4 steps per epoch, 10 steps; checkpoints every 3 steps; killed inside step 8, i.e. after the checkpoint of
    # step 6 (the middle of epoch 2): steps 7 and 8 are lost and redone.
    cfg = QATConfig(4, 4, method="ewgs", epochs=None, max_steps=10, batch_size=16, lr=0.01, kd=True,
                    kd_weight=0.5, ewgs_every=3)
    teacher = make_tiny_resnet().eval()
    whole = _qat_model(cfg, images.x)
    straight = qat.train(whole, teacher, images, cfg, evaluate=lambda m: 0.0, progress=False,
                         checkpoint=Checkpoint(tmp_path / "a.pt", every=3))

    calls = []

    def kill_in_step_8(module, inputs):
        calls.append(1)
        if len(calls) == 8:
            raise Killed

    hook = teacher.register_forward_pre_hook(kill_in_step_8)
    broken = _qat_model(cfg, images.x)
    with pytest.raises(Killed):
        qat.train(broken, teacher, images, cfg, evaluate=lambda m: 0.0, progress=False,
                  checkpoint=Checkpoint(tmp_path / "b.pt", every=3))
    hook.remove()
    saved = torch.load(tmp_path / "b.pt", weights_only=True)
    assert saved["step"] == 6 and saved["progress"]["epoch_seen"] == 2 * 16  # two batches into epoch 2
    assert torch.equal(saved["order"], epoch_order(64, cfg.seed, 1))

    torch.manual_seed(123)  # the global random state is restored from the checkpoint, whatever it is now
    resumed = _qat_model(cfg, images.x)
    r = qat.train(resumed, teacher, images, cfg, evaluate=lambda m: 0.0, progress=False,
                  checkpoint=Checkpoint(tmp_path / "b.pt", every=3), resume=True)
    assert r["resumed_from_step"] == 6 and r["steps"] == 10
    assert any(float(q.delta) > 0 for q in qat.quantizers(resumed))
    assert _tensors_equal(resumed, whole)
    assert not _tensors_equal(resumed, _qat_model(cfg, images.x))
    assert _no_seconds(r["history"]) == _no_seconds(straight["history"])


class DropNet(nn.Module):
    """A float model with dropout (draws from the global torch generator) and BatchNorm (running statistics)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.drop(F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1)))


def _pruned_student() -> tuple[nn.Module, pruning.GradualSchedule]:
    student = DropNet()
    sched = pruning.GradualSchedule(0.6, 0, 8, 2, exclude=())
    sched.step(student, 0)
    return student, sched


def test_finetune_killed_mid_epoch_and_resumed_equals_the_uninterrupted_run(images, tmp_path):
    # gradual magnitude pruning re-masks in on_step; dropout draws from the global generator; 1.75 epochs of 8
    # steps = 14 steps; checkpoints every 4 steps; killed at step 11, after the checkpoint of step 8 (epoch 2)
    cfg = FinetuneConfig(epochs=1.75, lr=0.05, batch_size=8, kd_weight=0.5, temperature=2.0)
    teacher = DropNet().eval()

    def run(seed: int, on_step, path: str, resume: bool = False):
        student, _ = _pruned_student()
        torch.manual_seed(seed)  # dropout's masks come from here
        r = finetune(student, images, cfg, teacher=teacher, on_step=on_step, progress=False, resume=resume,
                     checkpoint=Checkpoint(tmp_path / path, every=4))
        return student, r

    whole, straight = run(5, _pruned_student()[1].step, "a.pt")
    assert straight["steps"] == 14
    sched = _pruned_student()[1]

    def kill_at_11(model, step):
        if step == 11:
            raise Killed
        sched.step(model, step)

    with pytest.raises(Killed):
        run(5, kill_at_11, "b.pt")
    assert torch.load(tmp_path / "b.pt", weights_only=True)["step"] == 8
    np.random.seed(7)
    resumed, r = run(7, sched.step, "b.pt", resume=True)  # the random state comes back from the checkpoint
    assert r["resumed_from_step"] == 8 and r["steps"] == 14
    assert _tensors_equal(resumed, whole)
    assert r["loss"] == straight["loss"] and r["train_top1"] == straight["train_top1"]
    other, _ = run(7, sched.step, "c.pt")  # the random state matters: another seed, other dropout masks
    assert not _tensors_equal(other, whole)


def test_a_finished_checkpoint_resumes_to_the_same_weights_without_training(images, tmp_path):
    recipe = Recipe(steps=5, lr=0.05, batch_size=16)
    loss = lambda out, y, t: F.cross_entropy(out, y)  # noqa: E731
    model = DropNet()
    fit(model, images, recipe, loss=loss, checkpoint=Checkpoint(tmp_path / "c.pt", every=0), progress=False)
    again = DropNet()
    r = fit(again, images, recipe, loss=loss, checkpoint=Checkpoint(tmp_path / "c.pt", every=0), resume=True,
            progress=False)
    assert r["resumed_from_step"] == 5 and _tensors_equal(again, model)


# -- refusing another run's checkpoint ----------------------------------------------------------------------

def test_resume_names_what_differs(images, tmp_path):
    cfg = FinetuneConfig(epochs=0.5, lr=0.05, batch_size=16, augment=False)
    path = tmp_path / "c.pt"
    finetune(DropNet(), images, cfg, progress=False, checkpoint=Checkpoint(path, identity={"model": "abc"}))

    def refused(model=None, data=images, config=cfg, identity=None) -> str:
        with pytest.raises(EdgeslimError) as e:
            finetune(model or DropNet(), data, config, progress=False, resume=True,
                     checkpoint=Checkpoint(path, identity=identity or {"model": "abc"}))
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("--resume:")
        return msg

    other = TrainData(images.x.flip(0), images.y, images.pad_value)
    assert "differs in data (" in refused(data=other) and "config" not in refused(data=other)
    assert "config (lr 0.05 -> 0.1)" in refused(config=FinetuneConfig(epochs=0.5, lr=0.1, batch_size=16, augment=False))
    assert "model (abc -> xyz)" in refused(identity={"model": "xyz"})
    wider = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    assert "tensors (" in refused(model=wider)
    with pytest.raises(EdgeslimError, match="exists from an earlier run: add --resume"):
        Checkpoint(path).check_start(resume=False)
    with pytest.raises(EdgeslimError, match="no checkpoint at"):
        Checkpoint(tmp_path / "none.pt").check_start(resume=True)


def test_qat_resume_refuses_other_bits(images, tmp_path):
    cfg = QATConfig(4, 4, method="lsq", epochs=None, max_steps=2, batch_size=32)
    qat.train(_qat_model(cfg, images.x), None, images, cfg, evaluate=lambda m: 0.0, progress=False,
              checkpoint=Checkpoint(tmp_path / "q.pt"))
    other = QATConfig(3, 4, method="lsq", epochs=None, max_steps=2, batch_size=32)
    with pytest.raises(EdgeslimError, match=r"differs in config \(w_bits 4 -> 3\)"):
        qat.train(_qat_model(other, images.x), None, images, other, evaluate=lambda m: 0.0, progress=False,
                  checkpoint=Checkpoint(tmp_path / "q.pt"), resume=True)


# -- writing ----------------------------------------------------------------------------------------------

def test_atomic_save_replaces_a_symlink_and_leaves_no_temporary_files(tmp_path):
    real = tmp_path / "real.pt"
    torch.save({"v": 1}, real)
    link = tmp_path / "ck.pt"
    link.symlink_to(real)
    save_atomic({"v": 2}, link)
    assert not link.is_symlink() and torch.load(link)["v"] == 2
    assert torch.load(real)["v"] == 1  # the file the link pointed to is untouched
    with pytest.raises(Exception):
        save_atomic({"f": lambda: 0}, link)  # cannot be pickled: the old checkpoint stays
    assert torch.load(link)["v"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt", "real.pt"]
    umask = os.umask(0o022)
    try:
        save_atomic({"v": 3}, link)
    finally:
        os.umask(umask)
    assert link.stat().st_mode & 0o777 == 0o644


def test_checkpoint_schedule():
    every3 = Checkpoint(Path("x.pt"), every=3)
    assert [s for s in range(1, 10) if every3.due(s)] == [3, 6, 9]
    assert not any(Checkpoint(Path("x.pt"), every=0).due(s) for s in range(1, 10))
    assert Checkpoint(Path("x.pt"), every_seconds=0.0).due(1)  # the default: by measured time
    assert not Checkpoint(Path("x.pt")).due(1)  # five minutes have not passed
    with pytest.raises(EdgeslimError, match="--checkpoint-every"):
        Checkpoint(Path("x.pt"), every=-1)


# -- layering ---------------------------------------------------------------------------------------------

def _imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) for every ``from X import name`` in ``path``, relative modules resolved in edgeslim."""
    pkg = path.relative_to(Path(edgeslim.__file__).parent.parent).with_suffix("").parts[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = list(pkg[:len(pkg) - node.level + 1]) if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out += [(mod, a.name) for a in node.names]
    return out


def test_training_modules_sit_below_the_algorithms_and_jobs():
    root = Path(edgeslim.__file__).parent
    for path in sorted((root / "train").glob("*.py")):
        for mod, name in _imports(path):
            assert not mod.startswith(("edgeslim.algorithms", "edgeslim.jobs", "edgeslim.cli", "edgeslim.api")), \
                (path.name, mod)
    assert ("edgeslim.train.loop", "fit") in _imports(root / "algorithms" / "qat.py")
    assert ("edgeslim.train.loop", "fit") in _imports(root / "algorithms" / "finetune.py")


# -- the commands -----------------------------------------------------------------------------------------

def _prune(data, out, *extra):
    return ["prune", "resnet20", "--random-init", "--train-data", str(data), "--data", str(data), "--epochs", "2",
            "--batch-size", "8", "--method", "magnitude", "--sparsity", "0.5", "--checkpoint-every", "2",
            "--out", str(out), *extra]


def test_prune_killed_and_resumed_matches_the_uninterrupted_run(capsys, monkeypatch, tmp_path, three_colours):
    from edgeslim.cli import main

    from helpers import expect_error as _expect_error

    torch.manual_seed(0)  # --random-init
    assert main(_prune(three_colours, tmp_path / "a")) == 0
    orig = pruning.GradualSchedule.step

    def killed_at_5(self, model, step):  # 6 steps: killed after step 5, the last checkpoint is step 4's
        if step == 5:
            raise Killed
        return orig(self, model, step)

    with monkeypatch.context() as m:
        m.setattr(pruning.GradualSchedule, "step", killed_at_5)
        m.setenv("EDGESLIM_DEBUG", "1")  # let the exception through instead of the one-line report
        torch.manual_seed(0)
        with pytest.raises(Killed):
            main(_prune(three_colours, tmp_path / "b"))
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 4
    assert not (tmp_path / "b" / "summary.json").exists()
    torch.manual_seed(0)
    _expect_error(capsys, tmp_path, _prune(three_colours, tmp_path / "b"), "exists from an earlier run: add --resume")
    torch.manual_seed(0)
    _expect_error(capsys, tmp_path, _prune(three_colours, tmp_path / "b", "--resume", "--lr", "0.02"),
                  "differs in config (lr 0.01 -> 0.02)")
    torch.manual_seed(0)
    assert main(_prune(three_colours, tmp_path / "b", "--resume")) == 0
    a = torch.load(tmp_path / "a" / "model_pruned.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "model_pruned.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    s = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert s["finetune"]["resumed_from_step"] == 4 and s["finetune"]["steps"] == 6


@pytest.mark.slow
def test_plan_resumes_its_fine_tuning_steps(capsys, tmp_path, three_colours):
    from edgeslim.cli import main

    from helpers import expect_error as _expect_error

    def plan(out, *extra):
        torch.manual_seed(0)
        return main(["plan", "resnet20", "--random-init", "--train-data", str(three_colours), "--data",
                     str(three_colours), "--batch-size", "8", "--steps", "G2,G3", "--budget-epochs", "1",
                     "--max-size-kb", "1", "--checkpoint-every", "1", "--out", str(out), *extra])

    torch.manual_seed(0)
    _expect_error(capsys, tmp_path, ["plan", "resnet20", "--random-init", "--train-data", str(three_colours), "--data",
                                     str(three_colours), "--max-drop", "1", "--resume", "--out", str(tmp_path / "n")],
                  "no fine-tuning checkpoint")
    assert plan(tmp_path / "p") == 0
    first = json.loads((tmp_path / "p" / "summary.json").read_text())
    written = (tmp_path / "p" / "checkpoint_G2.pt").stat().st_mtime_ns
    assert plan(tmp_path / "p", "--resume") == 0  # G2's fine-tuning is finished: its weights are loaded, not retrained
    assert (tmp_path / "p" / "checkpoint_G2.pt").stat().st_mtime_ns == written
    again = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert [r["top1"] for r in again["steps"]] == [r["top1"] for r in first["steps"]]
    assert [r["size_bytes"] for r in again["steps"]] == [r["size_bytes"] for r in first["steps"]]


@pytest.mark.slow
def test_prune_killed_with_sigkill_resumes_to_the_uninterrupted_weights(tmp_path, three_colours):
    """A real ``kill -9`` as soon as the first checkpoint exists (wherever the run is then), then ``--resume``."""
    import signal
    import subprocess
    import sys
    import time

    from edgeslim.models import build_model

    torch.manual_seed(0)
    weights = tmp_path / "w.pt"  # --random-init draws from a fresh process's random seed: fixed weights instead
    torch.save(build_model("resnet20")[0].state_dict(), weights)

    def cmd(out, *extra):
        argv = _prune(three_colours, out, "--epochs", "6", "--checkpoint-every", "1", "--weights", str(weights))
        return [sys.executable, "-m", "edgeslim", *[a for a in argv if a != "--random-init"], *extra]

    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd(tmp_path / "a"), env=env, check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen(cmd(tmp_path / "b"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while not (tmp_path / "b" / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() - t0 < 300:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "b" / "summary.json").exists()
    assert 1 <= torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] < 18  # killed mid-run
    resumed = subprocess.run(cmd(tmp_path / "b", "--resume"), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-500:]
    a = torch.load(tmp_path / "a" / "model_pruned.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "model_pruned.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "b").glob(".checkpoint.pt.*.tmp"))
