import subprocess
import sys


def test_entry_point_help():
    res = subprocess.run([sys.executable, "-m", "spikelm", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and all(c in res.stdout for c in ("convert-official", "pretrain", "data", "demo"))


def test_tokenizer_is_exact_bert_base_uncased():
    from spikelm.data.tokenization import load_bert_tokenizer

    tok = load_bert_tokenizer()
    assert tok("the quick brown fox", add_special_tokens=False).input_ids == [1996, 4248, 2829, 4419]
    assert len(tok) == 30522 and tok.cls_token_id == 101
