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


# ---- any nn.Module as a trunk: the batched path equals a loop over the same modules --------

class DropoutNet(torch.nn.Module):
    """A user's trunk with dropout and a norm: [B, 1, 8, 8] -> [B, 12]."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 12),
                                        torch.nn.LayerNorm(12), torch.nn.ReLU(),
                                        torch.nn.Dropout(0.5))

    def forward(self, x):
        return self.body(x)


USER_FILE = """
import torch
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 3, padding=1)
        self.fc = torch.nn.Linear(3 * 8 * 8, 10)
    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc(h.view(h.shape[0], -1))  # view: needs the layout the conv made
def make():
    return Net()
"""


def _build(spec, n, in_shape, loop_conv=False):
    """The batched group and, for each client, its own copy: (module or None, params).
    loop_conv: the clients run one at a time, else as one batch."""
    arch = models.parse_arch(spec)
    gen = torch.Generator().manual_seed(0)
    if isinstance(arch, models.ModuleArch):
        net, params, buffers = models.init_module(arch, n, in_shape, V, H1, gen, loop_conv=loop_conv)
    else:
        net, params, buffers = None, models.init_params(arch, n, in_shape, V, H1, gen), {}
    params = {k: p.requires_grad_() for k, p in params.items()}
    clients = []
    for i in range(n):
        p = {k: v[i].detach().clone().requires_grad_() for k, v in params.items()}
        m = None
        if net is not None:
            m = models.build_trunk(arch, in_shape)
            m.load_state_dict({**{k[6:]: v for k, v in p.items() if k.startswith("trunk.")},
                               **{k: v[i] for k, v in buffers.items()}})
            p = {**{f"trunk.{k}": v for k, v in m.named_parameters()},
                 "heads.weight": p["heads.weight"], "heads.bias": p["heads.bias"]}
        clients.append((m, p))
    return models.Group(arch, 0, n, params, buffers, net, loop_conv), clients


def _client_forward(arch, m, p, x, train):
    if m is None:
        return models.forward(arch, {k: v[None] for k, v in p.items()}, x[None], shared=False,
                              num_heads=H1)[0][0]
    m.train(train)
    out = m(x) @ p["heads.weight"] + p["heads.bias"]
    return out.unflatten(-1, (H1, -1)).transpose(0, 1)


def _loss(logits, y):
    """Per client: CE of head 0 plus a square term on the others ([.., H1, B, V] logits)."""
    ce = torch.nn.functional.cross_entropy(logits[..., 0, :, :].reshape(-1, V), y.reshape(-1))
    return ce + logits[..., 1:, :, :].square().mean()


@pytest.mark.parametrize("spec,in_shape,train", [
    ("mlp:16x8", (1, 8, 8), True), ("cnn:4x6-9", (1, 8, 8), True),
    ("resnet:8", (1, 8, 8), True), ("resnet:8", (3, 10, 10), True),
    ("resnet:8:bn", (1, 8, 8), True), ("resnet:8:bn", (1, 8, 8), False),
    (DropoutNet, (1, 8, 8), False), ("module:user_trunk_file:make", (1, 8, 8), True),
])
@pytest.mark.parametrize("loop_conv", [True, False])
def test_batched_clients_equal_a_loop_over_the_same_modules(spec, in_shape, train, loop_conv,
                                                            tmp_path, monkeypatch):
    if isinstance(spec, str) and spec.startswith("module:"):
        (tmp_path / "user_trunk_file.py").write_text(USER_FILE)
        monkeypatch.syspath_prepend(str(tmp_path))
    n, b = 3, 5
    group, clients = _build(spec, n, in_shape, loop_conv)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, b, *in_shape, generator=gen)
    y = torch.randint(0, V, (n, b), generator=gen)
    logits, emb = models.forward_group(group, x, shared=False, num_heads=H1, train=train)
    assert logits.shape == (n, H1, b, V) and emb.shape[:2] == (n, b)
    sum(_loss(logits[i], y[i]) for i in range(n)).backward()
    # SGD: an update linear in the gradient (Adam's first step, lr·g/(|g| + eps), turns the
    # rounding of a gradient near eps into a difference of up to lr)
    torch.optim.SGD(group.params.values(), lr=0.1, momentum=0.9, weight_decay=1e-3, fused=True).step()
    for i, (m, p) in enumerate(clients):
        want = _client_forward(group.arch, m, p, x[i], train)
        torch.testing.assert_close(logits[i], want, rtol=1e-5, atol=1e-5)
        _loss(want, y[i]).backward()
        for k, v in p.items():
            torch.testing.assert_close(group.params[k].grad[i], v.grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda s, k=k: f"grad of {k}: {s}")
        torch.optim.SGD(p.values(), lr=0.1, momentum=0.9, weight_decay=1e-3).step()
        for k, v in p.items():
            torch.testing.assert_close(group.params[k][i], v, rtol=1e-5, atol=1e-6)
        if m is not None:  # BatchNorm's running statistics are the client's own
            for k, v in m.named_buffers():
                torch.testing.assert_close(group.buffers[k][i], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loop_conv", [True, False])
@pytest.mark.parametrize("spec", ["resnet:8", "cnn:4-8"])
def test_module_trunk_shared_input_equals_the_same_rows_for_every_client(spec, loop_conv):
    group, _ = _build(spec, 3, (1, 8, 8), loop_conv)
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    shared, _ = models.forward_group(group, x, shared=True, num_heads=H1, train=False)
    each, _ = models.forward_group(group, x.expand(3, *x.shape), shared=False, num_heads=H1,
                                   train=False)
    torch.testing.assert_close(shared, each, rtol=1e-5, atol=1e-6)


def test_dropout_masks_differ_per_client_follow_the_seed_and_leave_the_global_rng():
    n = 4
    group, _ = _build(DropoutNet, n, (1, 8, 8))
    with torch.no_grad():  # the same weights for every client: only the masks differ
        for p in group.params.values():
            p.copy_(p[:1].expand_as(p))
    x = torch.randn(6, 1, 8, 8)
    state = torch.get_rng_state()
    a = models.forward_group(group, x, shared=True, num_heads=H1, train=True, seed=7)[1]
    b = models.forward_group(group, x, shared=True, num_heads=H1, train=True, seed=7)[1]
    c = models.forward_group(group, x, shared=True, num_heads=H1, train=True, seed=8)[1]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)
    zeros = a == 0
    assert not torch.equal(zeros[0], zeros[1])  # each client its own mask
    assert models.step_seed(1, 5) == models.step_seed(1, 5) != models.step_seed(1, 6)


def test_module_init_is_seeded_per_client_whatever_rows_are_kept():
    arch = models.parse_arch("resnet:8")
    _, full, _ = models.init_module(arch, 5, (1, 8, 8), V, H1, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    _, part, _ = models.init_module(arch, 5, (1, 8, 8), V, H1, gen, rows=range(2, 4))
    for k in full:
        assert torch.equal(full[k][2:4], part[k]), k
    assert not torch.equal(full["trunk.stem.0.weight"][0], full["trunk.stem.0.weight"][1])
    state = torch.get_rng_state()
    models.init_module(arch, 2, (1, 8, 8), V, H1, torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)  # the factories drew from their own seeds


@pytest.mark.parametrize("depth", [8, 14, 20])
@pytest.mark.parametrize("in_shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_resnets_take_digits_fashion_mnist_and_cifar_inputs(depth, in_shape):
    for norm in ("", ":bn"):
        arch = models.parse_arch(f"resnet:{depth}{norm}")
        info = models.trunk_info(arch, in_shape)
        assert info.emb_dim == 64
        assert str(arch) == f"resnet:{depth}{norm}"
    # 6n + 2 layers: n blocks of 2 convs in 3 stages, the stem, (the heads)
    convs = sum(1 for m in models.build_trunk(arch, in_shape).modules()
                if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert convs == depth - 1


@pytest.mark.parametrize("spec", ["resnet", "resnet:9", "resnet:2", "resnet:8:ln", "module:x",
                                  "module:no_such_module_here:make", "module:os:no_such_name",
                                  "module:os:sep"])
def test_bad_module_specs_name_the_option(spec):
    with pytest.raises(ValueError, match="--model"):
        models.parse_arch(spec, option="--model")


def test_module_trunk_counts_match_what_is_built():
    arch = models.parse_arch("resnet:8:bn")
    net, params, buffers = models.init_module(arch, 2, (1, 8, 8), V, H1, torch.Generator())
    assert models.num_params(arch, (1, 8, 8), V, H1) == sum(p[0].numel() for p in params.values())
    assert "stem.1.running_mean" in buffers and buffers["stem.1.running_mean"].shape == (2, 16)
    assert models.activation_floats(arch, (1, 8, 8), 0) >= 16 * 8 * 8


# ---- chunks of clients with activation checkpointing ----------------------------------------

def _step(group, x, y, chunk, seed=0):
    """One chunked (or not) forward, backward and SGD step of group -> (logits, emb, grads)."""
    logits, emb = models.forward_group(group, x, shared=False, num_heads=H1, train=True,
                                       seed=seed, chunk=chunk)
    (sum(_loss(logits[i], y[i]) for i in range(len(y))) + emb.square().mean()).backward()
    grads = {k: p.grad.clone() for k, p in group.params.items()}
    torch.optim.SGD(group.params.values(), lr=0.1, momentum=0.9, fused=True).step()
    return logits.detach(), emb.detach(), grads


@pytest.mark.parametrize("spec", ["resnet:8:bn", "cnn:4-6", "mlp:16x8"])
@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_chunked_step_equals_the_unchunked_step(spec, chunk):
    n, b = 5, 4  # chunks of 2 and 3 do not divide the 5 clients
    group, _ = _build(spec, n, (1, 8, 8))
    twin = models.Group(group.arch, 0, n, {k: p.detach().clone().requires_grad_()
                                           for k, p in group.params.items()},
                        {k: t.clone() for k, t in group.buffers.items()}, group.net)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, b, 1, 8, 8, generator=gen)
    y = torch.randint(0, V, (n, b), generator=gen)
    want = _step(group, x, y, 0)
    got = _step(twin, x, y, chunk)
    for w, g in zip(want[:2], got[:2]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    for k in want[2]:
        torch.testing.assert_close(got[2][k], want[2][k], rtol=1e-4, atol=1e-6,
                                   msg=lambda s, k=k: f"grad of {k}: {s}")
        torch.testing.assert_close(twin.params[k], group.params[k], rtol=1e-5, atol=1e-6)
    # BatchNorm's running statistics: updated once per step, not again by the recompute
    assert twin.buffers.keys() == group.buffers.keys()
    for k in group.buffers:
        torch.testing.assert_close(twin.buffers[k], group.buffers[k], rtol=1e-5, atol=1e-6,
                                   msg=lambda s, k=k: f"buffer {k}: {s}")
    if spec == "resnet:8:bn":
        assert int(twin.buffers["stem.1.num_batches_tracked"][0]) == 1


def test_chunked_dropout_recompute_draws_the_forward_masks():
    """A chunk draws its masks from chunk_seed(seed, first client): the backward's recompute
    must draw them again, so the gradients equal those of the chunks run without it."""
    n, b, chunk = 5, 6, 2
    group, _ = _build(DropoutNet, n, (1, 8, 8))
    twin = models.Group(group.arch, 0, n, {k: p.detach().clone().requires_grad_()
                                           for k, p in group.params.items()}, {}, group.net)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, b, 1, 8, 8, generator=gen)
    y = torch.randint(0, V, (n, b), generator=gen)
    state = torch.get_rng_state()
    got = _step(twin, x, y, chunk, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    # the same chunks with their seeds, every activation kept by autograd
    outs = [models.forward_group(models._sub(group, a, min(a + chunk, n), {}), x[a:a + chunk],
                                 shared=False, num_heads=H1, train=True,
                                 seed=models.chunk_seed(7, a)) for a in range(0, n, chunk)]
    logits, emb = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
    (sum(_loss(logits[i], y[i]) for i in range(n)) + emb.square().mean()).backward()
    torch.testing.assert_close(got[1], emb.detach(), rtol=0, atol=0)
    for k, p in group.params.items():
        torch.testing.assert_close(got[2][k], p.grad, rtol=1e-5, atol=1e-7)
    zeros = got[1] == 0
    assert not torch.equal(zeros[0], zeros[2])  # the second chunk does not repeat the first's masks
    assert models.chunk_seed(7, 0) == 7 != models.chunk_seed(7, 2)


def test_chunked_forward_without_autograd_equals_the_unchunked_one():
    group, _ = _build("resnet:8:bn", 5, (1, 8, 8))
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = models.forward_group(group, x, shared=True, num_heads=H1, train=False)
        got = models.forward_group(group, x, shared=True, num_heads=H1, train=False, chunk=2)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
