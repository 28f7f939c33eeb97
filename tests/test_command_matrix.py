"""The contract of issue 14 item 6: every command that takes a model, fed every kind of model a user can build or save
with the public API, either works (exit 0, its output files written) or refuses in one line naming the model (exit
2, no output directory left behind). The table is README.md's "Commands x model kinds"; this test runs every cell on
tiny models.

Model kinds (all built here with the public API, no download):

* ``spikelm``: ``SpikeLMForPreTraining(SpikeLMConfig(...)).save_pretrained(d)`` (a fresh native encoder);
* ``spikelm-causal``: ``SpikeLMForCausalLM(SpikeLMConfig(...))`` saved with a tokenizer;
* ``auto-class``: ``AutoModelForSequenceClassification.from_config(SpikeLMConfig(...))`` saved;
* ``bert``: ``BertForMaskedLM(BertConfig(...)).save_pretrained(d)`` (a transformers BERT checkpoint);
* ``spikified``: ``LlamaForCausalLM`` converted with ``spikelm.spikify`` (GIF), ``save_pretrained`` + tokenizer;
* ``llama``: the plain ``LlamaForCausalLM`` (real-valued) + tokenizer;
* ``smollm2-135m``: the named source (resolved to the tiny LLaMA here: the name goes through the same resolver).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import word_tokenizer

from spikelm.commands.main import main

TEXT = "\n\n".join(f"the quick brown fox number {i} jumps over the lazy dog ." for i in range(120))
KINDS = ("spikelm", "spikelm-causal", "auto-class", "bert", "spikified", "llama", "smollm2-135m")
COMMANDS = ("finetune", "glue", "perplexity", "generate", "energy", "spikify", "distill", "convert-official")

W, R = "works", "refused"
# command -> kind -> (outcome, what the one-line refusal must contain / a file the working run writes)
EXPECTED = {
    "finetune": {
        "spikelm": (W, "eval_results.json"),
        "spikelm-causal": (R, "holds a SpikeLMForCausalLM (a causal decoder)"),
        "auto-class": (W, "eval_results.json"),
        "bert": (W, "eval_results.json"),
        "spikified": (R, "model_type 'llama'"),
        "llama": (R, "model_type 'llama'"),
        "smollm2-135m": (R, "causal language model (a named source)"),
    },
    "glue": {
        "spikelm": (W, "glue_results.json"),
        "spikelm-causal": (R, "holds a SpikeLMForCausalLM (a causal decoder)"),
        "auto-class": (W, "glue_results.json"),
        "bert": (W, "glue_results.json"),
        "spikified": (R, "model_type 'llama'"),
        "llama": (R, "model_type 'llama'"),
        "smollm2-135m": (R, "causal language model (a named source)"),
    },
    "perplexity": {
        "spikelm": (R, "not a causal"),
        "spikelm-causal": (W, "perplexity.json"),
        "auto-class": (R, "not a causal"),
        "bert": (R, "not a causal"),
        "spikified": (W, "perplexity.json"),
        "llama": (W, "perplexity.json"),
        "smollm2-135m": (W, "perplexity.json"),
    },
    "generate": {
        "spikelm": (R, "not a causal"),
        "spikelm-causal": (W, "generations.json"),
        "auto-class": (R, "not a causal"),
        "bert": (R, "not a causal"),
        "spikified": (W, "generations.json"),
        "llama": (W, "generations.json"),
        "smollm2-135m": (W, "generations.json"),
    },
    "energy": {kind: (W, "energy.json") for kind in KINDS},
    "spikify": {
        "spikelm": (R, "'spikelm' is not supported"),
        "spikelm-causal": (R, "'spikelm' is not supported"),
        "auto-class": (R, "'spikelm' is not supported"),
        "bert": (W, "spikify_summary.json"),
        "spikified": (R, "already spiking"),
        "llama": (W, "spikify_summary.json"),
        "smollm2-135m": (W, "spikify_summary.json"),
    },
    "distill": {
        "spikelm": (R, "not a causal"),
        "spikelm-causal": (W, "train_log.jsonl"),
        "auto-class": (R, "not a causal"),
        "bert": (R, "not a causal"),
        "spikified": (W, "train_log.jsonl"),
        "llama": (R, "are the same model"),  # the teacher itself as the student
        "smollm2-135m": (R, "named (real-valued) source"),
    },
    "convert-official": {
        **{kind: (R, "is a directory; expected a file") for kind in KINDS},
        "smollm2-135m": (R, "no such file"),
    },
}
SLOW = {("distill", k) for k in KINDS} | {("glue", k) for k in KINDS} | {("finetune", k) for k in KINDS}


def _word_tokenizer():
    return word_tokenizer(sorted(set(TEXT.split())), pad=True)


def build_kinds(root: Path) -> dict[str, Path]:
    """Every model kind, saved under ``root`` with the public API; also the text, task data and tokenizer."""
    from transformers import (
        AutoModelForSequenceClassification,
        BertConfig,
        BertForMaskedLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    import spikelm
    from spikelm import SpikeLMConfig, SpikeLMForCausalLM, SpikeLMForPreTraining

    torch.manual_seed(0)
    tok = _word_tokenizer()
    encoder = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    paths = {kind: root / kind for kind in KINDS if kind != "smollm2-135m"}
    SpikeLMForPreTraining(SpikeLMConfig(**encoder, max_position_embeddings=64)).save_pretrained(paths["spikelm"])
    SpikeLMForCausalLM(
        SpikeLMConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            pad_token_id=None,
        )
    ).save_pretrained(paths["spikelm-causal"])
    tok.save_pretrained(paths["spikelm-causal"])
    AutoModelForSequenceClassification.from_config(
        SpikeLMConfig(**encoder, max_position_embeddings=64, num_labels=2)
    ).save_pretrained(paths["auto-class"])
    BertForMaskedLM(BertConfig(**encoder, max_position_embeddings=64)).save_pretrained(paths["bert"])
    llama = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(llama).save_pretrained(paths["llama"])
    tok.save_pretrained(paths["llama"])
    model = LlamaForCausalLM.from_pretrained(paths["llama"])
    ids = torch.tensor([tok(TEXT)["input_ids"][:16]])
    spikelm.spikify(model, neuron="gif", calibration=ids)
    model.save_pretrained(paths["spikified"])
    tok.save_pretrained(paths["spikified"])
    (root / "text.txt").write_text(TEXT)
    sst2 = root / "glue" / "SST-2"
    sst2.mkdir(parents=True)
    rows = ["sentence\tlabel"] + [f"the quick fox {'jumps' if i % 2 else 'sleeps'}\t{i % 2}" for i in range(8)]
    for split in ("train", "dev"):
        (sst2 / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return paths


def argv_for(command: str, kind: str, paths: dict, out: Path) -> list[str]:
    model = kind if kind == "smollm2-135m" else str(paths[kind])
    root = paths["llama"].parent
    text = str(root / "text.txt")
    train = ["--epochs", "1", "--batch-size", "4", "--max-length", "16", "--max-train-samples", "8"]
    return {
        "finetune": ["finetune", "--model", model, "--task", "sst2", "--data-dir", str(root / "glue" / "SST-2"),
                     *train, "--output-dir", str(out)],
        "glue": ["glue", "--model", model, "--tasks", "sst2", "--data-dir", str(root / "glue"), "--variants", "model",
                 *train, "--output-dir", str(out)],
        "perplexity": ["perplexity", "--model", model, "--text-file", text, "--max-length", "16", "--output-dir",
                       str(out)],
        "generate": ["generate", "--model", model, "--prompt", "The quick brown", "--max-new-tokens", "3",
                     "--output-dir", str(out)],
        "energy": ["energy", "--model", model, "--text-file", text, "--max-length", "16", "--max-sequences", "2",
                   "--output-dir", str(out)],
        "spikify": ["spikify", "--model", model, "--calibration-text", text, "--calibration-sequences", "1",
                    "--calibration-length", "16", "--eval-tokens", "0", "--output-dir", str(out)],
        "distill": ["distill", "--teacher", str(paths["llama"]), "--student", model, "--text-file", text,
                    "--max-steps", "1", "--set", "max_length=16", "--set", "batch_size=2", "--set",
                    "eval_examples=1", "--no-progress", "--output-dir", str(out)],
        "convert-official": ["convert-official", model, "--output-dir", str(out)],
    }[command]  # fmt: skip


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    return build_kinds(tmp_path_factory.mktemp("kinds"))


@pytest.fixture
def named_sources(kinds, monkeypatch):
    """``smollm2-135m`` resolves to the tiny LLaMA (no download): the command sees only the name."""
    import spikelm.data.pretrained as pretrained

    monkeypatch.setitem(pretrained.NAMED_SOURCES, "smollm2-135m", lambda: kinds["llama"])


def _cells():
    for command in COMMANDS:
        for kind in KINDS:
            marks = [pytest.mark.slow] if (command, kind) in SLOW and EXPECTED[command][kind][0] == W else []
            yield pytest.param(command, kind, id=f"{command}-{kind}", marks=marks)


@pytest.mark.parametrize("command,kind", list(_cells()))
def test_command_on_model_kind(command, kind, kinds, named_sources, tmp_path, capsys):
    outcome, detail = EXPECTED[command][kind]
    out = tmp_path / "out"
    code = main(argv_for(command, kind, kinds, out))
    captured = capsys.readouterr()
    if outcome == W:
        assert code == 0, captured.err[-2000:]
        assert list(out.rglob(detail)), f"{detail} not written under {out}"
        for found in out.rglob("*.json"):
            json.loads(found.read_text())
    else:
        lines = [line for line in captured.err.splitlines() if line.strip()]
        assert code == 2, captured.err[-2000:]
        assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
        assert lines[0].startswith(f"spikelm {command}: error:"), lines[0]
        assert detail in lines[0], lines[0]
        named = kind if kind == "smollm2-135m" else kinds[kind].name
        assert named in lines[0] or command == "convert-official", lines[0]
        assert not out.exists(), "a refused run left its output directory behind"
    shutil.rmtree(out, ignore_errors=True)
