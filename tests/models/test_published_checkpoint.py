"""The published checkpoint format, written by DeepSpeed itself (docs/behaviour.md §4), read back value by value.

A module fixture has DeepSpeed (gloo, CPU) write, through ``zero_writer.py``, a ZeRO stage-2
checkpoint with **8 ranks** of a Lightning-like module holding a tiny dual-attention model in
VD's block layout: the 265 published trainable names (9 brain module, 256 LoRA, 128 on the text
stack) under Lightning's ``model.`` prefix, a sample of frozen UNet/VAE weights, module states
in float16 (the published shards are named ``zero_pp_rank_R_mp_rank_00_optim_states.pt``, the
names of an fp16 run: bf16 would be ``bf16_zero_pp_rank_*``), tag ``checkpoint``, and a
Lightning-like client state with a pickled ``argparse.Namespace``. The same training is also
saved with 2 ranks (for the stale-shard fault). Every value read back is compared with the
float32 master weights DeepSpeed held at the save, which the writer gathers through DeepSpeed
(``safe_get_full_fp32_param``), not from the checkpoint files.
"""

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_values import (
    assert_model_differs,
    assert_model_holds,
    model_trainable_tensors,
    published_trainable_names,
)
from safetensors.torch import load_file, save_file

from dynadiff.checkpoint import (
    CheckpointError,
    OpaqueObject,
    convert,
    load_checkpoint,
    read_metadata,
    read_zero_checkpoint,
    resolve_checkpoint,
    safe_torch_load,
    save_checkpoint,
    trainable_state_dict,
)
from dynadiff.models.config import FmriMLPConfig, VersatileDiffusionConfig

pytestmark = pytest.mark.slow

N_VOXELS, N_SUBJECTS, N_TIMEPOINTS, HIDDEN = 23, 2, 6, 4
MODEL_STATES = "mp_rank_00_model_states.pt"
FROZEN_SAMPLE = ("unet.conv_in.", "unet.down_blocks.0.attentions.0.", "unet.mid_block.attentions.0.transformers.1.",
                 "vae.encoder.conv_in.", "vae.decoder.conv_out.")


def _shard(rank: int) -> str:
    return f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """f(seed, dual) -> a fresh tiny model whose UNet has VD's 16 attention blocks (2 layers per block)."""
    from dynadiff.models import build_model
    from dynadiff.models.tiny import write_tiny_vd

    vd = write_tiny_vd(tmp_path_factory.mktemp("vd_published_layout"), layers_per_block=2, text_unet=True)

    def make(seed: int, dual: bool):
        torch.manual_seed(seed)
        return build_model(VersatileDiffusionConfig(vd_cache_dir=vd, image_size=64, dual_attention=dual),
                           FmriMLPConfig(hidden=HIDDEN), n_voxels=N_VOXELS, n_subjects=N_SUBJECTS,
                           n_timepoints=N_TIMEPOINTS)

    return make


