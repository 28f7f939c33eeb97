import collections
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _threads():
    """Each test starts with the suite's thread count and leaves it so: float sums (GEMMs, reductions) depend on it,
    and a test that compares an in-process run with a subprocess's must not inherit another test's setting."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


def load_fixture(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / name))


def tiny_config(**overrides):
    from spikelm import SpikeLMConfig

    kwargs = dict(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    kwargs.update(overrides)
    return SpikeLMConfig(**kwargs)


def random_batch(config, batch=3, length=12, pad_from=8):
    ids = torch.randint(1, config.vocab_size, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, pad_from:] = 0
    types = torch.zeros(batch, length, dtype=torch.long)
    types[:, length // 2 :] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def word_tokenizer(words, pad: bool = False):
    """A word-level fast tokenizer over ``words`` (ids after ``<unk> <s> </s>`` and, with ``pad``, ``<pad>``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", *(["<pad>"] if pad else [])]
    vocab = {w: i for i, w in enumerate([*specials, *words])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"pad_token": "<pad>"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>", **extra)


def tiny_llama_model(cls=None, config_cls=None, seed: int = 0, **overrides):
    """A tiny random LLaMA-family causal LM (``cls``/``config_cls``: default LlamaForCausalLM / LlamaConfig) in eval
    mode, built with the public transformers API: vocabulary 64, hidden 32, 2 layers, 4 heads, 2 KV heads.
    ``overrides``: config fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    fields = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(overrides)
    return (cls or LlamaForCausalLM)((config_cls or LlamaConfig)(**fields)).eval()


def save_tiny_llama(directory, words, seed: int = 0, **overrides):
    """A tiny random ``LlamaForCausalLM`` and a word-level tokenizer over ``words``, saved in ``directory`` with the
    public transformers API (as a user would). ``overrides``: LlamaConfig fields. Returns the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = word_tokenizer(words)
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=len(tok.get_vocab()),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    fields.update(overrides)
    LlamaForCausalLM(LlamaConfig(**fields)).save_pretrained(directory)
    tok.save_pretrained(directory)
    return tok


def save_tiny_spikelm_classifier(directory):
    """A tiny random ``SpikeLMForSequenceClassification`` (T=2, BERT's WordPiece tokenizer) saved in ``directory``
    with the public API, as a user would. Returns the tokenizer."""
    from spikelm import SpikeLMConfig, SpikeLMForSequenceClassification
    from spikelm.data.tokenization import load_tokenizer

    tokenizer = load_tokenizer("bert-base-uncased")
    config = SpikeLMConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_steps=2,
    )
    SpikeLMForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return tokenizer


def count_calls(monkeypatch, module, *names):
    """Wrap ``module.<name>`` for each name so that its calls are counted; returns the Counter (name -> calls so far),
    filled as the calls happen. The wrapped functions still run."""
    counts = collections.Counter()

    def counting(name, function):
        def counted(*args):
            counts[name] += 1
            return function(*args)

        return counted

    for name in names:
        monkeypatch.setattr(module, name, counting(name, getattr(module, name)))
    return counts
