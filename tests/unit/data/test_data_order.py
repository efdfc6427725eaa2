"""One global order of packed rows: each epoch covers every document once, the global batches are the
same at every world size and micro-batch size, and a cursor saved at one layout resumes at another.

Ranks are simulated in one process (the loaders talk to no one once the store exists); the
torchrun runs that train on these batches are in tests/distributed/test_data_layout.py.
"""

import json

import numpy as np
import pytest
import torch

from engine.data.config import DataConfig
from engine.data.loader import build_train_loader
from engine.data.sampler import Cursor, GlobalOrder

GLOBAL_BATCH = 8


@pytest.fixture(scope="module")
def store(tmp_path_factory, tokenizer):
    """The shipped sample chats, prepared once for the module."""
    path = tmp_path_factory.mktemp("order") / "train"
    build_train_loader(DataConfig(max_seq_len=256), tokenizer, store_dir=path, seed=0)
    return path


def loaders(store, tokenizer, world_size: int, micro: int, seed: int = 7, pack: object = True, window: int = 4096):
    cfg = DataConfig(max_seq_len=256, global_batch_size=GLOBAL_BATCH, micro_batch_size=micro, pack=pack,
                     pack_window=window, prefetch=0)
    return [build_train_loader(cfg, tokenizer, store_dir=store, rank=r, world_size=world_size, seed=seed)
            for r in range(world_size)]


def global_batches(ranks: list, steps: int, keys=("input_ids",)) -> list[torch.Tensor]:
    """Each step's global batch as the trainer assembles it: accum micro-rounds of every rank's rows,
    laid out in (micro-round, rank, row) order -> [GLOBAL_BATCH, T] input ids per step (with more
    `keys`, [GLOBAL_BATCH, len(keys) * T]: those tensors side by side)."""
    world, micro = len(ranks), ranks[0].micro_batch_size
    accum = GLOBAL_BATCH // (world * micro)
    out = []
    for _ in range(steps):
        rows = []
        for _ in range(accum):
            for loader in ranks:
                batch = next(loader)
                rows.append(torch.cat([batch[k] for k in keys], dim=1))
        out.append(torch.cat(rows))
    return out


def test_each_epoch_covers_every_document_once():
    lengths = np.random.default_rng(0).integers(1, 100, size=300)
    order = GlobalOrder(lengths, max_seq_len=128, pack=True, shuffle=True, seed=3)
    for epoch in range(3):
        docs = np.concatenate([order.docs(Cursor(epoch, r)) for r in range(order.rows_in(epoch))])
        assert sorted(docs.tolist()) == list(range(300))
        assert all(lengths[order.docs(Cursor(epoch, r))].sum() <= 128 for r in range(order.rows_in(epoch)))
    first = [order.docs(Cursor(e, 0)).tolist() for e in range(3)]
    assert first[0] != first[1] != first[2], "each epoch has its own permutation"
    plain = GlobalOrder(lengths, max_seq_len=128, pack=False, shuffle=False, seed=3)
    assert [plain.docs(Cursor(0, r)).tolist() for r in range(5)] == [[0], [1], [2], [3], [4]]
    assert plain.advance(Cursor(0, 298), 3) == Cursor(1, 1)


@pytest.mark.parametrize("pack", [True, False, "next_fit"])
def test_global_batches_do_not_depend_on_the_layout(store, tokenizer, pack):
    one = loaders(store, tokenizer, 1, 8, pack=pack)
    # Packed, run past the end of epoch 0 (about 220 rows); unpacked (400 rows), a few steps.
    steps = one[0].order.rows_in(0) // GLOBAL_BATCH + 2 if pack else 4
    reference = global_batches(one, steps)
    for world, micro in ((1, 2), (2, 2), (4, 2), (4, 1), (8, 1), (2, 4)):
        batches = global_batches(loaders(store, tokenizer, world, micro, pack=pack), steps)
        assert all(torch.equal(a, b) for a, b in zip(batches, reference)), f"world {world} micro {micro}"
    assert not torch.equal(reference[0], global_batches(loaders(store, tokenizer, 1, 8, seed=8, pack=pack), 1)[0])


def test_cursor_saved_at_two_ranks_resumes_at_four_and_at_one(store, tokenizer):
    ep2 = loaders(store, tokenizer, 2, 2)
    global_batches(ep2, ep2[0].order.rows_in(0) // GLOBAL_BATCH - 1)  # just before the end of epoch 0
    states = [json.loads(json.dumps(loader.state_dict())) for loader in ep2]
    assert all(s == states[0] for s in states), "the data state is the same on every rank"
    assert states[0]["epoch"] == 0
    expected = global_batches(ep2, 4)  # crosses into epoch 1
    assert ep2[0].cursor.epoch == 1
    for world, micro in ((4, 2), (1, 2), (1, 8)):
        resumed = loaders(store, tokenizer, world, micro)
        for loader in resumed:
            loader.load_state_dict(states[0])
        got = global_batches(resumed, 4)
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), f"world {world} micro {micro}"


BATCH_KEYS = ("input_ids", "labels", "position_ids", "doc_ids")


def test_best_fit_windows_at_one_two_and_four_ranks(store, tokenizer):
    # Windows of 40 of the 400 documents (about 20 rows each): 10 windows an epoch, run into epoch 1.
    one = loaders(store, tokenizer, 1, 8, pack="best_fit", window=40)
    assert len(one[0].order.epoch(0).window_rows) - 1 == 10
    steps = one[0].order.rows_in(0) // GLOBAL_BATCH + 2
    reference = global_batches(one, steps, BATCH_KEYS)
    for world, micro in ((2, 1), (2, 4), (4, 1), (4, 2)):
        batches = global_batches(loaders(store, tokenizer, world, micro, pack="best_fit", window=40), steps, BATCH_KEYS)
        assert all(torch.equal(a, b) for a, b in zip(batches, reference)), f"world {world} micro {micro}"
    default_window = global_batches(loaders(store, tokenizer, 1, 8, pack="best_fit"), 1, BATCH_KEYS)
    assert not torch.equal(reference[0], default_window[0]), "the window decides the rows"


def test_resume_in_the_middle_of_a_window_at_another_layout(store, tokenizer):
    saved = loaders(store, tokenizer, 2, 2, pack="best_fit", window=40)
    window_rows = saved[0].order.epoch(0).window_rows.tolist()
    # The first step boundary strictly inside a window (not its first row), past the first window.
    step = next(s for s in range(3, 40) if s * GLOBAL_BATCH not in window_rows and s * GLOBAL_BATCH > window_rows[1])
    global_batches(saved, step)
    state = json.loads(json.dumps(saved[0].state_dict()))
    assert state["epoch"] == 0 and state["row"] == step * GLOBAL_BATCH and state["pack_window"] == 40
    expected = global_batches(saved, 6, BATCH_KEYS)  # on into the next windows
    for world, micro in ((4, 1), (1, 8)):
        resumed = loaders(store, tokenizer, world, micro, pack="best_fit", window=40)  # a fresh order, packed anew
        for loader in resumed:
            loader.load_state_dict(state)
        got = global_batches(resumed, 6, BATCH_KEYS)
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), f"world {world} micro {micro}"
