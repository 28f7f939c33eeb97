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
