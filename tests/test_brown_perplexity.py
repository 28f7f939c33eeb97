"""The conversion ladder's perplexity: disjoint windows (stride == window) and the Brown evaluation tokens
(on a two-document tree in the corpus package's layout: no download)."""

import pytest
import torch


def test_disjoint_windows_score_all_but_each_window_start():
    from spikelm.evaluation.perplexity import sliding_windows

    assert sliding_windows(12, 4, 4) == [(0, 1, 4), (4, 5, 8), (8, 9, 12)]
    assert sliding_windows(10, 4, 4) == [(0, 1, 4), (4, 5, 8), (6, 8, 10)]  # the tail: a full window, new tokens only
    assert sliding_windows(3, 4, 4) == [(0, 1, 3)]
    with pytest.raises(ValueError, match="between 1 and the window length"):
        sliding_windows(12, 4, 5)


def test_perplexity_with_disjoint_windows_matches_a_direct_computation():
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from spikelm.evaluation.brown_perplexity import perplexity

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
        )
    )
    ids = torch.randint(0, 50, (40,))
    result = perplexity(model, ids, window=8, stride=8, batch_size=3)
    nll = 0.0
    with torch.no_grad():
        for start in range(0, 40, 8):
            logits = model(ids[None, start : start + 8]).logits[0, :-1]
            nll += F.cross_entropy(logits, ids[start + 1 : start + 8], reduction="sum").item()
    assert result["tokens_scored"] == 40 - 5 and result["windows"] == 5 and result["tokens"] == 40
    assert result["nll_sum"] == pytest.approx(nll, rel=1e-5)
    assert model.training  # left as it was found


def test_brown_eval_tokens_are_the_start_of_the_brown_text(tmp_path):
    from spikelm.data.tokenization import load_bert_tokenizer
    from spikelm.evaluation.brown_perplexity import brown_eval_span, brown_eval_tokens

    root = tmp_path / "package"
    root.mkdir()
    (root / "ca01").write_text("\n\n\tThe/at jury/nn said/vbd ./.\n\n\tIt/pps urged/vbd ./.\n")
    (root / "cb02").write_text("\n\n\tWell/uh ,/, she/pps said/vbd ./.\n")
    tokenizer = load_bert_tokenizer()
    ids = brown_eval_tokens(tokenizer, num_tokens=6, root=root)
    assert tokenizer.decode(ids) == "the jury said. it urged"
    assert brown_eval_span(tokenizer, num_tokens=6, root=root)["documents"] == ["ca01"]
    assert brown_eval_span(tokenizer, num_tokens=9, root=root)["documents"] == ["ca01", "cb02"]
    with pytest.raises(ValueError, match="only 12 tokens"):
        brown_eval_tokens(tokenizer, num_tokens=100, root=root)
