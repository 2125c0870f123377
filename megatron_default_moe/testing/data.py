"""A real text corpus on every machine, through Megatron's own data path (demo and tests).

The corpus is the source of the Python standard library found via ``sysconfig`` (no download),
tokenised as raw bytes: token ``b`` is byte ``b``, plus an end-of-document token and a pad token.

1. ``write_byte_corpus(prefix)`` writes a Megatron ``IndexedDataset`` (``prefix.bin`` / ``.idx``)
   with ``IndexedDatasetBuilder``, one document per source file.
2. ``build_gpt_datasets(prefix, ...)`` builds the train / valid ``GPTDataset`` splits with
   ``BlendedMegatronDatasetBuilder`` and a ``GPTDatasetConfig``, exactly as ``pretrain_gpt`` does.
"""

import os
import random
import sysconfig
from typing import List, Optional, Sequence

import numpy
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron.core.tokenizers import MegatronTokenizerBase

_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


class ByteTokenizer(MegatronTokenizerBase):
    """Bytes 0..255, then ``eod`` (256) and ``pad`` (257): vocabulary 258."""

    def __init__(self):
        super().__init__(path="bytes", config={})
        self.eod = 256
        self.pad = 257
        self.unique_identifiers = {"class": "ByteTokenizer", "vocab_size": 258}

    @property
    def vocab_size(self) -> int:
        return 258

    def vocab(self):
        return {bytes([b]): b for b in range(256)} | {"<eod>": self.eod, "<pad>": self.pad}

    def tokenize(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("ByteTokenizer has no chat template")


def python_source_files(root: Optional[str] = None) -> List[str]:
    """The ``.py`` files of the standard library (tests and site-packages left out), sorted."""
    root = root or sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_DIRS)
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return files


def write_byte_corpus(prefix: str, max_bytes: int = 8 << 20, seed: int = 0) -> int:
    """Write ``prefix.bin``/``.idx``: a seeded shuffle of stdlib files, up to ``max_bytes``.

    One document per file, ending with ``eod``. Returns the number of documents. Idempotent: an
    existing ``prefix.idx`` is kept (delete it to rebuild).
    """
    if os.path.exists(prefix + ".idx") and os.path.exists(prefix + ".bin"):
        return -1
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    files = python_source_files()
    if not files:
        raise RuntimeError(f"no Python source files under {sysconfig.get_paths()['stdlib']}")
    random.Random(seed).shuffle(files)
    eod = ByteTokenizer().eod
    builder = IndexedDatasetBuilder(prefix + ".bin.tmp", dtype=numpy.uint16)
    total = documents = 0
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        if not data.strip():
            continue
        tokens = numpy.frombuffer(data, dtype=numpy.uint8).astype(numpy.uint16)
        builder.add_item(torch.from_numpy(numpy.append(tokens, numpy.uint16(eod))))
        builder.end_document()
        total += len(data) + 1
        documents += 1
        if total >= max_bytes:
            break
    builder.finalize(prefix + ".idx.tmp")
    os.replace(prefix + ".bin.tmp", prefix + ".bin")  # write-then-rename: readers never see halves
    os.replace(prefix + ".idx.tmp", prefix + ".idx")
    return documents


def build_gpt_datasets(
    prefix: str,
    seq_length: int,
    num_samples: Sequence[int],
    seed: int = 1234,
    split: str = "95,5,0",
    cache_dir: Optional[str] = None,
):
    """``(train, valid, test)`` ``GPTDataset``s over ``prefix`` (a split may be ``None``).

    Call on every rank (Megatron builds on rank 0 first, then the others, with barriers).
    ``num_samples`` is the number of samples each split must offer ([train, valid, test]).
    """
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([prefix], None),
        split=split,
        tokenizer=ByteTokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=cache_dir or os.path.join(os.path.dirname(os.path.abspath(prefix)), "cache"),
    )
    _check_splits_have_documents(prefix, config, num_samples)
    builder = BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, config)
    return builder.build()


def _check_splits_have_documents(prefix, config, num_samples):
    """Megatron loops forever drawing samples from a split without documents: fail clearly."""
    documents = len(IndexedDataset(prefix).sequence_lengths)
    for name, bounds, wanted in zip(("train", "valid", "test"), config.split_matrix, num_samples):
        if bounds is None or not wanted:
            continue
        if int(round(bounds[1] * documents)) - int(round(bounds[0] * documents)) < 1:
            raise ValueError(
                f"{prefix}: the {name} split ({config.split}) of {documents} documents is empty; "
                "use a larger corpus (--corpus-bytes) or another split"
            )
