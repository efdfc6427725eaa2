"""The tiny recipes under torchrun with expert parallelism (gloo, CPU), against the one-process run.

The synthetic data source gives every layout the same global batch (rank r takes its slice of each
global micro-batch), so losses must agree up to fp32 summation order; the LoRA adapters trained at
EP=2 must equal those trained at EP=1 after their expert slices are put back together.
"""

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from engine.export import gather_trained_weights
from engine.train import REPO
from tests.closeness import assert_tensors_close, assert_weights_close

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
]


def _run(out, nproc, *overrides, ep=None):
    script = str(REPO / "engine" / "train.py")
    if nproc == 1:
        cmd = [sys.executable, script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    cmd += [*overrides, f"trainer.output_dir={out}", f"parallel.ep={ep or nproc}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("recipe,nproc", [("tiny_sft", 2), ("tiny_sft", 4), ("tiny_lora", 2), ("tiny_lora", 4)])
def test_expert_parallel_run_matches_one_process(tmp_path, recipe, nproc):
    one = _run(tmp_path / "ep1", 1, f"recipe={recipe}", *SYNTH)
    ep = _run(tmp_path / f"ep{nproc}", nproc, f"recipe={recipe}", *SYNTH)
    a = torch.tensor([r["loss"] for r in one])
    b = torch.tensor([r["loss"] for r in ep])
    assert a[-1] < a[0]
    assert_tensors_close(b, a, rtol=1e-5, atol=1e-5, where=f"loss per step, EP{nproc} vs one process")
    assert_tensors_close(
        torch.tensor([r["grad_norm"] for r in ep]),
        torch.tensor([r["grad_norm"] for r in one]),
        rtol=1e-4,
        atol=1e-6,
        where=f"grad norm per step, EP{nproc} vs one process",
    )
    assert yaml.safe_load((REPO / "recipes" / f"{recipe}.yaml").read_text())["optim"]["lr"] == PEAK_LR[recipe]
    w1 = gather_trained_weights(tmp_path / "ep1" / "checkpoints" / "step_0000006")
    wn = gather_trained_weights(tmp_path / f"ep{nproc}" / "checkpoints" / "step_0000006")
    # Experts' (and expert adapters') slices put back together in expert order; the tolerance
    # grows with lr and the number of steps (tests/closeness.py says why).
    assert_weights_close(wn, w1, lr=PEAK_LR[recipe], steps=6, where=f"{recipe} weights, EP{nproc} vs one process")
    export = "adapter" if recipe == "tiny_lora" else "hf"
    assert (tmp_path / f"ep{nproc}" / export).is_dir()
    if recipe == "tiny_lora":  # the EP run's adapter export (read back from its checkpoint) is the same
        from safetensors.torch import load_file

        a, b = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("ep1", f"ep{nproc}"))
        assert_weights_close(b, a, lr=PEAK_LR[recipe], steps=6, where=f"adapter export, EP{nproc} vs one process")


@pytest.mark.parametrize("extra", [[], ["parallel.shard=full"]])
def test_resume_at_ep2_is_bit_exact(tmp_path, extra):
    common = ["recipe=tiny_sft", *SYNTH, "checkpoint.every=3", "checkpoint.keep=3", *extra]
    straight = _run(tmp_path / "a", 2, *common)
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_0000003", tmp_path / "b" / "checkpoints" / "step_0000003")
    resumed = _run(tmp_path / "b", 2, *common)
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight[3:]]


def test_checkpoint_from_two_ranks_resumes_at_four_and_at_one(tmp_path):
    # Written at EP2 on 2 ranks, read at EP4 on 4 ranks and in one process: the same run continues
    # (fp32; the layouts sum in different orders).
    common = ["recipe=tiny_sft", *SYNTH, "checkpoint.every=3", "checkpoint.keep=3"]
    straight = _run(tmp_path / "a", 2, *common)
    for nproc in (4, 1):
        out = tmp_path / f"resumed{nproc}"
        shutil.copytree(tmp_path / "a" / "checkpoints" / "step_0000003", out / "checkpoints" / "step_0000003")
        resumed = _run(out, nproc, *common)
        assert [r["step"] for r in resumed] == [4, 5, 6]
        torch.testing.assert_close(
            torch.tensor([r["loss"] for r in resumed]),
            torch.tensor([r["loss"] for r in straight[3:]]),
            rtol=1e-5,
            atol=1e-5,
        )


