"""The data pipeline on a test-made corpus and tokenizer: exact counts, splits, windows, failures."""

import json

import numpy as np
import pytest
import torch

from training_harness import prepare_data
from training_harness.data import TokenWindows
from training_harness.errors import DataError
from training_harness.prepare_data import PrepareConfig, is_validation, prepare
from training_harness.tokenization import load_tokenizer, token_utf8_bytes, train_byte_level_tokenizer


def expected_splits(texts, tokenizer_file, fraction):
    tokenizer = load_tokenizer(tokenizer_file)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    splits = {"train": [], "val": []}
    for index, text in enumerate(texts):
        split = "val" if is_validation(index, fraction) else "train"
        splits[split].append((tokenizer(text, add_special_tokens=False)["input_ids"] + [eos], text))
    return splits


def test_exact_counts_eos_and_document_split(tmp_path, corpus_file, corpus_texts, tokenizer_file):
    out = prepare(PrepareConfig(source=str(corpus_file), tokenizer=tokenizer_file,
                                output_dir=str(tmp_path / "data"), val_fraction=0.25, workers=1))
    meta = json.loads((out / "meta.json").read_text())
    expected = expected_splits(corpus_texts, tokenizer_file, 0.25)
    assert meta["eos_id"] == 0 and meta["dtype"] == "uint16" and meta["vocab_size"] == 384
    for split, docs in expected.items():
        tokens = np.fromfile(out / f"{split}.bin", dtype=np.uint16)
        # Every document's tokens, then its EOS, nothing else: no padding, no truncation.
        assert tokens.tolist() == [t for ids, _ in docs for t in ids]
        assert meta["splits"][split]["tokens"] == len(tokens)
        assert meta["splits"][split]["documents"] == len(docs)
        assert meta["splits"][split]["utf8_bytes"] == sum(len(text.encode()) for _, text in docs)
    assert meta["splits"]["val"]["documents"] == 7  # 28 documents, every fourth held out
    val_texts = {text for _, text in expected["val"]}
    assert val_texts.isdisjoint(text for _, text in expected["train"])


def test_worker_processes_give_identical_output(tmp_path, corpus_file, tokenizer_file):
    one = prepare(PrepareConfig(source=str(corpus_file), tokenizer=tokenizer_file, output_dir=str(tmp_path / "a"),
                                val_fraction=0.1, workers=1))
    two = prepare(PrepareConfig(source=str(corpus_file), tokenizer=tokenizer_file, output_dir=str(tmp_path / "b"),
                                val_fraction=0.1, workers=2, batch_documents=5))
    for split in ("train.bin", "val.bin"):
        assert (one / split).read_bytes() == (two / split).read_bytes()


def test_max_tokens_bounds_training_split(tmp_path, corpus_file, tokenizer_file):
    out = prepare(PrepareConfig(source=str(corpus_file), tokenizer=tokenizer_file, output_dir=str(tmp_path / "d"),
                                val_fraction=0.25, max_tokens=1500, workers=1))
    train = json.loads((out / "meta.json").read_text())["splits"]["train"]
    assert 1000 < train["tokens"] <= 1500
    assert train["documents"] < 21


def test_windows_shift_by_exactly_one_and_are_deterministic(tmp_path, corpus_file, tokenizer_file):
    out = prepare(PrepareConfig(source=str(corpus_file), tokenizer=tokenizer_file, output_dir=str(tmp_path / "d"),
                                val_fraction=0.25, workers=1))
    windows = TokenWindows(out, "train", seq_len=32)
    x, y = windows.training_batch(seed=1, step=3, micro_step=0, rank=0, batch_size=4)
    assert x.shape == y.shape == (4, 32)
    assert torch_equal(x[:, 1:], y[:, :-1])
    tokens = np.asarray(windows.tokens, dtype=np.int64)
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        start = next(s for s in range(len(tokens) - 32) if (tokens[s:s + 32] == row_x).all())
        assert (tokens[start + 1:start + 33] == row_y).all()
    again, _ = windows.training_batch(seed=1, step=3, micro_step=0, rank=0, batch_size=4)
    other_step, _ = windows.training_batch(seed=1, step=4, micro_step=0, rank=0, batch_size=4)
    assert torch_equal(x, again) and not torch_equal(x, other_step)
    seq, _ = windows.training_batch(seed=1, step=0, micro_step=1, rank=0, batch_size=2, order="sequential",
                                    micro_steps=2, world_size=1)
    assert seq[0, 0].item() == tokens[2 * 32] and seq[1, 0].item() == tokens[3 * 32]


