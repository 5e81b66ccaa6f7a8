"""Single lightweighting steps as jobs: ``edgeslim prune`` (G5) and ``edgeslim factorize`` (G2).

Each job changes the float model, fine-tunes it with distillation from the original, exports both to ONNX and
measures them side by side in one run: test top-1 (onnxruntime), MACs, parameters, stored bytes and latency
(interleaved, batch 1). Outputs are staged and moved into ``out`` at the end, ``summary.json`` last. Fine-tuning
checkpoints into ``out/checkpoint.pt`` (``train.checkpoint``); ``resume`` continues it exactly and refuses a
checkpoint of another model, step settings, fine-tuning config or training data.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
import statistics
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import api
from ..algorithms.finetune import finetune
from ..config import FinetuneConfig
from ..data import ImageDataset
from ..errors import EdgeslimError
from ..eval import ort as ort_eval
from ..io.staging import staged
from ..eval.profile import profile
from ..graph.capture import capture
from ..tasks import onnx_top1
from ..models import ModelInfo
from ..train.checkpoint import Checkpoint, params_digest
from ..train.data import TrainData, load_train

__all__ = ["macs", "compare", "run_factorize", "run_prune", "job_checkpoint", "IMPORTANCE", "weight_sparsity"]


def macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    return int(sum(r.macs for r in profile(capture(copy.deepcopy(model).eval(), input_shape))))


def compare(models: dict[str, nn.Module], info: ModelInfo, test: ImageDataset, stage: Path, *, threads: int = 1,
            rounds: int = 200, sizes: dict[str, int] | None = None) -> dict[str, dict]:
    """Export each float model, then top-1, MACs, parameters, stored bytes and paired latency vs the first one."""
    paths = {k: api.export_fp32_onnx(m, info.input_shape, stage / f"model_{k}.onnx") for k, m in models.items()}
    top1 = onnx_top1(paths, test, 500, f"scoring {', '.join(paths)}")
    lat = ort_eval.latency_samples(paths, info.input_shape, 1, threads=threads, rounds=rounds)
    first = next(iter(models))
    out = {}
    for k, m in models.items():
        params = sum(p.numel() for p in m.parameters())
        out[k] = {"top1": top1[k], "macs": macs(m, info.input_shape), "params": int(params),
                  "size_bytes": int(sizes[k]) if sizes and k in sizes else 4 * int(params),
                  "onnx_bytes": paths[k].stat().st_size, "latency_ms": statistics.median(lat[k]),
                  "latency_vs_" + first: ort_eval.paired_ratio(lat, k, first), "threads": threads}
    return out


def run_factorize(model: nn.Module, info: ModelInfo, train_ds: ImageDataset, test_ds: ImageDataset, out: Path, *,
                  layers: list[str] | None = None, method: str = "separable", macs_reduction: float = 0.5,
                  rank: int | None = None, share: float = 0.5, finetune_cfg: FinetuneConfig = FinetuneConfig(),
                  train_size: int | None = None, threads: int = 1, checkpoint_every: int | None = None,
                  resume: bool = False) -> dict:
    """The TTA guideline's G2: factorize the heaviest convolutions (or ``layers``), fine-tune with KD, measure vs the original."""
    from ..algorithms.factorize import choose_layers, factorize

    ckpt = job_checkpoint(out, model, {"layers": layers, "method": method, "macs_reduction": macs_reduction,
                                       "rank": rank, "share": share}, checkpoint_every, resume)

    def work(stage: Path) -> dict:
        chosen = layers or choose_layers(model, info.input_shape, share=share)
        new, record = factorize(model, info.input_shape, layers=chosen, method=method, macs_reduction=macs_reduction,
                                rank=rank)
        before = compare({"original": model, "factorized": new}, info, test_ds, stage, threads=threads, rounds=20)
        train = load_train(train_ds, info, train_size, finetune_cfg.seed)
        tuned = finetune(new, train, finetune_cfg, teacher=copy.deepcopy(model).eval(), desc="fine-tuning (KD)",
                         checkpoint=ckpt, resume=resume)
        res = compare({"original": model, "factorized": new}, info, test_ds, stage, threads=threads)
        res["factorized"]["top1_before_finetune"] = before["factorized"]["top1"]
        (stage / "factorize_record.json").write_text(record.to_json())
        torch.save(new.state_dict(), stage / "model_factorized.pt")
        (stage / "model_original.onnx").unlink(missing_ok=True)
        return {"model": info.name, "step": "G2 factorize", **res, "record": record.to_dict(), "finetune": tuned,
                "train_images": int(len(train.y))}

    return staged(out, work)


