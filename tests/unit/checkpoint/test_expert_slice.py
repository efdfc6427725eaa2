"""Expert-parallel loading: a rank builds and reads only its experts' rows, which equal the full load's."""

import pytest
import torch

from engine.checkpoint import load_hf
from engine.checkpoint.hf.safetensors_io import SafetensorsIndex
from tests.distributed.layout import is_expert_param as is_expert_tensor
from tests.unit.checkpoint.builders import tiny_hf, write_mxfp4_checkpoint


@pytest.fixture(scope="module")
def mxfp4_dir(tmp_path_factory):
    return write_mxfp4_checkpoint(tiny_hf(seed=5, intermediate_size=32), tmp_path_factory.mktemp("ep") / "mxfp4")


@pytest.fixture(params=["bf16_layout", "mxfp4"])
def checkpoint(request, hf_dir, mxfp4_dir):
    return hf_dir if request.param == "bf16_layout" else mxfp4_dir


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rank_slice_equals_rows_of_full_load(checkpoint, dtype, monkeypatch):
    full = load_hf(checkpoint, dtype=dtype).state_dict()
    reads = []
    original_read = SafetensorsIndex.read
    monkeypatch.setattr(
        SafetensorsIndex,
        "read",
        lambda self, name, rows=None: reads.append((name, rows)) or original_read(self, name, rows),
    )
    rank = load_hf(checkpoint, dtype=dtype, ep_size=2, ep_rank=1)

    e = rank.config.num_local_experts
    for block in rank.moe_blocks():
        assert (block.experts.expert_offset, block.experts.num_experts) == (e // 2, e // 2)
    for name, tensor in rank.state_dict().items():
        expected = full[name][e // 2 :] if is_expert_tensor(name) else full[name]  # the router keeps all E rows
        assert tensor.dtype == dtype and torch.equal(tensor, expected), name
    # Only this rank's rows were read from the files, never the other experts'.
    expert_reads = [rows for name, rows in reads if is_expert_tensor(name)]
    assert expert_reads and all(rows is not None and e // 2 <= rows[0] < rows[1] <= e for rows in expert_reads)


def test_expert_range_is_the_same_slice(hf_dir):
    by_options = load_hf(hf_dir, dtype=torch.float32, ep_size=4, ep_rank=2).state_dict()
    by_range = load_hf(hf_dir, dtype=torch.float32, expert_range=(2, 3)).state_dict()
    assert by_options.keys() == by_range.keys()
    assert all(torch.equal(by_options[k], by_range[k]) for k in by_options)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(expert_range=(1, 3)), "one expert-parallel slice"),
        (dict(expert_range=(0, 5)), "one expert-parallel slice"),
        (dict(expert_range=(2, 4), ep_size=2, ep_rank=0), "give one or the other"),
        (dict(ep_size=2, ep_rank=2), "ep_rank=2 must be in"),
        (dict(ep_size=3), "must divide the number of experts"),
        (dict(expert_backend="loop"), "unknown model option"),
    ],
)
def test_bad_expert_slices_are_refused(hf_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_hf(hf_dir, **kwargs)
