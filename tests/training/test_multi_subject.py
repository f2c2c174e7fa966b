"""One model for several subjects: padded windows, each sample through its own subject layer."""

from __future__ import annotations

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
