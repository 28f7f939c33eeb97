"""The layout holds: module names of source architectures appear only in their descriptions
(spikelm/conversion/architectures/, docs/CONVERSION.md "Adding an architecture")."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "spikelm"
ARCHITECTURES = PACKAGE / "conversion" / "architectures"

# the projection (and embedding) module names of the transformers families spikelm describes, and of common others
PROJECTIONS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "qkv_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "gate_up_proj",
    "c_attn",
    "c_fc",
    "c_proj",
    "query_key_value",
    "dense_h_to_4h",
    "dense_4h_to_h",
    "out_proj",
    "fc1",
    "fc2",
    "wte",
)
# Identifiers that contain a projection's name but are not module paths, kept because users already have them:
# ``online_down_proj_rotation`` is a field of saved conversion configs (config.json) and of the CLI's --set;
# ``attach_online_down_proj_rotation`` and the ``online_down_proj`` keyword / summary key of
# ``rotate_residual_stream`` are public API of spikelm.conversion.rotation.
LEGACY = {"online_down_proj_rotation", "attach_online_down_proj_rotation", "online_down_proj"}
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def projection_names(text: str) -> list[str]:
    """The identifiers (or path components) of ``text`` that name a projection, legacy names excepted."""
    return [
        token
        for token in IDENTIFIER.findall(text)
        if token not in LEGACY and any(name in token for name in PROJECTIONS)
    ]


def test_the_check_finds_a_projection_name():
    assert projection_names("x = layer.mlp.down_proj(h)  # down_proj's input") == ["down_proj", "down_proj"]
    assert projection_names("self.attn.c_attn; gate_up_proj") == ["c_attn", "gate_up_proj"]
    assert projection_names("config.online_down_proj_rotation = True") == []
    assert projection_names("the output projection's input; proj_out") == []


def test_no_module_outside_architectures_names_a_projection():
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{number}: {', '.join(names)}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if ARCHITECTURES not in path.parents
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if (names := projection_names(line))
    ]
    assert offenders == [], "\n".join(offenders)
