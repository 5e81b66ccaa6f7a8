"""Pure-numpy integer inference engine for ``IntGraph`` (no torch): bit-level reference execution,
requantization variants (float / fixed-point / shift) and accumulator-overflow analysis.

Import the submodules directly: ``edgeslim.engine.ops``, ``edgeslim.engine.run``,
``edgeslim.engine.overflow``, ``edgeslim.engine.narrow`` (accumulator registers, the narrow-accumulator
simulation).
"""

__all__: list[str] = []