@pytest.mark.parametrize("ep", [1, 2])
def test_checkpoint_holds_each_tensor_once(tmp_path, ep):
    # 2 ranks: at EP1 every weight is replicated on both, at EP2 the dense ones are. The checkpoint's
    # data files must hold the model's weights and both AdamW moments once (fp32), plus a small
    # per-tensor overhead; a duplicate would add 40-100 %.
    from engine.models.gpt_oss import GptOssConfig, GptOssForCausalLM

    wide = ["++model.overrides.hidden_size=128", "++model.overrides.intermediate_size=256"]
    _run(tmp_path / "run", 2, "recipe=tiny_sft", *SYNTH, "trainer.max_steps=1", "optim.warmup_steps=1", *wide, ep=ep)
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
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
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
def test_fsdp_at_ep2_x_expert_dp2_matches_one_process(tmp_path, recipe, extra, shard):
    # EP2 x expert-DP2 on 4 ranks under FSDP2: dense weights sharded over 4 ranks, experts over 2.
    # fp32: the ranks sum in another order than one process, nothing else differs.
    # bf16 compute + fp32 masters: one process keeps bf16 weights (fp32 masters in the optimizer) and
    # accumulates bf16 gradients over its 4 micro-batches; FSDP2 keeps the fp32 masters as the sharded
    # weights and sums each rank's bf16 gradient in fp32. Not the same rounding: measured on CPU, losses
    # agree to 3.5e-4 relative and grad norms to 1.2 % over 6 steps; checked at 1e-3 and 3e-2 (an
    # averaged instead of summed gradient would be off by 4x).
    bf16 = extra == BF16_MASTERS
    common = [f"recipe={recipe}", *SYNTH, "checkpoint.every=3", *extra]
    one = _run(tmp_path / "one", 1, *common)
    fsdp = _run(tmp_path / "fsdp", 4, *common, f"parallel.shard={shard}", ep=2)
    torch.testing.assert_close(
        torch.tensor([r["loss"] for r in fsdp]),
        torch.tensor([r["loss"] for r in one]),
        rtol=1e-3 if bf16 else 1e-5,
        atol=1e-5,
    )
    torch.testing.assert_close(
        torch.tensor([r["grad_norm"] for r in fsdp]),
        torch.tensor([r["grad_norm"] for r in one]),
        rtol=3e-2 if bf16 else 1e-4,
        atol=1e-6,
    )
    if bf16:
        return
    a = gather_trained_weights(tmp_path / "one" / "checkpoints" / "step_0000006")
    b = gather_trained_weights(tmp_path / "fsdp" / "checkpoints" / "step_0000006")
    # As in the EP test above: Adam carries fp32 rounding of near-cancelled gradients into the weights,
    # bounded by a fraction of the distance Adam can move them (tests/closeness.py).
    assert_weights_close(b, a, lr=PEAK_LR[recipe], steps=6, where=f"{recipe} weights, FSDP2 {shard} vs one process")


@pytest.fixture(scope="module")
def one_process_with_validation(tmp_path_factory):
    out = tmp_path_factory.mktemp("val") / "one"
    prompts = out.parent / "prompts.txt"
    prompts.write_text("What is 2 + 2?\nName a colour.\n")
    common = [
        "recipe=tiny_sft",
        "trainer.max_steps=4",
        "optim.warmup_steps=1",
        "trainer.log_every=1",
        "trainer.val_every=2",
        "trainer.sample_every=2",
        f"trainer.sample_prompts={prompts}",
        "trainer.sample_max_new_tokens=6",
        "parallel.timeout_s=120",
    ]
    return common, _run(out, 1, *common), (out / "samples.jsonl").read_text()


@pytest.mark.parametrize("shard", ["full", "optimizer"])
def test_validation_and_samples_under_fsdp_match_one_process(tmp_path, one_process_with_validation, shard):
    # Validation and generation read the root's embedding and head and (generation) call a block's
    # submodules directly, outside FSDP2's forward hooks: they must gather those weights themselves.
    # The training after them must go on as in one process (FSDP2's state left as it was).
    common, one, samples = one_process_with_validation
    fsdp = _run(tmp_path / "fsdp", 2, *common, f"parallel.shard={shard}", ep=1)
    for key in ("loss", "val_loss"):
        a = torch.tensor([r[key] for r in one if key in r])
        b = torch.tensor([r[key] for r in fsdp if key in r])
        assert len(a) == (4 if key == "loss" else 2)
        assert_tensors_close(b, a, rtol=1e-5, atol=1e-5, where=f"{key}, FSDP2 shard={shard} on 2 ranks vs one process")
    assert (tmp_path / "fsdp" / "samples.jsonl").read_text() == samples


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
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "all checks passed" in proc.stdout
    rows = int(re.search(r"data_rows: (\d+)", proc.stdout).group(1))  # the first epoch's packing, reported
    assert rows > 0 and 0 < float(re.search(r"data_packing_efficiency: ([\d.]+)", proc.stdout).group(1)) <= 1
    expected = lora_param_count(
        arch, 32, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"], nproc, False
    )
    assert f"trainable_on_rank: {expected}" in proc.stdout
    assert not (tmp_path / "out" / "checkpoints").exists()
