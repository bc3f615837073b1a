"""Stream documents, tokenize them in worker processes and pack them into memmapped token files.

Output folder: ``train.bin`` and ``val.bin`` (every document's tokens followed by its end-of-text
token, no padding), ``token_bytes.npy`` (the UTF-8 bytes each token id stands for, where the vocabulary
is byte-level) and ``meta.json``. Validation is whole documents, chosen by their position in the source
alone, so every tokenizer holds out the same documents and keeps the source's document order. The
folder is written aside and renamed at the end: an interrupted run never leaves a folder that looks
complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from efficientllm_metrics import atomic_folder
from training_harness.errors import EXIT_USAGE, DataError
from training_harness.flags import dataclass_parser, program_name
from training_harness.locks import exclusive
from training_harness.tokenization import (
    end_of_text_id,
    hub_reachable,
    load_tokenizer,
    token_utf8_bytes,
    tokenizer_name,
)

META_FILE = "meta.json"
TOKEN_BYTES_FILE = "token_bytes.npy"
#: Share of documents held out, for prepared folders and raw files prepared on the fly alike.
DEFAULT_VAL_FRACTION = 0.02
DEFAULT_DATA_ROOT = Path("experiments/data")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")


@dataclass(frozen=True, kw_only=True)
class PrepareConfig:
    """What to tokenize and where to put it. Every field is a flag of the same name."""

    source: str = field(default="hub", metadata={
        "help": "'hub' to stream --dataset, or a local .jsonl/.json/.parquet/.txt file or folder of them"})
    tokenizer: str = field(default="EleutherAI/pythia-410m", metadata={
        "help": "hub id, local folder or tokenizer.json"})
    output_dir: str | None = field(default=None, metadata={"help": "default: experiments/data/<tokenizer name>"})
    max_tokens: int | None = field(default=None, metadata={
        "help": "stop once the training split would exceed this many tokens (default: the whole source)"})
    val_fraction: float = field(default=DEFAULT_VAL_FRACTION, metadata={
        "help": "share of documents held out for validation, spread evenly over the stream"})
    dataset: str = field(default="HuggingFaceFW/fineweb-edu", metadata={"help": "hub dataset (--source hub)"})
    dataset_config: str = field(default="sample-350BT", metadata={"help": "its configuration"})
    split: str = field(default="train", metadata={"help": "its split"})
    text_field: str = field(default="text", metadata={"help": "the field holding each document's text"})
    dtype: str = field(default="auto", metadata={
        "help": "token file type: uint16, uint32, or auto (uint16 when the vocabulary fits)",
        "choices": ("auto", "uint16", "uint32")})
    workers: int = field(default=min(8, os.cpu_count() or 1), metadata={
        "help": "tokenizer processes; 1 tokenizes in this process"})
    batch_documents: int = field(default=512, metadata={"help": "documents per batch sent to a worker"})

    def __post_init__(self):
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")
        if self.dtype not in ("auto", "uint16", "uint32"):
            raise ValueError(f"dtype must be auto, uint16 or uint32, got {self.dtype}")
        if self.workers < 1 or self.batch_documents < 1:
            raise ValueError("workers and batch_documents must be >= 1")

    def resolved_output_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        return DEFAULT_DATA_ROOT / tokenizer_name(self.tokenizer)

    def fingerprint(self) -> dict:
        """The arguments that decide the folder's content (not workers or batch size); a local source by its
        path, not by the hub dataset it does not come from."""
        keys = ("source", "tokenizer", "max_tokens", "val_fraction", "text_field", "dtype")
        values = {key: getattr(self, key) for key in keys}
        if self.source == "hub":
            values.update(dataset=self.dataset, dataset_config=self.dataset_config, split=self.split)
        else:
            values["source"] = str(Path(self.source).resolve())
        return values


# ---------------------------------------------------------------------------------------------- sources

def _local_files(source: Path) -> list[Path]:
    if not source.exists():
        raise DataError(f"{source}: no such file or folder; pass an existing .jsonl/.json/.parquet/.txt or 'hub'")
    if source.is_file():
        files = [source]
    else:
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
    bad = [p for p in files if p.suffix not in LOCAL_SUFFIXES]
    if bad or not files:
        raise DataError(f"{source}: expected .jsonl, .json, .parquet or .txt files")
    return files


def _json_document(path: Path, line_number: int, record: object, text_field: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        raise DataError(f"{path}:{line_number}: no {text_field!r} field; set --text_field to the field holding text")
    text = record[text_field]
    if not isinstance(text, str):
        raise DataError(f"{path}:{line_number}: field {text_field!r} is {type(text).__name__}, not text")
    return text


def _read_file(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".parquet":
        import pandas as pd

        frame = pd.read_parquet(path)
        if text_field not in frame.columns:
            raise DataError(f"{path}: no {text_field!r} column; set --text_field (columns: {list(frame.columns)})")
        yield from frame[text_field].astype(str)
        return
    with open(path, encoding="utf-8") as handle:
        if path.suffix == ".txt":
            # Documents are separated by blank lines.
            yield from (doc.strip() for doc in handle.read().split("\n\n") if doc.strip())
            return
        first = handle.read(1)
        handle.seek(0)
        if path.suffix == ".json" and first == "[":
            for index, record in enumerate(json.load(handle)):
                yield _json_document(path, index + 1, record, text_field)
            return
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}:{line_number}: not valid JSON ({error.msg}); one JSON object per line") from None
            yield _json_document(path, line_number, record, text_field)


def iter_documents(config: PrepareConfig) -> Iterator[str]:
    """Documents in a fixed order: streamed from the hub, or read from local files."""
    if config.source == "hub":
        from datasets import load_dataset

        if not hub_reachable():
            raise DataError(f"--source hub streams {config.dataset} from the Hugging Face hub, which cannot be "
                            "reached; pass --source a local .jsonl/.json/.parquet/.txt file or folder")

        stream = load_dataset(config.dataset, name=config.dataset_config, split=config.split, streaming=True)
        for example in stream:
            yield example[config.text_field]
        return
    for path in _local_files(Path(config.source)):
        try:
            yield from _read_file(path, config.text_field)
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: not UTF-8 text (byte {error.start} of a read block: "
                            f"{error.object[error.start:error.start + 4]!r}); convert the file to UTF-8 first, e.g. "
                            f"iconv -f latin1 -t utf-8") from None


def is_validation(index: int, fraction: float) -> bool:
    """Document ``index`` is held out when it crosses a multiple of 1/fraction: even, deterministic."""
    return math.floor((index + 1) * fraction) > math.floor(index * fraction)


# ---------------------------------------------------------------------------------------------- tokenize

_worker_tokenizer = None


def _init_worker(tokenizer_spec: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_spec)


def _encode(texts: list[str]) -> list[tuple[list[int], int]]:
    """Token ids and UTF-8 byte count of each text (bytes are what BPB divides by)."""
    ids = _worker_tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [(doc_ids, len(text.encode("utf-8"))) for doc_ids, text in zip(ids, texts)]


def _batches(documents: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in documents:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _SplitWriter:
    """Appends token arrays to ``<split>.bin`` and counts tokens, documents and UTF-8 bytes."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.handle = open(path, "wb")
        self.dtype = dtype
        self.tokens = self.documents = self.utf8_bytes = 0
        self.hash = hashlib.sha256()

    def write(self, ids: list[int], eos: int, utf8_bytes: int) -> None:
        data = np.asarray([*ids, eos], dtype=self.dtype).tobytes()
        self.handle.write(data)
        self.hash.update(data)
        self.tokens += len(ids) + 1
        self.documents += 1
        self.utf8_bytes += utf8_bytes

    def close(self) -> dict:
        self.handle.close()
        return {"tokens": self.tokens, "documents": self.documents, "utf8_bytes": self.utf8_bytes,
                "sha256": self.hash.hexdigest()}


