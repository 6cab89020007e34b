"""Config: defaults, TOML / YAML files, flags over files, unknown keys, checks, what methods imply."""
import math

import pytest

from mhd_fast import config as C


def test_defaults_are_valid_and_resolved():
    cfg = C.load()
    assert cfg.dataset == "digits" and cfg.method == "mhd" and cfg.heads == 3
    assert cfg.name == "digits-mhd-s0" and cfg.out.endswith("digits-mhd-s0")
    assert len({cfg.split_seed, cfg.init_seed, cfg.train_seed}) == 3  # separate streams


def test_seeds_are_derived_stably_and_can_be_pinned():
    a, b = C.load(None, {"seed": 1}), C.load(None, {"seed": 1})
    assert (a.split_seed, a.init_seed, a.train_seed) == (b.split_seed, b.init_seed, b.train_seed)
    c = C.load(None, {"seed": 1, "train_seed": 5})
    assert c.train_seed == 5 and c.split_seed == a.split_seed
    assert C.load(None, {"seed": 2}).split_seed != a.split_seed


def test_toml_then_flags(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('clients = 8\nmodel = ["mlp:32", "cnn:4-8"]\ngraph = "kring"\ngraph_options = {k = 2}\ntau = 2\n')
    cfg = C.load(str(path), {"clients": 4})
    assert cfg.clients == 4 and cfg.model == ["mlp:32", "cnn:4-8"]
    assert cfg.graph_options == {"k": 2} and cfg.tau == 2.0 and isinstance(cfg.tau, float)


def test_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rounds: 3\nmodel: mlp:16\ninclude_self: true\n")
    cfg = C.load(str(path))
    assert cfg.rounds == 3 and cfg.model == ["mlp:16"] and cfg.include_self is True


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("clients = 8\nlearning_rate = 0.1\n")
    with pytest.raises(ValueError, match="unknown key 'learning_rate'"):
        C.load(str(path))


@pytest.mark.parametrize("name,text,match", [
    ("c.toml", "clients = [", "not valid TOML"),
    ("c.yaml", "a: [", "not valid YAML"),
    ("c.yaml", "- 1\n- 2\n", "table of keys"),
    ("c.json", "{}", ".toml, .yaml or .yml"),
    ("c.toml", 'clients = "many"', "clients .* must be int"),
])
def test_unreadable_files(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        C.load(str(path))


def test_missing_file():
    with pytest.raises(ValueError, match="--config: cannot read"):
        C.load("/nonexistent/c.toml")


def test_a_partition_option_picks_its_partition():
    assert C.load(None, {"dirichlet": 0.3}).partition == "dirichlet"
    assert C.load(None, {"shards": 3}).partition == "shards"
    assert C.load(None, {"dirichlet": 0.3, "partition": "iid"}).partition == "iid"


@pytest.mark.parametrize("key,value,flag", [
    ("clients", 0, "--clients"), ("method", "fedprox", "--method"), ("dataset", "imagenet", "--dataset"),
    ("graph", "hypercube", "--graph"), ("skew", 1.5, "--skew"), ("dirichlet", 0.0, "--dirichlet"),
    ("tau", 0.0, "--tau"), ("tau", 101.0, "--tau"), ("topk", -1, "--topk"), ("wire_dtype", "int8", "--wire-dtype"),
    ("aggregate", "median", "--aggregate"), ("model", ["transformer"], "--model"),
    ("public_fraction", 1.0, "--public-fraction"), ("device", "tpu", "--device"),
    ("exchange_every", 0, "--exchange-every"), ("lr", 0.0, "--lr"), ("name", "a/b", "--name"),
    ("heads", 0, "--heads"), ("partition", "zipf", "--partition"), ("backend", "cuda", "--backend"),
    ("teacher_ema", 1.0, "--teacher-ema"), ("teacher_ema", -0.1, "--teacher-ema"),
    ("client_chunk", -1, "--client-chunk"), ("conv", "winograd", "--conv"),
])
def test_bad_values_name_the_option(key, value, flag):
    with pytest.raises(ValueError, match=flag):
        C.load(None, {key: value})


def test_teacher_ema_needs_dense_logits():
    with pytest.raises(ValueError, match="--teacher-ema .* needs --topk 0"):
        C.load(None, {"teacher_ema": 0.5, "topk": 2})
    assert C.load(None, {"teacher_ema": 0.5, "method": "isolated"}).teacher_ema == 0


def test_heterogeneous_models_with_fedavg_or_mismatched_embeddings_are_refused():
    with pytest.raises(ValueError, match="fedavg"):
        C.load(None, {"method": "fedavg", "model": ["mlp:8", "mlp:16"]})
    with pytest.raises(ValueError, match="--nu-emb"):
        C.load(None, {"nu_emb": 1.0, "model": ["mlp:8", "mlp:16"]})
    C.load(None, {"nu_emb": 1.0, "model": ["mlp:32x8", "cnn:4-8"]})  # same E = 8


@pytest.mark.parametrize("method", ["isolated", "fedavg", "centralized"])
def test_baselines_have_no_aux_heads_and_no_distillation(method):
    cfg = C.load(None, {"method": method, "nu_main": 1.0})
    assert cfg.heads == 0 and cfg.nu_aux == 0 and cfg.nu_main == 0


def test_mean_distill_is_fedmd_style():
    cfg = C.load(None, {"method": "mean_distill"})
    assert cfg.heads == 0 and cfg.aggregate == "mean" and cfg.nu_main == 1.0
    assert C.load(None, {"method": "mean_distill", "nu_main": 0.3}).nu_main == 0.3


def test_round_trip_through_a_dict():
    cfg = C.load(None, {"clients": 5, "model": ["mlp:8"]})
    assert C.from_dict(C.to_dict(cfg)) == cfg


@pytest.mark.parametrize("name", [n for n in C.FIELDS if C.field_kind(n) is float])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_every_float_option_must_be_finite(name, value):
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ValueError, match=f"^{flag} must be a finite number"):
        C.load(None, {name: value})


@pytest.mark.parametrize("flags,match", [
    ({"dist_timeout": 1e300}, "--dist-timeout must be <= 604800 seconds"),
    ({"split_seed": 2**70}, r"--split-seed must be in \[0, 2\*\*63 - 1\]"),
    ({"init_seed": -1}, "--init-seed must be in"),
    ({"clients": 2, "model": ["mlp:16", "mlp:8", "mlp:4"]}, "--model lists 3 architectures for 2"),
    ({"method": "centralized", "model": ["mlp:16", "mlp:8"]}, "centralized .* one --model"),
    ({"graph": "ring", "graph_options": {"k": 2}}, "--graph-options: graph 'ring' takes no options"),
    ({"graph": "kring", "graph_options": {"degree": 2}}, "takes the options k, got degree"),
    ({"name": "bad\udcff"}, "--name must be a plain folder name in UTF-8"),
])
def test_values_that_would_be_ignored_or_overflow_are_refused(flags, match):
    with pytest.raises(ValueError, match=match):
        C.load(None, flags)


def test_a_config_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes(b"clients = 4\n# caf\xe9\n")
    with pytest.raises(ValueError, match=r"^--config: .*c.toml' is not UTF-8 text \(byte 17"):
        C.load(str(path))
