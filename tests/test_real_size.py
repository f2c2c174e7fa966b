"""Real-size stand-ins (benchmarks/real_size.py) and the benchmarks that use them.

The real-size eval.py run itself (full VD UNet and VAE, 15,724-voxel brain module, a 7 GB published-format
checkpoint, 512x512 sampling) takes about 7 minutes and 11 GB of RAM on the project's 2-core CPU machine:
it is ``benchmarks/bench_real_size.py``, not a test. Here: the real configs build the real sizes, the
published checkpoint's 265 tensors, the ZeRO-2 folder written without DeepSpeed read by DeepSpeed's own
reader and by ours and loaded with nothing missing, all on toy widths; and benchmarks/bench_gpu.{py,sh} run
on tiny models on the CPU (their GPU run cannot be tested here).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import real_size  # benchmarks/real_size.py
import torch

REPO = Path(__file__).resolve().parents[1]
TINY_UNET = dict(real_size.VD_IMAGE_UNET_CONFIG, block_out_channels=[32, 32, 64, 64], layers_per_block=1, norm_num_groups=8)
TINY_VAE = dict(real_size.VD_VAE_CONFIG, block_out_channels=[16, 32, 32, 32], layers_per_block=1, norm_num_groups=8)
TINY_LORA_PER_STACK = 10 * 4 * 2  # 10 transformers (3 down, 1 mid, 6 up at 1 layer per block) x 4 projections x (A, B)


def _load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here on one torch thread (tests/conftest.py)."""


def test_real_configs_build_versatile_diffusion_sizes():
    unet = real_size.build_image_unet(device="meta")
    vae = real_size.build_vae(device="meta")
    assert sum(p.numel() for p in unet.parameters()) == real_size.IMAGE_UNET_PARAMETERS == 859_520_964
    assert sum(p.numel() for p in vae.parameters()) == real_size.VAE_PARAMETERS == 83_653_863
    assert list(unet.config.block_out_channels) == [320, 640, 1280, 1280] and unet.config.cross_attention_dim == 768
    assert unet.config.attention_head_dim == 8 and unet.config.sample_size == 64 and unet.config.layers_per_block == 2
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    assert attn.heads == 8 and attn.to_k.in_features == 768  # 8 heads of 40 channels at 320
    assert vae.config.scaling_factor == 0.18215 and vae.config.latent_channels == 4  # the default: not in VD's file
    assert "clip_sample" not in real_size.VD_SCHEDULER_CONFIG  # DDPM's default applies (docs/behaviour.md §4)


def test_published_checkpoint_tensors():
    shapes = real_size.published_trainable_shapes(15724)
    assert len(shapes) == real_size.N_TRAINABLE_TENSORS == 265
    assert sum(k.startswith("brain_modules.clip_image.") for k in shapes) == 9
    assert sum(".lora_" in k for k in shapes) == 256
    assert sum(".lora_" in k and ".transformers.1." in k for k in shapes) == 128
    assert sum(math.prod(s) for s in shapes.values()) == 346_188_871  # subject 1
    assert shapes["brain_modules.clip_image.lin1.weight"] == (257 * 768, 1552)
    assert shapes["brain_modules.clip_image.subject_layers.weights"] == (1, 15724, 1552)
    assert shapes["brain_modules.clip_image.lin0.weight"] == (6 * 1552, 1, 1552)
    assert shapes["unet.mid_block.attentions.0.transformers.1.transformer_blocks.0.attn2.to_k.lora_A.default.weight"] == (4, 768)
    assert shapes["unet.up_blocks.3.attentions.2.transformers.0.transformer_blocks.0.attn2.to_out.0.lora_B.default.weight"] == (320, 4)
    # docs/behaviour.md §4's element count (341,467,687) is that of a 12,682-voxel model: subject 7's nsdgeneral count
    assert sum(math.prod(s) for s in real_size.published_trainable_shapes(12682).values()) == 341_467_687


