"""Batched client models: one stacked forward equals each client's own forward, gradients stay
with their client, heterogeneous groups join on the client dimension."""
import pytest
import torch

from mhd_fast import models

V, H1 = 5, 3


def _setup(spec: str, n: int, in_shape, seed: int = 0):
    arch = models.parse_arch(spec)
    params = models.init_params(arch, n, in_shape, V, H1, torch.Generator().manual_seed(seed))
    return arch, params


def _client(params, i):
    return {k: p[i:i + 1] for k, p in params.items()}


@pytest.mark.parametrize("spec,in_shape", [("mlp:16x8", (1, 8, 8)), ("mlp:7", (12,)),
                                           ("cnn:4x6-9", (1, 8, 8)), ("cnn:3-5x4", (3, 6, 6))])
def test_batched_forward_matches_each_client_alone(spec, in_shape):
    n, b = 4, 6
    arch, params = _setup(spec, n, in_shape)
    x = torch.randn(n, b, *in_shape, generator=torch.Generator().manual_seed(1))
    logits, emb = models.forward(arch, params, x, shared=False, num_heads=H1)
    assert logits.shape == (n, H1, b, V) and emb.shape == (n, b, arch.emb_dim)
    for i in range(n):
        li, ei = models.forward(arch, _client(params, i), x[i:i + 1], shared=False, num_heads=H1)
        torch.testing.assert_close(logits[i], li[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(emb[i], ei[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["mlp:16x8", "cnn:4-8"])
def test_shared_input_equals_the_same_rows_for_every_client(spec):
    n, b = 3, 5
    arch, params = _setup(spec, n, (1, 8, 8))
    x = torch.randn(b, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    shared, _ = models.forward(arch, params, x, shared=True, num_heads=H1)
    each, _ = models.forward(arch, params, x.expand(n, *x.shape), shared=False, num_heads=H1)
    torch.testing.assert_close(shared, each, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", ["mlp:16x8", "cnn:4-8"])
def test_gradient_of_one_client_touches_only_its_weights(spec):
    n = 4
    arch, params = _setup(spec, n, (1, 8, 8))
    for p in params.values():
        p.requires_grad_()
    x = torch.randn(n, 3, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    logits, _ = models.forward(arch, params, x, shared=False, num_heads=H1)
    logits[2].square().sum().backward()
    for name, p in params.items():
        others = torch.cat([p.grad[:2], p.grad[3:]])
        assert torch.all(others == 0), name
        assert p.grad[2].abs().sum() > 0, name


def test_init_is_seeded_and_shaped_like_torch_defaults():
    arch, a = _setup("mlp:16x8", 3, (1, 8, 8), seed=0)
    _, b = _setup("mlp:16x8", 3, (1, 8, 8), seed=0)
    _, c = _setup("mlp:16x8", 3, (1, 8, 8), seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["fc0.weight"], c["fc0.weight"])
    assert a["fc0.weight"].shape == (3, 64, 16) and a["heads.weight"].shape == (3, 8, H1 * V)
    assert a["fc0.weight"].abs().max() <= 1 / 8  # U(±1/sqrt(fan_in)), fan_in = 64
    assert not torch.equal(a["fc0.weight"][0], a["fc0.weight"][1])  # clients differ


def test_heterogeneous_groups_join_on_the_client_dimension():
    archs = [models.parse_arch("mlp:16x8"), models.parse_arch("cnn:4-8")]
    gen = torch.Generator().manual_seed(0)
    groups = [models.Group(a, s, e, models.init_params(a, e - s, (1, 8, 8), V, H1, gen))
              for a, s, e in models.split_groups(5, archs)]
    assert [(g.start, g.stop) for g in groups] == [(0, 3), (3, 5)]
    x = torch.randn(5, 4, 1, 8, 8)
    logits, emb = models.forward_groups(groups, x, shared=False, num_heads=H1)
    assert logits.shape == (5, H1, 4, V) and emb.shape == (5, 4, 8)
    want, _ = models.forward(groups[1].arch, groups[1].params, x[3:], shared=False, num_heads=H1)
    torch.testing.assert_close(logits[3:], want)
    other = models.parse_arch("mlp:16x4")
    groups[0] = models.Group(other, 0, 3, models.init_params(other, 3, (1, 8, 8), V, H1, gen))
    _, emb = models.forward_groups(groups, x, shared=False, num_heads=H1)
    assert emb is None  # embedding sizes differ: nothing to compare embeddings with


@pytest.mark.parametrize("spec", ["mlp", "mlp:", "mlp:0", "mlp:8-4", "cnn:8", "rnn:8", "mlp:8x", 3])
def test_bad_architecture_names_the_option(spec):
    with pytest.raises(ValueError, match="model"):
        models.parse_arch(spec)


def test_parse_arch_round_trips():
    for spec in ("mlp:128x64", "cnn:16x32-64", "mlp:7"):
        assert str(models.parse_arch(spec)) == spec
    assert models.parse_arch("cnn:16x32-64x10").emb_dim == 10


def test_cnn_needs_images_and_enough_pixels():
    with pytest.raises(ValueError, match="image"):
        _setup("cnn:4-8", 2, (12,))
    with pytest.raises(ValueError, match="conv blocks"):
        _setup("cnn:4x4x4x4-8", 2, (1, 8, 8))


def test_more_architectures_than_clients_is_an_error():
    archs = [models.parse_arch("mlp:4"), models.parse_arch("mlp:8")]
    with pytest.raises(ValueError, match="clients"):
        models.split_groups(1, archs)


def test_activation_floats_bound_the_widest_layer():
    assert models.activation_floats(models.parse_arch("mlp:16x8"), (1, 8, 8), 15) == 64
    assert models.activation_floats(models.parse_arch("mlp:100"), (1, 8, 8), 15) == 100
    # conv 4 channels at 8x8 before pooling, then 6 at 4x4
    assert models.activation_floats(models.parse_arch("cnn:4x6-9"), (1, 8, 8), 15) == 256
