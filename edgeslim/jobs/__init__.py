"""The jobs: one module per verb, each serving every task (``tasks``) end to end into an output folder, atomically
(``io.staging``): ``quantize`` (quantize / analyze), ``mixed`` (sensitivity / mixed), ``qat``, ``lighten``
(prune / factorize), ``plan`` (the G1-G5 loop, its quantization roads in ``plan_roads``) and ``export`` (a finished
run into LiteRT / TFLM). A job never imports another job; the CLI (``cli``) parses arguments and calls one.
"""

__all__: list[str] = []
