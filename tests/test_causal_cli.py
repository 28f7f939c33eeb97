"""`spikelm generate` and `spikelm perplexity`, and the sliding-window perplexity they use."""

import json

import pytest
import torch
import torch.nn.functional as F

from spikelm import SpikeLMConfig, SpikeLMForCausalLM, SpikeLMForMaskedLM
from spikelm.commands.main import main
from spikelm.data.tokenization import load_bert_tokenizer, sample_text_path
from spikelm.evaluation.perplexity import (
    load_causal_lm,
    load_tokenizer,
    read_text,
    sliding_window_perplexity,
    sliding_windows,
)


def tiny_causal(**overrides):
    kwargs = dict(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=40,
        num_steps=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    kwargs.update(overrides)
    model = SpikeLMForCausalLM(SpikeLMConfig(**kwargs)).eval()
    with torch.no_grad():
        model(torch.randint(0, kwargs["vocab_size"], (2, 16)))  # initialise the alphas
    return model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("causal")
    tiny_causal().save_pretrained(path)
    load_bert_tokenizer().save_pretrained(path)
    return path


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("num_tokens,window,stride", [(40, 16, 5), (40, 16, 15), (40, 16, 1), (10, 16, 8), (17, 16, 4)])
def test_sliding_windows_score_every_token_but_the_first_once(num_tokens, window, stride):
    spans = sliding_windows(num_tokens, window, stride)
    scored = [i for _, first, end in spans for i in range(first, end)]
    assert scored == list(range(1, num_tokens))
    for begin, first, end in spans:
        assert end - begin == min(window, num_tokens) and begin < first
        assert first == 1 or first - begin >= window - stride


def test_sliding_window_perplexity_matches_a_direct_computation():
    torch.manual_seed(1)
    model = tiny_causal(vocab_size=50, max_position_embeddings=16)
    ids = torch.randint(0, 50, (40,))
    window, stride = 16, 5
    result = sliding_window_perplexity(model, ids, window, stride, batch_size=3)
    # directly: each scored token from its own forward pass over the context its window gives it
    nll, count = 0.0, 0
    with torch.no_grad():
        for begin, first, end in sliding_windows(40, window, stride):
            for i in range(first, end):
                logits = model(ids[None, begin:i]).logits[0, -1]
                nll -= F.log_softmax(logits, -1)[ids[i]].item()
                count += 1
    assert result["tokens_scored"] == count == 39
    assert result["nll_sum"] == pytest.approx(nll, rel=1e-5)
    assert result["perplexity"] == pytest.approx(torch.tensor(nll / count).exp().item(), rel=1e-5)
    assert sliding_window_perplexity(model, ids, window, stride, batch_size=1)["nll_sum"] == pytest.approx(
        nll, rel=1e-5
    )


def test_read_text_file_and_directory(tmp_path):
    (tmp_path / "b").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / ".hidden").write_text("skipped")
    assert read_text(tmp_path) == "first\n\nsecond"
    assert read_text(tmp_path / "a.txt") == "first"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "bad").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_text(tmp_path)


def test_generate_command_prints_what_generate_returns(model_dir, capsys, tmp_path):
    prompts = ["shall i compare thee to a summer's day", "thou art more lovely"]
    code, out, _ = run_cli(
        capsys,
        "generate",
        "--model",
        str(model_dir),
        "--max-new-tokens",
        "6",
        "--prompt",
        prompts[0],
        "--prompt",
        prompts[1],
        "--output-dir",
        str(tmp_path / "gen"),
    )
    assert code == 0
    written = json.loads((tmp_path / "gen" / "generations.json").read_text())["generations"]
    model, tokenizer = load_causal_lm(model_dir), load_tokenizer(model_dir)
    for prompt, record in zip(prompts, written, strict=True):
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids])
        expected = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, ids.shape[1] :]
        assert record["continuation"] == tokenizer.decode(expected, skip_special_tokens=True)
        assert record["continuation"] in out
    for extra in (
        ["--do-sample", "--top-k", "5", "--top-p", "0.9", "--temperature", "0.7"],
        ["--num-beams", "2"],
        ["--no-cache"],
    ):
        assert (
            run_cli(
                capsys, "generate", "--model", str(model_dir), "--prompt", "hello", "--max-new-tokens", "3", *extra
            )[0]
            == 0
        )


