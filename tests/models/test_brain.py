"""FmriMLP: published names and shapes, an independent explicit implementation, per-TR
independence, the options."""

import math

import pytest
import torch
from torch import nn

from dynadiff.models.config import FmriMLPConfig

V, S, T, H = 23, 2, 6, 16


def _module(**kw):
    torch.manual_seed(0)
    return FmriMLPConfig(**dict(dict(hidden=H), **kw)).build(n_voxels=V, n_subjects=S, n_timepoints=T).eval()


def _inputs(b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, V, T, generator=g), torch.tensor([1, 0, 1][:b])


def test_published_parameter_names_and_shapes():
    # the list of issue 3 / the released checkpoints, subject 1: V = 15724, 1552 hidden, 6 TRs
    with torch.device("meta"):
        m = FmriMLPConfig().build(n_voxels=15724, n_subjects=1)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "subject_layers.weights": (1, 15724, 1552),
        "lin0.weight": (6 * 1552, 1, 1552),
        "lin0.bias": (6 * 1552,),
        "post_lin0.0.weight": (1552,),
        "post_lin0.0.bias": (1552,),
        "out_time_agg.weight": (1, 6),
        "out_time_agg.bias": (1,),
        "lin1.weight": (257 * 768, 1552),
        "lin1.bias": (257 * 768,),
    }


def _reference(m, brain, subject_idx):
    """docs/behaviour.md §3 written out sample by sample and TR by TR, per-TR layer as the original's
    grouped Conv1d, LayerNorm and GELU from their formulas."""
    conv = nn.Conv1d(T, T * H, kernel_size=H, groups=T)
    with torch.no_grad():
        conv.weight.copy_(m.lin0.weight)
        conv.bias.copy_(m.lin0.bias)
    out = []
    for b in range(brain.shape[0]):
        w = m.subject_layers.weights[subject_idx[b]]  # (V, H)
        x = torch.einsum("ct,cd->dt", brain[b], w)  # (H, T), the original's einsum
        x = conv(x.T[None]).reshape(T, H)  # (1, T, H) -> (1, T*H, 1) -> (T, H)
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        x = (x - mu) / torch.sqrt(var + 1e-5) * m.post_lin0[0].weight + m.post_lin0[0].bias
        x = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
        agg = sum(m.out_time_agg.weight[0, t] * x[t] for t in range(T)) + m.out_time_agg.bias[0]  # (H,)
        out.append((m.lin1.weight @ agg + m.lin1.bias).reshape(257, 768))
    return torch.stack(out)


def test_forward_equals_explicit_implementation():
    m = _module()
    brain, subject_idx = _inputs()
    with torch.no_grad():
        got = m(brain, subject_idx)
        want = _reference(m, brain, subject_idx)
    assert got.shape == (3, 257, 768)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_per_tr_layer_matches_one_linear_per_tr():
    m = _module()
    x = torch.randn(4, T, H)
    with torch.no_grad():
        got = m.lin0(x)
        w = m.lin0.weight.reshape(T, H, H)
        b = m.lin0.bias.reshape(T, H)
        for t in range(T):
            torch.testing.assert_close(got[:, t], nn.functional.linear(x[:, t], w[t], b[t]), atol=1e-6, rtol=1e-5)


def test_tr_k_input_acts_only_through_tr_k_weights():
    m = _module()
    brain, subject_idx = _inputs()
    k = 2
    changed = brain.clone()
    changed[:, :, k] += torch.randn(3, V)
    with torch.no_grad():
        assert not torch.allclose(m(brain, subject_idx), m(changed, subject_idx), atol=1e-4)  # it matters...
        m.lin0.weight[k * H:(k + 1) * H] = 0  # ...only through TR k's slice of the per-TR layer
        torch.testing.assert_close(m(brain, subject_idx), m(changed, subject_idx), atol=0, rtol=0)
        m2 = _module()
        m2.lin0.weight[(k + 1) * H:(k + 2) * H] = 0  # zeroing another TR's slice does not cut it
        assert not torch.allclose(m2(brain, subject_idx), m2(changed, subject_idx), atol=1e-4)


