"""Loaders: the batch contract on real data, exact resume, prefetch, the validation pass."""

import json
import threading
from itertools import islice

import pytest
import torch

from engine.data.config import DataConfig
from engine.data.dataset import DataError
from engine.data.loader import build_train_loader, build_val_loader
from engine.data.packing import IGNORE_INDEX


@pytest.fixture
def stores(tmp_path):
    """stores() -> a fresh folder for a prepared store, so each call prepares again."""
    count = iter(range(1000))
    return lambda: tmp_path / f"store{next(count)}"


def numbered_records(n: int) -> list[dict]:
    """Distinct records of varied length, so a batch's text says which record it holds and
    packed rows hold varying numbers of documents."""
    return [{"prompt": f"What is {i} + 1?" + " Please." * (i % 7), "completion": f"{i + 1}."} for i in range(n)]


def take(loader, n: int) -> list[dict]:
    it = iter(loader)
    try:
        return list(islice(it, n))
    finally:
        it.close()


def same_batches(a: list[dict], b: list[dict]) -> bool:
    keys = ("input_ids", "labels", "position_ids", "doc_ids")
    return len(a) == len(b) and all(all(torch.equal(x[k], y[k]) for k in keys) for x, y in zip(a, b))


def test_batch_contract_on_sample_data(tokenizer, stores):
    cfg = DataConfig(max_seq_len=256, micro_batch_size=2, global_batch_size=2)
    for batch in take(build_train_loader(cfg, tokenizer, store_dir=stores(), seed=0), 8):
        ids, labels, pos, docs = (batch[k] for k in ("input_ids", "labels", "position_ids", "doc_ids"))
        for t in (ids, labels, pos, docs):
            assert t.shape == (2, 256) and t.dtype == torch.int64 and t.device.type == "cpu"
        target = labels != IGNORE_INDEX
        assert batch["num_target_tokens"] == int(target.sum()) > 0
        # Shifted labels, never across a document boundary.
        assert torch.equal(labels[:, :-1][target[:, :-1]], ids[:, 1:][target[:, :-1]])
        assert not target[:, -1].any()
        assert (docs[:, 1:][target[:, :-1]] == docs[:, :-1][target[:, :-1]]).all()
        # Positions restart exactly where the document id changes.
        starts = torch.ones_like(docs, dtype=torch.bool)
        starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
        assert torch.equal(starts, pos == 0)
        assert not target[ids == tokenizer.pad_id].any()


@pytest.mark.parametrize("pack", [True, False])
def test_resume_reproduces_the_following_batches_exactly(tokenizer, write_jsonl, pack, stores):
    # 30 records of 75-95 tokens, 2 rows per batch: packed, an epoch is about 6 batches; unpacked, 15.
    cfg = DataConfig(train_path=str(write_jsonl(numbered_records(30))), max_seq_len=256, micro_batch_size=2,
                     global_batch_size=2, pack=pack, prefetch=3)
    store = stores()
    for stop_at in (3, 11):
        first = build_train_loader(cfg, tokenizer, store_dir=store, seed=5)
        it = iter(first)
        list(islice(it, stop_at))
        state = json.loads(json.dumps(first.state_dict()))
        expected = list(islice(it, 9))
        it.close()
        resumed = build_train_loader(cfg, tokenizer, store_dir=store, seed=5)
        resumed.load_state_dict(state)
        assert same_batches(take(resumed, 9), expected)


def test_prefetch_does_not_change_the_batches(tokenizer, stores):
    cfg = DataConfig(max_seq_len=256, micro_batch_size=2, global_batch_size=2, prefetch=0)
    store = stores()
    eager = take(build_train_loader(cfg, tokenizer, store_dir=store, seed=1), 6)
    ahead = take(build_train_loader(DataConfig(**{**vars(cfg), "prefetch": 4}), tokenizer, store_dir=store, seed=1), 6)
    assert same_batches(eager, ahead)


