"""Pretraining examples: BERT's NSP pairs, MLM blocks, causal-LM blocks, dynamic masking."""

import numpy as np
import pytest

from spikelm.data.corpora import load_corpus
from spikelm.data.objectives import IGNORE_INDEX, Batcher, build_examples, mask_tokens, split_sentences, tokenize_corpus
from spikelm.data.tokenization import load_bert_tokenizer, sample_text_path


@pytest.fixture(scope="module")
def tokenizer():
    return load_bert_tokenizer()


@pytest.fixture(scope="module")
def sonnets(tokenizer):
    return tokenize_corpus(list(load_corpus(text_file=sample_text_path())["train"]["text"]), tokenizer, True)


def test_split_sentences():
    assert split_sentences('He said "Go." Then he left! Did he? yes. 3 more.') == [
        'He said "Go."',
        "Then he left!",
        "Did he? yes.",
        "3 more.",
    ]


def test_tokenize_corpus_keeps_documents_and_segments(tokenizer):
    corpus = tokenize_corpus(["One. Two.\nThree.", "Four."], tokenizer, by_sentence=True)
    assert corpus.num_documents == 2
    assert [tokenizer.decode(s) for s in corpus.segments(0)] == ["one.", "two.", "three."]
    assert tokenizer.decode(corpus.document(1)) == "four."
    whole = tokenize_corpus(["One. Two.\nThree."], tokenizer, by_sentence=False)
    assert len(whole.segments(0)) == 1 and whole.num_tokens == corpus.num_tokens - 2


def test_nsp_pairs_come_from_consecutive_segments_or_another_document(tokenizer, sonnets):
    examples = build_examples("mlm-nsp", sonnets, tokenizer, 512, seed=0, epoch=0, short_seq_prob=0.0)
    labels = examples.next_sentence_label
    # half random, plus every chunk of a single segment (BERT's rule; these documents are short)
    assert 0.4 < labels.mean() < 0.8
    streams = [sonnets.document(d).tolist() for d in range(sonnets.num_documents)]

    def contiguous_in(tokens, doc):
        n = len(tokens)
        return any(doc[i : i + n] == tokens for i in range(len(doc) - n + 1))

    for row in range(30):
        ids = examples.input_ids[row][examples.attention_mask[row] == 1].tolist()
        types = examples.token_type_ids[row][examples.attention_mask[row] == 1]
        first_sep = ids.index(tokenizer.sep_token_id)
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        assert (types[: first_sep + 1] == 0).all() and (types[first_sep + 1 :] == 1).all()
        a, b = ids[1:first_sep], ids[first_sep + 1 : -1]
        home = [d for d, doc in enumerate(streams) if contiguous_in(a, doc)]
        if labels[row] == 0:  # B continues A in the same document (no truncation at length 512)
            assert any(contiguous_in(a + b, streams[d]) for d in home)
        else:
            assert not any(contiguous_in(b, streams[d]) for d in home)


def test_examples_are_a_function_of_seed_and_epoch(tokenizer, sonnets):
    a = build_examples("mlm-nsp", sonnets, tokenizer, 128, seed=3, epoch=1)
    b = build_examples("mlm-nsp", sonnets, tokenizer, 128, seed=3, epoch=1)
    c = build_examples("mlm-nsp", sonnets, tokenizer, 128, seed=3, epoch=2)
    assert np.array_equal(a.input_ids, b.input_ids)
    assert not np.array_equal(a.input_ids[: len(c)], c.input_ids[: len(a)])
    assert a.input_ids.shape[1] == 128 and (a.attention_mask.sum(1) <= 128).all()


def test_mlm_and_clm_blocks_are_packed(tokenizer, sonnets):
    mlm = build_examples("mlm", sonnets, tokenizer, 64, seed=0, epoch=0)
    assert (mlm.input_ids[:, 0] == tokenizer.cls_token_id).all() and (
        mlm.input_ids[:, -1] == tokenizer.sep_token_id
    ).all()
    assert mlm.attention_mask.all() and mlm.next_sentence_label is None
    assert len(mlm) == (sonnets.num_tokens + sonnets.num_documents) // 62
    clm = build_examples("clm", sonnets, tokenizer, 64, seed=0, epoch=0)
    assert clm.input_ids.shape == ((sonnets.num_tokens + sonnets.num_documents) // 64, 64)
    batch = Batcher("clm", tokenizer, seed=0)(clm, np.arange(4), 0)
    assert (batch["labels"] == batch["input_ids"]).all() and "token_type_ids" not in batch
    # documents are separated by the end-of-text token (here the tokenizer has none: [SEP])
    separators = int((clm.input_ids == tokenizer.sep_token_id).sum())
    assert sonnets.num_documents - 2 <= separators <= sonnets.num_documents  # the last partial block is dropped


def test_mask_tokens_80_10_10():
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 2000, size=200_000)
    candidates = np.ones_like(ids, dtype=bool)
    candidates[::10] = False  # e.g. special tokens
    masked, labels = mask_tokens(ids, candidates, rng, vocab_size=30522, mask_token_id=103)
    chosen = labels != IGNORE_INDEX
    assert chosen.sum() == round(candidates.sum() * 0.15)
    assert not chosen[::10].any() and (labels[chosen] == ids[chosen]).all()
    assert (masked[~chosen] == ids[~chosen]).all()
    as_mask = (masked[chosen] == 103).mean()
    kept = (masked[chosen] == ids[chosen]).mean()
    assert abs(as_mask - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(1 - as_mask - kept - 0.1) < 0.01


def test_masking_is_dynamic_and_independent_of_batching(tokenizer, sonnets):
    examples = build_examples("mlm-nsp", sonnets, tokenizer, 128, seed=0, epoch=0)
    batcher = Batcher("mlm-nsp", tokenizer, seed=0)
    together = batcher(examples, np.array([5, 6, 7]), epoch=0)
    alone = batcher(examples, np.array([7]), epoch=0)
    assert (together["input_ids"][2] == alone["input_ids"][0]).all()
    assert (together["labels"][2] == alone["labels"][0]).all()
    next_epoch = batcher(examples, np.array([7]), epoch=1)
    assert not (next_epoch["labels"][0] == alone["labels"][0]).all()  # masked anew every epoch
    special = np.isin(examples.input_ids[[5, 6, 7]], [tokenizer.cls_token_id, tokenizer.sep_token_id, 0])
    assert (together["labels"].numpy()[special] == IGNORE_INDEX).all()
    assert set(together) == {"input_ids", "attention_mask", "token_type_ids", "labels", "next_sentence_label"}
