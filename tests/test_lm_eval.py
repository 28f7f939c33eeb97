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


GOALS = ["buy a red ball", "paint the big house", "walk the small dog home", "cook rice", "fix an old red bike"]


def fake_goal_inference(n=12):
    """Cloze examples like BIG-bench goal_inference: steps and goals of different lengths, 3 to 5 goals each."""
    examples = []
    for i in range(n):
        goals = GOALS[: 3 + i % 3]
        step = " ".join(["take", "the", *["big"] * (i % 4), "ball"])
        examples.append(
            {
                "input": f"The most reasonable goal of '{step} {i}' is",
                "target_scores": {g: int(j == i % len(goals)) for j, g in enumerate(goals)},
            }
        )
    return {"name": "goal_inference", "examples": examples}


def test_a_spiking_checkpoint_is_scored_by_its_own_log_likelihoods(tmp_path, monkeypatch):
    """A GIF conversion saved with save_pretrained (as `spikelm spikify` does) goes through lm-eval's `spikelm`
    model type: the harness loads it spiking, and each choice's log-likelihood (batched, right-padded by lm-eval)
    equals the spiking model's own, computed here one sequence at a time without lm-eval; acc follows from those."""
    lm_eval = pytest.importorskip("lm_eval")
    from conftest import save_tiny_llama
    from transformers import AutoModelForCausalLM

    import spikelm
    from spikelm.conversion import is_spiking
    from spikelm.evaluation import lm_eval_adapter

    words = sorted(
        {w for g in GOALS for w in g.split()} | {"The", "most", "reasonable", "goal", "of", "'", "is", "take"}
    )
    tokenizer = save_tiny_llama(tmp_path / "real", words, hidden_size=32, intermediate_size=64, initializer_range=0.2)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "real", dtype=torch.float32)
    torch.manual_seed(1)
    spikelm.spikify(model, neuron="gif", calibration=torch.randint(3, len(tokenizer), (2, 24)))
    model.save_pretrained(tmp_path / "gif")
    # lm-eval pads its batches; without a pad token it would add one past the vocabulary
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(tmp_path / "gif")

    monkeypatch.setattr(sources, "bigbench_task", lambda task: fake_goal_inference())
    lm = lm_eval_adapter.SpikeLMEvalModel(pretrained=str(tmp_path / "gif"), device="cpu", dtype="float32", batch_size=8)
    assert is_spiking(lm.model)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=["spikelm_goal_inference"],
        task_manager=lm_eval_adapter.task_manager(include_defaults=False),
        random_seed=0,
        log_samples=True,
    )

    def log_likelihoods(reference, context, choices):
        start = tokenizer(context)["input_ids"]  # this tokenizer adds no BOS token, and lm-eval adds none either
        out = []
        for choice in choices:
            ids = start + tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = reference(torch.tensor([ids])).logits[0].log_softmax(-1)
            out.append(sum(logp[i - 1, ids[i]].item() for i in range(len(start), len(ids))))
        return out

    spiking_model = AutoModelForCausalLM.from_pretrained(tmp_path / "gif", dtype=torch.float32).eval()
    real_model = AutoModelForCausalLM.from_pretrained(tmp_path / "real", dtype=torch.float32).eval()
    assert is_spiking(spiking_model) and not is_spiking(real_model)
    samples = results["samples"]["spikelm_goal_inference"]
    assert len(samples) == 12 and {len(s["doc"]["choices"]) for s in samples} == {3, 4, 5}
    correct, gap_to_real = 0, 0.0
    for sample in samples:
        doc = sample["doc"]
        harness = [resp[0][0] for resp in sample["resps"]]
        spiking = log_likelihoods(spiking_model, doc["prompt"], doc["choices"])
        real = log_likelihoods(real_model, doc["prompt"], doc["choices"])
        assert harness == pytest.approx(spiking, abs=1e-4)
        gap_to_real = max(gap_to_real, max(abs(h - r) for h, r in zip(harness, real, strict=True)))
        correct += max(range(len(spiking)), key=spiking.__getitem__) == doc["label"]
    assert gap_to_real > 0.1  # the harness scored the spiking model, not its real-valued source
    assert results["results"]["spikelm_goal_inference"]["acc,none"] == pytest.approx(correct / len(samples))
