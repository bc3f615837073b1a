"""Loading a tokenizer from a hub id, a folder or a tokenizer.json, and finding its end-of-text id."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
from functools import cache
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from training_harness.errors import DataError

END_OF_TEXT = "<|endoftext|>"
#: Where prepared raw files and the bundled tokenizer are kept between runs.
CACHE_ROOT = Path(os.environ.get("EFFICIENTLLM_CACHE", Path.home() / ".cache" / "efficientllm"))


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a connection within ``timeout_s`` (False under HF_HUB_OFFLINE=1):
    asked first so that a machine without network fails in seconds, not after the client's retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def load_tokenizer(id_or_path: str):
    """A fast tokenizer from a local folder, a ``tokenizer.json`` file, or a hub id (from the local cache when
    it is there; the hub is asked only when it can be reached)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(id_or_path)
    try:
        if path.is_file():
            return PreTrainedTokenizerFast(tokenizer_file=str(path))
        if path.is_dir() and not (path / "tokenizer_config.json").exists():
            return PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
        if path.is_dir():
            return AutoTokenizer.from_pretrained(id_or_path)
        with contextlib.suppress(OSError):
            return AutoTokenizer.from_pretrained(id_or_path, local_files_only=True)
        if not hub_reachable():
            raise DataError(f"tokenizer {id_or_path!r} is not in the local cache and the Hugging Face hub cannot be "
                            "reached; pass --tokenizer a local folder or tokenizer.json")
        return AutoTokenizer.from_pretrained(id_or_path)
    except DataError:
        raise
    except Exception as error:
        raise DataError(
            f"cannot load tokenizer {id_or_path!r} ({type(error).__name__}: {str(error).splitlines()[0]}); "
            "pass a hub id (online) or a local folder or tokenizer.json (offline)"
        ) from error


def end_of_text_id(tokenizer) -> int:
    """The document separator: ``<|endoftext|>`` where the vocabulary has it, else the EOS token.

    Qwen's config names ``<|im_end|>`` as EOS, but its pretraining separator is ``<|endoftext|>``.
    """
    token_id = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    if token_id is not None and token_id != tokenizer.unk_token_id:
        return int(token_id)
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer has neither {END_OF_TEXT} nor an EOS token to separate documents")
    return int(tokenizer.eos_token_id)


@cache
def _byte_of_symbol() -> dict[str, int]:
    """Byte-level BPE's alphabet: each byte is written as one printable character (GPT-2's scheme: printable
    bytes stand for themselves, the other 68 take the characters from U+0100 on, in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return {**{chr(byte): byte for byte in printable}, **{chr(256 + i): byte for i, byte in enumerate(others)}}


def _decodes_byte_level(tokenizer) -> bool:
    """Whether the tokenizer's decoder maps tokens back to bytes through byte-level BPE's alphabet."""
    decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(part.get("type") == "ByteLevel" for part in parts)


def token_utf8_bytes(tokenizer) -> np.ndarray | None:
    """How many bytes of UTF-8 text each token id stands for, so that BPB divides by the exact bytes of the
    tokens evaluated; None for a vocabulary that is not byte-level BPE (GPT-NeoX's and Qwen's are).

    Special tokens count 0 bytes: the end-of-text token between documents is added by data preparation, not
    text. Added tokens that are not special are plain text.
    """
    if not _decodes_byte_level(tokenizer):
        return None
    alphabet = _byte_of_symbol()
    special = set(tokenizer.all_special_ids) | {
        token_id for token_id, added in tokenizer.added_tokens_decoder.items() if added.special}
    added = {token_id: added.content for token_id, added in tokenizer.added_tokens_decoder.items()}
    sizes = np.zeros(len(tokenizer), dtype=np.uint16)
    for token_id, symbols in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if token_id in special or symbols is None:
            continue
        if token_id in added:
            sizes[token_id] = len(added[token_id].encode("utf-8"))
        elif all(symbol in alphabet for symbol in symbols):
            sizes[token_id] = len(symbols)
        else:
            return None
    return sizes


def tokenizer_name(id_or_path: str) -> str:
    """A folder-safe name: the folder's name for local tokenizers, the hub id with '--' for '/'."""
    path = Path(id_or_path)
    if path.is_file():
        return path.resolve().parent.name
    if path.exists():
        return path.resolve().name
    return id_or_path.replace("/", "--")


def train_byte_level_tokenizer(texts: list[str], output_file: str | Path, vocab_size: int = 512) -> Path:
    """A small byte-level BPE with ``<|endoftext|>``, trained offline: for smoke tests and unit tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    output_file = Path(output_file)
    output_file.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(output_file))
    return output_file


def default_corpus_path() -> Path:
    """The small corpus shipped with the package, for runs with no download."""
    return Path(__file__).with_name("default_corpus.jsonl")


def bundled_tokenizer() -> Path:
    """A 512-token byte-level BPE trained on the bundled corpus, made once into the cache: the tokenizer of a
    run given no --data_path, so that it needs no download."""
    corpus = default_corpus_path()
    folder = CACHE_ROOT / "tokenizers" / f"bundled-{hashlib.sha256(corpus.read_bytes()).hexdigest()[:12]}"
    path = folder / "tokenizer.json"
    if not path.exists():
        texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
        staging = train_byte_level_tokenizer(texts, folder / f"tokenizer.json.{os.getpid()}", vocab_size=512)
        staging.replace(path)  # atomic: a concurrent run finds a whole file or none
    return path
