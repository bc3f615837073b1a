"""Shared fixtures: a corpus and a tokenizer made by the tests themselves (no network, no shared files)."""

import json
import os
import signal

import pytest
from processes import processes_naming

from training_harness.prepare_data import PrepareConfig, prepare
from training_harness.tokenization import default_corpus_path, train_byte_level_tokenizer


@pytest.fixture(scope="session")
def corpus_texts() -> list[str]:
    return [json.loads(line)["text"] for line in default_corpus_path().read_text().splitlines()]


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory, corpus_texts):
    return str(train_byte_level_tokenizer(corpus_texts, tmp_path_factory.mktemp("tok") / "tokenizer.json", 384))


@pytest.fixture
def corpus_file(tmp_path, corpus_texts):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts))
    return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, tokenizer_file, corpus_texts) -> str:
    """The test corpus prepared once: a fifth of its documents held out."""
    root = tmp_path_factory.mktemp("prepared")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts))
    return str(prepare(PrepareConfig(source=str(corpus), tokenizer=tokenizer_file, output_dir=str(root / "data"),
                                     val_fraction=0.2, workers=1)))


@pytest.fixture
def stop_runs_left_under():
    """Call it with a folder: at the test's end every process whose command line names that folder is killed.
    The sweep driver starts each run in a session of its own, so a run outlives a driver that a test stopped,
    killed or failed to signal, and would train on, or wait for a peer, long after the test."""
    folders = []
    yield folders.append
    for pid in {pid for folder in folders for pid in processes_naming(folder)}:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass  # gone meanwhile