def test_resume_state_must_match_the_run(tokenizer, stores, write_jsonl):
    store = stores()
    loader = build_train_loader(DataConfig(max_seq_len=256), tokenizer, store_dir=store, seed=0)
    state = json.loads(json.dumps(loader.state_dict()))
    assert set(state) == {"epoch", "row", "store", "seed", "shuffle", "pack", "pack_window", "max_seq_len"}
    for key, value in (("seed", 1), ("shuffle", False), ("store", "0" * 64), ("max_seq_len", 128),
                       ("pack", "next_fit"), ("pack_window", 64)):
        other = build_train_loader(DataConfig(max_seq_len=256), tokenizer, store_dir=store, seed=0)
        with pytest.raises(DataError, match=f"checkpoint has data {key} = {value!r}"):
            other.load_state_dict({**state, key: value})
    # Other data behind the same folder: the store's content hash differs.
    changed = build_train_loader(DataConfig(train_path=str(write_jsonl(numbered_records(9))), max_seq_len=256),
                                 tokenizer, store_dir=store, seed=0)
    with pytest.raises(DataError, match="checkpoint has data store"):
        changed.load_state_dict(state)


def test_a_state_from_before_best_fit_resumes_next_fit_only(tokenizer, stores):
    # Such a state says pack = true and has no pack_window: its rows were packed next-fit.
    store = stores()
    cfg = DataConfig(max_seq_len=256, pack="next_fit", prefetch=0)
    saved = build_train_loader(cfg, tokenizer, store_dir=store, seed=0)
    [next(saved) for _ in range(3)]
    old = {k: v for k, v in saved.state_dict().items() if k != "pack_window"} | {"pack": True}
    expected = [next(saved) for _ in range(2)]
    resumed = build_train_loader(cfg, tokenizer, store_dir=store, seed=0)
    resumed.load_state_dict(old)
    assert same_batches([next(resumed) for _ in range(2)], expected)
    default = build_train_loader(DataConfig(max_seq_len=256), tokenizer, store_dir=store, seed=0)
    with pytest.raises(DataError, match=r"data pack = 'next_fit', this run has 'best_fit'.*\(data.pack=next_fit\)"):
        default.load_state_dict(old)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_validation_pass_equal_lengths_and_full_coverage(tokenizer, world_size, stores):
    cfg = DataConfig(max_seq_len=256, micro_batch_size=2)
    store = stores()
    whole = build_val_loader(cfg, tokenizer, store_dir=store)
    total = sum(b["num_target_tokens"] for b in whole)
    assert total == whole.store.manifest["token_stats"]["target_tokens"] > 0
    loaders = [build_val_loader(cfg, tokenizer, store_dir=store, rank=r, world_size=world_size)
               for r in range(world_size)]
    assert len({len(loader) for loader in loaders}) == 1
    assert sum(b["num_target_tokens"] for loader in loaders for b in loader) == total
    assert all(b["input_ids"].shape == (2, 256) for b in loaders[-1])


def test_no_validation_for_user_data_without_val_path(tokenizer, write_jsonl, stores):
    cfg = DataConfig(train_path=str(write_jsonl(numbered_records(2))))
    assert build_val_loader(cfg, tokenizer, store_dir=stores()) is None


def test_reloading_a_state_mid_stream_rewinds_it(tokenizer, stores):
    # The trainer's way: next(loader) throughout, load_state_dict on the same object.
    loader = build_train_loader(DataConfig(max_seq_len=256, prefetch=2), tokenizer, store_dir=stores(), seed=3)
    next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(4)]
    next(loader)
    loader.load_state_dict(state)
    assert same_batches([next(loader) for _ in range(4)], expected)
    loader.close()
    assert not any(t.name == "data-prefetch" for t in threading.enumerate()), "close() stops the thread"


def test_errors_in_the_prefetch_thread_reach_the_consumer():
    from engine.data.loader import prefetch

    def items():
        yield 1
        yield 2
        raise DataError("store.bin: read failed")

    stream = prefetch(items(), depth=2)
    assert [next(stream), next(stream)] == [1, 2]
    with pytest.raises(DataError, match="read failed"):
        next(stream)
