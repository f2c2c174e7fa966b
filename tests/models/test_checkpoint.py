"""Checkpoints: the published names load with nothing missing, every missing or unexpected
key is reported by name, safetensors round trip, safe unpickling, DeepSpeed ZeRO folders
(read without DeepSpeed, equal to DeepSpeed's own reader) and the convert command. On every
path (published names, other prefixes, ZeRO folder, converted and saved files) each trainable
tensor of the model is compared with its source (``checkpoint_values.assert_model_holds``).
The published 8-rank format: test_published_checkpoint.py."""

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_values import (
    assert_model_differs,
    assert_model_holds,
    model_trainable_tensors,
)
from diffusers import UNet2DConditionModel
from diffusers.models import Transformer2DModel
from safetensors.torch import load_file, save_file

from dynadiff.checkpoint import (
    CheckpointError,
    OpaqueObject,
    load_checkpoint,
    read_metadata,
    read_state_dict,
    read_zero_checkpoint,
    resolve_zero_folder,
    safe_torch_load,
    save_checkpoint,
    trainable_state_dict,
)

V, S, T, H = 23, 2, 6, 16
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def published_state_dict(vd_dir, seed=0, with_text_stack=True):
    """A state dict named and shaped as the released checkpoints (issue 3's list for the brain
    module; LoRA names of the dual-attention UNet walked from the base UNet's attention
    modules), with Lightning's ``model.`` prefix and a few frozen base weights."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "brain_modules.clip_image.subject_layers.weights": (S, V, H),
        "brain_modules.clip_image.lin0.weight": (T * H, 1, H),
        "brain_modules.clip_image.lin0.bias": (T * H,),
        "brain_modules.clip_image.post_lin0.0.weight": (H,),
        "brain_modules.clip_image.post_lin0.0.bias": (H,),
        "brain_modules.clip_image.out_time_agg.weight": (1, T),
        "brain_modules.clip_image.out_time_agg.bias": (1,),
        "brain_modules.clip_image.lin1.weight": (257 * 768, H),
        "brain_modules.clip_image.lin1.bias": (257 * 768,),
    }
    base = UNet2DConditionModel.from_pretrained(vd_dir, subfolder="image_unet")
    for path, transformer in base.named_modules():
        if not isinstance(transformer, Transformer2DModel):
            continue
        for rest, attn in transformer.named_modules():
            if not rest.endswith("attn2"):
                continue
            for stack in (0, 1) if with_text_stack else (0,):
                for target in TARGETS:
                    lin = attn.get_submodule(target)
                    prefix = f"unet.{path}.transformers.{stack}.{rest}.{target}"
                    shapes[f"{prefix}.lora_A.default.weight"] = (4, lin.in_features)
                    shapes[f"{prefix}.lora_B.default.weight"] = (lin.out_features, 4)
    state = {f"model.{k}": torch.randn(s, generator=g) for k, s in shapes.items()}
    state["model.unet.conv_in.weight"] = base.conv_in.weight.detach().clone()
    state["model.unet.down_blocks.0.attentions.0.transformers.0.proj_in.weight"] = torch.zeros(1)
    state["model.vae.encoder.conv_in.weight"] = torch.zeros(1)
    return state


def _lora_count(state, stack):
    return sum(".lora_" in k and f".transformers.{stack}." in k for k in state)


def test_published_names_load_with_nothing_missing(model_factory, tiny_vd):
    model = model_factory(seed=3)
    state = published_state_dict(tiny_vd)
    assert_model_differs(model, state, prefix="model.")
    report = load_checkpoint(model, state)
    assert report.missing == [] and report.unexpected == []
    # every trainable tensor of the model holds its file value (image-stack names mapped onto the plain UNet)
    assert assert_model_holds(model, state, prefix="model.") == 9 + 80
    n_brain = 9
    assert len(report.loaded) == n_brain + _lora_count(state, 0) and _lora_count(state, 0) == 10 * 4 * 2
    assert len(report.ignored_text_stack) == _lora_count(state, 1)
    assert sorted(report.ignored_frozen) == sorted(k[len("model."):] for k in state if ".lora_" not in k and "brain" not in k)
    # the values are in the model, image-stack names mapped onto the plain UNet
    unet_key = "unet.up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_out.0.lora_B.default.weight"
    file_key = "model.unet.up_blocks.2.attentions.1.transformers.0.transformer_blocks.0.attn2.to_out.0.lora_B.default.weight"
    assert torch.equal(model.state_dict()[unet_key], state[file_key])
    assert torch.equal(model.brain_module.lin0.weight, state["model.brain_modules.clip_image.lin0.weight"])
    # and they are the model's own published names
    assert set(trainable_state_dict(model)) == {k[len("model."):] for k in state if ".transformers.1." not in k} - {
        k[len("model."):] for k in state if ".lora_" not in k and "brain" not in k}


def test_published_names_load_into_dual_model_exactly(model_factory, tiny_vd):
    model = model_factory(seed=3, dual_attention=True)
    state = published_state_dict(tiny_vd)
    assert_model_differs(model, state, prefix="model.")
    report = load_checkpoint(model, state)
    assert report.missing == report.unexpected == report.ignored_text_stack == report.missing_text_stack == []
    assert len(report.loaded) == 9 + _lora_count(state, 0) + _lora_count(state, 1)
    assert assert_model_holds(model, state, prefix="model.") == 9 + 160
    assert set(trainable_state_dict(model)) == {k[6:] for k in state if "lora_" in k or "brain" in k}


def test_dropped_keys_are_reported_by_name(model_factory, tiny_vd):
    model = model_factory(seed=3)
    state = published_state_dict(tiny_vd)
    dropped_lora = "unet.mid_block.attentions.0.transformers.0.transformer_blocks.0.attn2.to_v.lora_A.default.weight"
    dropped_brain = "brain_modules.clip_image.out_time_agg.bias"
    del state["model." + dropped_lora], state["model." + dropped_brain]
    before = model.brain_module.lin1.weight.detach().clone()
    initial = {k: v.clone() for k, v in model_trainable_tensors(model).items()}
    with pytest.raises(CheckpointError, match=rf"lacks trainable weights of this model: 2: .*{re.escape(dropped_brain)}") as err:
        load_checkpoint(model, state)
    assert dropped_lora in str(err.value) and "allow_missing=True" in str(err.value)
    assert torch.equal(model.brain_module.lin1.weight, before)  # nothing loaded
    report = load_checkpoint(model, state, allow_missing=True)
    assert sorted(report.missing) == sorted([dropped_lora, dropped_brain])
    assert "MISSING (left at their initial values): 2:" in report.summary()
    assert torch.equal(model.brain_module.lin1.weight, state["model.brain_modules.clip_image.lin1.weight"])
    # every other tensor holds its file value; the two missing ones kept their initial values
    assert assert_model_holds(model, dict(state, **{"model." + k: initial[k] for k in (dropped_lora, dropped_brain)}),
                              prefix="model.") == 9 + 80


def test_unexpected_and_misshapen_keys(model_factory, tiny_vd, caplog):
    model = model_factory(seed=3)
    state = published_state_dict(tiny_vd)
    state["model.brain_modules.clip_image.lin2.weight"] = torch.zeros(3)
    state["model.scheduler.betas"] = torch.zeros(3)
    state["model.unet.down_blocks.0.attentions.0.transformers.0.transformer_blocks.7.attn2.to_q.lora_A.default.weight"] = torch.zeros(3)
    with caplog.at_level("WARNING"):
        report = load_checkpoint(model, state)
    assert sorted(report.unexpected) == sorted([
        "brain_modules.clip_image.lin2.weight", "scheduler.betas",
        "unet.down_blocks.0.attentions.0.transformers.0.transformer_blocks.7.attn2.to_q.lora_A.default.weight"])
    assert "3 unexpected tensors not loaded" in caplog.text and "scheduler.betas" in caplog.text
    state["model.brain_modules.clip_image.subject_layers.weights"] = torch.zeros(1, V, H)
    with pytest.raises(CheckpointError, match=r"subject_layers.weights: file \(1, 23, 16\) vs model \(2, 23, 16\)"):
        load_checkpoint(model, state)


@pytest.mark.parametrize("dual", [False, True], ids=["plain", "dual"])
@pytest.mark.parametrize("lora_prefix, reported", [
    ("_forward_module.model.unet.base_model.model.", "unet.base_model.model."),  # Lightning wrapper + PEFT's get_peft_model
    ("module.model.unet.base_model.model.", "unet.base_model.model."),  # DeepSpeed engine + PEFT
    ("model.model.diffusion_model.", "model.diffusion_model."),  # another pipeline's attribute names
    ("base_model.model.", "base_model.model."),  # PEFT around the UNet alone
])
def test_other_unet_prefixes_and_lightning_wrapper(model_factory, tiny_vd, dual, lora_prefix, reported):
    """LoRA keys under another prefix are matched to the model's names, and their VALUES are the
    ones copied into the model: every trainable tensor, not only the count of renamed keys."""
    model = model_factory(seed=3, dual_attention=dual)
    published = published_state_dict(tiny_vd)
    state = {(lora_prefix + k[len("model.unet."):] if ".lora_" in k else "_forward_module." + k): v
             for k, v in published.items()}
    assert_model_differs(model, published, prefix="model.")
    report = load_checkpoint(model, state)
    assert report.missing == report.unexpected == []
    assert len(report.renamed) == (160 if dual else 80) and len(report.ignored_text_stack) == (0 if dual else 80)
    # (keys reported once the wrapper prefixes module., _forward_module., model. are removed)
    assert all(k.startswith(reported) and v == "unet." + k[len(reported):] for k, v in report.renamed.items())
    assert assert_model_holds(model, published, prefix="model.") == (9 + 160 if dual else 9 + 80)


def test_safetensors_round_trip_gives_identical_outputs(model_factory, randomise_trainable, tmp_path, brain_batch):
    brain, subject_idx = brain_batch
    a = model_factory(seed=0)
    randomise_trainable(a, 5)
    path = save_checkpoint(a, tmp_path / "ckpt.safetensors", extra_metadata={"subject": 1, "note": "x"})
    b = model_factory(seed=1)
    before = b.reconstruct(brain[:2], subject_idx[:2])
    want = a.reconstruct(brain[:2], subject_idx[:2])
    assert (before - want).abs().max() > 1e-2
    expected = {k: v.clone() for k, v in model_trainable_tensors(a).items()}
    assert assert_model_holds(a, load_file(path)) == 9 + 80  # the file holds every trainable value of a
    assert_model_differs(b, expected)
    report = load_checkpoint(b, path)
    assert report.missing == report.unexpected == [] and report.source == str(path)
    assert assert_model_holds(b, expected) == 9 + 80
    torch.testing.assert_close(b.reconstruct(brain[:2], subject_idx[:2]), want, atol=0, rtol=0)
    meta = read_metadata(path)
    assert json.loads(meta["brain_modules_config"])["hidden"] == H
    assert (meta["n_voxels"], meta["n_subjects"], meta["subject"], meta["note"], meta["dual_attention"]) == ("23", "2", "1", "x", "false")
    assert all(".transformers.0." in k for k in load_file(path) if ".lora_" in k)
    with pytest.raises(ValueError, match="are .safetensors"):
        save_checkpoint(a, tmp_path / "ckpt.pt")


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*nope not found: give a DeepSpeed checkpoint folder"):
        read_state_dict(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no DeepSpeed ZeRO checkpoint at .*empty: expected mp_rank_00_model_states.pt"):
        read_state_dict(tmp_path / "empty")


class _RunsCommand:
    def __init__(self, func, command):
        self.func, self.command = func, command

    def __reduce__(self):
        return (self.func, (self.command,))


class _SomeConfig:  # a class of the writer's that the reader cannot import
    def __init__(self):
        self.lr = 0.1


def test_safe_load_never_runs_pickled_code(tmp_path, monkeypatch):
    flag = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weights": torch.arange(3.0), "payload": _RunsCommand(subprocess.call, ["touch", str(flag)]),
                "config": _SomeConfig()}, path)
    monkeypatch.delattr(sys.modules[__name__], "_SomeConfig")  # as if it were defined in another program
    with pytest.raises(pickle.UnpicklingError):  # torch's own weights-only load refuses the file
        torch.load(path, weights_only=True)
    obj = safe_torch_load(path)
    assert not flag.exists()
    assert torch.equal(obj["weights"], torch.arange(3.0))
    assert isinstance(obj["payload"], OpaqueObject) and obj["payload"].qualname.endswith(".call")  # (py2 name: commands)
    assert obj["payload"].args == (["touch", str(flag)],)
    assert isinstance(obj["config"], OpaqueObject) and obj["config"].state == {"lr": 0.1}
    assert obj["config"].qualname.endswith("._SomeConfig")

    torch.save({"payload": _RunsCommand(os.system, f"touch {flag}")}, path)
    with pytest.raises(ValueError, match="cannot be read safely, refusing it: .*posix.system"):
        safe_torch_load(path)
    assert not flag.exists()
    (tmp_path / "legacy.pt").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="not a torch zip checkpoint"):
        safe_torch_load(tmp_path / "legacy.pt")


def test_zero_folder_resolution(tmp_path):
    for folder in (tmp_path / "ckpt" / "checkpoint", tmp_path / "other" / "global_step7"):
        folder.mkdir(parents=True)
        (folder / "mp_rank_00_model_states.pt").write_bytes(b"")
    (tmp_path / "other" / "latest").write_text("global_step7\n")
    assert resolve_zero_folder(tmp_path / "ckpt") == tmp_path / "ckpt" / "checkpoint"
    assert resolve_zero_folder(tmp_path / "ckpt" / "checkpoint") == tmp_path / "ckpt" / "checkpoint"
    assert resolve_zero_folder(tmp_path / "other") == tmp_path / "other" / "global_step7"
    with pytest.raises(FileNotFoundError, match="tag 'best'"):
        resolve_zero_folder(tmp_path / "ckpt", tag="best")


# -- real DeepSpeed checkpoints -----------------------------------------------------------


@pytest.fixture(scope="module")
def zero_checkpoints(tmp_path_factory, model_factory):
    """{world size: folder} of ZeRO-2 checkpoints DeepSpeed wrote with 1 and 2 gloo ranks,
    of a module holding the dual-attention model's trainable tensors under ``model.``."""
    pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp("zero")
    dual = model_factory(seed=6, dual_attention=True)
    tensors = {"model." + k: v.clone().contiguous() for k, v in trainable_state_dict(dual).items()}
    frozen = ["model.unet.conv_in.weight", "model.vae.encoder.conv_in.bias"]
    tensors[frozen[0]] = dual.unet.conv_in.weight.detach().clone()
    tensors[frozen[1]] = dual.vae.encoder.conv_in.bias.detach().clone()
    tensors["model.vae.step_count"] = torch.tensor([3.0, 4.0])
    params = root / "params.safetensors"
    save_file(tensors, str(params), metadata={"frozen": json.dumps(frozen), "buffers": json.dumps(["model.vae.step_count"])})
    writer = Path(__file__).with_name("zero_writer.py")
    # both checkpoints from one process that imports DeepSpeed once and forks the ranks
    proc = subprocess.run([sys.executable, str(writer), str(params), "--spawn", f"1:{root / 'world1'}",
                           "--spawn", f"2:{root / 'world2'}"], check=False, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return {"params": params, 1: root / "world1", 2: root / "world2"}


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_zero_reader_equals_deepspeed(zero_checkpoints, world):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    want = get_fp32_state_dict_from_zero_checkpoint(str(zero_checkpoints[world]), tag="checkpoint")
    got = read_zero_checkpoint(zero_checkpoints[world])
    assert got.zero_stage == 2 and got.world_size == world
    assert list(got.state_dict) and sorted(got.state_dict) == sorted(want)
    for k in want:
        assert got.state_dict[k].dtype == want[k].dtype and torch.equal(got.state_dict[k], want[k]), k
    # the optimizer moved the trainable tensors: these are the trained master weights
    initial = load_file(zero_checkpoints["params"])
    moved = [k for k in got.trainable if not torch.equal(got.state_dict[k], initial[k])]
    assert len(moved) == len(got.trainable) > 100
    assert torch.equal(got.state_dict["model.unet.conv_in.weight"], initial["model.unet.conv_in.weight"])
    # the client state's argparse.Namespace was never imported: torch itself refuses the file
    with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace"):
        torch.load(got.folder / "mp_rank_00_model_states.pt", weights_only=True)


@pytest.mark.slow
def test_load_and_convert_deepspeed_checkpoint(zero_checkpoints, model_factory, tmp_path, brain_batch):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    brain, subject_idx = brain_batch
    fp32 = read_zero_checkpoint(zero_checkpoints[2]).state_dict
    want = get_fp32_state_dict_from_zero_checkpoint(str(zero_checkpoints[2]), tag="checkpoint")  # DeepSpeed's reader
    from_folder = model_factory(seed=8)
    assert_model_differs(from_folder, want, prefix="model.")
    report = load_checkpoint(from_folder, zero_checkpoints[2])
    assert assert_model_holds(from_folder, want, prefix="model.") == 9 + 80
    assert report.missing == [] and report.unexpected == []
    assert len(report.ignored_text_stack) == 80 and sorted(report.ignored_frozen) == [
        "unet.conv_in.weight", "vae.encoder.conv_in.bias", "vae.step_count"]
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.default.weight"
    assert torch.equal(from_folder.state_dict()[key],
                       fp32["model.unet.down_blocks.1.attentions.0.transformers.0.transformer_blocks.0.attn2.to_k.lora_B.default.weight"])

    dst = tmp_path / "subj.safetensors"
    proc = subprocess.run([sys.executable, "-m", "dynadiff.checkpoint", "convert", str(zero_checkpoints[2]), str(dst)],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 frozen tensors left out" in proc.stdout
    converted = load_file(dst)
    assert "unet.conv_in.weight" not in converted and "vae.step_count" in converted
    assert all(not k.startswith("model.") for k in converted)
    assert read_metadata(dst)["world_size"] == "2"
    assert all(torch.equal(converted[k], want["model." + k]) for k in converted)
    from_file = model_factory(seed=9)
    load_checkpoint(from_file, dst)
    assert assert_model_holds(from_file, want, prefix="model.") == 9 + 80
    torch.testing.assert_close(from_file.reconstruct(brain[:2], subject_idx[:2]),
                               from_folder.reconstruct(brain[:2], subject_idx[:2]), atol=0, rtol=0)

    proc = subprocess.run([sys.executable, "-m", "dynadiff.checkpoint", "convert", str(tmp_path / "nope"), str(dst)],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "no DeepSpeed ZeRO checkpoint at" in proc.stderr
