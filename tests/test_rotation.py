"""Exact weight transforms of a LLaMA-family model: Hadamard constructions, residual rotation, online rotation."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from spikelm.conversion.rotation import (
    OnlineHadamard,
    attach_online_down_proj_rotation,
    fold_rmsnorm_gains,
    hadamard_factors,
    hadamard_matrix,
    lm_head_is_tied,
    random_orthogonal_matrix,
    rotate_residual_stream,
    rotation_matrix,
    untie_word_embeddings,
)


def tiny(family="llama", hidden=48, ffn=96, tie=False, **overrides):
    kwargs = dict(
        vocab_size=71,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=2,
        num_attention_heads=4 if hidden % 8 == 0 else 2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        **overrides,
    )
    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }[family]
    model = model_cls(config_cls(**kwargs)).eval()
    with torch.no_grad():  # gains and biases away from their init, so folding them is exercised
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0, 0.1)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 24, 28, 36, 48, 96, 576, 1536])
def test_hadamard_construction(n):
    h = hadamard_matrix(n)
    assert h.shape == (n, n)
    assert bool(((h == 1) | (h == -1)).all())
    assert torch.equal(h @ h.t(), n * torch.eye(n, dtype=torch.float64))


def test_hadamard_factors_for_smollm2_sizes():
    assert hadamard_factors(576) == (12, 12, 4)
    assert hadamard_factors(1536) == (12, 128)
    assert hadamard_factors(4096) == (256, 16)
    assert hadamard_factors(6) is None and hadamard_factors(52) is None


@pytest.mark.parametrize(
    "n,kind,expected", [(48, "hadamard", "hadamard"), (52, "hadamard", "random"), (48, "random", "random")]
)
def test_rotation_matrix_is_orthogonal(n, kind, expected):
    q, used = rotation_matrix(n, kind, seed=3)
    assert used == expected
    torch.testing.assert_close(q @ q.t(), torch.eye(n, dtype=torch.float64))
    again, _ = rotation_matrix(n, kind, seed=3)
    assert torch.equal(q, again)  # seeded: rebuilt identically
    assert not torch.equal(q, rotation_matrix(n, kind, seed=4)[0])
    if used == "hadamard":
        assert torch.allclose(q.abs(), torch.full_like(q, n**-0.5))


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
        ),
    ],
)
def test_rotation_on_a_device(device):
    model = tiny("llama", tie=True)
    ids = torch.randint(0, 71, (2, 9))
    before = logits(model, ids)
    model.to(device)
    rotate_residual_stream(model, online_down_proj=True)
    assert relative_error(logits(model, ids.to(device)).cpu(), before) <= 1e-4


def test_random_orthogonal_matrix():
    q = random_orthogonal_matrix(10, seed=0)
    torch.testing.assert_close(q.t() @ q, torch.eye(10, dtype=torch.float64))


@pytest.mark.parametrize("size,kind", [(96, "hadamard"), (1536, "hadamard"), (52, "hadamard"), (20, "random")])
def test_online_hadamard_equals_the_dense_matrix(size, kind):
    x = torch.randn(3, 5, size)
    rotation = OnlineHadamard(size, seed=7, kind=kind)
    q, used = rotation_matrix(size, kind, seed=7)
    assert rotation.kind == used
    torch.testing.assert_close(rotation(x).double(), x.double() @ q, rtol=1e-5, atol=1e-5)
    assert rotation(x.to(torch.bfloat16)).dtype == torch.bfloat16
    assert not list(rotation.parameters()) and not list(rotation.buffers())


@pytest.mark.parametrize(
    "family,hidden,ffn,tie",
    [
        ("llama", 48, 96, False),
        ("llama", 48, 96, True),
        ("llama", 96, 192, True),
        ("llama", 52, 104, False),  # no Hadamard construction for 52: random orthogonal fallback
        ("qwen2", 48, 96, True),
        ("mistral", 48, 96, False),
    ],
)
@pytest.mark.parametrize("online", [False, True])
def test_rotation_keeps_the_logits(family, hidden, ffn, tie, online):
    torch.manual_seed(0)
    model = tiny(family, hidden, ffn, tie)
    ids = torch.randint(0, 71, (2, 9))
    before = logits(model, ids)
    summary = rotate_residual_stream(model, kind="hadamard", seed=0, online_down_proj=online)
    after = logits(model, ids)
    assert relative_error(after, before) <= 1e-4
    assert summary["untied_embeddings"] is tie and not lm_head_is_tied(model)
    assert summary["kind"] == ("random" if hidden == 52 else "hadamard")
    assert (summary["fallback"] is None) == (hidden != 52)
    assert summary["folded_norms"] == 2 * 2 + 1
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            assert bool((param == 1).all()), name
    if online:
        assert summary["online_down_proj"]["seed"] == 1 and summary["online_down_proj"]["layers_attached"] == 2
        assert "OnlineHadamard" in repr(model)
    # the rotation did change the weights: outliers are spread, not kept
    assert not torch.allclose(
        model.model.layers[0].self_attn.q_proj.weight,
        tiny(family, hidden, ffn, tie).model.layers[0].self_attn.q_proj.weight,
    )


def test_qwen2_biases_stay_with_readers():
    model = tiny("qwen2")
    bias = model.model.layers[0].self_attn.q_proj.bias.clone()
    rotate_residual_stream(model)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.bias, bias)


def test_writer_biases_rotate():
    model = tiny("llama", attention_bias=True, mlp_bias=True)
    ids = torch.randint(0, 71, (2, 9))
    before = logits(model, ids)
    rotate_residual_stream(model, online_down_proj=True)
    assert relative_error(logits(model, ids), before) <= 1e-4


def test_residual_stream_is_rotated():
    model = tiny("llama")
    ids = torch.randint(0, 71, (1, 6))
    with torch.no_grad():
        h_before = model(input_ids=ids, output_hidden_states=True).hidden_states[1].double()
        rotate_residual_stream(model, seed=5)
        h_after = model(input_ids=ids, output_hidden_states=True).hidden_states[1].double()
    q, _ = rotation_matrix(48, "hadamard", seed=5)
    torch.testing.assert_close(h_after, h_before @ q, rtol=1e-4, atol=1e-5)


def test_online_rotation_is_idempotent_and_recreatable(tmp_path):
    model = tiny("llama")
    ids = torch.randint(0, 71, (2, 9))
    before = logits(model, ids)
    attach_online_down_proj_rotation(model, seed=3)
    second = attach_online_down_proj_rotation(model, seed=3)
    assert second["layers_attached"] == 0
    assert len(model.model.layers[0].mlp.down_proj._forward_pre_hooks) == 1
    assert relative_error(logits(model, ids), before) <= 1e-4
    with pytest.raises(ValueError, match="already carries"):
        attach_online_down_proj_rotation(model, seed=4)
    # saved weights hold W H; a reload re-attaches the run-time half from (seed, kind) without folding again
    model.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert relative_error(logits(reloaded, ids), before) > 1e-3  # without the online half it is wrong
    attach_online_down_proj_rotation(reloaded, seed=3, fold=False)
    assert relative_error(logits(reloaded, ids), before) <= 1e-4


def test_online_rotation_runs_before_other_pre_hooks():
    model = tiny("llama")
    seen = []
    down = model.model.layers[0].mlp.down_proj
    down.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    captured = []
    handle = down.register_forward_pre_hook(lambda module, args: captured.append(args[0].clone()), prepend=True)
    ids = torch.randint(0, 71, (1, 5))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    attach_online_down_proj_rotation(model, seed=2)
    seen.clear()
    with torch.no_grad():
        model(input_ids=ids)
    rotated = OnlineHadamard(96, seed=2)(captured[0])
    torch.testing.assert_close(seen[0], rotated, rtol=1e-5, atol=1e-6)


def test_untied_rotated_model_saves_and_reloads(tmp_path):
    model = tiny("llama", tie=True)
    ids = torch.randint(0, 71, (2, 9))
    before = logits(model, ids)
    rotate_residual_stream(model)
    model.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert not reloaded.config.tie_word_embeddings and not lm_head_is_tied(reloaded)
    assert relative_error(logits(reloaded, ids), before) <= 1e-4


def test_fold_needs_untied_embeddings_and_a_supported_model():
    model = tiny("llama", tie=True)
    with pytest.raises(ValueError, match="untie"):
        fold_rmsnorm_gains(model)
    assert untie_word_embeddings(model) and not untie_word_embeddings(model)
    with pytest.raises(ValueError, match="described architecture"):
        rotate_residual_stream(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="kind"):
        rotation_matrix(8, "learned")


@pytest.mark.parametrize("rotate", [False, True])
def test_smoothing_keeps_the_logits_and_flattens_outlier_channels(rotate):
    from spikelm.conversion.smoothing import input_absmax, smooth_model

    model = tiny("qwen2", tie=True)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[5] = 30.0  # an outlier channel in q/k/v's input
    ids = torch.randint(0, 71, (2, 9))
    before = logits(model, ids)
    if rotate:
        rotate_residual_stream(model, online_down_proj=True)
    absmax = input_absmax(model, [ids[:1], ids[1:]])
    assert set(absmax) == {f"layers.{i}.{n}" for i in range(2) for n in ("qkv", "gate_up")}
    summary = smooth_model(model, absmax, alpha=0.5)
    assert summary["smoothed"] == 4
    assert relative_error(logits(model, ids), before) <= 1e-4
    after = input_absmax(model, ids)["layers.0.qkv"]
    before_qkv = absmax["layers.0.qkv"]
    assert after.max() / after.median() < before_qkv.max() / before_qkv.median()
    with pytest.raises(ValueError, match="alpha"):
        smooth_model(model, absmax, alpha=2)
