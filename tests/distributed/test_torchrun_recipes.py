"""The tiny recipes under torchrun with expert parallelism (gloo, CPU), against the one-process run.

The synthetic data source gives every layout the same global batch (rank r takes its slice of each
global micro-batch), so losses must agree up to fp32 summation order; the LoRA adapters trained at
EP=2 must equal those trained at EP=1 after their expert slices are put back together.

Runs that several tests read (the one-process references, the EP2 run the resume tests continue)
are trained once per session (tests/train_runs.py) and never written to: a resume copies the
checkpoint it continues into a folder of its own.
"""

import hashlib
import json
import re
import shutil
import sys

import pytest
import torch
import yaml

from engine.export import gather_trained_weights
from engine.train import REPO
from tests.closeness import assert_tensors_close, assert_weights_close
from tests.train_runs import run_command, train

# Every test reads torchrun runs of the trainer.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PEAK_LR = {"tiny_sft": 3.0e-3, "tiny_lora": 1.0e-2}  # the recipes' optim.lr (checked below)

SYNTH = [
    "data.source=synthetic",
    "data.max_seq_len=32",
    "data.global_batch_size=8",
    "data.micro_batch_size=2",
    "trainer.max_steps=6",
    "trainer.log_every=1",
    "trainer.val_every=0",
    "parallel.timeout_s=120",
    "checkpoint.every=3",
    "checkpoint.keep=3",
]  # checkpoints at steps 3 (resumed from) and 6 (compared)


def _overrides(recipe, nproc, *extra, ep=None):
    return [f"recipe={recipe}", *SYNTH, *extra, f"parallel.ep={ep or nproc}"]


def _shared(shared_runs, recipe, nproc, *extra, ep=None):
    """The synthetic run of `recipe` on `nproc` ranks, trained once per session. Read-only."""
    return shared_runs.get(nproc, *_overrides(recipe, nproc, *extra, ep=ep))


def _losses(run):
    return [r["loss"] for r in run.records]


@pytest.mark.parametrize("recipe,nproc", [("tiny_sft", 2), ("tiny_sft", 4), ("tiny_lora", 2), ("tiny_lora", 4)])
def test_expert_parallel_run_matches_one_process(shared_runs, recipe, nproc):
    one = _shared(shared_runs, recipe, 1)
    ep = _shared(shared_runs, recipe, nproc)
    a = torch.tensor(_losses(one))
    b = torch.tensor(_losses(ep))
    assert a[-1] < a[0]
    assert_tensors_close(b, a, rtol=1e-5, atol=1e-5, where=f"loss per step, EP{nproc} vs one process")
    assert_tensors_close(
        torch.tensor([r["grad_norm"] for r in ep.records]),
        torch.tensor([r["grad_norm"] for r in one.records]),
        rtol=1e-4,
        atol=1e-6,
        where=f"grad norm per step, EP{nproc} vs one process",
    )
    assert yaml.safe_load((REPO / "recipes" / f"{recipe}.yaml").read_text())["optim"]["lr"] == PEAK_LR[recipe]
    w1 = gather_trained_weights(one.out / "checkpoints" / "step_0000006")
    wn = gather_trained_weights(ep.out / "checkpoints" / "step_0000006")
    # Experts' (and expert adapters') slices put back together in expert order; the tolerance
    # grows with lr and the number of steps (tests/closeness.py says why).
    assert_weights_close(wn, w1, lr=PEAK_LR[recipe], steps=6, where=f"{recipe} weights, EP{nproc} vs one process")
    export = "adapter" if recipe == "tiny_lora" else "hf"
    assert (ep.out / export).is_dir()
    if recipe == "tiny_lora":  # the EP run's adapter export (read back from its checkpoint) is the same
        from safetensors.torch import load_file

        a, b = (load_file(run.out / "adapter" / "adapter_model.safetensors") for run in (one, ep))
        assert_weights_close(b, a, lr=PEAK_LR[recipe], steps=6, where=f"adapter export, EP{nproc} vs one process")


def _resume_from_step_3(straight, out, nproc, overrides):
    """Continue `straight`'s step-3 checkpoint in a folder of its own, with the same overrides."""
    shutil.copytree(straight.out / "checkpoints" / "step_0000003", out / "checkpoints" / "step_0000003")
    return train(out, nproc, *overrides)


