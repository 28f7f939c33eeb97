"""Energy per operation: the constants of ``E = E_AC x ACs + E_MAC x MACs`` (no torch, so the command line's
help can show them without loading it)."""

from __future__ import annotations

import math
from dataclasses import dataclass

E_AC_PJ = 0.9  # one 32-bit floating-point addition, 45 nm (Horowitz, ISSCC 2014)
E_MAC_PJ = 4.6  # one 32-bit floating-point multiply-accumulate, 45 nm


@dataclass(frozen=True)
class EnergyConstants:
    """Energy per operation in picojoules."""

    ac_pJ: float = E_AC_PJ
    mac_pJ: float = E_MAC_PJ

    def __post_init__(self):
        for name in ("ac_pJ", "mac_pJ"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"EnergyConstants.{name} must be a non-negative number of picojoules, got {value!r}")

    def millijoules(self, acs: float, macs: float) -> float:
        return (self.ac_pJ * acs + self.mac_pJ * macs) * 1e-9


DEFAULT_CONSTANTS = EnergyConstants()


@dataclass(frozen=True)
class Precision:
    """Energy per operation at one weight precision (45 nm, 0.9 V; Horowitz, "Computing's energy problem (and what
    we can do about it)", ISSCC 2014): an accumulate is one add of the precision, a MAC one multiply plus one add."""

    name: str
    add_pJ: float
    multiply_pJ: float
    weight_bits: int
    note: str

    @property
    def mac_pJ(self) -> float:
        return self.add_pJ + self.multiply_pJ

    def millijoules(self, acs: float, macs: float) -> float:
        return (self.add_pJ * acs + self.mac_pJ * macs) * 1e-9


PRECISIONS = (
    Precision("fp32", 0.9, 3.7, 32, "32-bit float: add 0.9 pJ, multiply 3.7 pJ, multiply-add 4.6 pJ"),
    Precision(
        "bf16",
        0.4,
        1.1,
        16,
        "16-bit float: add 0.4 pJ, multiply 1.1 pJ, multiply-add 1.5 pJ (Horowitz's fp16 row: the source has no "
        "bfloat16 row; bfloat16's 8-bit mantissa multiplier is smaller than fp16's 11-bit one, so a real bf16 multiply "
        "costs less than this, which would favour the real-valued model, the one that multiplies more)",
    ),
    Precision("int8", 0.03, 0.2, 8, "8-bit integer: add 0.03 pJ, multiply 0.2 pJ, multiply-add 0.23 pJ"),
)
"""Both models at the same weight precision: the spiking model's accumulates add weights of the precision the ANN
multiplies (docs/CONVERSION.md, Energy)."""

DRAM_PJ_PER_64_BITS = 1300.0  # the low end of Horowitz's DRAM read, 1.3-2.6 nJ per 64 bits
MEMORY_PJ_PER_BIT = DRAM_PJ_PER_64_BITS / 64  # 20.3125 pJ per bit
MEMORY_SOURCE = (
    "Horowitz, ISSCC 2014, 45 nm: a 64-bit DRAM read costs 1.3-2.6 nJ (the default, 1.3 nJ / 64 = 20.3 pJ per bit, "
    "is its low end); a 64-bit SRAM read costs 10 pJ (8 KB), 20 pJ (32 KB) or 100 pJ (1 MB), i.e. 0.16-1.6 pJ per bit"
)