def test_written_vd_folder_is_read_by_the_real_loader(tmp_path):
    from dynadiff.models import vd

    folder = real_size.write_real_vd(tmp_path / "vd", unet_config=TINY_UNET, vae_config=TINY_VAE)
    assert json.loads((folder / "image_unet" / "config.json").read_text()) == json.loads(json.dumps(TINY_UNET))
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text()) == real_size.VD_SCHEDULER_CONFIG
    assert (folder / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    unet, vae = vd.load_image_unet(folder), vd.load_vae(folder)
    reference = real_size.build_image_unet(0, "cpu", TINY_UNET)
    for (name, p), q in zip(unet.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(p, q), name
    assert vae.config.scaling_factor == 0.18215
    assert "clip_sample" not in vd.load_scheduler_config(folder)


@pytest.fixture(scope="module")
def zero_folder(tmp_path_factory):
    """A tiny published-format ZeRO-2 folder (8 ranks, frozen weights in) and the tensors it holds."""
    from dynadiff.models.config import FmriMLPConfig

    root = tmp_path_factory.mktemp("real_size")
    vd_dir = real_size.write_real_vd(root / "vd", unet_config=TINY_UNET, vae_config=TINY_VAE)
    brain = FmriMLPConfig(hidden=16)
    trainable = real_size.random_trainable_tensors(23, 0, TINY_UNET, brain)
    ckpt = real_size.write_published_zero_checkpoint(root / "subj01", trainable, world_size=8,
                                                     frozen=real_size.frozen_shapes(TINY_UNET, TINY_VAE))
    return {"vd": vd_dir, "brain": brain, "trainable": trainable, "ckpt": ckpt}


def test_zero_folder_layout(zero_folder):
    from dynadiff.checkpoint import safe_torch_load

    ckpt = zero_folder["ckpt"]
    assert (ckpt / "latest").read_text() == "checkpoint"
    names = sorted(p.name for p in (ckpt / "checkpoint").iterdir())
    assert names == ["mp_rank_00_model_states.pt"] + [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(8)]
    states = safe_torch_load(ckpt / "checkpoint" / "mp_rank_00_model_states.pt")
    trainable = zero_folder["trainable"]
    assert list(states["param_shapes"][0]) == ["model." + k for k in trainable]
    assert len(trainable) == 9 + 2 * TINY_LORA_PER_STACK
    assert states["module"]["model.brain_modules.clip_image.lin0.weight"].dtype == torch.float16
    assert any(".transformers.1.proj_in.weight" in k for k in states["frozen_param_shapes"])
    assert any(k.endswith("attn2.to_q.base_layer.weight") for k in states["frozen_param_shapes"])
    optim = safe_torch_load(ckpt / "checkpoint" / "zero_pp_rank_7_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
    part = optim["single_partition_of_fp32_groups"][0]
    n = sum(t.numel() for t in trainable.values())
    assert part.dtype == torch.float32 and part.numel() * 8 == 16 * math.ceil(n / 16)
    assert optim["base_optimizer_state"]["state"][0]["exp_avg"].shape == part.shape


def test_zero_folder_read_by_deepspeed_and_ours_loads_with_nothing_missing(zero_folder, tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from dynadiff.checkpoint import convert, load_checkpoint, read_zero_checkpoint
    from dynadiff.models.config import VersatileDiffusionConfig

    theirs = get_fp32_state_dict_from_zero_checkpoint(str(zero_folder["ckpt"]), tag="checkpoint")
    ours = read_zero_checkpoint(zero_folder["ckpt"]).state_dict
    assert set(theirs) == set(ours)
    for name, value in zero_folder["trainable"].items():
        assert torch.equal(theirs["model." + name], value) and torch.equal(ours["model." + name], value), name

    vd_cfg = VersatileDiffusionConfig(vd_cache_dir=zero_folder["vd"], image_size=64, num_inference_steps=2)
    for source in (zero_folder["ckpt"], tmp_path / "subj01.safetensors"):
        if source.suffix == ".safetensors":
            convert(zero_folder["ckpt"], source)
        model = vd_cfg.build(zero_folder["brain"], n_voxels=23)
        report = load_checkpoint(model, source)
        assert report.missing == [] and report.unexpected == []
        assert len(report.loaded) == 9 + TINY_LORA_PER_STACK
        assert len(report.ignored_text_stack) == TINY_LORA_PER_STACK
        assert torch.equal(model.brain_module.lin1.weight, zero_folder["trainable"]["brain_modules.clip_image.lin1.weight"])


def test_real_size_benchmark_gets_exact_voxel_counts(tmp_path):
    from dynadiff.data.synthetic import write_synthetic_nsd

    bench = _load_benchmark("bench_real_size")
    shape = (14, 17, 11)
    for n in (1, 200, bench.brain_voxel_count(shape)):
        info = write_synthetic_nsd(tmp_path / "nsd", sessions=(1,), runs_per_session=1, n_test=2, n_unique=2,
                                   volume_shapes={1: shape}, visual_fraction=bench.visual_fraction_for(n, shape))
        assert info["n_voxels"][1] == n
    with pytest.raises(ValueError, match="brain voxels"):
        bench.visual_fraction_for(bench.brain_voxel_count(shape) + 1, shape)
    assert bench.brain_voxel_count(bench.VOLUME_SHAPE) >= bench.SUBJECT1_VOXELS


def test_gpu_benchmark_tiny_on_cpu_records_failures_and_goes_on(tmp_path, monkeypatch):
    bench = _load_benchmark("bench_gpu")
    real_build = bench.build_model

    def build(args, dtype, dual, device):
        if dual:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real_build(args, dtype, dual, device)

    monkeypatch.setattr(bench, "build_model", build)
    md, js = tmp_path / "bench.md", tmp_path / "bench.json"
    tiny = ["--tiny", "--device", "cpu", "--dtypes", "fp32", "--repeats", "1"]
    rows = bench.main([*tiny, "--batches", "1", "2", "--compile", "off", "--markdown", str(md), "--json", str(js)])
    assert [(r["path"], r["batch"], r["compiled"], r["status"].split(":")[0]) for r in rows] == [
        ("ours", 1, False, "ok"), ("ours", 2, False, "ok"), ("original", 1, False, "OOM")]
    assert all(r["images_per_s"] > 0 and r["finite"] and len(r["times_s"]) == 1 for r in rows[:2])
    text = md.read_text()
    assert "| ours (image stack) | fp32 | 2 | off |" in text and "| OOM: CUDA out of memory" in text
    assert "TINY models" in text and json.loads(js.read_text())["rows"][2]["status"].startswith("OOM")

    compiled = bench.main([*tiny, "--batches", "1", "--compile", "on", "--compile-backend", "eager"])
    assert [(r["compiled"], r["status"]) for r in compiled] == [(True, "ok")] and compiled[0]["images_per_s"] > 0

    skipped = bench.main([*tiny, "--batches", "1", "--budget", "0"])
    assert [r["status"] for r in skipped] == ["skipped: time budget (0 s) spent"] * 3


@pytest.mark.slow
def test_gpu_benchmark_shell_script_runs_from_anywhere(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "bench_gpu.sh"), "--tiny", "--device", "cpu", "--dtypes",
                           "fp32", "--batches", "1", "--compile", "off", "--no-original"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| ours (image stack) | fp32 | 1 | off |" in proc.stdout
    assert {"bench_gpu.md", "bench_gpu.json", "bench_gpu.log"} <= {p.name for p in out.iterdir()}
    assert "command: benchmarks/bench_gpu.sh --tiny" in (out / "bench_gpu.log").read_text()
