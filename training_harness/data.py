"""Token windows from a prepared folder: seeded random (or sequential) training windows, fixed validation."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from training_harness.errors import DataError
from training_harness.prepare_data import LOCAL_SUFFIXES, TOKEN_BYTES_FILE, PrepareConfig, prepare, read_meta
from training_harness.tokenization import CACHE_ROOT, tokenizer_name


def resolve_data_path(data_path: str, tokenizer: str, val_fraction: float) -> Path:
    """A prepared folder as is; a raw .jsonl/.json/.parquet/.txt file prepared once into a cache folder."""
    path = Path(data_path)
    if path.is_dir() and (path / "meta.json").exists():
        return path
    if path.is_file() and path.suffix in LOCAL_SUFFIXES:
        stat = path.stat()
        identity = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{tokenizer}:{val_fraction}"
        key = hashlib.sha256(identity.encode()).hexdigest()[:12]
        cache = CACHE_ROOT / "prepared" / f"{path.stem}-{tokenizer_name(tokenizer)}-{key}"
        return prepare(PrepareConfig(source=str(path), tokenizer=tokenizer, output_dir=str(cache),
                                     val_fraction=val_fraction, workers=1))
    if not path.exists():
        raise DataError(f"{data_path}: no such file or folder")
    raise DataError(f"{data_path}: expected a prepared folder (with meta.json) or a {'/'.join(LOCAL_SUFFIXES)} file")


class TokenWindows:
    """Windows of ``seq_len + 1`` tokens from one split; inputs and labels are shifted by exactly one."""

    def __init__(self, folder: str | os.PathLike, split: str, seq_len: int):
        self.meta = read_meta(folder)
        self.split = split
        self.seq_len = seq_len
        self.tokens = np.memmap(Path(folder) / f"{split}.bin", dtype=self.meta["dtype"], mode="r")
        if len(self.tokens) < seq_len + 1:
            raise DataError(
                f"{folder}: the {split} split has {len(self.tokens):,} tokens, fewer than one window of "
                f"seq_len + 1 = {seq_len + 1:,}; prepare more data (--max_tokens) or lower --seq_len")
        self.window_count = (len(self.tokens) - 1) // seq_len  # non-overlapping windows
        self._token_bytes = np.load(Path(folder) / TOKEN_BYTES_FILE) if self.meta.get("token_bytes") else None

    def _batch(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)
        window = torch.from_numpy(rows)
        return window[:, :-1], window[:, 1:]  # (B, T) inputs, (B, T) labels = next tokens

    def training_batch(self, seed: int, step: int, micro_step: int, rank: int, batch_size: int,
                       order: str = "random", micro_steps: int = 1,
                       world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """This micro-batch's share of step ``step``'s global batch.

        A step's global batch depends only on (seed, step): splitting it differently into micro-batches
        and ranks trains on the same windows, and a resumed run sees what the interrupted one would have.
        """
        global_batch = batch_size * micro_steps * world_size
        first = (micro_step * world_size + rank) * batch_size  # this share's offset within the global batch
        if order == "random":
            rng = np.random.default_rng([seed, step])
            starts = rng.integers(0, len(self.tokens) - self.seq_len, size=global_batch)[first:first + batch_size]
        elif order == "sequential":  # consecutive windows, wrapping at the end of the split
            starts = ((step * global_batch + first + np.arange(batch_size)) % self.window_count) * self.seq_len
        else:
            raise ValueError(f"data order must be random or sequential, got {order!r}")
        return self._batch(starts)

    def validation_count(self, windows: int) -> int:
        """How many windows ``windows`` asks for: 0 is every whole window of the split."""
        return self.window_count if windows == 0 else min(windows, self.window_count)

    def validation_batches(self, windows: int, batch_size: int):
        """The first ``validation_count(windows)`` non-overlapping windows, in batches."""
        count = self.validation_count(windows)
        starts = np.arange(count) * self.seq_len
        for first in range(0, count, batch_size):
            yield self._batch(starts[first:first + batch_size])

    @property
    def bytes_source(self) -> str:
        if self._token_bytes is not None:
            return "the exact UTF-8 bytes of the evaluated tokens"
        return "the split's mean UTF-8 bytes per token (an estimate: prepared without token_bytes.npy)"

    def utf8_bytes(self, labels: torch.Tensor) -> float:
        """The UTF-8 bytes of text that ``labels`` stand for, the denominator of BPB (see ``bytes_source``)."""
        if self._token_bytes is not None:
            return float(self._token_bytes[labels.numpy()].sum(dtype=np.int64))
        counts = self.meta["splits"][self.split]
        return labels.numel() * counts["utf8_bytes"] / counts["tokens"]
