"""Zero-shot evaluation: the BIG-bench multiple-choice documents (no download: a made-up task file) and lm-eval's
own simple_evaluate on a tiny random LLaMA through the ``spikelm`` model type (skipped without lm-eval)."""

import json

import pytest
import torch

from spikelm.data import sources
from spikelm.evaluation import bigbench_mc


def fake_hyperbaton(n=400):
    examples = []
    for i in range(n):
        correct = "ab"[i % 2]
        examples.append(
            {
                "input": f'Which sentence has the correct adjective order: a " big red ball {i} " '
                f'b " red big ball {i} " ?',
                "target_scores": {"a": int(correct == "a"), "b": int(correct == "b")},
            }
        )
    return {"name": "hyperbaton", "examples": examples}


def test_documents_are_a_deterministic_test_subset():
    data = fake_hyperbaton()
    docs = bigbench_mc.task_examples("spikelm_hyperbaton", task_json=data)
    rule_test = [ex for ex in data["examples"] if bigbench_mc.TASKS["spikelm_hyperbaton"].in_test(ex["input"])]
    assert 0 < len(docs) == len(rule_test) < len(data["examples"]) // 4  # ~10 % held out
    assert docs == bigbench_mc.task_examples("spikelm_hyperbaton", task_json=data)
    reversed_data = {"examples": data["examples"][::-1]}
    assert docs == bigbench_mc.task_examples("spikelm_hyperbaton", task_json=reversed_data)  # file order irrelevant
    for doc in docs:
        assert doc["choices"] == ["a", "b"]
        assert doc["prompt"] == f"Q: {doc['input']}\nA:"
        number = int(doc["input"].split()[-3])
        assert doc["choices"][doc["label"]] == "ab"[number % 2]
    assert bigbench_mc.task_examples("spikelm_hyperbaton", max_examples=3, task_json=data) == docs[:3]
    summary = bigbench_mc.task_summary("spikelm_hyperbaton", docs)
    assert summary["n"] == len(docs) and summary["chance"] == 0.5 and 0.5 <= summary["majority"] <= 1


def test_every_task_writes_its_prompt_and_rejects_bad_examples():
    for task in bigbench_mc.TASKS.values():
        assert task.prompt("X").count("X") == 1
    # the first made-up input that falls in hyperbaton's test subset, with two correct answers
    text = next(f"x{i}" for i in range(10_000) if bigbench_mc.TASKS["spikelm_hyperbaton"].in_test(f"x{i}"))
    bad = {"examples": [{"input": text, "target_scores": {"a": 1, "b": 1}}]}
    with pytest.raises(ValueError, match="exactly one correct answer"):
        bigbench_mc.task_examples("spikelm_hyperbaton", task_json=bad)
    with pytest.raises(ValueError, match="unknown task"):
        bigbench_mc.task_examples("spikelm_nope", task_json=bad)


@pytest.fixture
def tiny_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from spikelm.data.tokenization import load_bert_tokenizer

    tokenizer = load_bert_tokenizer()
    # lm-eval starts each context with the BOS (else EOS) token: give the WordPiece vocabulary's [CLS]/[SEP] those roles
    tokenizer.add_special_tokens({"bos_token": "[CLS]", "eos_token": "[SEP]"})
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_simple_evaluate_on_a_tiny_llama(tiny_llama, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from spikelm.evaluation import lm_eval_adapter

    monkeypatch.setattr(sources, "bigbench_task", lambda task: fake_hyperbaton())
    results = lm_eval.simple_evaluate(
        model="spikelm",
        model_args=f"pretrained={tiny_llama},device=cpu,dtype=float32",
        tasks=["spikelm_hyperbaton"],
        limit=5,
        batch_size=4,
        task_manager=lm_eval_adapter.task_manager(include_defaults=False),
        random_seed=0,
    )
    metrics = results["results"]["spikelm_hyperbaton"]
    assert 0 <= metrics["acc,none"] <= 1 and 0 <= metrics["acc_norm,none"] <= 1
    total = len(bigbench_mc.task_examples("spikelm_hyperbaton", task_json=fake_hyperbaton()))
    assert results["n-samples"]["spikelm_hyperbaton"] == {"original": total, "effective": 5}


@pytest.mark.slow  # lm-eval's command line indexes all of lm-eval's own task files first
def test_the_command_line_wrapper_defaults_to_the_spikelm_model(tiny_llama, tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    from spikelm.evaluation import lm_eval_adapter

    assert lm_eval_adapter.harness_argv(["--tasks", "x"]) == ["run", "--model", "spikelm", "--tasks", "x"]
    assert lm_eval_adapter.harness_argv(["ls", "tasks"]) == ["ls", "tasks"]
    assert lm_eval_adapter.harness_argv(["--model", "hf"])[1:3] == ["--model", "hf"]

    monkeypatch.setattr(sources, "bigbench_task", lambda task: fake_hyperbaton())
    out = tmp_path / "out"
    assert (
        lm_eval_adapter.main(
            [
                "--model_args",
                f"pretrained={tiny_llama}",
                "--device",
                "cpu",
                "--tasks",
                "spikelm_hyperbaton",
                "--limit",
                "3",
                "--output_path",
                str(out),
            ]
        )
        == 0
    )
    (result_file,) = out.rglob("results_*.json")
    result = json.loads(result_file.read_text())
    assert result["n-samples"]["spikelm_hyperbaton"]["effective"] == 3
    assert 0 <= result["results"]["spikelm_hyperbaton"]["acc,none"] <= 1
    assert "spikelm_hyperbaton" in capsys.readouterr().out