def run_prune(model: nn.Module, info: ModelInfo, train_ds: ImageDataset, test_ds: ImageDataset, out: Path, *,
              method: str = "channel", target_macs: float | None = 0.7, ratio: float | None = None,
              sparsity: float = 0.5, scope: str = "global", importance: str = "l1", gradual: bool = True,
              finetune_cfg: FinetuneConfig = FinetuneConfig(), train_size: int | None = None,
              threads: int = 1, checkpoint_every: int | None = None, resume: bool = False) -> dict:
    """The TTA guideline's G5: channel pruning (a smaller dense model: speed) or magnitude pruning (zeros stored sparse:
    memory), fine-tuned with KD, measured against the dense original in the same run."""
    from ..algorithms import pruning

    ckpt = job_checkpoint(out, model, {"method": method, "target_macs": target_macs, "ratio": ratio,
                                       "sparsity": sparsity, "scope": scope, "importance": importance,
                                       "gradual": gradual}, checkpoint_every, resume)

    def work(stage: Path) -> dict:
        train = load_train(train_ds, info, train_size, finetune_cfg.seed)
        teacher = copy.deepcopy(model).eval()
        if method == "channel":
            if importance not in IMPORTANCE:
                raise EdgeslimError(f"invalid --importance {importance!r}: use one of {', '.join(IMPORTANCE)}")
            crit = getattr(pruning, IMPORTANCE[importance])()
            if importance == "taylor":
                pruning.accumulate_gradients(model, _batches(train, 4), torch.nn.functional.cross_entropy)
            new, record = pruning.prune_channels(model, info.input_shape, ratio=ratio, target_macs=target_macs,
                                                 importance=crit)
            record.save(stage / "prune_record.json")
            tuned = finetune(new, train, finetune_cfg, teacher=teacher, desc="fine-tuning (KD)", checkpoint=ckpt,
                             resume=resume)
            res = compare({"dense": model, "pruned": new}, info, test_ds, stage, threads=threads)
            extra = {"record": json.loads((stage / "prune_record.json").read_text())}
        else:
            new = copy.deepcopy(model)
            hook = None
            if gradual:  # Zhu & Gupta: ramp the sparsity over the first 3/4 of fine-tuning, then recover
                total = finetune_cfg.total_steps(len(train.y))
                sched = pruning.GradualSchedule(sparsity, 0, max(1, int(0.75 * total)), max(1, total // 20), scope=scope)
                sched.step(new, 0)
                hook = sched.step
            else:
                pruning.magnitude_prune(new, sparsity, scope=scope)
            tuned = finetune(new, train, finetune_cfg, teacher=teacher, on_step=hook, desc="fine-tuning (KD, masked)",
                             checkpoint=ckpt, resume=resume)
            pruning.remove_masks(new)
            table = pruning.sparse_size_bytes(new, value_bits=32)
            pruning.write_sparse(new.state_dict(), stage / "model_sparse.npz")
            sizes = {"dense": 4 * sum(p.numel() for p in model.parameters()), "pruned": table.total_bytes}
            res = compare({"dense": model, "pruned": new}, info, test_ds, stage, threads=threads, sizes=sizes)
            res["pruned"]["sparsity"] = weight_sparsity(new)
            res["pruned"]["sparse_file_bytes"] = (stage / "model_sparse.npz").stat().st_size
            res["pruned"]["int8_sparse_bytes"] = pruning.sparse_size_bytes(new, value_bits=8).total_bytes
            extra = {"storage": [asdict(r) for r in table.rows]}
        torch.save(new.state_dict(), stage / "model_pruned.pt")
        (stage / "model_dense.onnx").unlink(missing_ok=True)
        return {"model": info.name, "step": f"G5 {method} pruning", "method": method, **res, **extra,
                "finetune": tuned, "train_images": int(len(train.y))}

    return staged(out, work)


def job_checkpoint(out: Path, model: nn.Module, step: dict, every: int | None, resume: bool) -> Checkpoint:
    """``out/checkpoint.pt`` for a lightweighting job: its identity is the original model's weights and the step's
    settings (the fine-tuning config and the training data are added when training starts)."""
    ckpt = Checkpoint(Path(out) / "checkpoint.pt", every=every,
                      identity={"model weights": params_digest(model), "plan": step})
    ckpt.check_start(resume)
    return ckpt


IMPORTANCE = {"l1": "L1Importance", "l2": "L2Importance", "bn": "BNScaleImportance", "taylor": "TaylorImportance"}


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of zeros over all conv / linear weights (the excluded first and last layers included)."""
    ws = [p for n, p in model.named_parameters() if p.dim() > 1]
    return float(sum(int((w == 0).sum()) for w in ws) / max(1, sum(w.numel() for w in ws)))


def _batches(train: TrainData, n: int, size: int = 128):
    idx = np.random.default_rng(0).permutation(len(train.y))[: n * size]
    return [(train.x[idx[i:i + size]], train.y[idx[i:i + size]]) for i in range(0, len(idx), size)]

