"""Training data: the non-test windows of the chosen subjects, a validation split held out by image, samples
zero-padded to the largest voxel count (each keeps its ``subject_idx``)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from dynadiff.config import TrainConfig
from dynadiff.training.errors import TrainingError
from dynadiff.training.seeding import seed_words

logger = logging.getLogger(__package__)  # "dynadiff.training", as before the split


class TrainingSamples:
    """torch ``Dataset`` over samples of several subjects' ``NsdDataset``.

    ``refs[i] = (dataset, sample)``; ``brain_refs`` (default ``refs``) says whose fMRI
    window goes with image ``refs[i]`` (different only for the shuffled-pairs control).
    Items: ``{"brain": (n_voxels, T) float32 zero-padded, "img": (3, S, S) in [0, 1],
    "subject_idx": long}``.
    """

    def __init__(self, datasets: list, refs: list[tuple[int, int]], n_voxels: int,
                 brain_refs: list[tuple[int, int]] | None = None):
        self.datasets, self.refs, self.n_voxels = datasets, list(refs), n_voxels
        self.brain_refs = list(brain_refs) if brain_refs is not None else self.refs
        if len(self.brain_refs) != len(self.refs):
            raise ValueError("brain_refs must pair up with refs")

    def __len__(self) -> int:
        return len(self.refs)

    def nsd_id(self, i: int) -> int:
        d, j = self.refs[i]
        return int(self.datasets[d].nsd_ids[j])

    def image(self, i: int) -> np.ndarray:
        d, j = self.refs[i]
        return self.datasets[d].image(j)

    def __getitem__(self, i: int) -> dict:
        d, j = self.refs[i]
        bd, bj = self.brain_refs[i]
        ds = self.datasets[d]
        window = self.datasets[bd].brain(bj)  # (V_subject, T)
        brain = np.zeros((self.n_voxels, window.shape[1]), dtype=np.float32)
        brain[: window.shape[0]] = window
        img = torch.from_numpy(ds.image(j).copy()).permute(2, 0, 1).float().div_(255.0)
        return {"brain": torch.from_numpy(brain), "img": img,
                "subject_idx": torch.tensor(self.datasets[bd].subject_idx, dtype=torch.long)}


@dataclasses.dataclass
class TrainingData:
    train: TrainingSamples
    val: TrainingSamples
    n_voxels: int  # the model's input size: the largest voxel count of the subjects (or a pretrained model's width)
    n_timepoints: int
    voxels_per_subject: dict[int, int]


def build_training_data(cfg: TrainConfig) -> TrainingData:
    """Each subject's train-split dataset, a validation split held out by image, padded samples."""
    from dynadiff.data.dataset import split_by_image

    datasets, refs = [], []
    for idx, subject in enumerate(cfg.subjects):
        # its layer of the model: its position among the model's subjects (a pretrained model's come first)
        ds = cfg.data.subject_config(subject).build(subject_idx=cfg.model_subjects.index(subject))
        datasets.append(ds)
        refs += [(idx, j) for j in range(len(ds))]
    counts = {s: ds.n_voxels for s, ds in zip(cfg.subjects, datasets)}
    trs = {ds.n_trs for ds in datasets}
    if len(trs) != 1:
        raise TrainingError(f"the subjects' windows have different numbers of TRs: {sorted(trs)}")
    ids = [int(datasets[d].nsd_ids[j]) for d, j in refs]
    train_pos, val_pos = split_by_image(ids, cfg.data.val_fraction, cfg.data.val_seed)
    train_refs = [refs[i] for i in train_pos]
    brain_refs = None
    if cfg.data.shuffle_pairs:
        perm = np.random.default_rng([*seed_words(cfg.seed), 11]).permutation(len(train_refs))
        brain_refs = [train_refs[i] for i in perm]
    n_voxels = max(*counts.values(), cfg.init_n_voxels or 0)  # a pretrained model's width, if wider
    data = TrainingData(
        train=TrainingSamples(datasets, train_refs, n_voxels, brain_refs),
        val=TrainingSamples(datasets, [refs[i] for i in val_pos], n_voxels),
        n_voxels=n_voxels, n_timepoints=trs.pop(), voxels_per_subject=counts,
    )
    logger.info("training data: subjects %s (voxels %s), %d training samples, %d validation samples (%d images held out)",
                cfg.subjects, counts, len(data.train), len(data.val), len({ids[i] for i in val_pos}))
    return data


def collate(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}
