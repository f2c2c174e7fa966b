"""train.py --init-from: a new subject from a pretrained model, its weights loaded exactly, its subjects kept."""

from __future__ import annotations

import pytest
import torch

from dynadiff import training
from dynadiff.cli import ConfigError
from scripts import load_script

SUBJECT_LAYERS = "brain_modules.clip_image.subject_layers."


def tiny(nsd, vd, out, cache) -> list[str]:
    """train.py's KEY=VALUE items of a tiny run (32 px, 16 hidden units, 4 tokens) on session 1."""
    return [f"data.nsd_dataset_config.nsddata_path={nsd}", "data.nsd_dataset_config.sessions=[1]",
            "data.nsd_dataset_config.image_size=32", "versatilediffusion_config.image_size=32",
            f"data.nsd_dataset_config.infra.folder={cache}", f"versatilediffusion_config.vd_cache_dir={vd}",
            f"output_dir={out}", "device=cpu", "data.num_workers=0", "progress=false", "brain_modules_config.hidden=16",
            "brain_modules_config.n_tokens=4", "versatilediffusion_config.num_inference_steps=2", "batch_size=4",
            "steps=4", "optim.warmup_steps=2", "optim.lr=1e-3", "log_every=1", "val_every=0", "sample_every=0",
            "checkpoint_every=2", "data.val_fraction=0.1"]


@pytest.fixture(scope="module")
def two_subjects(tmp_path_factory):
    """A mini-NSD of subjects 1 and 2 (subject 1 has more voxels), and a model pretrained on subject 2 alone."""
    from dynadiff.data.stimuli import prepare_stimuli
    from dynadiff.data.synthetic import write_synthetic_nsd
    from dynadiff.models.tiny import write_tiny_vd

    root = tmp_path_factory.mktemp("init_from")
    info = write_synthetic_nsd(root / "nsd", subjects=(1, 2), seed=3, sessions=(1,), n_unique=8, n_test=4)
    prepare_stimuli(root / "nsd", images="all", subjects=(1, 2), workers=1)
    assert info["n_voxels"][1] > info["n_voxels"][2]
    vd = write_tiny_vd(root / "vd", unet_block_out_channels=(8, 8, 16, 16), vae_block_out_channels=(8, 8, 8))
    script = load_script("train")
    base = tiny(root / "nsd", vd, root / "pretrained", root / "cache")
    with torch.random.fork_rng(devices=[]):
        pretrained = script.build_config(script.parse_args(["--subject", "2", *base, "steps=2"])).run()
    return {"root": root, "vd": vd, "voxels": info["n_voxels"], "ckpt": pretrained["last_checkpoint"],
            "args": lambda out, *extra: ["--subject", "1", "--init-from", pretrained["last_checkpoint"],
                                         *tiny(root / "nsd", vd, out, root / "cache"), *extra]}


def _config(two_subjects, out, *extra):
    script = load_script("train")
    return script.build_config(script.parse_args(two_subjects["args"](out, *extra)))


def test_the_pretrained_tensors_load_exactly_and_the_new_subject_gets_a_layer(two_subjects, tmp_path):
    from dynadiff.checkpoint import read_state_dict, trainable_state_dict

    cfg = _config(two_subjects, tmp_path / "run")
    v1, v2 = two_subjects["voxels"][1], two_subjects["voxels"][2]
    assert cfg.init_subjects == [2] and cfg.model_subjects == [2, 1] and cfg.init_n_voxels == v2
    data = training.build_training_data(cfg)
    assert data.n_voxels == v1 and {int(data.train[i]["subject_idx"]) for i in range(len(data.train))} == {1}
    model = training.init_model(cfg, data)
    saved = read_state_dict(two_subjects["ckpt"])
    params = trainable_state_dict(model)  # the file's names
    assert set(saved) == set(params)
    for name, tensor in saved.items():
        if name.startswith(SUBJECT_LAYERS):  # (subjects, voxels, hidden): subject 2's slot holds its layer
            assert params[name].shape == (2, v1, *tensor.shape[2:]) and tensor.shape[:2] == (1, v2)
            assert torch.equal(params[name][0, :v2], tensor[0])
            assert not params[name][0, v2:].any()  # the wider input's rows: zeros (they only meet padding)
            assert params[name][1].abs().sum() > 0  # subject 1's new layer: initialised, not zeros
        else:
            assert torch.equal(params[name], tensor), name