def test_each_sample_uses_its_subjects_weights():
    m = _module()
    brain, _ = _inputs()
    with torch.no_grad():
        mixed = m(brain, torch.tensor([1, 0, 1]))
        for b, s in enumerate([1, 0, 1]):
            alone = m(brain[b:b + 1], torch.tensor([s]))
            torch.testing.assert_close(mixed[b:b + 1], alone, atol=1e-5, rtol=1e-5)
        other = m(brain[:1], torch.tensor([0]))
    assert not torch.allclose(mixed[:1], other, atol=1e-4)


def test_subject_layer_initialisation_scale():
    torch.manual_seed(0)
    m = FmriMLPConfig(hidden=64).build(n_voxels=400, n_subjects=3)
    std = m.subject_layers.weights.std().item()
    assert abs(std - 1 / math.sqrt(400)) < 0.002


@pytest.mark.parametrize(
    "options",
    [
        dict(time_agg="out_mean"),
        dict(time_agg="in_linear", per_tr_layer=False),
        dict(time_agg="in_mean", per_tr_layer=False),
        dict(per_tr_layer=False, tr_embedding=True),
        dict(subject_layers="deep", subject_layers_bias=True),
        dict(subject_layers="none"),
        dict(norm="batch", n_blocks=2),
        dict(act_first=True, n_blocks=1),
        dict(n_tokens=5, token_dim=7),
    ],
)
def test_options_forward_and_train(options):
    m = _module(**options).train()
    brain, subject_idx = _inputs()
    out = m(brain, subject_idx)
    cfg = m.config
    assert out.shape == (3, cfg.n_tokens, cfg.token_dim) and torch.isfinite(out).all()
    out.square().mean().backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]


def test_option_semantics():
    brain, subject_idx = _inputs()
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        # in_mean: only the mean over time matters
        m = _module(time_agg="in_mean", per_tr_layer=False)
        torch.testing.assert_close(m(brain, subject_idx), m(brain[:, :, perm], subject_idx), atol=1e-5, rtol=1e-5)
        # out_mean with a shared per-TR layer: symmetric in the TRs; a TR embedding breaks the symmetry
        m = _module(time_agg="out_mean", per_tr_layer=False)
        torch.testing.assert_close(m(brain, subject_idx), m(brain[:, :, perm], subject_idx), atol=1e-5, rtol=1e-5)
        m = _module(time_agg="out_mean", per_tr_layer=False, tr_embedding=True)
        nn.init.normal_(m.tr_embedding.weight)
        assert not torch.allclose(m(brain, subject_idx), m(brain[:, :, perm], subject_idx), atol=1e-4)
        # no subject layers: one map for everybody
        m = _module(subject_layers="none")
        torch.testing.assert_close(m(brain, torch.tensor([0, 0, 0])), m(brain, torch.tensor([1, 1, 1])))
    assert isinstance(_module(act_first=True).post_lin0[0], nn.GELU)
    assert isinstance(_module(act_first=True).post_lin0[1], nn.LayerNorm)
    assert isinstance(_module(norm="batch").post_lin0[0], nn.BatchNorm1d)


def test_dropout_only_in_training():
    m = _module()
    brain, subject_idx = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(m(brain, subject_idx), m(brain, subject_idx), atol=0, rtol=0)
        m.train()
        assert not torch.allclose(m(brain, subject_idx), m(brain, subject_idx))


def test_bad_inputs_raise_clear_errors():
    m = _module()
    brain, subject_idx = _inputs()
    with pytest.raises(ValueError, match=r"\(batch, 23 voxels, 6 TRs\), got \(3, 22, 6\)"):
        m(brain[:, :-1], subject_idx)
    with pytest.raises(ValueError, match=r"\(batch, 23 voxels, 6 TRs\), got \(3, 23, 5\)"):
        m(brain[:, :, :-1], subject_idx)
    with pytest.raises(ValueError, match=r"subject_idx must be within \[0, 2\)"):
        m(brain, torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="long tensor of shape"):
        m(brain, subject_idx.int())
    with pytest.raises(TypeError, match="floating-point"):
        m(brain.long(), subject_idx)
    with pytest.raises(ValueError, match="must be positive"):
        FmriMLPConfig(hidden=4).build(n_voxels=0)
