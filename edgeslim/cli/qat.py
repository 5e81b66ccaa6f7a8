"""``edgeslim qat``: quantization-aware training from a calibrated PTQ start, one job for every task (``jobs.qat``:
classify with labels and optional distillation, detect by head distillation, fidelity by output distillation);
``--formats tflite`` via ``deploy``."""

from __future__ import annotations

from pathlib import Path

from ..errors import EdgeslimError
from .args import FINAL_FORMATS_HELP, qat_args
from .common import load_model, qat_task_name
from .deploy import deploying
from .tasks import CLI_TASKS, build_task

__all__ = ["HELP", "add_arguments", "run"]

HELP = "quantization-aware training (STE, LSQ, EWGS, DSQ, DAQ; uniform, PoT, APoT)"


def add_arguments(p) -> None:
    qat_args(p)
    p.add_argument("--formats", default="onnx", help=FINAL_FORMATS_HELP)


def _qat(args) -> int:
    import torch

    from ..config import MixedPlan, PTQConfig, QATConfig
    from ..jobs.qat import run_qat
    from ..train.dist import Dist

    if args.torch_threads is not None:
        if args.torch_threads < 1:
            raise EdgeslimError(f"invalid --torch-threads {args.torch_threads}: use 1 or more")
        torch.set_num_threads(args.torch_threads)
    epochs = args.epochs if args.epochs is not None else (None if args.max_steps else 1)
    cfg = QATConfig(w_bits=args.w_bits, a_bits=args.a_bits, quantizer=args.quantizer, a_quantizer=args.a_quantizer,
                    method=args.method, epochs=epochs, max_steps=args.max_steps, lr=args.lr,
                    batch_size=args.batch_size, weight_decay=args.weight_decay, kd=args.kd,
                    kd_weight=args.kd_weight, kd_temperature=args.kd_temperature, augment=not args.no_augment,
                    seed=args.seed)
    ptq_config = PTQConfig(w_bits=args.w_bits, a_bits=args.a_bits, granularity=args.granularity,
                           calibrator=args.calibrator, calib_size=args.calib_size, seed=args.seed,
                           algorithms=tuple(a.strip() for a in args.algorithm.split(",") if a.strip()),
                           iters=args.iters)
    for name in ("train_size", "val_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise EdgeslimError(f"invalid --{name.replace('_', '-')} {v}: use a positive number of images")
    plan = MixedPlan.load(args.plan) if args.plan else None
    model, info = load_model(args)
    name = qat_task_name(args, info)
    if name != "classify" and Dist.from_env().world > 1:
        raise EdgeslimError(f"qat --task {name} runs in one process: run it without torchrun")
    task, info = build_task(args, model, info, "qat")
    dist = Dist.from_env()
    try:
        s = run_qat(model, info, task, cfg, ptq_config, Path(args.out), resume=args.resume,
                    train_size=args.train_size, val_size=args.val_size, plan=plan, dist=dist,
                    checkpoint_every=args.checkpoint_every)
    finally:
        if dist.world > 1:
            import torch.distributed as td

            td.destroy_process_group()
    if dist.main:
        from ..report.results import QATResult

        CLI_TASKS[task.name].print_qat(QATResult.from_summary(s), args.out)
    return 0


run = deploying(_qat)