@pytest.fixture(scope="module")
def published(tmp_path_factory, build, randomise_trainable):
    pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp("published_zero")
    dual = build(20, dual=True)
    randomise_trainable(dual, 21)
    initial = {"model." + k: v.clone().contiguous() for k, v in model_trainable_tensors(dual).items()}
    frozen = ["model." + k for k, p in dual.named_parameters() if not p.requires_grad and k.startswith(FROZEN_SAMPLE)]
    state = dual.state_dict()
    initial.update({k: state[k[len("model."):]].clone().contiguous() for k in frozen})
    params = root / "params.safetensors"
    save_file(initial, str(params), metadata={"frozen": json.dumps(frozen), "buffers": "[]"})
    out = {"zero8": root / "world8", "zero2": root / "world2"}
    cmd = [sys.executable, str(Path(__file__).with_name("zero_writer.py")), str(params), "--dtype", "fp16",
           "--spawn", f"8:{out['zero8']}:{root / 'masters8.safetensors'}",
           "--spawn", f"2:{out['zero2']}:{root / 'masters2.safetensors'}"]
    proc = subprocess.run(cmd, check=False, env=dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return dict(out, initial=initial, frozen=frozen, masters8=load_file(root / "masters8.safetensors"),
                masters2=load_file(root / "masters2.safetensors"))


def test_deepspeed_wrote_the_published_layout(published, build):
    folder = published["zero8"] / "checkpoint"
    assert sorted(p.name for p in folder.iterdir()) == sorted([MODEL_STATES] + [_shard(r) for r in range(8)])
    names = published_trainable_names()
    assert len(names) == 265 and sum(".transformers.1." in n for n in names) == 128
    # the package's dual-attention model has exactly the published names, and so has the module DeepSpeed saved
    assert sorted(trainable_state_dict(build(0, dual=True))) == sorted(names)
    states = safe_torch_load(folder / MODEL_STATES)
    recorded = [name for group in states["param_shapes"] for name in group]
    assert sorted(recorded) == sorted("model." + n for n in names)
    assert sorted(states["frozen_param_shapes"]) == sorted(published["frozen"])
    assert {states["module"][k].dtype for k in recorded + published["frozen"]} == {torch.float16}
    # Lightning's hyper-parameters and DeepSpeed's classes: stand-ins, never imported
    hparams = states["hyper_parameters"]
    assert isinstance(hparams, OpaqueObject) and hparams.qualname == "argparse.Namespace"
    assert hparams.state == {"lr": 0.05, "subject": 1} and states["epoch"] == 1
    with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace"):
        torch.load(folder / MODEL_STATES, weights_only=True)
    optim = safe_torch_load(folder / _shard(5))["optimizer_state_dict"]
    assert optim["zero_stage"].qualname.endswith("ZeroStageEnum") and optim["zero_stage"].args == (2,)
    assert optim["loss_scaler"].qualname.endswith("DynamicLossScaler") and optim["partition_count"] == [8]


def test_reader_returns_the_float32_masters_deepspeed_held(published):
    import deepspeed
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    masters, initial, frozen = published["masters8"], published["initial"], published["frozen"]
    ckpt = read_zero_checkpoint(published["zero8"])
    assert (ckpt.zero_stage, ckpt.world_size, ckpt.ds_version) == (2, 8, deepspeed.__version__)
    assert sorted(ckpt.trainable) == sorted(masters) and len(masters) == 265
    assert sorted(ckpt.frozen) == sorted(frozen) and sorted(ckpt.state_dict) == sorted(list(masters) + frozen)
    wrong = [k for k in masters if ckpt.state_dict[k].dtype != torch.float32 or not torch.equal(ckpt.state_dict[k], masters[k])]
    assert not wrong, f"{len(wrong)} of 265 trainable tensors differ from DeepSpeed's float32 masters: {wrong[:3]}"
    wrong = [k for k in frozen if not torch.equal(ckpt.state_dict[k], initial[k].half())]
    assert not wrong, f"frozen tensors differ from the float16 weights saved: {wrong[:3]}"
    # not vacuous: training moved every master, and none is its module's float16 copy (a reader of those fails)
    module = safe_torch_load(published["zero8"] / "checkpoint" / MODEL_STATES)["module"]
    assert not [k for k in masters if torch.equal(masters[k], initial[k]) or torch.equal(masters[k], module[k].float())]
    # DeepSpeed's own reader agrees
    want = get_fp32_state_dict_from_zero_checkpoint(str(published["zero8"]), tag="checkpoint")
    assert sorted(want) == sorted(ckpt.state_dict) and all(torch.equal(want[k], ckpt.state_dict[k]) for k in want)
    # the same training saved by 2 ranks: its own masters
    two = read_zero_checkpoint(published["zero2"])
    assert two.world_size == 2 and all(torch.equal(two.state_dict[k], published["masters2"][k]) for k in masters)


@pytest.mark.parametrize("dual", [True, False], ids=["dual", "plain"])
def test_every_trainable_value_loads_from_the_zero_folder(published, build, dual):
    masters, frozen = published["masters8"], published["frozen"]
    model = build(30, dual=dual)
    assert_model_differs(model, masters, prefix="model.")
    report = load_checkpoint(model, published["zero8"])
    assert report.missing == report.unexpected == report.missing_text_stack == [] and report.renamed == {}
    assert sorted(report.ignored_frozen) == sorted(k[len("model."):] for k in frozen)
    text_stack = sorted(n for n in published_trainable_names() if ".transformers.1." in n)
    assert sorted(report.ignored_text_stack) == ([] if dual else text_stack)
    assert len(report.loaded) == (265 if dual else 137)
    assert assert_model_holds(model, masters, prefix="model.") == (265 if dual else 137)


def test_every_trainable_value_loads_from_converted_and_saved_files(published, build, tmp_path):
    masters, frozen = published["masters8"], published["frozen"]
    dst = tmp_path / "subj01.safetensors"
    counts = convert(published["zero8"], dst)
    assert counts == {"written": 265, "trainable": 265, "buffers": 0, "frozen_written": 0, "frozen_skipped": len(frozen)}
    converted = load_file(dst)
    assert sorted(converted) == sorted(published_trainable_names())
    assert all(converted[k].dtype == torch.float32 and torch.equal(converted[k], masters["model." + k]) for k in converted)
    meta = read_metadata(dst)
    assert (meta["world_size"], meta["zero_stage"]) == ("8", "2")
    for dual, n in ((True, 265), (False, 137)):
        model = build(31, dual=dual)
        assert_model_differs(model, masters, prefix="model.")
        assert load_checkpoint(model, dst).missing == []
        assert assert_model_holds(model, masters, prefix="model.") == n
        # save_checkpoint's file of the loaded model, into another fresh model
        saved = save_checkpoint(model, tmp_path / f"resaved_{dual}.safetensors")
        again = build(32, dual=dual)
        assert_model_differs(again, masters, prefix="model.")
        assert load_checkpoint(again, saved).missing == []
        assert assert_model_holds(again, masters, prefix="model.") == n
    convert(published["zero8"], tmp_path / "all.safetensors", include_frozen=True)
    with_frozen = load_file(tmp_path / "all.safetensors")
    assert sorted(with_frozen) == sorted(published_trainable_names() + [k[len("model."):] for k in frozen])
    assert all(torch.equal(with_frozen[k[len("model."):]], published["initial"][k].half()) for k in frozen)


# -- faults --------------------------------------------------------------------------------


def _linked_copy(published, tmp_path) -> Path:
    """A copy of the 8-rank checkpoint whose tag folder holds symbolic links to the original files
    (remove or replace a link, never write through it)."""
    dst = tmp_path / "subj01"
    shutil.copytree(published["zero8"], dst, copy_function=os.symlink)
    return dst


def _replace(link: Path, data: bytes) -> None:
    link.unlink()
    link.write_bytes(data)


@pytest.fixture
def untouched(build, published):
    """A plain model, its trainable tensors and a check that a failed load left them all as they were."""
    model = build(40, dual=False)
    before = {k: v.clone() for k, v in model_trainable_tensors(model).items()}
    yield model
    assert_model_holds(model, before)


@pytest.mark.parametrize("rank", [0, 7])
def test_a_missing_shard_is_an_error_before_anything_loads(published, tmp_path, untouched, rank, capsys):
    """An incomplete copy of the published folder: resolve_checkpoint, which eval.py calls before any
    work, says which shard is missing. (It used to pass it: eval.py then prepared the data, started
    generating, and reported the loader's ValueError as a possibly corrupt image cache.)"""
    from dynadiff.checkpoint.__main__ import main
    from dynadiff.decoder import CheckpointInfo, DecoderError

    ckpt = _linked_copy(published, tmp_path)
    (ckpt / "checkpoint" / _shard(rank)).unlink()
    message = rf"should hold 8 optimizer partitions \(one per rank\) but holds 7; missing: rank {rank} \(an incomplete"
    with pytest.raises(CheckpointError, match=rf"^DeepSpeed checkpoint .*subj01/checkpoint {message}"):
        resolve_checkpoint(ckpt)
    with pytest.raises(DecoderError, match=rf"^--checkpoint: DeepSpeed checkpoint .*{message}") as err:
        CheckpointInfo.read(ckpt)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=message):
        read_zero_checkpoint(ckpt)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(untouched, ckpt)
    assert main(["convert", str(ckpt), str(tmp_path / "out.safetensors")]) == 1
    assert "should hold 8 optimizer partitions" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