def _token_dtype(requested: str, vocab_size: int) -> np.dtype:
    fits_uint16 = vocab_size <= np.iinfo(np.uint16).max + 1
    if requested == "auto":
        return np.dtype(np.uint16 if fits_uint16 else np.uint32)
    if requested == "uint16" and not fits_uint16:
        raise DataError(f"vocabulary of {vocab_size} tokens does not fit uint16; use --dtype uint32 or auto")
    return np.dtype(requested)


def prepare(config: PrepareConfig) -> Path:
    """Tokenize ``config.source`` into ``config.resolved_output_dir()``; reuse it when already complete. One
    process at a time per folder: a second waits for nothing and is refused (FolderInUse)."""
    output = config.resolved_output_dir()
    with exclusive(output, "a prepared data folder", beside=True):
        return _prepare(config, output)


def _prepare(config: PrepareConfig, output: Path) -> Path:
    if _is_complete(output, config):
        print(f"reusing {output} (complete, same arguments)", file=sys.stderr)
        return output
    if (output / META_FILE).exists():
        raise DataError(f"{output} holds data prepared with other arguments; choose another --output_dir or delete it")

    tokenizer = load_tokenizer(config.tokenizer)
    eos = end_of_text_id(tokenizer)
    vocab_size = len(tokenizer)
    dtype = _token_dtype(config.dtype, vocab_size)

    started = time.perf_counter()
    token_bytes = token_utf8_bytes(tokenizer)
    with atomic_folder(output, frozenset({"train.bin", "val.bin", TOKEN_BYTES_FILE, META_FILE})) as staging:
        writers = {split: _SplitWriter(staging / f"{split}.bin", dtype) for split in ("train", "val")}
        try:
            _tokenize_into(config, tokenizer, eos, writers, started)
        finally:
            counts = {split: writer.close() for split, writer in writers.items()}
        for split in ("train", "val"):
            if counts[split]["documents"] == 0:
                raise DataError(f"{config.source}: the {split} split is empty; "
                                "give more documents or raise --val_fraction")
        if token_bytes is not None:
            np.save(staging / TOKEN_BYTES_FILE, token_bytes)
        meta = {
            "tokenizer": config.tokenizer,
            "tokenizer_name": tokenizer_name(config.tokenizer),
            "vocab_size": vocab_size,
            "eos_id": eos,
            "dtype": dtype.name,
            "token_bytes": token_bytes is not None,
            "splits": counts,
            "content_sha256": hashlib.sha256((counts["train"]["sha256"] + counts["val"]["sha256"]).encode())
            .hexdigest(),
            "arguments": config.fingerprint(),
            "seconds": round(time.perf_counter() - started, 3),
        }
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return output


