"""A compact, lossless payload of the converted SmolLM2-135M (and its training tokens) for a GPU machine that
reaches nothing and has no ``gguf``: build it here, carry it there, rebuild the float32 safetensors there.

Why: the device tool carries at most 64 MiB per call, and the SmolLM2 GGUF is 98 MB. Its float32 safetensors
(538 MB) hold weights that stay on the GGUF's grids: every 32-weight block of a Q4_1 tensor is ``d * q + m``
(``q`` in 0..15, ``d`` and ``m`` float16), the Q8_0 token embedding is ``d * q`` (``q`` in -127..127, ``d``
float16). The payload stores ``q`` (two per byte for Q4_1, one int8 for Q8_0) and ``d``, ``m`` (float16,
byte planes split and lzma-compressed) and rebuilds every tensor in float32 as ``d * q + m``: ``d * q`` is
exact in float32 (an 11-bit mantissa times a 4- or 8-bit integer), so the one rounding of the sum gives the same
bits wherever it runs (with or without a fused multiply-add). Each tensor is packed only if its rebuild is bit for
bit the original (checked at packing); any other tensor (the norms) is stored as it is.

The codes' order-0 entropy is 3.855 bits per 4-bit code and 7.464 per 8-bit code (measured over all of SmolLM2's):
77.6 MB before any scale, so no lossless coding fits the weights in one 64 MiB call: the payload is cut into parts
of at most ``--part-mib`` (default 56) MiB, each carried by one device call (see docs/BENCHMARKS.md, "GPU run:
prepared, not yet run").

Layout: ``<out>/part1``, ``<out>/part2``, ...; every part holds ``index.json`` (the same file) and some of the
chunk files it names (``sha256`` of each). :func:`unpack_model` takes the part directories (any order, on any
paths) and writes a model directory that ``from_pretrained`` loads. Also in the payload: the tokenizer and config
files, and token ids (uint16) of the default ``pypi`` corpus's two splits (documents concatenated in order, as
:func:`spikelm.conversion.recipes.calibration_batches` reads them, with document offsets) and the first 32,768
tokens of the Brown evaluation text.

Usage (here, where the converted model is cached; needs the project's usual environment)::

    python benchmarks/gpu_payload.py --out .gpu_payload

This module needs only numpy and the standard library at import time, so ``gpu_run.py`` imports it on the device.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

FORMAT = "spikelm-gpu-payload/1"
BLOCK = 32
CHUNK_BYTES = 8 << 20  # streams are cut into files of this size, so parts can be filled to their limit
INDEX = "index.json"
MODEL_FILE = "model.safetensors"


# ----------------------------------------------------------------------------------------------
# Grids: find (q, d, m) for a float32 tensor, or say it is not on the grid
# ----------------------------------------------------------------------------------------------


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def q4_1_rebuild(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Blocks (n, 32) of float32 from codes (n, 32) uint8 and float16 d, m (n,)."""
    return d.astype(np.float32)[:, None] * q.astype(np.float32) + m.astype(np.float32)[:, None]