@pytest.mark.parametrize("order", ["random", "sequential"])
def test_a_step_trains_on_the_same_windows_however_it_is_split(tmp_path, corpus_file, tokenizer_file, order):
    out = prepare(PrepareConfig(source=str(corpus_file), tokenizer=tokenizer_file, output_dir=str(tmp_path / "d"),
                                val_fraction=0.25, workers=1))
    windows = TokenWindows(out, "train", seq_len=16)
    whole, _ = windows.training_batch(seed=7, step=2, micro_step=0, rank=0, batch_size=4, order=order)

    def split(micro: int, micro_steps: int, world_size: int) -> np.ndarray:
        parts = [windows.training_batch(seed=7, step=2, micro_step=m, rank=r, batch_size=micro, order=order,
                                        micro_steps=micro_steps, world_size=world_size)[0]
                 for m in range(micro_steps) for r in range(world_size)]
        return np.concatenate([p.numpy() for p in parts])

    for micro, micro_steps, world_size in [(2, 2, 1), (1, 4, 1), (1, 2, 2), (2, 1, 2)]:
        assert (split(micro, micro_steps, world_size) == whole.numpy()).all()


def test_validation_reads_a_fixed_set(tmp_path, corpus_file, tokenizer_file):
    out = prepare(PrepareConfig(source=str(corpus_file), tokenizer=tokenizer_file, output_dir=str(tmp_path / "d"),
                                val_fraction=0.25, workers=1))
    windows = TokenWindows(out, "val", seq_len=16)
    first = [x for x, _ in windows.validation_batches(windows=5, batch_size=2)]
    second = [x for x, _ in windows.validation_batches(windows=5, batch_size=2)]
    assert [b.shape[0] for b in first] == [2, 2, 1]
    assert all(torch_equal(a, b) for a, b in zip(first, second))


def torch_equal(a, b):
    return bool((a == b).all())


def test_interrupted_prepare_leaves_nothing_complete_then_resumes(tmp_path, corpus_file, tokenizer_file,
                                                                  monkeypatch):
    config = PrepareConfig(source=str(corpus_file), tokenizer=tokenizer_file, output_dir=str(tmp_path / "d"),
                           val_fraction=0.25, workers=1, batch_documents=4)
    original = prepare_data._SplitWriter.write
    calls = {"n": 0}

    def interrupt_midway(self, *args):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        original(self, *args)

    monkeypatch.setattr(prepare_data._SplitWriter, "write", interrupt_midway)
    with pytest.raises(KeyboardInterrupt):
        prepare(config)
    assert list(tmp_path.iterdir()) == [corpus_file]
    monkeypatch.setattr(prepare_data._SplitWriter, "write", original)
    (tmp_path / ".d.partial").mkdir()  # debris of a run killed with SIGKILL
    out = prepare(config)
    assert json.loads((out / "meta.json").read_text())["splits"]["val"]["documents"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "d"]
    mtime = (out / "train.bin").stat().st_mtime_ns
    assert prepare(config) == out and (out / "train.bin").stat().st_mtime_ns == mtime  # reused, not redone


def run_cli(capsys, *args):
    code = prepare_data.main(list(args))
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "no documents"),
        ('{"text": "fine"}\nnot json\n', "corpus.jsonl:2: not valid JSON"),
        ('{"text": "fine"}\n{"body": "x"}\n', "corpus.jsonl:2: no 'text' field"),
    ],
)
def test_bad_input_is_one_line_error_without_output(tmp_path, capsys, tokenizer_file, content, message):
    source = tmp_path / "corpus.jsonl"
    source.write_text(content)
    code, err = run_cli(capsys, "--source", str(source), "--tokenizer", tokenizer_file,
                        "--output_dir", str(tmp_path / "out"), "--workers", "1")
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl"]


def test_missing_path_and_unloadable_tokenizer(tmp_path, capsys, corpus_file, tokenizer_file):
    code, err = run_cli(capsys, "--source", str(tmp_path / "nope.jsonl"), "--tokenizer", tokenizer_file,
                        "--output_dir", str(tmp_path / "out"), "--workers", "1")
    assert code == 2 and "nope.jsonl: no such file" in err
    broken = tmp_path / "broken.json"
    broken.write_text("{not a tokenizer")
    code, err = run_cli(capsys, "--source", str(corpus_file), "--tokenizer", str(broken),
                        "--output_dir", str(tmp_path / "out"), "--workers", "1")
    assert code == 2 and "cannot load tokenizer" in err
    assert not (tmp_path / "out").exists()


def test_vocabulary_too_big_for_dtype():
    with pytest.raises(DataError, match="does not fit uint16"):
        prepare_data._token_dtype("uint16", 151_936)
    assert prepare_data._token_dtype("auto", 151_936) == np.uint32
    assert prepare_data._token_dtype("auto", 50_304) == np.uint16


def test_corpus_smaller_than_one_window(tmp_path, corpus_file, tokenizer_file):
    out = prepare(PrepareConfig(source=str(corpus_file), tokenizer=tokenizer_file, output_dir=str(tmp_path / "d"),
                                val_fraction=0.25, workers=1))
    with pytest.raises(DataError, match="fewer than one window"):
        TokenWindows(out, "val", seq_len=100_000)


