"""Model directories and pretraining checkpoints saved by earlier versions load and resume unchanged."""

import json
import shutil

import pytest
import torch
from conftest import FIXTURES

LEGACY = FIXTURES / "legacy"


def test_saved_causal_model_loads_with_the_same_logits():
    from transformers import AutoModelForCausalLM

    import spikelm.models  # noqa: F401  (registers model_type "spikelm")

    model = AutoModelForCausalLM.from_pretrained(LEGACY / "causal_model").eval()
    assert type(model).__name__ == "SpikeLMForCausalLM"
    assert model.alphas_initialized
    saved = torch.load(LEGACY / "causal_model_logits.pt", weights_only=True)
    with torch.no_grad():
        logits = model(input_ids=saved["input_ids"]).logits
    torch.testing.assert_close(logits, saved["logits"], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_saved_pretraining_checkpoint_resumes_as_before(tmp_path):
    from spikelm.data.tokenization import sample_text_path
    from spikelm.training.presets import resolve_config
    from spikelm.training.pretrain import run_pretraining

    expected = json.loads((LEGACY / "pretrain_resumed.json").read_text())
    sets = [*expected["sets"], f"tokenizer={LEGACY / 'tokenizer'}", f"text_file={sample_text_path()}"]
    # the checkpoint records the absolute paths of the checkout that wrote it; a resume (which must keep the
    # recorded settings) runs from this checkout, so the copy points those two fields here, nothing else changes
    checkpoint = tmp_path / "pretrain_checkpoint"
    shutil.copytree(LEGACY / "pretrain_checkpoint", checkpoint)
    recorded = json.loads((checkpoint / "pretrain_config.json").read_text())
    recorded.update(tokenizer=str(LEGACY / "tokenizer"), text_file=str(sample_text_path()))
    (checkpoint / "pretrain_config.json").write_text(json.dumps(recorded, indent=2))
    out = tmp_path / "resumed"
    run_pretraining(resolve_config("tiny", sets=sets), out, resume=str(checkpoint), progress=False)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = {str(e["step"]): e["loss"] for e in log}
    assert sorted(losses) == sorted(expected["losses"])
    for step, loss in expected["losses"].items():
        assert abs(losses[step] - loss) <= 1e-6, step
    final = json.loads((out / "metrics.json").read_text())["final_validation"]
    assert final == pytest.approx(expected["final_validation"], abs=1e-6)
