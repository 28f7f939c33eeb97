"""convert-official: the authors' checkpoints in, a SpikeLMForPreTraining directory out; bad input refused."""

import json

import pytest
import torch
from conftest import FIXTURES, load_fixture
from safetensors.torch import save_file

from spikelm import SpikeLMForPreTraining
from spikelm.commands.main import main
from spikelm.conversion.official import CheckpointError, load_official_checkpoint
from spikelm.errors import RefusedPickleError

CKPT = FIXTURES / "tiny_spikelm_bert_official_state_dict.safetensors"


def _official():
    from safetensors import safe_open

    with safe_open(str(CKPT), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["config"])


def test_convert_cli_then_from_pretrained_reproduces_logits(tmp_path, capsys):
    out = tmp_path / "converted"
    assert main(["convert-official", str(CKPT), "--output-dir", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    model = SpikeLMForPreTraining.from_pretrained(out).eval()
    assert model.config.head_hidden_act == "relu" and model.config.hidden_act == "gelu"
    assert model.config.num_steps == 4 and not model.config.tie_word_embeddings
    io = load_fixture("tiny_spikelm_bert_official_io.safetensors")
    with torch.no_grad():
        res = model(input_ids=io["input_ids"], attention_mask=io["attention_mask"], token_type_ids=io["token_type_ids"])
    torch.testing.assert_close(res.prediction_logits, io["prediction_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(res.seq_relationship_logits, io["seq_relationship_logits"], atol=1e-4, rtol=0)


def test_bin_checkpoint_with_config_file_and_tied_decoder(tmp_path):
    sd, cfg = _official()
    sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"].clone()
    sd = {f"module.{k}": v for k, v in sd.items()}  # as saved from a DDP-wrapped model
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = load_official_checkpoint(tmp_path / "pytorch_model.bin", tmp_path / "config.json")
    assert model.config.tie_word_embeddings
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(
        model.bert.embeddings.word_embeddings.weight, sd["module.bert.embeddings.word_embeddings.weight"]
    )


def test_alpha_of_exactly_one_means_not_initialised(tmp_path):
    sd, cfg = _official()
    for k in sd:
        if "act_clip_val" in k or "clip_key" in k or "clip_value" in k:
            sd[k] = torch.tensor(1.0)
    path = tmp_path / "fresh.safetensors"
    save_file(sd, str(path), metadata={"config": json.dumps(cfg)})
    model = load_official_checkpoint(path)
    assert not model.alphas_initialized
    model(input_ids=torch.randint(0, 512, (2, 8)))  # initialises from this batch
    assert model.alphas_initialized


def _save(tmp_path, sd, cfg, name="bad.safetensors"):
    path = tmp_path / name
    save_file(sd, str(path), metadata={"config": json.dumps(cfg)})
    return path


def test_qkv_alpha_mismatch_is_refused_naming_the_projection(tmp_path):
    sd, cfg = _official()
    sd["bert.encoder.layer.1.attention.self.value.act_clip_val.2"] = torch.tensor(9.0)
    with pytest.raises(CheckpointError, match="layer 1.*value"):
        load_official_checkpoint(_save(tmp_path, sd, cfg))


def test_shape_mismatch_and_missing_keys_are_refused(tmp_path):
    sd, cfg = _official()
    sd["bert.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(100, 64)
    with pytest.raises(CheckpointError, match="shape.*intermediate"):
        load_official_checkpoint(_save(tmp_path, sd, cfg))
    sd, cfg = _official()
    del sd["bert.pooler.dense.weight"]
    with pytest.raises(CheckpointError, match="missing.*pooler"):
        load_official_checkpoint(_save(tmp_path, sd, cfg))
    sd, cfg = _official()
    cfg["num_hidden_layers"] = 1
    with pytest.raises(CheckpointError, match="unexpected.*layer.1"):
        load_official_checkpoint(_save(tmp_path, sd, cfg))
    sd, cfg = _official()
    cfg["T"] = 2
    with pytest.raises(CheckpointError, match="more time steps"):
        load_official_checkpoint(_save(tmp_path, sd, cfg))


def test_checkpoint_without_config_is_refused(tmp_path):
    sd, _ = _official()
    path = tmp_path / "noconfig.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match="--config"):
        load_official_checkpoint(path)


def test_pickled_code_is_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(RefusedPickleError, match="refused to load .*evil.bin") as refused:
        load_official_checkpoint(tmp_path / "evil.bin", tmp_path / "none.json")
    assert "weights_only=False" not in str(refused.value)


def test_cli_errors_are_one_line_and_nothing_is_written(tmp_path, capsys):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    assert main(["convert-official", str(CKPT), "--output-dir", str(occupied)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    assert sorted(p.name for p in occupied.iterdir()) == ["notes.txt"]
    assert main(["convert-official", str(tmp_path / "missing.bin"), "--output-dir", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # --overwrite writes into it; a second run into its own output is allowed
    assert main(["convert-official", str(CKPT), "--output-dir", str(occupied), "--overwrite"]) == 0
    assert main(["convert-official", str(CKPT), "--output-dir", str(occupied)]) == 0
    assert (occupied / "notes.txt").read_text() == "mine"