@pytest.mark.parametrize("extra", [[], ["parallel.shard=full"]])
def test_resume_at_ep2_is_bit_exact(shared_runs, tmp_path, extra):
    straight = _shared(shared_runs, "tiny_sft", 2, *extra)
    resumed = _resume_from_step_3(straight, tmp_path / "b", 2, _overrides("tiny_sft", 2, *extra))
    assert [r["step"] for r in resumed.records] == [4, 5, 6]
    assert _losses(resumed) == _losses(straight)[3:]


def test_checkpoint_from_two_ranks_resumes_at_four_and_at_one(shared_runs, tmp_path):
    # Written at EP2 on 2 ranks, read at EP4 on 4 ranks and in one process: the same run continues
    # (fp32; the layouts sum in different orders).
    straight = _shared(shared_runs, "tiny_sft", 2)
    written = straight.out / "checkpoints" / "step_0000003"
    recorded = json.loads((written / "meta.json").read_text())["checksums"]  # both ranks' files, from rank 0
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in written.iterdir() if p.name != "meta.json"}
    assert recorded == files and {"__1_0.distcp", "rank00001.json"} <= files.keys(), sorted(recorded)
    for nproc in (4, 1):  # each rank verifies its share of the files before reading them
        resumed = _resume_from_step_3(straight, tmp_path / f"resumed{nproc}", nproc, _overrides("tiny_sft", nproc))
        assert [r["step"] for r in resumed.records] == [4, 5, 6]
        torch.testing.assert_close(
            torch.tensor(_losses(resumed)), torch.tensor(_losses(straight)[3:]), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("ep", [1, 2])
def test_checkpoint_holds_each_tensor_once(tmp_path, ep):
    # 2 ranks: at EP1 every weight is replicated on both, at EP2 the dense ones are. The checkpoint's
    # data files must hold the model's weights and both AdamW moments once (fp32), plus a small
    # per-tensor overhead; a duplicate would add 40-100 %.
    from engine.models.gpt_oss import GptOssConfig, GptOssForCausalLM

    wide = ["++model.overrides.hidden_size=128", "++model.overrides.intermediate_size=256"]
    train(tmp_path / "run", 2, *_overrides("tiny_sft", 2, "trainer.max_steps=1", "optim.warmup_steps=1", *wide, ep=ep))
    with torch.device("meta"):
        n = GptOssForCausalLM(GptOssConfig.tiny(hidden_size=128, intermediate_size=256)).num_parameters()
    expected = 3 * 4 * n
    written = sum(p.stat().st_size for p in (tmp_path / "run" / "checkpoints" / "step_0000001").glob("*.distcp"))
    assert abs(written - expected) <= 0.05 * expected, (written, expected)


def test_bad_layout_fails_fast_on_every_rank(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=4",
        str(REPO / "engine" / "train.py"),
        "recipe=tiny_sft",
        "parallel.ep=3",
        f"trainer.output_dir={tmp_path}",
    ]
    proc = run_command(cmd, timeout=300)
    assert proc.returncode != 0
    for rank in range(4):
        assert f"error (rank {rank}): LayoutError: parallel.ep=3 does not divide the world size 4" in proc.stderr


BF16_MASTERS = ["model.dtype=bfloat16", "optim.master_weights=true"]


@pytest.mark.parametrize(
    "recipe,extra,shard",
    [
        ("tiny_sft", [], "full"),
        ("tiny_lora", [], "full"),
        ("tiny_sft", [], "optimizer"),
        ("tiny_sft", BF16_MASTERS, "full"),
    ],
)
def test_fsdp_at_ep2_x_expert_dp2_matches_one_process(shared_runs, recipe, extra, shard):
    # EP2 x expert-DP2 on 4 ranks under FSDP2: dense weights sharded over 4 ranks, experts over 2.
    # fp32: the ranks sum in another order than one process, nothing else differs.
    # bf16 compute + fp32 masters: one process keeps bf16 weights (fp32 masters in the optimizer) and
    # accumulates bf16 gradients over its 4 micro-batches; FSDP2 keeps the fp32 masters as the sharded
    # weights and sums each rank's bf16 gradient in fp32. Not the same rounding: measured on CPU, losses
    # agree to 3.5e-4 relative and grad norms to 1.2 % over 6 steps; checked at 1e-3 and 3e-2 (an
    # averaged instead of summed gradient would be off by 4x).
    bf16 = extra == BF16_MASTERS
    one = _shared(shared_runs, recipe, 1, *extra)
    fsdp = _shared(shared_runs, recipe, 4, *extra, f"parallel.shard={shard}", ep=2)
    torch.testing.assert_close(
        torch.tensor(_losses(fsdp)), torch.tensor(_losses(one)), rtol=1e-3 if bf16 else 1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        torch.tensor([r["grad_norm"] for r in fsdp.records]),
        torch.tensor([r["grad_norm"] for r in one.records]),
        rtol=3e-2 if bf16 else 1e-4,
        atol=1e-6,
    )
    if bf16:
        return
    a = gather_trained_weights(one.out / "checkpoints" / "step_0000006")
    b = gather_trained_weights(fsdp.out / "checkpoints" / "step_0000006")
    # As in the EP test above: Adam carries fp32 rounding of near-cancelled gradients into the weights,
    # bounded by a fraction of the distance Adam can move them (tests/closeness.py).
    assert_weights_close(b, a, lr=PEAK_LR[recipe], steps=6, where=f"{recipe} weights, FSDP2 {shard} vs one process")


@pytest.mark.parametrize("shard", ["full", "optimizer"])
def test_validation_and_samples_under_fsdp_match_one_process(shared_runs, sampled_overrides, shard):
    # Validation and generation read the root's embedding and head and (generation) call a block's
    # submodules directly, outside FSDP2's forward hooks: they must gather those weights themselves.
    # The training after them must go on as in one process (FSDP2's state left as it was).
    # 4 steps, validation and samples every 2 (tests/conftest.py: SAMPLED).
    one = shared_runs.get(1, *sampled_overrides, "parallel.ep=1")
    fsdp = shared_runs.get(2, *sampled_overrides, f"parallel.shard={shard}", "parallel.ep=1")
    for key in ("loss", "val_loss"):
        a = torch.tensor([r[key] for r in one.records if key in r])
        b = torch.tensor([r[key] for r in fsdp.records if key in r])
        assert len(a) == (4 if key == "loss" else 2)
        assert_tensors_close(b, a, rtol=1e-5, atol=1e-5, where=f"{key}, FSDP2 shard={shard} on 2 ranks vs one process")
    assert (fsdp.out / "samples.jsonl").read_text() == (one.out / "samples.jsonl").read_text()


@pytest.mark.parametrize(
    "recipe,preset,nproc",
    [
        ("gptoss20b_lora", "gpt_oss_20b", 4),
        ("gptoss120b_lora", "gpt_oss_120b", 8),
        ("gptoss20b_lora_128k", "gpt_oss_20b", 1),
    ],
)
def test_real_recipe_dry_run_at_full_scale(tmp_path, recipe, preset, nproc):
    # The real recipe at its real layout, on the meta device: mesh, 20B/120B shapes, LoRA targets,
    # the batch split and one batch of data, with a checkpoint folder that has no weights at all.
    from engine.models.gpt_oss import GptOssConfig
    from engine.training.memory_plan import lora_param_count

    arch = getattr(GptOssConfig, preset)()
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(arch.to_hf_dict()))
    shutil.copy(REPO / "engine" / "data" / "assets" / "tokenizer" / "tokenizer.json", model_dir)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(REPO / "engine" / "train.py"),
        f"recipe={recipe}",
        f"model.path={model_dir}",
        "trainer.dry_run=true",
        f"trainer.output_dir={tmp_path / 'out'}",
        "trainer.device=cpu",
    ]
    proc = run_command(cmd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "all checks passed" in proc.stdout
    rows = int(re.search(r"data_rows: (\d+)", proc.stdout).group(1))  # the first epoch's packing, reported
    assert rows > 0 and 0 < float(re.search(r"data_packing_efficiency: ([\d.]+)", proc.stdout).group(1)) <= 1
    expected = lora_param_count(
        arch, 32, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"], nproc, False
    )
    assert f"trainable_on_rank: {expected}" in proc.stdout
    assert not (tmp_path / "out" / "checkpoints").exists()
