"""Load weights made elsewhere: the authors' SpikeLM-BERT checkpoints and real-valued BERT models.

Nothing here unpickles arbitrary code: ``.safetensors`` files are read with safetensors and
``.bin``/``.pt`` files with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch
from safetensors import safe_open

from spikelm.errors import MissingInputError, UserError, refused_pickle
from spikelm.models.configuration_spikelm import SpikeLMConfig

# the authors' BertConfig fields that carry over unchanged
_BERT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "type_vocab_size",
    "initializer_range",
    "layer_norm_eps",
    "pad_token_id",
)
# their spiking linear layers inside block N, by our name of the layer
_OFFICIAL_LINEARS = ("attention.output.dense", "intermediate.dense", "output.dense")


class CheckpointError(UserError):
    """A checkpoint that does not fit the model it is loaded into (the message says how)."""


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata (safetensors only; else empty) of a checkpoint file, safely."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from err
    if path.suffix not in (".bin", ".pt", ".pth"):
        raise CheckpointError(
            f"unknown checkpoint format {path.suffix!r} for {path}: expected .safetensors, .bin or .pt"
        )
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # Python objects besides tensors: refused, never unpickled
        raise refused_pickle(path, err) from None
    except Exception as err:
        raise CheckpointError(
            f"could not read {path} with torch.load(weights_only=True) (only plain tensors are accepted): {err}"
        ) from err
    for key in ("state_dict", "model", "model_state_dict"):  # common wrappers of a state dict
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj), {}


def official_config(config: dict, **overrides) -> SpikeLMConfig:
    """A :class:`SpikeLMConfig` from the authors' BertConfig-style dict (with their ``T``).

    Their ``hidden_act`` only drives the MLM head (their FFN is exact GELU), so it becomes
    ``head_hidden_act``; ``T`` becomes ``num_steps``.
    """
    if "T" not in config and "num_steps" not in config:
        raise CheckpointError("the checkpoint's config has no 'T' (number of time steps)")
    weight_bits = config.get("weight_bits", 32)
    if weight_bits != 32:
        raise CheckpointError(
            f"weight_bits={weight_bits} is not supported: SpikeLM keeps full-precision (32-bit) weights"
        )
    input_bits = config.get("input_bits", 2)
    if input_bits != 2:
        raise CheckpointError(f"input_bits={input_bits} is not supported: SpikeLM spikes are ternary (input_bits=2)")
    kwargs = {k: config[k] for k in _BERT_FIELDS if k in config}
    kwargs["num_steps"] = int(config.get("T", config.get("num_steps")))
    kwargs["head_hidden_act"] = config.get("hidden_act", "gelu")
    kwargs["hidden_act"] = "gelu"
    kwargs.update(overrides)
    return SpikeLMConfig(**kwargs)


def _strip_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state_dict and all(k.startswith("module.") for k in state_dict):  # saved from a DDP wrapper
        return {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


def _gather_alphas(state_dict, prefix: str, num_steps: int) -> torch.Tensor | None:
    keys = [f"{prefix}.{t}" for t in range(num_steps)]
    if not any(k in state_dict for k in keys):
        return None
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise CheckpointError(f"missing alpha(s) {missing} (the config says T={num_steps})")
    extra = f"{prefix}.{num_steps}"
    if extra in state_dict:
        raise CheckpointError(f"the checkpoint has {extra}: more time steps than the config's T={num_steps}")
    return torch.stack([state_dict.pop(k).reshape(()).float() for k in keys])


def _initialized_flag(alpha: torch.Tensor, name: str) -> torch.Tensor:
    """The authors' rule: an alpha of exactly 1.0 has never been initialised."""
    untouched = alpha == 1.0
    if bool(untouched.any()) and not bool(untouched.all()):
        raise CheckpointError(f"{name}: some steps' alphas are exactly 1.0 (uninitialised) and others are not")
    return torch.tensor(not bool(untouched.all()))


