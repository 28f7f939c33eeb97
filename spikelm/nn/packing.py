"""Packed spike codes for the key/value caches of spiking decoders.

Ternary codes q in {-1, 0, 1} are stored as digits ``q + 1`` in {0, 1, 2}, ``per_byte`` to a byte:

* 4 per byte (2 bits each, the default of the caches): a row of 16G values (the last axis padded to a multiple
  of 16) is G 32-bit words; byte i of word g holds value ``k * 4G + 4g + i`` in its bits 2k, 2k+1. Read as
  little-endian words, ``(words >> 2k) & 0x03030303`` is then the k-th quarter of the row, one digit per byte, in
  order: unpacking is four shifts of the words, one mask and a cast (:func:`unpack_ternary_words`).
* 5 per byte (base 3, 3^5 = 243 <= 256, 1.6 bits per value): unpacking is one table lookup per byte
  (:func:`ternary_table`, :func:`unpack_ternary`), slower on CPU. The last axis is padded to a multiple of 5.

Only the last axis (the head dimension d) is packed: every other axis (batch, heads, positions) stays where it
was, so reordering, selecting and cropping a cache along them works on the packed bytes directly. Both decoders
compute ``alpha_t * q`` exactly as the unpacked cache does (the code in the compute dtype times the step's scale,
then cast; ``d * alpha - alpha`` with d in {0, 1, 2} is exact), so the attention reads bit-identical inputs.

Multi-level codes (GIF: integers 0..top) are packed to their bit width as bit planes: plane k holds bit k of 8
consecutive values per byte (:func:`pack_bits` / :func:`unpack_bits`).
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.nn.functional as F

PER_BYTE = (4, 5)
GROUP = 16  # values per 32-bit word at 4 per byte
_MASK = 0x03030303
_LITTLE_ENDIAN = sys.byteorder == "little"


def packed_width(width: int, per_byte: int) -> int:
    if per_byte == 4:
        return -(-width // GROUP) * 4
    return -(-width // per_byte)


def _digit_weights(per_byte: int, device) -> torch.Tensor:
    return torch.tensor([3**i for i in range(per_byte)], dtype=torch.uint8, device=device)


def pack_ternary(codes: torch.Tensor, per_byte: int = 5) -> torch.Tensor:
    """(…, d) codes in {-1, 0, 1} (any integer or float dtype) -> (…, ceil(d / per_byte)) uint8."""
    if per_byte not in PER_BYTE:
        raise ValueError(f"per_byte must be one of {PER_BYTE}, got {per_byte!r}")
    digits = (codes.to(torch.int8) + 1).to(torch.uint8)
    if per_byte == 4:
        pad = (-digits.shape[-1]) % GROUP
        if pad:
            digits = F.pad(digits, (0, pad), value=1)
        fields = digits.view(*digits.shape[:-1], 4, -1)  # (…, k, 4G): quarter k of the row
        return fields[..., 0, :] | (fields[..., 1, :] << 2) | (fields[..., 2, :] << 4) | (fields[..., 3, :] << 6)
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


_warned_endian = False


def _digits_of_words(packed: torch.Tensor) -> torch.Tensor:
    """(…, 4G) bytes at 4 per byte -> (…, 16G) uint8 digits in {0, 1, 2}, in value order."""
    global _warned_endian
    if _LITTLE_ENDIAN:
        words = packed.contiguous().view(torch.int32)  # (…, G)
        quarters = torch.empty((*words.shape[:-1], 4, words.shape[-1]), dtype=torch.int32, device=packed.device)
        for k in range(4):  # scalar shifts of contiguous words (a broadcast shift is several times slower on CPU)
            torch.bitwise_right_shift(words, 2 * k, out=quarters[..., k, :])
        return quarters.bitwise_and_(_MASK).view(torch.uint8).flatten(-2)
    if not _warned_endian:
        _warned_endian = True
        warnings.warn(
            "spikelm: a big-endian platform: the packed spike cache unpacks byte by byte (slower), not by 32-bit words",
            RuntimeWarning,
            stacklevel=2,
        )
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device).view(4, 1)
    return ((packed.unsqueeze(-2) >> shifts) & 3).flatten(-2)  # (…, k, 4G) -> value k * 4G + byte


def unpack_ternary_words(
    packed: torch.Tensor,
    scale: torch.Tensor,
    width: int,
    dtype: torch.dtype,
    compute_dtype: torch.dtype,
    steps_into_batch: bool = False,
) -> torch.Tensor:
    """Decode (B, T*H, L, w) bytes packed 4 per byte -> (B, T*H, L, width) values ``(q * scale_t).to(dtype)``
    (or (T*B, H, L, width) with ``steps_into_batch``, time-major in the batch axis)."""
    batch, heads, length, nbytes = packed.shape
    steps = scale.shape[0]
    split = packed.view(batch, steps, heads // steps, length, nbytes)
    if steps_into_batch:
        split = split.transpose(0, 1).contiguous()  # the small packed bytes move, not the decoded values
        shape, view = (steps * batch, heads // steps, length), (steps, 1, 1, 1, 1)
    else:
        shape, view = (batch, heads, length), (1, steps, 1, 1, 1)
    a = scale.to(compute_dtype).view(view)
    values = _digits_of_words(split).to(compute_dtype).mul_(a).sub_(a)  # d * alpha - alpha = q * alpha, exactly
    values = values.view(*shape, values.shape[-1])
    values = values if values.dtype == dtype else values.to(dtype)
    return values if values.shape[-1] == width else values[..., :width]


def unpack_ternary_codes(packed: torch.Tensor, width: int, per_byte: int = 5) -> torch.Tensor:
    """(…, w) packed bytes -> (…, width) int8 codes in {-1, 0, 1} (the inverse of :func:`pack_ternary`)."""
    if per_byte == 4:
        return (_digits_of_words(packed).to(torch.int8) - 1)[..., :width]
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
