import subprocess
import sys

from spikelm.cli import main


def test_demo_prints_firing_rates(capsys):
    assert main(["demo", "--num-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "layer.1.output.dense.neuron" in out and "T=2" in out


def test_entry_point_help():
    res = subprocess.run([sys.executable, "-m", "spikelm", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "convert-official" in res.stdout


def test_tokenizer_is_exact_bert_base_uncased():
    from spikelm.tokenization import load_bert_tokenizer

    tok = load_bert_tokenizer()
    assert tok("the quick brown fox", add_special_tokens=False).input_ids == [1996, 4248, 2829, 4419]
    assert len(tok) == 30522 and tok.cls_token_id == 101
