import subprocess
import sys

from spikelm.commands.main import main


def test_demo_runs_its_steps_on_a_text_file(tmp_path, capsys, monkeypatch):
    from spikelm.data import sources
    from spikelm.data.tokenization import sample_text_path

    # the fine-tuning step's BBC articles, without the download: three topics with their own words
    words = {
        "sports": "match goal team season",
        "tech": "software phone computer chip",
        "business": "shares bank profit",
    }
    articles = [
        (f"bbcnews/data/{topic}/{i:03d}.txt", topic, f"{w} story {i}. " * 5)
        for topic, w in words.items()
        for i in range(40)
    ]
    monkeypatch.setattr(sources, "bbc_articles", lambda root=None: articles)

    micro = [
        "hidden_size=32",
        "num_hidden_layers=2",
        "num_attention_heads=2",
        "intermediate_size=64",
        "num_steps=2",
        "max_length=32",
        "batch_size=8",
        "eval_examples=16",
    ]
    args = [
        "demo",
        "--text-file",
        str(sample_text_path()),
        "--max-steps",
        "3",
        "--finetune-samples",
        "48",
        "--finetune-epochs",
        "1",
        "--output-dir",
        str(tmp_path / "demo"),
    ]
    for item in micro:
        args += ["--set", item]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "== 1/5 corpus" in out and "validation MLM loss" in out and "unigram baseline" in out
    assert "fine-tuned on bbc-topics" in out and "majority class" in out
    assert "ratio" in out and (tmp_path / "demo" / "energy" / "energy.json").is_file()
    assert "layer.1.output.dense.neuron" in out and "T=2" in out
    assert (tmp_path / "demo" / "pretrain" / "model.safetensors").is_file()
    assert main(args) == 0  # the demo's own directory is reused


def test_entry_point_help():
    res = subprocess.run([sys.executable, "-m", "spikelm", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and all(c in res.stdout for c in ("convert-official", "pretrain", "data", "demo"))


def test_tokenizer_is_exact_bert_base_uncased():
    from spikelm.data.tokenization import load_bert_tokenizer

    tok = load_bert_tokenizer()
    assert tok("the quick brown fox", add_special_tokens=False).input_ids == [1996, 4248, 2829, 4419]
    assert len(tok) == 30522 and tok.cls_token_id == 101