def convert_official_state_dict(state_dict: dict[str, torch.Tensor], config: SpikeLMConfig) -> dict[str, torch.Tensor]:
    """Rename the authors' SpikeLM-BERT keys to ``SpikeLMForPreTraining`` keys.

    Q, K and V weights are concatenated into one ``qkv`` layer; their three input alphas must be
    identical (they are whenever they were data-initialised on the same input).
    """
    sd = _strip_prefix(dict(state_dict))
    steps = config.num_steps
    out: dict[str, torch.Tensor] = {}
    sd.pop("bert.embeddings.position_ids", None)
    for key in [k for k in sd if k.endswith("weight_clip_val")]:  # unused by the released model
        sd.pop(key)

    def put_neuron(dst: str, alpha: torch.Tensor | None, src: str) -> None:
        if alpha is None:
            raise CheckpointError(f"missing alphas {src}.0 .. {src}.{steps - 1}")
        out[f"{dst}.alpha"] = alpha
        out[f"{dst}.initialized"] = _initialized_flag(alpha, src)

    for i in range(config.num_hidden_layers):
        src = f"bert.encoder.layer.{i}.attention.self"
        dst = f"bert.encoder.layer.{i}.attention.self"
        alphas = {p: _gather_alphas(sd, f"{src}.{p}.act_clip_val", steps) for p in ("query", "key", "value")}
        for part in ("key", "value"):
            if (
                alphas[part] is not None
                and alphas["query"] is not None
                and not torch.equal(alphas[part], alphas["query"])
            ):
                raise CheckpointError(
                    f"layer {i}: the input alphas of {part} ({alphas[part].tolist()}) differ from those of query "
                    f"({alphas['query'].tolist()}); SpikeLM shares one neuron for the Q/K/V input and cannot load "
                    "three different ones"
                )
        put_neuron(f"{dst}.qkv.neuron", alphas["query"], f"{src}.query.act_clip_val")
        for suffix in ("weight", "bias"):
            parts = [f"{src}.{p}.{suffix}" for p in ("query", "key", "value")]
            missing = [k for k in parts if k not in sd]
            if missing:
                raise CheckpointError(f"missing keys {missing}")
            out[f"{dst}.qkv.{suffix}"] = torch.cat([sd.pop(k) for k in parts], dim=0)
        put_neuron(f"{dst}.key_spike", _gather_alphas(sd, f"{src}.clip_key", steps), f"{src}.clip_key")
        put_neuron(f"{dst}.value_spike", _gather_alphas(sd, f"{src}.clip_value", steps), f"{src}.clip_value")
        for name in _OFFICIAL_LINEARS:
            base = f"bert.encoder.layer.{i}.{name}"
            put_neuron(f"{base}.neuron", _gather_alphas(sd, f"{base}.act_clip_val", steps), f"{base}.act_clip_val")

    decoder_bias = sd.pop("cls.predictions.decoder.bias", None)
    if decoder_bias is not None:
        bias = sd.get("cls.predictions.bias")
        if bias is None:
            sd["cls.predictions.bias"] = decoder_bias
        elif not torch.equal(bias, decoder_bias):
            raise CheckpointError("cls.predictions.decoder.bias differs from cls.predictions.bias; expected them tied")
    out.update(sd)  # embeddings, LayerNorms, dense weights, pooler and heads keep their names
    return out


def check_state_dict_fits(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointError` listing missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state_dict)
    tied = (
        set(getattr(model, "_tied_weights_keys", None) or {})
        if getattr(model.config, "tie_word_embeddings", False)
        else set()
    )
    missing = [k for k in missing if k not in tied]
    unexpected = sorted(k for k in state_dict if k not in expected)
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in state_dict
        if k in expected and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {shapes[:8]}{' ...' if len(shapes) > 8 else ''}")
    if problems:
        raise CheckpointError(
            f"{source} does not match a {type(model).__name__} of this config: " + "; ".join(problems)
        )


def load_official_checkpoint(path: str | Path, config_path: str | Path | None = None):
    """A ``SpikeLMForPreTraining`` holding the authors' checkpoint at ``path``.

    The shape comes from ``config_path`` (their BertConfig JSON with ``T``) or else from the
    safetensors metadata key ``config``.
    """
    from spikelm.models.modeling_spikelm import SpikeLMForPreTraining

    state_dict, metadata = read_state_dict(path)
    if config_path is not None:
        try:
            raw = json.loads(Path(config_path).read_text())
        except FileNotFoundError:
            raise MissingInputError(f"--config file not found: {config_path}") from None
        except json.JSONDecodeError as err:
            raise CheckpointError(f"--config {config_path} is not valid JSON: {err}") from err
    elif "config" in metadata:
        raw = json.loads(metadata["config"])
    else:
        raise CheckpointError(
            f"{path} carries no 'config' metadata; pass the model's BertConfig JSON (with 'T') via --config"
        )
    state_dict = _strip_prefix(state_dict)
    decoder = state_dict.get("cls.predictions.decoder.weight")
    words = state_dict.get("bert.embeddings.word_embeddings.weight")
    tied = decoder is None or (words is not None and decoder.shape == words.shape and torch.equal(decoder, words))
    config = official_config(raw, tie_word_embeddings=tied)
    converted = convert_official_state_dict(state_dict, config)
    model = SpikeLMForPreTraining(config)
    check_state_dict_fits(model, converted, str(path))
    # check_state_dict_fits has vetted every key; a tied decoder may be absent from the file
    model.load_state_dict(converted, strict=False)
    if tied:
        model.tie_weights()
    model.eval()
    return model


# ----------------------------------------------------------------------------------------------
# Real-valued BERT-family weights (transformers' BertModel naming)
# ----------------------------------------------------------------------------------------------

_QKV = re.compile(r"^(.*encoder\.layer\.\d+\.attention\.self)\.(query|key|value)\.(weight|bias)$")


def bert_to_spikelm_state_dict(state_dict: dict[str, torch.Tensor], prefix: str = "bert.") -> dict[str, torch.Tensor]:
    """Map a ``transformers`` BERT state dict (bare ``BertModel`` or with heads) to SpikeLM names.

    Keys of a bare ``BertModel`` get ``prefix``; separate query/key/value projections are
    concatenated into ``qkv``. Neuron alphas are not included: they initialise from data.
    """
    sd = _strip_prefix(dict(state_dict))
    bare = not any(k.startswith(("bert.", "cls.", "classifier.")) for k in sd)
    if bare:
        sd = {prefix + k: v for k, v in sd.items()}
    out, qkv = {}, {}
    for key, value in sd.items():
        if key.endswith(("position_ids", "token_type_ids")) and "embeddings" in key and "weight" not in key:
            continue  # buffers of the embeddings module
        match = _QKV.match(key)
        if match:
            qkv.setdefault((match.group(1), match.group(3)), {})[match.group(2)] = value
        elif key == "cls.predictions.decoder.bias":
            out.setdefault("cls.predictions.bias", value)
        else:
            out[key] = value
    for (base, suffix), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise CheckpointError(f"{base}: expected query, key and value {suffix}s, found {sorted(parts)}")
        out[f"{base}.qkv.{suffix}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out