def test_generate_command_errors(model_dir, capsys, tmp_path):
    mlm = tmp_path / "mlm"
    SpikeLMForMaskedLM(
        SpikeLMConfig(vocab_size=97, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    ).save_pretrained(mlm)
    cases = [
        (["--prompt", "   "], "is empty"),
        (["--prompt", "word " * 45], "longer than the model's maximum length 40"),
        (["--prompt", "word " * 30, "--max-new-tokens", "20"], "lower --max-new-tokens to at most 10"),
        (["--prompt", "hi", "--temperature", "0.5"], "add --do-sample"),
    ]
    for argv, message in cases:
        code, _, err = run_cli(capsys, "generate", "--model", str(model_dir), *argv)
        assert code == 2 and message in err, err
    code, _, err = run_cli(capsys, "generate", "--model", str(mlm), "--prompt", "hi")
    assert code == 2 and "SpikeLMForMaskedLM checkpoint, not a causal SpikeLM" in err
    code, _, err = run_cli(capsys, "generate", "--model", str(tmp_path / "none"), "--prompt", "hi")
    assert code == 2 and ("no config.json" in err or "no such directory" in err)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((model_dir / name).read_bytes())
    code, _, err = run_cli(capsys, "generate", "--model", str(bare), "--prompt", "hi")
    assert code == 2 and "pass --tokenizer" in err
    assert (
        run_cli(
            capsys,
            "generate",
            "--model",
            str(bare),
            "--tokenizer",
            str(model_dir),
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
        )[0]
        == 0
    )


def test_perplexity_command(model_dir, capsys, tmp_path):
    text = tmp_path / "text"
    text.mkdir()
    lines = sample_text_path().read_text().splitlines()[:60]
    (text / "part1").write_text("\n".join(lines[:30]))
    (text / "part2.txt").write_text("\n".join(lines[30:]))
    code, out, _ = run_cli(
        capsys,
        "perplexity",
        "--model",
        str(model_dir),
        "--text-file",
        str(text),
        "--stride",
        "7",
        "--output-dir",
        str(tmp_path / "ppl"),
    )
    assert code == 0 and "perplexity" in out
    result = json.loads((tmp_path / "ppl" / "perplexity.json").read_text())
    tokenizer = load_tokenizer(model_dir)
    ids = torch.tensor(tokenizer(read_text(text), add_special_tokens=False).input_ids)
    expected = sliding_window_perplexity(load_causal_lm(model_dir), ids, 40, 7)
    assert result["tokens_scored"] == ids.numel() - 1 == result["text_tokens"] - 1
    assert result["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)
    assert (result["window"], result["stride"]) == (40, 7)

    code, _, err = run_cli(capsys, "perplexity", "--model", str(model_dir), "--text-file", str(tmp_path / "no.txt"))
    assert code == 2 and "no such file" in err
    code, _, err = run_cli(capsys, "perplexity", "--model", str(model_dir), "--text-file", str(text), "--stride", "41")
    assert code == 2 and "--stride must be between 1 and" in err


def test_unigram_baseline_file(tmp_path):
    from safetensors.torch import save_file

    from spikelm.evaluation.perplexity import TOKEN_COUNTS_FILE, load_unigram_log_probs

    assert load_unigram_log_probs(tmp_path, 5) is None  # a model not trained by `spikelm pretrain`
    save_file({"counts": torch.tensor([3, 0, 1, 0, 6])}, str(tmp_path / TOKEN_COUNTS_FILE))
    log_p = load_unigram_log_probs(tmp_path, 5)
    assert torch.allclose(log_p.exp(), torch.tensor([4, 1, 2, 1, 7], dtype=torch.float64) / 15)
    with pytest.raises(ValueError, match="another run"):
        load_unigram_log_probs(tmp_path, 30522)