def test_training_keeps_the_pretrained_subject_and_starts_with_the_new_layer_alone(two_subjects, tmp_path):
    """With init_subject_steps covering the run, only subject 1's layer moves: every other tensor, and subject 2's
    layer, are the checkpoint's after training, and subject 2 decodes as through the pretrained model."""
    from dynadiff.checkpoint import read_state_dict, trainable_state_dict
    from dynadiff.decoder import CheckpointInfo, Decoder

    cfg = _config(two_subjects, tmp_path / "run", "steps=2", "init_subject_steps=2", "optim.weight_decay=0.1")
    start = trainable_state_dict(training.init_model(cfg, training.build_training_data(cfg)))
    summary = cfg.run()
    after, before = read_state_dict(summary["last_checkpoint"]), read_state_dict(two_subjects["ckpt"])
    v2 = two_subjects["voxels"][2]
    for name, tensor in before.items():
        if name.startswith(SUBJECT_LAYERS):
            assert torch.equal(after[name][0, :v2], tensor[0])  # held, despite the weight decay
            assert not torch.equal(after[name][1], start[name][1].detach())  # subject 1's layer trained
        else:
            assert torch.equal(after[name], tensor), name
    info = CheckpointInfo.read(summary["last_checkpoint"])
    assert info.subjects == [2, 1] and info.n_voxels == two_subjects["voxels"][1]
    # subject 2 through the new model (its window zero-padded to the wider input) = through the pretrained one
    window = torch.randn(1, v2, 6)
    tokens = {}
    for key, path in (("pretrained", two_subjects["ckpt"]), ("new", summary["last_checkpoint"])):
        decoder = Decoder.from_checkpoint(path, vd_dir=two_subjects["vd"], device="cpu", subject=2)
        model = decoder.model
        padded = torch.zeros(1, model.brain_modules["clip_image"].n_voxels, 6)
        padded[:, :v2] = window
        with torch.no_grad():
            tokens[key] = model.encode_brain(padded, torch.tensor([decoder.subject_index(2)]))
    torch.testing.assert_close(tokens["new"], tokens["pretrained"], rtol=0, atol=1e-5)


@pytest.mark.parametrize(("extra", "message"), [
    (["--resume"], "--init-from starts a new run from a checkpoint, --resume continues"),
    (["--window", "4:5"], "reads windows of 6 TRs, this run's are 1"),
    (["brain_modules_config.hidden=32"], "brain_modules_config.hidden=32 (checkpoint: 16)"),
])
def test_what_cannot_start_from_the_checkpoint_is_one_line(two_subjects, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        _config(two_subjects, tmp_path / "run", *extra)
    assert "\n" not in str(info.value)


def test_a_checkpoint_that_records_no_subjects_is_refused(two_subjects, tmp_path):
    from safetensors.torch import load_file, save_file

    bare = tmp_path / "bare.safetensors"
    save_file(load_file(two_subjects["ckpt"]), str(bare))  # the tensors without the metadata (as converted ones)
    script = load_script("train")
    args = two_subjects["args"](tmp_path / "run")
    args[args.index("--init-from") + 1] = str(bare)
    with pytest.raises(ConfigError, match="records no subjects"):
        script.build_config(script.parse_args(args))


def test_a_subject_the_checkpoint_holds_reuses_its_layer(two_subjects, tmp_path):
    script = load_script("train")
    args = two_subjects["args"](tmp_path / "run")
    args[args.index("--subject") + 1] = "2"  # the pretrained model's own subject: its layer trains on, none added
    cfg = script.build_config(script.parse_args(args))
    assert cfg.init_subjects == [2] and cfg.model_subjects == [2]
    from dynadiff.training.pretrained import Holds

    model = training.init_model(cfg, training.build_training_data(cfg))
    assert Holds(model, cfg).held == []  # nothing held: the run has data for every layer
