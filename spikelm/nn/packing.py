"""Packed spike codes for the key/value caches of spiking decoders.

Ternary codes q in {-1, 0, 1} are stored ``per_byte`` to a byte as base-3 digits of ``q + 1`` (5 per byte,
3^5 = 243 <= 256, 1.6 bits per value; or 4 per byte, the 2-bit layout). The last axis (the head dimension d) is
padded with zeros up to a multiple of ``per_byte``, so a (…, d) int8 code tensor packs to (…, ceil(d / per_byte))
uint8 and every other axis (batch, heads, positions) stays where it was: reordering, selecting and cropping a
cache along them works on the packed bytes directly.

Unpacking is one table lookup per byte: :func:`ternary_table` builds, for each time step t, the ``per_byte`` float
values ``alpha_t * q`` every byte decodes to, computed with the same arithmetic as the unpacked cache's decode
(the code in the compute dtype, times the step's scale, then cast), so the attention reads bit-identical inputs.

Multi-level codes (GIF: integers 0..top) are packed to their bit width as bit planes: plane k holds bit k of 8
consecutive values per byte (:func:`pack_bits` / :func:`unpack_bits`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PER_BYTE = (4, 5)


def packed_width(width: int, per_byte: int) -> int:
    return -(-width // per_byte)


def _digit_weights(per_byte: int, device) -> torch.Tensor:
    return torch.tensor([3**i for i in range(per_byte)], dtype=torch.uint8, device=device)


def pack_ternary(codes: torch.Tensor, per_byte: int = 5) -> torch.Tensor:
    """(…, d) codes in {-1, 0, 1} (any integer or float dtype) -> (…, ceil(d / per_byte)) uint8."""
    if per_byte not in PER_BYTE:
        raise ValueError(f"per_byte must be one of {PER_BYTE}, got {per_byte!r}")
    digits = (codes.to(torch.int8) + 1).to(torch.uint8)
    pad = (-digits.shape[-1]) % per_byte
    if pad:
        digits = F.pad(digits, (0, pad), value=1)  # the digit of q = 0
    digits = digits.view(*digits.shape[:-1], -1, per_byte)
    return (digits * _digit_weights(per_byte, digits.device)).sum(-1, dtype=torch.uint8)


def ternary_table(scale: torch.Tensor, per_byte: int, dtype: torch.dtype, compute_dtype: torch.dtype) -> torch.Tensor:
    """(T * 3^per_byte, per_byte) ``dtype``: row ``t * 3^per_byte + b`` holds the values byte b decodes to at step t.

    Each value is ``(q.to(compute_dtype) * scale[t].to(compute_dtype)).to(dtype)``.
    """
    rows = 3**per_byte
    byte = torch.arange(rows, device=scale.device)
    digits = torch.stack([(byte // 3**i) % 3 for i in range(per_byte)], dim=-1)  # (rows, per_byte)
    q = (digits - 1).to(torch.int8).to(compute_dtype)
    values = q[None] * scale.to(compute_dtype).view(-1, 1, 1)
    return values.to(dtype).reshape(-1, per_byte)


def unpack_ternary(
    packed: torch.Tensor, table: torch.Tensor, steps: int, width: int, steps_into_batch: bool = False
) -> torch.Tensor:
    """Decode (B, T*H, L, w) packed bytes with :func:`ternary_table`'s ``table`` -> (B, T*H, L, width) values.

    The step of head ``t*H + h`` is t (step-major heads, the caches' layout). With ``steps_into_batch`` the values
    come out as (T*B, H, L, width) instead, time-major in the batch axis (a converted model's layout).
    """
    batch, heads, length, nbytes = packed.shape
    per_byte = table.shape[-1]
    rows = table.shape[0] // steps
    offsets = torch.arange(0, steps * rows, rows, device=packed.device, dtype=torch.int32)
    split = packed.view(batch, steps, heads // steps, length, nbytes)
    if steps_into_batch:
        index = split.transpose(0, 1).to(torch.int32, memory_format=torch.contiguous_format)
        index += offsets.view(-1, 1, 1, 1, 1)
        shape = (steps * batch, heads // steps, length)
    else:
        index = split.to(torch.int32) + offsets.view(1, -1, 1, 1, 1)
        shape = (batch, heads, length)
    values = F.embedding(index.view(*shape, nbytes), table).view(*shape, nbytes * per_byte)
    return values if nbytes * per_byte == width else values[..., :width]


def unpack_ternary_codes(packed: torch.Tensor, width: int, per_byte: int = 5) -> torch.Tensor:
    """(…, w) packed bytes -> (…, width) int8 codes in {-1, 0, 1} (the inverse of :func:`pack_ternary`)."""
    digits = packed.to(torch.int16).unsqueeze(-1) // _digit_weights(per_byte, packed.device).to(torch.int16) % 3
    codes = (digits - 1).to(torch.int8).flatten(-2)
    return codes[..., :width]


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(…, d) integer codes in [0, 2^bits) -> (…, bits, ceil(d / 8)) uint8 bit planes."""
    values = codes.to(torch.int32)
    pad = (-values.shape[-1]) % 8
    if pad:
        values = F.pad(values, (0, pad))
    values = values.view(*values.shape[:-1], -1, 8)  # (…, d/8, 8)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int32)
    planes = [(((values >> k) & 1) << shifts).sum(-1) for k in range(bits)]
    return torch.stack(planes, dim=-2).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """(…, bits, w) bit planes -> (…, width) integer codes in ``dtype`` (the inverse of :func:`pack_bits`)."""
    bits = packed.shape[-2]
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32)
    planes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1  # (…, bits, w, 8)
    weights = (1 << torch.arange(bits, device=packed.device, dtype=torch.int32)).view(bits, 1, 1)
    values = (planes * weights).sum(-3).flatten(-2)
    return values[..., :width].to(dtype)