def _tokenize_into(config: PrepareConfig, tokenizer, eos: int, writers: dict, started: float) -> None:
    documents = iter_documents(config)
    pool = None
    if config.workers > 1:
        pool = multiprocessing.get_context("spawn").Pool(config.workers, _init_worker, (config.tokenizer,))
        encoded = pool.imap(_encode, _batches(documents, config.batch_documents))
    else:
        global _worker_tokenizer
        _worker_tokenizer = tokenizer
        encoded = map(_encode, _batches(documents, config.batch_documents))
    index = 0
    train = writers["train"]
    progress = tqdm(unit=" docs", desc="tokenizing", disable=None)
    try:
        for batch in encoded:
            for ids, utf8_bytes in batch:
                split = "val" if is_validation(index, config.val_fraction) else "train"
                index += 1
                if split == "train" and config.max_tokens and train.tokens + len(ids) + 1 > config.max_tokens:
                    return
                writers[split].write(ids, eos, utf8_bytes)
            progress.update(len(batch))
            rate = (train.tokens + writers["val"].tokens) / (time.perf_counter() - started)
            progress.set_postfix(tokens=train.tokens + writers["val"].tokens, tokens_per_s=f"{rate:,.0f}")
        if index == 0:
            raise DataError(f"{config.source}: no documents found (empty input)")
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()


def _is_complete(output: Path, config: PrepareConfig) -> bool:
    meta_path = output / META_FILE
    if not meta_path.exists():
        return False
    meta = json.loads(meta_path.read_text())
    return meta.get("arguments") == config.fingerprint() and all(
        (output / f"{split}.bin").exists() for split in ("train", "val"))


def read_meta(folder: str | os.PathLike) -> dict:
    """A prepared folder's meta.json, or a DataError saying how to make one."""
    path = Path(folder) / META_FILE
    if not path.exists():
        raise DataError(f"{folder}: not a prepared data folder (no {META_FILE}); "
                        "run scripts/prepare_fineweb_dataset.sh or pass a .jsonl/.txt file")
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = dataclass_parser(PrepareConfig, __doc__.splitlines()[0], program_name("training_harness.prepare_data"))
    args = parser.parse_args(argv)
    try:
        config = PrepareConfig(**vars(args))
        output = prepare(config)
    except (DataError, ValueError) as error:  # FolderInUse and NotOurFolder are ValueErrors
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    meta = read_meta(output)
    splits = meta["splits"]
    print(f"{output}: train {splits['train']['tokens']:,} tokens / {splits['train']['documents']:,} docs, "
          f"val {splits['val']['tokens']:,} tokens / {splits['val']['documents']:,} docs ({meta['dtype']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
