"""``spikelm pretrain``: presets and overrides, the training loop's outputs, exact resume after a
kill, data parallelism (2 CPU processes), and clear errors that leave existing files alone."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spikelm.commands.main import main
from spikelm.data.tokenization import sample_text_path
from spikelm.training.presets import PRESETS, resolve_config

SONNETS = str(sample_text_path())
# a micro model and recipe so that a run takes seconds on a CPU
MICRO = [
    "--set",
    "hidden_size=32",
    "--set",
    "num_hidden_layers=1",
    "--set",
    "num_attention_heads=2",
    "--set",
    "intermediate_size=64",
    "--set",
    "max_length=32",
    "--set",
    "batch_size=8",
    "--set",
    "eval_examples=16",
    "--set",
    "log_every=1",
    "--set",
    "eval_every=5",
]
REPO = Path(__file__).resolve().parents[1]


def pretrain(*args):
    return main(["pretrain", "--text-file", SONNETS, "--no-progress", *MICRO, *args])


def log_losses(run_dir):
    return {e["step"]: e["loss"] for e in map(json.loads, (Path(run_dir) / "train_log.jsonl").read_text().splitlines())}


def snapshot(directory):
    return {p: p.read_bytes() for p in Path(directory).rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------


def test_presets_carry_shape_and_recipe():
    tiny = resolve_config("tiny")
    assert (tiny.model["num_hidden_layers"], tiny.model["hidden_size"], tiny.model["num_attention_heads"]) == (
        2,
        128,
        2,
    )
    assert (
        tiny.batch_size == 32 and tiny.learning_rate == 1e-3 and tiny.num_warmup_steps == round(0.06 * tiny.max_steps)
    )
    for name, shape in {"mini": (4, 256, 4), "small": (4, 512, 8), "medium": (8, 512, 8)}.items():
        m = resolve_config(name).model
        assert (m["num_hidden_layers"], m["hidden_size"], m["num_attention_heads"]) == shape
    base = resolve_config("base")  # SPEC section 4
    assert (base.model["num_hidden_layers"], base.model["hidden_size"], base.model["intermediate_size"]) == (
        12,
        768,
        3072,
    )
    assert base.model["head_hidden_act"] == "relu" and base.model["num_steps"] == 4
    assert (base.learning_rate, base.weight_decay, base.num_warmup_steps, base.batch_size) == (2e-4, 0.0, 5000, 512)
    assert (base.max_steps, base.total_schedule_steps, base.max_length, base.objective) == (
        100_000,
        500_000,
        128,
        "mlm-nsp",
    )


def test_overrides_from_file_then_set(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: mini\nlearning_rate: 0.0005\nmodel:\n  num_steps: 2\nseed: 3\n")
    config = resolve_config(None, path, ["learning_rate=2e-3", "spike_levels=binary", "warmup_steps=7"])
    assert config.preset == "mini" and config.learning_rate == 2e-3 and config.seed == 3
    assert config.model["num_steps"] == 2 and config.model["spike_levels"] == "binary" and config.num_warmup_steps == 7
    assert config.model["hidden_size"] == PRESETS["mini"]["model"]["hidden_size"]
    json_path = tmp_path / "run.json"
    json_path.write_text(json.dumps({"batch_size": 16}))
    assert resolve_config("tiny", json_path).batch_size == 16


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"preset": "huge"}, "unknown preset 'huge'"),
        ({"sets": ["no_such_field=1"]}, "unknown config key 'no_such_field'"),
        ({"sets": ["learning_rate"]}, "FIELD=VALUE"),
        ({"sets": ["batch_size=many"]}, "batch_size expects a int"),
        ({"sets": ["objective=gpt"]}, "objective must be one of"),
        ({"sets": ["num_steps=0"]}, None),
    ],
)
def test_bad_configs_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        config = resolve_config(**kwargs)
        from spikelm import SpikeLMConfig

        SpikeLMConfig(**config.model)  # a bad model field is caught when the model config is built


def test_clm_builds_the_causal_spikelm():
    from spikelm import SpikeLMForCausalLM
    from spikelm.data.tokenization import load_bert_tokenizer
    from spikelm.training.pretrain import build_model

    tok = load_bert_tokenizer()
    config = resolve_config("mini", sets=["objective=clm", "max_length=64"])
    model = build_model(config, tok)
    assert type(model) is SpikeLMForCausalLM and model.neurons()
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_steps) == (4, 256, 4, 4)
    # positions cover the training blocks; generate() stops at the separator between documents
    assert c.max_position_embeddings == 64 and c.eos_token_id == tok.sep_token_id and c.vocab_size == len(tok)
    real = build_model(resolve_config("tiny", sets=["objective=clm", "spiking=false"]), tok)
    assert not real.config.spiking and not real.neurons()


# ----------------------------------------------------------------------------------------------
# runs
# ----------------------------------------------------------------------------------------------


def test_pretrain_run_writes_a_loadable_model_logs_and_metrics(tmp_path, capsys):
    from transformers import AutoTokenizer

    from spikelm import SpikeLMForPreTraining

    out = tmp_path / "run"
    assert pretrain("--max-steps", "10", "--output-dir", str(out)) == 0
    assert "validation loss" in capsys.readouterr().out
    model = SpikeLMForPreTraining.from_pretrained(out)
    assert model.alphas_initialized and model.config.hidden_size == 32
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("the quick brown fox", add_special_tokens=False).input_ids == [1996, 4248, 2829, 4419]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 10 and metrics["tokens_per_second"] > 0 and metrics["peak_rss_mb"] > 0
    for key in ("initial_validation", "final_validation"):
        assert {"loss", "accuracy", "nsp_accuracy", "unigram_loss"} <= set(metrics[key])
    assert metrics["final_validation"]["loss"] < metrics["initial_validation"]["loss"]
    assert sorted(log_losses(out)) == list(range(1, 11))
    assert list((out / "tensorboard").iterdir())
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert latest.name == "step-00000010" and (latest / "optimizer.pt").is_file()
    assert (latest / "rng-0.pt").is_file() and json.loads((latest / "trainer_state.json").read_text())["step"] == 10


def test_mlm_only_objective_trains_a_masked_lm(tmp_path):
    from transformers import AutoModelForMaskedLM

    out = tmp_path / "mlm"
    assert pretrain("--objective", "mlm", "--max-steps", "3", "--output-dir", str(out)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "nsp_accuracy" not in metrics["final_validation"]
    assert type(AutoModelForMaskedLM.from_pretrained(out)).__name__ == "SpikeLMForMaskedLM"


def test_unigram_baseline_is_the_loss_of_corpus_frequencies():
    import numpy as np

    from spikelm.data.corpora import load_corpus
    from spikelm.data.tokenization import load_bert_tokenizer
    from spikelm.training.pretrain import PretrainingData

    tok = load_bert_tokenizer()
    config = resolve_config("tiny")
    data = PretrainingData(config, tok, load_corpus(text_file=SONNETS), 1, 0)
    log_p = data.unigram_log_probs()
    counts = np.bincount(data.train.tokens, minlength=len(tok))
    token = int(data.train.tokens[0])
    assert float(log_p[token]) == pytest.approx(np.log((counts[token] + 1) / (counts.sum() + len(tok))))
    assert float(log_p.exp().sum()) == pytest.approx(1.0)


@pytest.mark.slow
def test_killed_run_resumes_exactly(tmp_path):
    args = ["--max-steps", "10", "--set", "save_every=4"]
    full = tmp_path / "full"
    assert pretrain(*args, "--output-dir", str(full)) == 0

    # the same run, SIGKILLed right after its 6th optimizer step (its last checkpoint is step 4)
    killed = tmp_path / "killed"
    script = (
        "import os, signal, sys\n"
        "from torch.optim.lr_scheduler import LambdaLR\n"
        "step = LambdaLR.step\n"
        "def step_then_die(self, *args, **kwargs):\n"
        "    step(self, *args, **kwargs)\n"
        "    if self.last_epoch == 6:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "LambdaLR.step = step_then_die\n"
        "from spikelm.commands.main import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    cmd = [
        sys.executable,
        "-c",
        script,
        "pretrain",
        "--text-file",
        SONNETS,
        "--no-progress",
        *MICRO,
        *args,
        "--output-dir",
        str(killed),
    ]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == -9, res.stderr[-2000:]
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    assert not (killed / "metrics.json").exists() and max(log_losses(killed)) == 5

    assert pretrain(*args, "--output-dir", str(killed)) == 2  # a started run is not restarted by accident
    assert pretrain(*args, "--output-dir", str(killed), "--resume") == 0
    assert_same_run(full, killed, 10)


def assert_same_run(full, resumed, steps):
    """An interrupted-and-resumed run reproduces the uninterrupted one: losses, weights, validation."""
    from safetensors.torch import load_file

    full_losses, resumed_losses = log_losses(full), log_losses(resumed)
    assert sorted(resumed_losses) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert abs(full_losses[step] - resumed_losses[step]) <= 1e-6, step
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)
    m_full, m_resumed = (json.loads((d / "metrics.json").read_text()) for d in (full, resumed))
    assert m_full["final_validation"] == m_resumed["final_validation"]
    assert m_full["initial_validation"] == m_resumed["initial_validation"]


DDP_SCRIPT = """
import sys, torch
from safetensors.torch import save_file
from spikelm.training.presets import resolve_config
from spikelm.training.pretrain import run_pretraining
out, sets = sys.argv[1], sys.argv[2:]
torch.set_num_threads(1)
result = run_pretraining(resolve_config("tiny", sets=sets), out, progress=False)
rank = torch.distributed.get_rank()
save_file({k: v.detach().clone() for k, v in result.model.state_dict().items()}, f"{out}/rank{rank}.safetensors")
"""


@pytest.mark.slow
def test_two_processes_end_with_identical_parameters_and_alphas(tmp_path):
    from safetensors.torch import load_file

    # no dropout, so that one process on the whole global batch sets the same alphas
    sets = [s for s in MICRO if s != "--set"] + [
        f"text_file={SONNETS}",
        "hidden_dropout_prob=0.0",
        "attention_probs_dropout_prob=0.0",
        "max_steps=4",
    ]
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        str(out),
        *sets,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert r0.keys() == r1.keys()
    alphas = [k for k in r0 if k.endswith(".alpha")]
    assert alphas and all(r0[k].ne(1.0).all() for k in alphas)  # initialised from data
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name
    assert json.loads((out / "metrics.json").read_text())["processes"] == 2
    # alpha was set from the statistics of the global first batch, summed over both processes
    from spikelm.data.corpora import load_corpus
    from spikelm.data.tokenization import load_bert_tokenizer
    from spikelm.training.pretrain import PretrainingData, build_model

    config, tok = resolve_config("tiny", sets=sets), load_bert_tokenizer()
    global_batch = PretrainingData(config, tok, load_corpus(text_file=SONNETS), 1, 0).micro_batches(0, 0)[0]
    torch.manual_seed(config.seed)
    single = build_model(config, tok).train()
    with torch.no_grad():
        single(**global_batch)
    for name, neuron in single.neurons():
        torch.testing.assert_close(neuron.alpha, r0[f"{name}.alpha"], atol=1e-5, rtol=1e-5, msg=name)


def test_processes_take_different_slices_of_the_global_batch():
    from spikelm.data.corpora import load_corpus
    from spikelm.data.tokenization import load_bert_tokenizer
    from spikelm.training.pretrain import PretrainingData

    tok = load_bert_tokenizer()
    config = resolve_config("tiny", sets=["batch_size=8", "grad_accum=2", "max_length=32"])
    corpus = load_corpus(text_file=SONNETS)
    ranks = [PretrainingData(config, tok, corpus, 2, r).micro_batches(0, 1) for r in (0, 1)]
    single = PretrainingData(config, tok, corpus, 1, 0)
    whole = torch.cat([b["input_ids"] for b in single.micro_batches(0, 1)])
    # global batch = [micro 0: rank 0, rank 1 | micro 1: rank 0, rank 1], 2 sequences each
    parts = torch.cat(
        [ranks[0][0]["input_ids"], ranks[1][0]["input_ids"], ranks[0][1]["input_ids"], ranks[1][1]["input_ids"]]
    )
    assert torch.equal(parts, whole)


# ----------------------------------------------------------------------------------------------
# bad input: a clear error, nothing overwritten
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "corpus_bytes, message",
    [
        (None, "argument --text-file: "),
        (b"", "0 document"),
        (bytes(range(256)) * 64, "is not UTF-8 text"),
    ],
)
def test_bad_corpus_is_a_clear_error(tmp_path, capsys, corpus_bytes, message):
    path = tmp_path / "corpus.txt"
    if corpus_bytes is not None:
        path.write_bytes(corpus_bytes)
    out = tmp_path / "out"
    assert main(["pretrain", "--text-file", str(path), *MICRO, "--output-dir", str(out)]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_unknown_preset_or_key_is_a_clear_error(tmp_path, capsys):
    assert main(["pretrain", "--preset", "huge", "--output-dir", str(tmp_path / "o")]) == 2
    assert "unknown preset 'huge'; presets: tiny, mini, small, medium, base" in capsys.readouterr().err
    assert main(["pretrain", "--set", "lerning_rate=1e-3", "--output-dir", str(tmp_path / "o")]) == 2
    assert "unknown config key 'lerning_rate'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_output_dir_of_another_run_and_checkpoint_of_another_shape(tmp_path, capsys):
    first = tmp_path / "first"
    assert pretrain("--max-steps", "2", "--output-dir", str(first)) == 0
    before = snapshot(first)
    capsys.readouterr()
    # another model shape into the same directory
    assert pretrain("--max-steps", "2", "--set", "hidden_size=64", "--output-dir", str(first)) == 2
    assert "holds a different `spikelm pretrain` run" in capsys.readouterr().err
    # resuming another shape's checkpoint into a new directory
    checkpoint = first / "checkpoints" / (first / "checkpoints" / "latest").read_text().strip()
    assert (
        pretrain(
            "--max-steps",
            "4",
            "--set",
            "hidden_size=64",
            "--output-dir",
            str(tmp_path / "second"),
            "--resume",
            str(checkpoint),
        )
        == 2
    )
    assert "model.hidden_size 64 differs from the recorded run's 32" in capsys.readouterr().err
    assert not (tmp_path / "second").exists()
    # a directory holding other files
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert pretrain("--max-steps", "2", "--output-dir", str(tmp_path / "mine")) == 2
    assert "not empty" in capsys.readouterr().err
    assert snapshot(first) == before and (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_causal_pretraining_end_to_end(tmp_path, capsys):
    """A tiny causal SpikeLM trained a few steps; the saved directory works with generate and perplexity."""
    import math

    import numpy as np
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "clm"
    assert (
        pretrain(
            "--objective", "clm", "--tokenizer", "bert-base-uncased", "--max-steps", "15", "--output-dir", str(out)
        )
        == 0
    )
    assert "validation perplexity" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    start, end = metrics["initial_validation"], metrics["final_validation"]
    assert metrics["objective"] == "clm" and "nsp_accuracy" not in end
    assert end["loss"] < start["loss"] and log_losses(out)[15] < log_losses(out)[1]
    assert end["perplexity"] == pytest.approx(math.exp(end["loss"]))
    # next-token targets: every position but the first of each of the 16 validation blocks of 32 tokens
    assert start["tokens"] == 16 * 31
    assert metrics["unigram_baseline_perplexity"] == pytest.approx(math.exp(metrics["unigram_baseline_loss"]))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "SpikeLMForCausalLM" and model.alphas_initialized

    # the unigram baseline: the training stream's token counts (documents' tokens + one separator each)
    from spikelm.data.corpora import load_corpus
    from spikelm.data.tokenization import load_bert_tokenizer
    from spikelm.training.pretrain import PretrainingData

    tok = load_bert_tokenizer()
    data = PretrainingData(resolve_config("tiny", sets=["objective=clm"]), tok, load_corpus(text_file=SONNETS), 1, 0)
    counts = load_file(out / "token_counts.safetensors")["counts"]
    expected = np.bincount(data.train.tokens, minlength=len(tok))
    expected[tok.sep_token_id] += data.train.num_documents
    assert np.array_equal(counts.numpy(), expected)

    assert main(["generate", "--model", str(out), "--prompt", "Shall I compare thee", "--max-new-tokens", "8"]) == 0
    assert "generated" in capsys.readouterr().out
    text = tmp_path / "eval.txt"
    text.write_text("From fairest creatures we desire increase,\nThat thereby beauty's rose might never die.\n")
    assert (
        main(["perplexity", "--model", str(out), "--text-file", str(text), "--output-dir", str(tmp_path / "ppl")]) == 0
    )
    result = json.loads((tmp_path / "ppl" / "perplexity.json").read_text())
    ids = tok(text.read_text(), add_special_tokens=False).input_ids
    log_p = np.log((expected + 1) / (expected + 1).sum())
    assert result["unigram_perplexity"] == pytest.approx(math.exp(-log_p[ids[1:]].mean()))
    assert result["tokens_scored"] == len(ids) - 1 and result["perplexity"] > 1


@pytest.mark.slow
@pytest.mark.parametrize("spiking", ["true", "false"])
def test_causal_run_resumed_equals_uninterrupted(tmp_path, spiking):
    """Stopped after 3 of 6 steps (the schedule fixed at 6), then resumed: the same losses and weights."""
    args = [
        "--objective",
        "clm",
        "--tokenizer",
        "bert-base-uncased",
        "--set",
        f"spiking={spiking}",
        "--set",
        "schedule_steps=6",
        "--set",
        "save_every=3",
    ]
    full, parts = tmp_path / "full", tmp_path / "parts"
    assert pretrain(*args, "--max-steps", "6", "--output-dir", str(full)) == 0
    assert pretrain(*args, "--max-steps", "3", "--output-dir", str(parts)) == 0
    assert pretrain(*args, "--max-steps", "6", "--output-dir", str(parts), "--resume") == 0
    assert_same_run(full, parts, 6)


def test_train_tokenizer_command(tmp_path):
    from transformers import AutoTokenizer

    assert (
        main(
            [
                "data",
                "train-tokenizer",
                "--text-file",
                SONNETS,
                "--vocab-size",
                "500",
                "--output-dir",
                str(tmp_path / "wp"),
            ]
        )
        == 0
    )
    tok = AutoTokenizer.from_pretrained(tmp_path / "wp")
    assert len(tok) <= 500 and tok.mask_token == "[MASK]"


@pytest.mark.slow
def test_the_documented_command_as_written(tmp_path):
    from spikelm import SpikeLMForPreTraining

    out = tmp_path / "tiny"
    cmd = [
        sys.executable,
        "-m",
        "spikelm",
        "pretrain",
        "--preset",
        "tiny",
        "--text-file",
        SONNETS,
        "--max-steps",
        "2",
        "--output-dir",
        str(out),
    ]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    model = SpikeLMForPreTraining.from_pretrained(out)
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.num_attention_heads) == (2, 128, 2)
    assert (out / "tokenizer.json").is_file() and max(log_losses(out)) <= 2
