"""Console lines several commands print: a score in its metric's format, what still runs in float in onnxruntime,
the weights' grid, the worst INT16 overflow and the ``.tflite`` file's line."""

from __future__ import annotations

__all__ = ["fmt_score", "float_line", "tflite_line", "weights_line", "overflow_line"]


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


def weights_line(config: dict | None, containers: dict | None) -> None:
    """One line on how 8-bit weights are stored when this CPU's int8 kernels saturate (x86, AVX2, no VNNI):
    ``config``: the summary's PTQ config; ``containers``: the INT8 graph's weight containers."""
    cfg = config or {}
    if cfg.get("w_bits") == 8 and cfg.get("weight_range") == "reduced":
        print("note: 8-bit weights on the 7-bit grid (--weight-range reduced, the default on this CPU: AVX2 without "
              "VNNI), so onnxruntime's fast int8 kernels compute them exactly; --weight-range full for an ARM / VNNI / "
              "NPU / microcontroller file")
    elif (containers or {}).get("uint8"):
        print(f"note: {containers['uint8']} layers store uint8 weights: onnxruntime's int8-weight kernels saturate on "
              "this CPU (AVX2 without VNNI); uint8 is exact but not faster. --weight-range reduced (the default here) "
              "keeps int8 weights exactly (the fast kernel)")


def tflite_line(s) -> None:
    """``--formats tflite / tflm``: the .tflite's score in LiteRT (top-1, mAP or worst SQNR), size, float ops, arena.
    ``s``: a summary dict, or a ``QuantizeResult``."""
    t, mcu = (s.get("tflite"), s.get("mcu")) if isinstance(s, dict) else (s.tflite, s.mcu)
    if t is None:
        return
    score = ""
    if t.get("top1") is not None:
        score = f"top-1 {t['top1']:.4f} in LiteRT, "
    elif "map50" in t:
        score = f"mAP@.5 {t['map50']:.4f}, mAP@.5:.95 {t['map50_95']:.4f} in LiteRT, "
    elif t.get("fidelity_vs_fp32"):
        from ..eval.fidelity import headline_db

        db = headline_db(t["fidelity_vs_fp32"])
        score = f"worst SQNR vs FP32 {'exact' if db is None else format(db, '.1f') + ' dB'} in LiteRT, "
    floats = ", ".join(t.get("float_nodes") or t["float_ops"]) or "none"  # the float islands by name
    print(f"model_int8.tflite: {score}{t['size_bytes'] / 1024:.1f} KiB, float ops: {floats}"
          + (f"; TFLM arena {mcu['ram_bytes'] / 1024:.1f} KiB (model_data.h / .cc, op_resolver.txt)" if mcu else ""))


def overflow_line(overflow: dict | None, what: str, tail: str = "") -> None:
    """The worst layer's INT16 sum overflow (``analyze``), when the statistics ran over some layers."""
    if overflow is None or not overflow["layers"]:
        return
    worst = max(overflow["layers"], key=lambda r: r["sum_int16"]["max"])
    print(f"overflow ({overflow['images']} {what}): worst INT16 sum overflow {worst['sum_int16']['max']:.2%} "
          f"of pixels in a filter of {worst['name']}{tail}")
