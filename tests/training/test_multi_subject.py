"""One model for several subjects: padded windows, each sample through its own subject layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dynadiff import training


@pytest.fixture(scope="module")
def two_subject_nsd(tmp_path_factory):
    """Synthetic mini-NSD of subjects 1 and 2 (different volume shapes, so different voxel counts), session 1."""
    from dynadiff.data.stimuli import prepare_stimuli
    from dynadiff.data.synthetic import write_synthetic_nsd

    root = tmp_path_factory.mktemp("nsd_two_subjects")
    info = write_synthetic_nsd(root, subjects=(1, 2), seed=3, sessions=(1,), n_unique=8, n_test=4)
    prepare_stimuli(root, images="all", subjects=(1, 2), workers=1)
    return root, info


def test_samples_keep_their_subject_and_are_zero_padded(make_train_config, two_subject_nsd, tmp_path):
    root, info = two_subject_nsd
    counts = {s: info["n_voxels"][s] for s in (1, 2)}
    assert counts[1] != counts[2]
    cfg = make_train_config("data.subjects=[2,1]", "data.nsd_dataset_config.subject=2", nsd_root=root, sessions=(1,))
    data = training.build_training_data(cfg)
    assert data.n_voxels == max(counts.values()) and data.voxels_per_subject == {2: counts[2], 1: counts[1]}
    seen = set()
    for part in (data.train, data.val):
        for i in range(len(part)):
            d, j = part.refs[i]
            item = part[i]
            subject = cfg.subjects[d]
            seen.add(subject)
            assert int(item["subject_idx"]) == d  # position in data.subjects: subject 2 -> 0, subject 1 -> 1
            v = counts[subject]
            np.testing.assert_array_equal(item["brain"][:v].numpy(), part.datasets[d].brain(j))
            assert not item["brain"][v:].any()
            assert item["img"].shape == (3, 32, 32)
    assert seen == {1, 2}
    # validation images are held out across both subjects
    val_ids = {data.val.nsd_id(i) for i in range(len(data.val))}
    assert val_ids and not val_ids & {data.train.nsd_id(i) for i in range(len(data.train))}


def test_each_sample_goes_through_its_own_subject_layer(make_train_config, two_subject_nsd):
    root, _ = two_subject_nsd
    cfg = make_train_config("data.subjects=[1,2]", "optim.weight_decay=0", "brain_modules_config.dropout=0",
                            nsd_root=root, sessions=(1,))
    data = training.build_training_data(cfg)
    model = training.init_model(cfg, data)
    model.train()
    by_subject = {d: [i for i in range(len(data.train)) if data.train.refs[i][0] == d] for d in (0, 1)}
    mixed = training.collate([data.train[i] for i in by_subject[0][:2] + by_subject[1][:2]])
    assert mixed["subject_idx"].tolist() == [0, 0, 1, 1]
    with torch.no_grad():
        tokens = model.brain_module(mixed["brain"], mixed["subject_idx"])
        for b in range(4):
            own = model.brain_module(mixed["brain"][b:b + 1], mixed["subject_idx"][b:b + 1])
            wrong = model.brain_module(mixed["brain"][b:b + 1], 1 - mixed["subject_idx"][b:b + 1])
            torch.testing.assert_close(tokens[b:b + 1], own)
            assert not torch.allclose(own, wrong)
    # one optimizer step on subject 1's samples only: subject 2's layer does not move
    weights = model.brain_module.subject_layers.weights
    before = weights.detach().clone()
    opt, _ = training.build_optimizer(model, cfg.optim)
    only_first = training.collate([data.train[i] for i in by_subject[0][:3]])
    loss = training.training_step_loss(model, only_first, torch.Generator().manual_seed(0), None)
    loss.backward()
    assert weights.grad[0].abs().sum() > 0 and weights.grad[1].abs().sum() == 0
    opt.step()
    assert not torch.equal(weights[0], before[0]) and torch.equal(weights[1], before[1])


def test_eval_reconstructs_each_subject_of_a_multi_subject_checkpoint_through_its_own_layer(
        make_train_config, two_subject_nsd, tmp_path):
    """A train.py checkpoint of subjects [2, 1] (layers 0, 1): eval.py's images of subject 1 are the model's
    own reconstructions of its zero-padded windows through layer 1, not layer 0; subject 5 is a clear error."""
    import shlex

    from PIL import Image

    from dynadiff.checkpoint import load_checkpoint
    from dynadiff.config import NsdDatasetConfig
    from dynadiff.evaluation import EvaluationError
    from scripts import load_script

    root, info = two_subject_nsd
    cfg = make_train_config("data.subjects=[2,1]", "data.nsd_dataset_config.subject=2", nsd_root=root, sessions=(1,))
    data = training.build_training_data(cfg)
    model = training.init_model(cfg, data)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero: make the brain signal reach the images, strongly
        for p in model.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    checkpoint = training.save_training_checkpoint(tmp_path / "ckpt", model, None, [], None, None, cfg, 1, None,
                                                   with_state=False)
    assert checkpoint == tmp_path / "ckpt" / "model.safetensors"

    commands = training.eval_command(cfg, checkpoint).splitlines()
    assert [shlex.split(c)[3] for c in commands] == ["2", "1"]  # one command per subject
    script = load_script("eval")
    extra = ["--cache", str(tmp_path / "eval"), "--device", "cpu", "--limit", "2", "--batch-size", "2",
             "--metrics", "pixcorr", "--no-blur-faces", "versatilediffusion_config.num_inference_steps=2"]
    vd = cfg.versatilediffusion_config.model_copy(update={"num_inference_steps": 2})
    fresh = vd.build(cfg.brain_modules_config, n_voxels=data.n_voxels, n_subjects=2)
    load_checkpoint(fresh, checkpoint)
    for subject, layer, command in ((2, 0, commands[0]), (1, 1, commands[1])):
        result = script.build_config(script.parse_args(shlex.split(command)[2:] + extra)).run()
        out = Path(result["output_dir"])
        assert out.parent == tmp_path / "eval" and out.name.startswith(f"reconstructions_subj{subject:02d}_unaveraged_")
        got = np.stack([np.asarray(Image.open(out / f"{i}.png")) for i in range(2)])
        assert result["n_images"] == 2

        # the same two images, computed here: the subject's test windows, zero-padded to the model's width
        ds = NsdDatasetConfig(nsddata_path=root, subject=subject, sessions=[1], image_size=32,
                              infra={"folder": tmp_path / "windows"}).build()
        assert ds.n_voxels == info["n_voxels"][subject] <= data.n_voxels
        brain = torch.zeros(2, data.n_voxels, ds.n_trs)
        for i in range(2):
            brain[i, :ds.n_voxels] = torch.from_numpy(ds.brain(i))

        def images(layer: int) -> np.ndarray:
            with torch.no_grad():
                rec = fresh.reconstruct(brain, torch.full((2,), layer), seed=0)
            return (rec.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)  # truncated, as the original

        np.testing.assert_array_equal(got, images(layer), err_msg=f"subject {subject}")
        assert np.abs(got.astype(int) - images(1 - layer)).max() > 8  # the other layer draws other images
    assert min(info["n_voxels"][s] for s in (1, 2)) < data.n_voxels  # one of them was padded

    with pytest.raises(EvaluationError, match=r"trained on subject\(s\) \[2, 1\], not on subject 5"):
        script.build_config(script.parse_args(["--subject", "5", "--checkpoint", str(checkpoint)] + extra)).run()


def test_each_subjects_windows_are_cached_under_that_subjects_key(make_train_config, two_subject_nsd, tmp_path):
    """The second subject's data config is a new config, with its own exca cache key: the one a config built
    for that subject has (where prepare_data.py --windows puts its windows), not the first subject's (a pydantic
    model_copy keeps the original's key)."""
    from dynadiff.config import NsdDatasetConfig

    cfg = make_train_config("data.subjects=[5,2]", "data.nsd_dataset_config.subject=5", nsd_root=two_subject_nsd)
    first, second = (cfg.data.subject_config(s) for s in (5, 2))
    fresh = NsdDatasetConfig(**{**cfg.data.nsd_dataset_config.model_dump(), "subject": 2})
    assert second.subject == 2 and second.infra.uid() == fresh.infra.uid() != first.infra.uid()
