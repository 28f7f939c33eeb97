"""The Brown corpus as plain evaluation text: reading the tagged files and `spikelm data prepare-brown`
(on a small tree in the package's layout: no download)."""

import json

import pytest

from spikelm.commands.main import main
from spikelm.data import brown

CA01 = (
    "\n\n\tThe/at Fulton/np-tl County/nn-tl Grand/jj-tl Jury/nn-tl said/vbd Friday/nr an/at investigation/nn "
    "produced/vbd ``/`` no/at evidence/nn ''/'' ./.\n\n\n"
    "\tIt/pps urged/vbd ,/, ``/`` take/vb steps/nns ''/'' (/( 1-1/2/cd weeks/nns )/) ./.\n"
    "Ivan/np Allen/np Jr./np ./.\n\n"
)
CR09 = "\n\n\tWell/uh ,/, she/pps said/vbd ;/. why/wrb not/*  ?/.\n\n"
EXPECTED = (
    'The Fulton County Grand Jury said Friday an investigation produced "no evidence".\n'
    'It urged, "take steps" (1-1/2 weeks). Ivan Allen Jr.\n'
    "\n"
    "Well, she said; why not?\n"
)


@pytest.fixture
def brown_tree(tmp_path):
    root = tmp_path / "package"
    root.mkdir()
    (root / "ca01").write_text(CA01)
    (root / "cr09").write_text(CR09)
    (root / "README").write_text("BROWN CORPUS\n")  # package files that are not documents
    (root / "cats.txt").write_text("ca01 news\ncr09 humor\n")
    return root


def test_tags_stripped_and_prose_spacing_restored(brown_tree):
    text, report = brown.brown_text(brown_tree)
    assert text == EXPECTED
    assert report["documents"] == 2 and report["paragraphs"] == 3
    assert report["tokens"] == sum(len((brown_tree / n).read_text().split()) for n in ("ca01", "cr09"))
    assert report["words"] == len(EXPECTED.split())
    assert set(report["genres"]) == {"press: reportage", "humor"}


def test_prepare_brown_command(brown_tree, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(brown, "fetch_brown", lambda: brown_tree)
    out = tmp_path / "out"
    assert main(["data", "prepare-brown", "--output-dir", str(out)]) == 0
    assert (out / "brown.txt").read_text() == EXPECTED
    assert json.loads((out / "brown_report.json").read_text())["documents"] == 2
    assert "spikelm perplexity" in capsys.readouterr().out
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["data", "prepare-brown", "--output-dir", str(tmp_path / "mine")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_a_directory_without_documents_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no Brown corpus documents"):
        brown.brown_text(tmp_path)


def test_every_nth_document(brown_tree, tmp_path, monkeypatch, capsys):
    (brown_tree / "cb01").write_text("\n\n\tMiddle/nn ./.\n\n")
    text, report = brown.brown_text(brown_tree, every=2)  # ca01, cb01, cr09 -> ca01, cr09
    assert text == EXPECTED and report["documents"] == 2 and report["every"] == 2
    assert "Middle" in brown.brown_text(brown_tree)[0]
    monkeypatch.setattr(brown, "fetch_brown", lambda: brown_tree)
    assert main(["data", "prepare-brown", "--every", "0", "--output-dir", str(tmp_path / "o")]) == 2
    assert "--every must be at least 1" in capsys.readouterr().err
