"""The CliqueNet family: published parameter counts and FLOPs, every option builds and
trains under jit, variant identities, and one-line errors for impossible configs."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cliquejax import summary
from cliquejax.models import build_model
from cliquejax.models import cliquenet_imagenet as imagenet_model
from configs import cliquenet_cifar10, cliquenet_imagenet, densenet_cifar10, mbclique_cifar10

# docs/papers.md §1 and the CliqueNet README's Table 3: (k, T, params, FLOPs) as printed.
CLIQUENET_ROWS = [(36, 12, "0.94M", "0.91G"), (64, 15, "4.49M", "4.21G"),
                  (80, 15, "6.94M", "6.45G"), (80, 18, "10.14M", "9.45G")]
DENSENET_ROWS = [(12, 36, "1.0M", "0.53G"), (12, 96, "7.0M", "3.54G"),
                 (24, 96, "27.2M", "13.78G")]


def printed(value: float, like: str) -> str:
    decimals = len(like.split(".")[1]) - 1
    return f"{value:.{decimals}f}{like[-1]}"


def cifar_config(**model):
    config = cliquenet_cifar10.get_config()
    config.model.update(model)
    return config


@pytest.mark.parametrize("k,T,params,flops", CLIQUENET_ROWS)
def test_cliquenet_published_counts(k, T, params, flops):
    result = summary.summarize(cifar_config(k=k, T=T))
    assert printed(result["params"] / 1e6, params) == params
    assert printed(result["flops"] / 1e9, flops) == flops


@pytest.mark.parametrize("k,T,params,flops", DENSENET_ROWS)
def test_densenet_published_counts(k, T, params, flops):
    config = densenet_cifar10.get_config()
    config.model.k, config.model.T = k, T
    result = summary.summarize(config)
    assert printed(result["params"] / 1e6, params) == params
    assert printed(result["flops"] / 1e9, flops) == flops


def test_cliquenet_k36_T12_exact_count():
    # Hand count (docs/papers.md §1): stem 1728, blocks 224720 + 2 * 329040, transitions
    # 2 * 21024, head BNs 1568 and dense 7850.
    assert summary.summarize(cifar_config())["params"] == 935_994


def init_and_step(config, image_shape=(2, 16, 16, 3), num_classes=5):
    model = build_model(config, num_classes)
    images = jax.random.normal(jax.random.PRNGKey(0), image_shape)
    labels = jnp.arange(image_shape[0]) % num_classes
    variables = model.init(jax.random.PRNGKey(1), images)

    @jax.jit
    def loss_and_grads(params, batch_stats):
        def loss(p):
            logits, state = model.apply({"params": p, "batch_stats": batch_stats}, images,
                                        train=True, rngs={"dropout": jax.random.PRNGKey(2)},
                                        mutable=["batch_stats"])
            onehot = jax.nn.one_hot(labels, num_classes)
            return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1)), state
        return jax.value_and_grad(loss, has_aux=True)(params)

    (value, state), grads = loss_and_grads(variables["params"], variables["batch_stats"])
    logits = model.apply(variables, images, train=False)
    return model, variables, value, grads, state, logits


FAST_OPTIONS = dict(attention=True, bottleneck=True, compression=True, T=12)  # make test-fast
OPTIONS = [dict(variant=v, x=1) for v in ("II+II", "I+I", "I+II", "X")] + [
    dict(attention=True), dict(bottleneck=True, T=12), dict(compression=True),
    FAST_OPTIONS, dict(unroll=False)]


@pytest.mark.parametrize("options", [
    pytest.param(o, marks=() if o == FAST_OPTIONS else pytest.mark.slow,
                 id=",".join(f"{k}={v}" for k, v in o.items())) for o in OPTIONS])
def test_every_option_trains_under_jit(options):
    config = cifar_config(**{"k": 4, "T": 6, **options})
    _, variables, value, grads, state, logits = init_and_step(config)
    assert np.isfinite(float(value)) and logits.shape == (2, 5)
    norms = jax.tree.map(lambda g: float(jnp.sum(g**2)), grads)
    assert all(np.isfinite(n) for n in jax.tree.leaves(norms))
    assert sum(jax.tree.leaves(norms)) > 0
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"],
                         state["batch_stats"])
    assert all(jax.tree.leaves(moved)), "every BN's moving statistics update in training"


@pytest.mark.parametrize("x,same_as", [(0, "I+I"), (2, "II+II")])
def test_variant_x_limits(x, same_as):
    """X = 0 is I+I, X = n is II+II: the same parameters and the same network function."""
    model_x = build_model(cifar_config(k=4, T=6, variant="X", x=x), 5)
    model_ref = build_model(cifar_config(k=4, T=6, variant=same_as), 5)
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
    v_x = model_x.init(jax.random.PRNGKey(1), images)
    v_ref = jax.eval_shape(model_ref.init, jax.random.PRNGKey(1), images)
    assert jax.tree.structure(v_x) == jax.tree.structure(v_ref)
    assert jax.tree.map(jnp.shape, v_x) == jax.tree.map(lambda a: a.shape, v_ref)
    np.testing.assert_allclose(model_ref.apply(v_x, images, train=False),
                               model_x.apply(v_x, images, train=False), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_densenet_trains_under_jit():
    config = densenet_cifar10.get_config()
    config.model.k, config.model.T = 4, 6
    _, _, value, _, _, logits = init_and_step(config)
    assert np.isfinite(float(value)) and logits.shape == (2, 5)


@pytest.mark.parametrize("setting", ["S0", "S1", "S2", "S3"])
def test_imagenet_settings_build(setting):
    config = cliquenet_imagenet.get_config(setting)
    result = summary.summarize(config)
    assert result["input"] == [224, 224, 3] and result["classes"] == 1000
    blocks = [row for row in result["modules"] if row["module"].startswith("block")]
    assert len(blocks) == 4
    k, n = imagenet_model.SETTINGS[setting]
    widths = [ki * ni for ki, ni in zip(k, n, strict=True)]
    assert [row["output"][1][-1] for row in blocks] == widths


@pytest.mark.slow
def test_imagenet_model_trains_small():
    config = cliquenet_imagenet.get_config("S0")
    config.model.channels, config.model.layers = (4, 4, 4, 4), (2, 2, 2, 2)
    _, _, value, _, _, logits = init_and_step(config, (2, 32, 32, 3), 7)
    assert np.isfinite(float(value)) and logits.shape == (2, 7)


@pytest.mark.parametrize("field,value,message", [
    ("T", 2, "model.T=2"), ("T", 5, "model.T=5"), ("variant", "II+I", "model.variant='II+I'"),
    ("x", 7, "model.x=7"), ("name", "resnet", "model.name='resnet'")])
def test_impossible_config_is_a_one_line_error(field, value, message):
    config = cifar_config(variant="X" if field == "x" else "II+II")
    config.model[field] = value
    with pytest.raises(ValueError) as error:
        build_model(config, 10)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert "allowed" in str(error.value) or "one of" in str(error.value)


@pytest.mark.slow
def test_summary_cli_json():
    result = subprocess.run(
        [sys.executable, "-m", "cliquejax.summary", "--config=configs/cliquenet_cifar10.py",
         "--config.model.k=36", "--json"], capture_output=True, text=True, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["params"] == 935_994 and report["flops"] == 2 * report["macs"]
    assert report["macs"] == sum(row["macs"] for row in report["modules"])


@pytest.mark.parametrize("get_config", [cliquenet_cifar10.get_config, mbclique_cifar10.get_config],
                         ids=["cliquenet", "mbcliquenet"])
def test_counts_are_the_summary_totals(get_config):
    """`summary.counts` (what reproduce prints beside the published sizes) traces less than
    `summarize` and must give the same parameters and FLOPs."""
    result = summary.summarize(get_config())
    assert summary.counts(get_config()) == (result["params"], result["flops"])