def q8_0_rebuild(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    return d.astype(np.float32)[:, None] * q.astype(np.float32)


def to_q4_1_grid(a: np.ndarray) -> np.ndarray:
    """``a`` (float32, last dimension a multiple of 32) moved onto a Q4_1 grid (for tests and the tiny run)."""
    blocks = np.asarray(a, np.float32).reshape(-1, BLOCK)
    lo, hi = blocks.min(1), blocks.max(1)
    d, m = ((hi - lo) / 15).astype(np.float16), lo.astype(np.float16)
    df = d.astype(np.float32)[:, None]
    q = np.clip(np.rint((blocks - m.astype(np.float32)[:, None]) / np.where(df > 0, df, 1)), 0, 15).astype(np.uint8)
    return q4_1_rebuild(q, d, m).reshape(a.shape)


def to_q8_0_grid(a: np.ndarray) -> np.ndarray:
    """``a`` moved onto a Q8_0 grid."""
    blocks = np.asarray(a, np.float32).reshape(-1, BLOCK)
    d = (np.abs(blocks).max(1) / 127).astype(np.float16)
    df = d.astype(np.float32)[:, None]
    q = np.clip(np.rint(blocks / np.where(df > 0, df, 1)), -127, 127).astype(np.int8)
    return q8_0_rebuild(q, d).reshape(a.shape)


def _fp16_neighbours(d16: np.ndarray, k: int) -> np.ndarray:
    """``d16`` moved ``k`` float16 steps (toward +inf for k > 0), for non-negative finite values."""
    bits = d16.view(np.uint16).astype(np.int32) + k
    return np.clip(bits, 0, 0x7BFF).astype(np.uint16).view(np.float16)


def fit_q4_1(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(q, d, m) with ``q4_1_rebuild(q, d, m)`` bit-identical to ``blocks`` (n, 32) float32, else None."""
    lo, hi = blocks.min(1), blocks.max(1)
    m = lo.astype(np.float16)
    if not np.array_equal(_bits(m.astype(np.float32)), _bits(lo)):
        return None  # the block minimum is q = 0, i.e. m itself: it must be a float16
    guess = ((hi - lo) / 15).astype(np.float16)
    q = np.zeros(blocks.shape, np.uint8)
    d = np.zeros(len(blocks), np.float16)
    todo = np.ones(len(blocks), bool)
    for k in (0, -1, 1, -2, 2, -3, 3):
        if not todo.any():
            break
        idx = np.nonzero(todo)[0]
        dk = _fp16_neighbours(guess[idx], k)
        df = dk.astype(np.float32)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            qk = np.where(df > 0, np.rint((blocks[idx] - lo[idx, None]) / np.where(df > 0, df, 1)), 0)
        qk = np.clip(qk, 0, 15).astype(np.uint8)
        ok = np.all(_bits(q4_1_rebuild(qk, dk, m[idx])) == _bits(blocks[idx]), axis=1)
        q[idx[ok]], d[idx[ok]] = qk[ok], dk[ok]
        todo[idx[ok]] = False
    return None if todo.any() else (q, d, m)


def fit_q8_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(q int8, d float16) with ``q8_0_rebuild(q, d)`` bit-identical to ``blocks``, else None."""
    amax = np.abs(blocks).max(1)
    guess = (amax / 127).astype(np.float16)
    q = np.zeros(blocks.shape, np.int8)
    d = np.zeros(len(blocks), np.float16)
    todo = np.ones(len(blocks), bool)
    for k in (0, -1, 1, -2, 2):
        if not todo.any():
            break
        idx = np.nonzero(todo)[0]
        dk = _fp16_neighbours(guess[idx], k)
        df = dk.astype(np.float32)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            qk = np.where(df > 0, np.rint(blocks[idx] / np.where(df > 0, df, 1)), 0)
        qk = np.clip(qk, -127, 127).astype(np.int8)
        ok = np.all(_bits(q8_0_rebuild(qk, dk)) == _bits(blocks[idx]), axis=1)
        q[idx[ok]], d[idx[ok]] = qk[ok], dk[ok]
        todo[idx[ok]] = False
    return None if todo.any() else (q, d)


# ----------------------------------------------------------------------------------------------
# Packing a state dict into streams, and back
# ----------------------------------------------------------------------------------------------


class _Streams:
    """Named byte streams that tensors append to; each becomes chunk files."""

    def __init__(self):
        self.parts: dict[str, list[bytes]] = {}
        self.sizes: dict[str, int] = {}

    def put(self, name: str, data: bytes) -> list[int]:
        offset = self.sizes.get(name, 0)
        self.parts.setdefault(name, []).append(data)
        self.sizes[name] = offset + len(data)
        return [name, offset, len(data)]

    def bytes_of(self, name: str) -> bytes:
        return b"".join(self.parts[name])


def _planes(a: np.ndarray) -> bytes:
    """A float16 array's bytes as two planes (low bytes, then high): lzma compresses them far better."""
    b = np.ascontiguousarray(a, dtype=np.float16).view(np.uint8).reshape(-1, 2)
    return b[:, 0].tobytes() + b[:, 1].tobytes()


def _unplanes(data: bytes) -> np.ndarray:
    b = np.frombuffer(data, np.uint8)
    n = len(b) // 2
    return np.stack([b[:n], b[n:]], 1).copy().view(np.float16).reshape(-1)


def pack_state_dict(state: dict[str, np.ndarray], grids: bool = True) -> tuple[dict, _Streams]:
    """Encode every tensor (float32 numpy arrays; other dtypes stored as they are): ``q4_1`` or ``q8_0`` where a
    bit-identical rebuild exists (checked here), else ``raw``. Returns the tensor index and the streams."""
    streams = _Streams()
    tensors = {}
    for name in sorted(state):
        a = np.ascontiguousarray(state[name])
        entry = {"shape": list(a.shape), "dtype": str(a.dtype)}
        fitted = None
        if grids and a.dtype == np.float32 and a.ndim >= 2 and a.shape[-1] % BLOCK == 0 and a.size:
            blocks = a.reshape(-1, BLOCK)
            fitted = fit_q4_1(blocks)
            if fitted is not None:
                q, d, m = fitted
                entry.update(
                    encoding="q4_1",
                    codes=streams.put("q4", (q[:, 0::2] | (q[:, 1::2] << 4)).tobytes()),
                    d=streams.put("scales", d.tobytes()),
                    m=streams.put("scales", m.tobytes()),
                )
            else:
                fitted = fit_q8_0(blocks)
                if fitted is not None:
                    q, d = fitted
                    entry.update(
                        encoding="q8_0", codes=streams.put("q8", q.tobytes()), d=streams.put("scales", d.tobytes())
                    )
        if fitted is None:
            entry.update(encoding="raw", data=streams.put("raw", a.tobytes()))
        tensors[name] = entry
    return tensors, streams


def _read(entry_ref, streams: dict[str, bytes]) -> bytes:
    name, offset, size = entry_ref
    return streams[name][offset : offset + size]


def unpack_tensor(entry: dict, streams: dict[str, bytes]) -> np.ndarray:
    shape, enc = tuple(entry["shape"]), entry["encoding"]
    if enc == "raw":
        return np.frombuffer(_read(entry["data"], streams), dtype=np.dtype(entry["dtype"])).reshape(shape).copy()
    d = np.frombuffer(_read(entry["d"], streams), np.float16)
    if enc == "q4_1":
        packed = np.frombuffer(_read(entry["codes"], streams), np.uint8).reshape(len(d), BLOCK // 2)
        q = np.empty((len(d), BLOCK), np.uint8)
        q[:, 0::2], q[:, 1::2] = packed & 0x0F, packed >> 4
        m = np.frombuffer(_read(entry["m"], streams), np.float16)
        return q4_1_rebuild(q, d, m).reshape(shape)
    if enc == "q8_0":
        q = np.frombuffer(_read(entry["codes"], streams), np.int8).reshape(len(d), BLOCK)
        return q8_0_rebuild(q, d).reshape(shape)
    raise ValueError(f"unknown tensor encoding {enc!r}")


# ----------------------------------------------------------------------------------------------
# Files: streams -> chunk files in parts, and back
# ----------------------------------------------------------------------------------------------

# streams that lzma shrinks a lot (the others, near-random codes, are stored as they are)
COMPRESSED = {"scales", "raw", "files", "tokens"}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_payload(
    out: Path, tensors: dict, streams: _Streams, files: dict[str, bytes], extra: dict, part_mib: float = 56.0
) -> dict:
    """Write the chunk files into ``out/part1``, ``out/part2``, ... (each at most ``part_mib`` MiB, the index
    included) and ``index.json`` into every part. ``files``: small files of the model directory (config,
    tokenizer), stored in the ``files`` stream; ``extra``: more index fields (token arrays' places, notes).
    Returns the index."""
    file_refs = {}
    for name in sorted(files):
        file_refs[name] = streams.put("files", files[name])
    if "scales" in streams.parts:  # store float16 scales as byte planes
        streams.parts["scales"] = [_planes(np.frombuffer(streams.bytes_of("scales"), np.float16))]
    chunks = []  # (file name, stream, raw bytes, stored bytes)
    for stream in sorted(streams.parts):
        data = streams.bytes_of(stream)
        if stream in COMPRESSED:
            stored = lzma.compress(data, preset=6)
            chunks.append((f"{stream}.xz", stream, len(data), stored))
        else:
            for i in range(0, len(data), CHUNK_BYTES):
                chunks.append(
                    (
                        f"{stream}-{i // CHUNK_BYTES:03d}.bin",
                        stream,
                        len(data[i : i + CHUNK_BYTES]),
                        data[i : i + CHUNK_BYTES],
                    )
                )
    limit = int(part_mib * 2**20) - (1 << 20)  # room for the index
    parts: list[list] = [[]]
    used = 0
    for chunk in sorted(chunks, key=lambda c: -len(c[3])):  # first fit, largest first
        if len(chunk[3]) > limit:
            raise ValueError(f"chunk {chunk[0]} ({len(chunk[3])} bytes) is larger than a part ({limit} bytes)")
        if used + len(chunk[3]) > limit:
            parts.append([])
            used = 0
        parts[-1].append(chunk)
        used += len(chunk[3])
    index = {
        "format": FORMAT,
        "tensors": tensors,
        "files": file_refs,
        "streams": {
            s: {"bytes": streams.sizes[s] if s != "scales" else len(streams.bytes_of(s))} for s in streams.parts
        },
        "chunks": [
            {
                "file": f,
                "stream": s,
                "raw_bytes": raw,
                "stored_bytes": len(data),
                "lzma": f.endswith(".xz"),
                "sha256": _sha256(data),
                "part": p + 1,
            }
            for p, part in enumerate(parts)
            for f, s, raw, data in part
        ],
        **extra,
    }
    # chunks of one stream in order of their names
    index["chunks"].sort(key=lambda c: (c["stream"], c["file"]))
    if out.exists():
        others = [p.name for p in out.iterdir() if not (p.name.startswith("part") or p.name == "sizes.json")]
        if others:  # never remove a folder that is not an earlier payload
            raise ValueError(
                f"{out} holds other files than a payload ({', '.join(sorted(others)[:3])}); not replacing it"
            )
        shutil.rmtree(out)
    for p, part in enumerate(parts):
        folder = out / f"part{p + 1}"
        folder.mkdir(parents=True)
        for f, _s, _raw, data in part:
            (folder / f).write_bytes(data)
        (folder / INDEX).write_text(json.dumps(index) + "\n")
    return index


def expand_dirs(dirs) -> list[Path]:
    """Part folders: a folder holding ``index.json`` as it is, else the ``part*`` folders inside it."""
    found = []
    for d in map(Path, dirs):
        found.extend([d] if (d / INDEX).is_file() else sorted(p for p in d.glob("part*") if p.is_dir()))
    return found


def read_streams(dirs: list[Path]) -> tuple[dict, dict[str, bytes]]:
    """The index and every stream's bytes from the part directories ``dirs`` (checked against their sha256)."""
    dirs = expand_dirs(dirs)
    index = None
    for d in dirs:
        if (d / INDEX).is_file():
            index = json.loads((d / INDEX).read_text())
            break
    if index is None:
        raise FileNotFoundError(f"no {INDEX} in {', '.join(map(str, dirs))}")
    if index.get("format") != FORMAT:
        raise ValueError(f"payload format {index.get('format')!r}, expected {FORMAT!r}")
    pieces: dict[str, list[bytes]] = {}
    for chunk in index["chunks"]:
        found = [d / chunk["file"] for d in dirs if (d / chunk["file"]).is_file()]
        if not found:
            raise FileNotFoundError(
                f"payload chunk {chunk['file']} (part {chunk['part']}) is in none of {', '.join(map(str, dirs))}"
            )
        data = found[0].read_bytes()
        if _sha256(data) != chunk["sha256"]:
            raise ValueError(f"payload chunk {found[0]} does not match its sha256")
        pieces.setdefault(chunk["stream"], []).append(lzma.decompress(data) if chunk["lzma"] else data)
    streams = {name: b"".join(parts) for name, parts in pieces.items()}
    if "scales" in streams:
        streams["scales"] = _unplanes(streams["scales"]).tobytes()
    return index, streams


def unpack_state_dict(dirs: list[Path]) -> tuple[dict[str, np.ndarray], dict, dict[str, bytes]]:
    index, streams = read_streams(dirs)
    state = {name: unpack_tensor(entry, streams) for name, entry in index["tensors"].items()}
    return state, index, streams


def token_array(index: dict, streams: dict[str, bytes], name: str) -> np.ndarray:
    """A token array the payload carries (``pypi_train``, ``pypi_validation``, ``brown``, and ``*_offsets``)."""
    ref = index["token_arrays"][name]
    return np.frombuffer(_read(ref["data"], streams), dtype=np.dtype(ref["dtype"])).copy()


def unpack_model(dirs: list[Path], model_dir: Path) -> tuple[dict, dict[str, bytes]]:
    """Rebuild the model directory (``model.safetensors`` float32, config and tokenizer files) from the parts."""
    from safetensors.numpy import save_file

    state, index, streams = unpack_state_dict(dirs)
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(model_dir / MODEL_FILE), metadata={"format": "pt"})
    for name, ref in index["files"].items():
        (model_dir / name).write_bytes(_read(ref, streams))
    return index, streams


def add_token_arrays(streams: _Streams, arrays: dict[str, np.ndarray]) -> dict:
    refs = {}
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        refs[name] = {"dtype": str(a.dtype), "length": int(a.size), "data": streams.put("tokens", a.tobytes())}
    return refs


def check_round_trip(state: dict[str, np.ndarray], dirs: list[Path]) -> int:
    """Unpack ``dirs`` and compare every tensor with ``state`` bit for bit; returns the number compared."""
    got, _, _ = unpack_state_dict(dirs)
    if set(got) != set(state):
        raise ValueError(f"payload tensors differ: {sorted(set(got) ^ set(state))[:5]}")
    for name, a in state.items():
        b = got[name]
        if a.shape != b.shape or a.dtype != b.dtype or a.tobytes() != b.tobytes():
            raise ValueError(f"payload tensor {name} is not bit-identical to the original")
    return len(got)


# ----------------------------------------------------------------------------------------------
# The SmolLM2 payload (run here)
# ----------------------------------------------------------------------------------------------


def _corpus_tokens(tokenizer) -> dict[str, np.ndarray]:
    from spikelm.data.corpora import DEFAULT_CORPUS, load_corpus

    corpus = load_corpus(DEFAULT_CORPUS)
    arrays = {}
    for split in ("train", "validation"):
        ids, offsets = [], [0]
        for text in corpus[split]["text"]:
            ids.extend(tokenizer(text, add_special_tokens=False).input_ids)
            offsets.append(len(ids))
        if max(ids) >= 2**16:
            raise ValueError("a token id does not fit uint16")
        arrays[f"pypi_{split}"] = np.asarray(ids, np.uint16)
        arrays[f"pypi_{split}_offsets"] = np.asarray(offsets, np.uint32)
    return arrays


def build_smollm2_payload(out: Path, part_mib: float, brown_tokens: int) -> dict:
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    from spikelm.data.pretrained import SMOLLM2_NAME, resolve_model_source
    from spikelm.evaluation.brown_perplexity import brown_eval_tokens

    started = time.perf_counter()
    model_dir = Path(resolve_model_source(SMOLLM2_NAME))
    print(f"model: {model_dir}", flush=True)
    state = load_file(str(model_dir / MODEL_FILE))
    tensors, streams = pack_state_dict(state)
    counts = {}
    for entry in tensors.values():
        counts[entry["encoding"]] = counts.get(entry["encoding"], 0) + 1
    print(f"tensors: {counts} ({time.perf_counter() - started:.0f} s)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    arrays = _corpus_tokens(tokenizer)
    arrays["brown"] = brown_eval_tokens(tokenizer, brown_tokens).numpy().astype(np.uint16)
    print(", ".join(f"{k} {v.size}" for k, v in arrays.items()), flush=True)
    refs = add_token_arrays(streams, arrays)
    files = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file() and p.name != MODEL_FILE}
    extra = {
        "model": SMOLLM2_NAME,
        "source_dir": str(model_dir),
        "token_arrays": refs,
        "notes": {
            "pypi": "the default corpus's splits, documents concatenated in order without special tokens",
            "brown": f"the first {brown_tokens} tokens of the Brown evaluation text (spikelm.evaluation)",
        },
    }
    index = write_payload(out, tensors, streams, files, extra, part_mib)
    dirs = sorted(out.glob("part*"))
    compared = check_round_trip(state, dirs)
    print(f"round trip: {compared} tensors bit-identical ({time.perf_counter() - started:.0f} s)", flush=True)
    return index


def describe(out: Path) -> dict:
    sizes = {p.name: sum(f.stat().st_size for f in p.iterdir()) for p in sorted(out.glob("part*"))}
    return {"parts_bytes": sizes, "total_bytes": sum(sizes.values())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", default=".gpu_payload", help="output folder (replaced)")
    parser.add_argument("--part-mib", type=float, default=56.0, help="largest part, MiB (default 56)")
    parser.add_argument("--brown-tokens", type=int, default=32768)
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        index = build_smollm2_payload(out, args.part_mib, args.brown_tokens)
    except Exception as err:  # noqa: BLE001 - one line, not a traceback
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    info = describe(out)
    streams = {s: v["bytes"] for s, v in index["streams"].items()}
    print(f"streams (raw bytes): {streams}")
    for name, size in info["parts_bytes"].items():
        print(f"{out / name}: {size} bytes ({size / 2**20:.2f} MiB)")
    print(f"total: {info['total_bytes']} bytes ({info['total_bytes'] / 2**20:.2f} MiB)")
    (out / "sizes.json").write_text(json.dumps({**info, "streams_raw_bytes": streams}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