def test_a_truncated_shard_is_an_error_before_anything_loads(published, tmp_path, untouched):
    ckpt = _linked_copy(published, tmp_path)
    shard = ckpt / "checkpoint" / _shard(3)
    data = shard.read_bytes()
    _replace(shard, data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{_shard(3)} is not a complete torch file \(truncated"):
        resolve_checkpoint(ckpt)
    with pytest.raises(ValueError, match=rf"{_shard(3)} is not a torch zip checkpoint that can be read safely"):
        load_checkpoint(untouched, ckpt)


def test_a_truncated_model_states_file_is_an_error(published, tmp_path, untouched):
    ckpt = _linked_copy(published, tmp_path)
    states = ckpt / "checkpoint" / MODEL_STATES
    data = states.read_bytes()
    _replace(states, data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=rf"{MODEL_STATES} is not a complete torch file"):
        resolve_checkpoint(ckpt)
    with pytest.raises(ValueError, match=rf"{MODEL_STATES} is not a torch zip checkpoint"):
        load_checkpoint(untouched, ckpt)


def test_stale_shards_of_another_world_size_are_an_error(published, tmp_path, untouched):
    """The same training later saved with 2 ranks into the 8-rank folder: model states and ranks 0-1
    are replaced, the shards of ranks 2-7 stay behind."""
    ckpt = _linked_copy(published, tmp_path)
    for name in (MODEL_STATES, _shard(0), _shard(1)):
        _replace(ckpt / "checkpoint" / name, (published["zero2"] / "checkpoint" / name).read_bytes())
    message = r"should hold 2 optimizer partitions \(one per rank\) but holds 8 \(an incomplete copy, or the shards"
    with pytest.raises(CheckpointError, match=message):
        resolve_checkpoint(ckpt)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(untouched, ckpt)


def test_without_any_shard_the_module_float16_weights_load_with_a_warning(published, build, tmp_path, caplog):
    """No optimizer shard at all (only mp_rank_00_model_states.pt downloaded): the module's own
    float16 copies, which DeepSpeed rounded from the masters, are loaded, and a warning says so."""
    ckpt = _linked_copy(published, tmp_path)
    for rank in range(8):
        (ckpt / "checkpoint" / _shard(rank)).unlink()
    model = build(41, dual=True)
    with caplog.at_level(logging.WARNING):
        report = load_checkpoint(model, ckpt)
    assert "has no optimizer partitions: using the module's stored weights" in caplog.text
    assert report.missing == [] and len(report.loaded) == 265
    assert assert_model_holds(model, {k: v.half() for k, v in published["masters8"].items()}, prefix="model.") == 265


def test_a_folder_without_model_states_is_not_a_checkpoint(published, tmp_path, untouched):
    ckpt = _linked_copy(published, tmp_path)
    (ckpt / "checkpoint" / MODEL_STATES).unlink()
    with pytest.raises(CheckpointError, match=r"subj01 holds no checkpoint \(\d+ entries: checkpoint, latest"):
        resolve_checkpoint(ckpt)
    with pytest.raises(FileNotFoundError, match=r"no DeepSpeed ZeRO checkpoint at .*subj01: expected mp_rank_00"):
        load_checkpoint(untouched, ckpt)