def test_parquet_txt_and_json_array_sources(tmp_path, corpus_texts, tokenizer_file):
    import pandas as pd

    folder = tmp_path / "mixed"
    folder.mkdir()
    pd.DataFrame({"text": corpus_texts[:10]}).to_parquet(folder / "a.parquet")
    (folder / "b.txt").write_text("\n\n".join(corpus_texts[10:20]))
    (folder / "c.json").write_text(json.dumps([{"text": t} for t in corpus_texts[20:]]))
    out = prepare(PrepareConfig(source=str(folder), tokenizer=tokenizer_file, output_dir=str(tmp_path / "d"),
                                val_fraction=0.25, workers=1))
    splits = json.loads((out / "meta.json").read_text())["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == len(corpus_texts)
    assert splits["train"]["utf8_bytes"] + splits["val"]["utf8_bytes"] == sum(len(t.encode()) for t in corpus_texts)


def test_hub_source_streams_the_configured_dataset(tmp_path, corpus_texts, tokenizer_file, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        return ({"text": text, "id": i} for i, text in enumerate(corpus_texts))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(prepare_data, "hub_reachable", lambda: True)
    out = prepare(PrepareConfig(tokenizer=tokenizer_file, output_dir=str(tmp_path / "hub"), val_fraction=0.25,
                                max_tokens=1500, workers=1))
    assert calls == [("HuggingFaceFW/fineweb-edu", "sample-350BT", "train", True)]
    assert 1000 < json.loads((out / "meta.json").read_text())["splits"]["train"]["tokens"] <= 1500


def test_bpb_bytes_are_the_exact_bytes_of_the_evaluated_tokens(tmp_path, corpus_file, tokenizer_file):
    out = prepare(PrepareConfig(source=str(corpus_file), tokenizer=tokenizer_file, output_dir=str(tmp_path / "d"),
                                val_fraction=0.25, workers=1))
    windows = TokenWindows(out, "val", seq_len=16)
    assert "exact" in windows.bytes_source
    # Every token's bytes, EOS counting none, add up to the held-out documents' UTF-8 bytes exactly.
    all_tokens = torch.from_numpy(np.asarray(windows.tokens, dtype=np.int64))
    assert windows.utf8_bytes(all_tokens) == json.loads((out / "meta.json").read_text())["splits"]["val"]["utf8_bytes"]
    tokenizer = load_tokenizer(tokenizer_file)
    for _, labels in windows.validation_batches(0, batch_size=1):
        text = tokenizer.decode(labels[0].tolist())
        if "\ufffd" not in text:  # a window may cut a character's bytes apart; those cannot be decoded
            assert windows.utf8_bytes(labels) == len(text.replace("<|endoftext|>", "").encode())


def test_every_tokenizer_holds_out_the_same_documents(tmp_path, corpus_file, corpus_texts):
    folders = []
    for vocab in (300, 384):
        tokenizer = train_byte_level_tokenizer(corpus_texts, tmp_path / f"tok{vocab}" / "tokenizer.json", vocab)
        folders.append(prepare(PrepareConfig(source=str(corpus_file), tokenizer=str(tokenizer), workers=1,
                                             output_dir=str(tmp_path / f"d{vocab}"), val_fraction=0.25)))
    small, large = (json.loads((folder / "meta.json").read_text())["splits"] for folder in folders)
    assert small["val"]["tokens"] > large["val"]["tokens"]  # different tokenizers ...
    for split in ("train", "val"):  # ... of the same documents, bytes for bytes
        assert (small[split]["documents"], small[split]["utf8_bytes"]) == \
            (large[split]["documents"], large[split]["utf8_bytes"])


def test_a_vocabulary_that_is_not_byte_level_gets_an_estimate_said_so(tmp_path, corpus_file):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "[UNK]": 1, "the": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.save(str(tmp_path / "words.json"))
    assert token_utf8_bytes(load_tokenizer(str(tmp_path / "words.json"))) is None
    out = prepare(PrepareConfig(source=str(corpus_file), tokenizer=str(tmp_path / "words.json"), workers=1,
                                output_dir=str(tmp_path / "d"), val_fraction=0.25))
    windows = TokenWindows(out, "val", seq_len=16)
    assert not (out / "token_bytes.npy").exists() and "estimate" in windows.bytes_source
    meta = windows.meta["splits"]["val"]
    assert windows.utf8_bytes(torch.zeros(meta["tokens"], dtype=torch.int64)) == pytest.approx(meta["utf8_bytes"])


def test_a_local_source_is_recorded_as_itself(tmp_path, corpus_file, tokenizer_file):
    out = prepare(PrepareConfig(source=str(corpus_file), tokenizer=tokenizer_file, output_dir=str(tmp_path / "d"),
                                val_fraction=0.25, workers=1))
    arguments = json.loads((out / "meta.json").read_text())["arguments"]
    assert arguments["source"] == str(corpus_file.resolve())
    assert not {"dataset", "dataset_config", "split"} & set(arguments)


def test_without_the_hub_a_hub_source_fails_at_once_saying_what_to_pass(tmp_path, tokenizer_file, monkeypatch):
    monkeypatch.setattr(prepare_data, "hub_reachable", lambda: False)
    with pytest.raises(DataError, match="cannot be reached; pass --source a local"):
        prepare(PrepareConfig(tokenizer=tokenizer_file, output_dir=str(tmp_path / "hub"), workers=1))
    assert not (tmp_path / "hub").exists()
