"""Console lines several commands print: a score in its metric's format, what still runs in float in onnxruntime,
and the ``.tflite`` file's line."""

from __future__ import annotations

__all__ = ["fmt_score", "float_line", "tflite_line"]


def fmt_score(v, key: str) -> str:
    """A plan score: SQNR in dB with two decimals (``exact`` for an infinite one), top-1 / mAP with four."""
    if v is None:
        return "exact"
    return f"{v:.2f}" if key == "sqnr_db" else f"{v:.4f}"


def float_line(profile: dict | None) -> None:
    """One line on what keeps the INT8 model from running all-integer in onnxruntime."""
    if not profile:
        return
    share = profile["time_share"]
    ops = ", ".join(f"{op} {t:.0%}" for op, t in list(profile["float_time_by_op"].items())[:5])
    print(f"onnxruntime kernel time: integer {share['integer']:.0%}, float {share['float']:.0%}"
          + (f" ({ops})" if ops else "") + f", Q/DQ {share['qdq']:.0%}, data movement {share['movement']:.0%}")


def tflite_line(s: dict) -> None:
    """``--formats tflite / tflm``: the .tflite's score in LiteRT (top-1, mAP or worst SQNR), size, float ops, arena."""
    if "tflite" not in s:
        return
    t, mcu = s["tflite"], s.get("mcu")
    score = ""
    if t.get("top1") is not None:
        score = f"top-1 {t['top1']:.4f} in LiteRT, "
    elif "map50" in t:
        score = f"mAP@.5 {t['map50']:.4f}, mAP@.5:.95 {t['map50_95']:.4f} in LiteRT, "
    elif t.get("fidelity_vs_fp32"):
        from ..eval.fidelity import headline_db

        db = headline_db(t["fidelity_vs_fp32"])
        score = f"worst SQNR vs FP32 {'exact' if db is None else format(db, '.1f') + ' dB'} in LiteRT, "
    print(f"model_int8.tflite: {score}{t['size_bytes'] / 1024:.1f} KiB, float ops: {', '.join(t['float_ops']) or 'none'}"
          + (f"; TFLM arena {mcu['ram_bytes'] / 1024:.1f} KiB (model_data.h / .cc, op_resolver.txt)" if mcu else ""))
