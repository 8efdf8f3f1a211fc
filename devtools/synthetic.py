"""Models the project builds itself, because the hub is out of reach where memfit is tested.

* ``tiny``: a 2-layer BERT with 32-d vectors: unit and integration tests load it by path through
  the real loading code.
* ``alephbert``: AlephBERT's exact architecture (vocab 52000, hidden 768, 12 layers, 12 heads,
  intermediate 3072, type_vocab_size 1, mean pooling) with random weights: memory and latency
  do not depend on weight values, so benchmarks and container tests measure the real footprint.

Both are saved in sentence-transformers format with a WordPiece tokenizer trained on the bundled
Hebrew sample. Written beside OUTPUT and renamed into place when complete. A build tool, not part of
the served app: the image's model stage runs it (deploy/prepare-model.sh), the runtime never has it.

    python -m devtools.synthetic OUTPUT [--arch tiny|alephbert] [--seed N]
"""

from __future__ import annotations

from pathlib import Path

from app.data import load_sample
from app.semantic.encoders import write_layout, written_into_place

ARCHES = {
    "tiny": dict(vocab_size=2000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=512),
    "alephbert": dict(vocab_size=52000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, max_position_embeddings=512),
}
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def corpus() -> list[str]:
    return [f"{e['title']} {e.get('body', '')} {' '.join(e['tags'])}" for e in load_sample()]


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS)
    tokenizer.train_from_iterator(corpus(), trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return tokenizer


def build(output: Path, arch: str = "tiny", seed: int = 0, max_seq_length: int = 128) -> Path:
    """Write a random-weight sentence-transformers model of ``arch`` to ``output``."""
    import torch
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    if arch not in ARCHES:
        raise ValueError(f"arch {arch!r} is unknown; accepts {', '.join(ARCHES)}")
    with written_into_place(output) as work:
        torch.manual_seed(seed)
        shape = ARCHES[arch]
        fast = PreTrainedTokenizerFast(
            tokenizer_object=build_tokenizer(min(shape["vocab_size"], 8000)), unk_token="[UNK]",
            pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
            model_max_length=max_seq_length,
        )
        config = BertConfig(type_vocab_size=1, **shape)
        BertModel(config).save_pretrained(str(work))
        fast.save_pretrained(str(work))
        write_layout(work, shape["hidden_size"], max_seq_length)
    return Path(output)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Build a random-weight model in sentence-transformers format.")
    parser.add_argument("output", type=Path)
    parser.add_argument("--arch", choices=sorted(ARCHES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"built {args.arch} model at {build(args.output, arch=args.arch, seed=args.seed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
