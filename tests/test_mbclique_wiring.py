"""MBCliqueNet's wiring against its forward pass written out here from the parameter tree
(the MBCliqueNet paper's Sec. 2 and Fig. 1-2, on CliqueNet's Stage I / Stage II): stem ->
per block, Stage I then Stage II of the clique layers, each layer BN-ReLU-1x1 conv over its
concatenated inputs -> BN-ReLU -> modulated binary 3x3 conv with the block's one M-filter;
{X0, Stage-II} pooled for the head, Stage-II through the transition; head 1x1 conv -> BN.
The other readings of the source (`model.clique_conv`, `stage_two_kernels`,
`transition_kernel`, `transition_width`, `attention`, `head_input`, `compression`) are
written out too.
Only `jax.lax.conv_general_dilated` and `jnp` below; nothing from cliquejax but the model."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cliquejax.models import build_model
from configs import mbclique_digits

HIGHEST = jax.lax.Precision.HIGHEST


def small_config(**model):
    config = mbclique_digits.get_config()  # 3 blocks x 3 layers
    config.model.update(dict(widths=(8, 8, 16), K=4))
    config.model.update(model)
    return config


def built(config, seed=0):
    """The real model, its variables with random BN parameters and running statistics (so a
    BN applied to the wrong features shows), and a batch of 16 x 16 images."""
    model = build_model(config, 10)
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    images = jax.random.normal(keys[0], (4, 16, 16, 1))
    variables = model.init(keys[1], images)

    def randomise(key):
        def leaf(path, value):
            name = str(path[-1].key)
            k = jax.random.fold_in(key, zlib.crc32(jax.tree_util.keystr(path).encode()))
            if name in ("scale", "var"):
                return jax.random.uniform(k, value.shape, minval=0.5, maxval=1.5)
            if name in ("bias", "mean"):
                return 0.2 * jax.random.normal(k, value.shape)
            return value
        return leaf

    variables = {
        "params": jax.tree_util.tree_map_with_path(randomise(keys[2]), variables["params"]),
        "batch_stats": jax.tree_util.tree_map_with_path(randomise(keys[3]),
                                                        variables["batch_stats"]),
    }
    return model, variables, images


# --- the forward pass, written out ----------------------------------------------------


def conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=HIGHEST)


def bn(x, params, stats, eps, train, relu):
    if train:  # the batch's statistics (biased variance), over all but the channel axis
        axes = tuple(range(x.ndim - 1))
        mean, var = jnp.mean(x, axes), jnp.var(x, axes)
    else:
        mean, var = stats["mean"], stats["var"]
    y = (x - mean) / jnp.sqrt(var + eps) * params["scale"] + params["bias"]
    return jnp.maximum(y, 0.0) if relu else y


def sign(w):
    return jnp.where(w >= 0, 1.0, -1.0)


def one_bit(kernel, on):
    """A 1-bit (not modulated) kernel: sign times the He std of its own fan-in."""
    fan_in = kernel.shape[0] * kernel.shape[1] * kernel.shape[2]
    return sign(kernel) * jnp.sqrt(2.0 / fan_in) if on else kernel


def modulated(latent, m_filter, on):
    """Q[..., i*K + j] = sign(C_i) * M_j: each of the width / K binary filters gives K
    filters, one per M-filter plane (paper eq. 3), the plane broadcast over input channels."""
    binary = sign(latent) if on else latent
    planes = jnp.transpose(m_filter, (1, 2, 0))[:, :, None, :]  # (3, 3, 1, K)
    return jnp.concatenate([binary[..., i:i + 1] * planes for i in range(binary.shape[-1])], -1)


def block(p, s, x0, n, m, eps, train, planes=None):
    """One block: Stage I (X_i from X0..X_{i-1}), Stage II (X_i from all X_j, j != i, in
    place, in order). `planes`: {layer: the M-filter that layer uses}, by default the
    block's one M-filter for every layer."""
    planes = planes or {i: p["M_filter"] for i in range(1, n + 1)}
    binary_1x1 = m.binarize and m.binarize_1x1
    own = {1: "", 2: "II_"}  # Stage II's own kernels: W_II_{j}to{i}, W_bottleneck_II_{i}
    clique = lambda stage: own[stage] if m.stage_two_kernels != "shared" else ""
    bottleneck = lambda stage: own[stage] if m.stage_two_kernels == "own" else ""

    def layer(stage, i, inputs):
        name = f"BN_{'I' * stage}_{i}"
        x = jnp.concatenate([features[j] for j in inputs], -1)
        pieces = [p[f"W_{clique(stage)}{j}to{i}"] for j in inputs]
        if m.clique_conv == "per_connection":  # every W_ji a modulated 3x3 (eqs. 1-2)
            w = jnp.concatenate([modulated(c, planes[i], m.binarize) for c in pieces], axis=2)
            return conv(bn(x, p[name], s[name], eps, train, True), w)
        w = jnp.concatenate([one_bit(c, binary_1x1) for c in pieces], axis=2)
        y = conv(bn(x, p[name], s[name], eps, train, True), w)
        name = f"BN_{'I' * stage}_bottleneck_{i}"
        y = bn(y, p[name], s[name], eps, train, True)
        return conv(y, modulated(p[f"W_bottleneck_{bottleneck(stage)}{i}"], planes[i],
                                 m.binarize))

    features = {0: x0}
    for i in range(1, n + 1):
        features[i] = layer(1, i, list(range(i)))
    for i in range(1, n + 1):
        features[i] = layer(2, i, [j for j in range(1, n + 1) if j != i])
    stage_two = jnp.concatenate([features[i] for i in range(1, n + 1)], -1)
    head = jnp.concatenate([x0, stage_two], -1) if m.head_input == "x0_and_stage2" else stage_two
    return head, stage_two


def attention(x, p):
    """CliqueNet's attentional transition: squeeze-excitation by two dense layers."""
    dense = lambda v, q: jnp.dot(v, q["kernel"], precision=HIGHEST) + q["bias"]
    squeezed = jnp.maximum(dense(jnp.mean(x, axis=(1, 2)), p["squeeze"]), 0.0)
    return x * jax.nn.sigmoid(dense(squeezed, p["expand"]))[:, None, None, :]


def reference_logits(config, variables, images, eps, train=False, planes=None):
    """`planes`: {block index: {layer: its M-filter}} (`block`), by default the blocks' own."""
    m, p, s = config.model, variables["params"], variables["batch_stats"]
    x = conv(images, one_bit(p["stem"]["kernel"], m.binarize and m.binarize_stem))
    pooled = []
    for b, n in enumerate(m.layers, start=1):
        if f"block{b}_input" in p:  # per_connection: X0 brought to the block's width
            x = conv(x, one_bit(p[f"block{b}_input"]["kernel"], m.binarize and m.binarize_1x1))
        block_feature, transit = block(p[f"block{b}"], s[f"block{b}"], x, n, m, eps, train,
                                       (planes or {}).get(b))
        if m.compression:  # CliqueNet's: BN-ReLU-1x1 halving the head feature
            block_feature = conv(bn(block_feature, p[f"compression{b}_bn"],
                                    s[f"compression{b}_bn"], eps, train, True),
                                 one_bit(p[f"compression{b}"]["kernel"],
                                         m.binarize and m.binarize_1x1))
        pooled.append(jnp.mean(bn(block_feature, p[f"pool{b}"]["bn"], s[f"pool{b}"]["bn"],
                                  eps, train, True), axis=(1, 2)))
        if b < len(m.layers):
            t = bn(transit, p[f"transition{b}_bn"], s[f"transition{b}_bn"], eps, train, True)
            t = conv(t, one_bit(p[f"transition{b}"]["kernel"], m.binarize and
                                m.binarize_transition))
            if m.attention:
                t = attention(t, p[f"transition{b}_attention"])
            batch, height, width, channels = t.shape
            x = t.reshape(batch, height // 2, 2, width // 2, 2, channels).mean(axis=(2, 4))
    head = one_bit(p["head_conv"]["kernel"], m.binarize and m.binarize_head)[0, 0]
    logits = jnp.dot(jnp.concatenate(pooled, -1), head, precision=HIGHEST)
    return bn(logits, p["head_bn"], s["head_bn"], eps, train, False)


def bn_epsilon(model):
    return model.bn.epsilon  # the model's ops.BNSpec: 1e-5 for MBCliqueNet (PyTorch)


# --- the tests ------------------------------------------------------------------------


@pytest.mark.parametrize("binarize, train", [(True, False), (False, False), (True, True)],
                         ids=["MBCliqueNet-eval", "u-MBCliqueNet-eval", "MBCliqueNet-train"])
def test_forward_pass_equals_the_written_out_wiring(binarize, train):
    config = small_config(binarize=binarize)
    model, variables, images = built(config)
    if train:
        logits, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
    else:
        logits = model.apply(variables, images, train=False)
    expected = jax.jit(lambda v, x: reference_logits(config, v, x, bn_epsilon(model), train))(
        variables, images)
    assert logits.shape == (4, 10)
    # training mode normalises the logits over a batch of 4: float32 rounding of the batch
    # variances is amplified more there
    tolerance = (1e-4 if train else 1e-5) * np.abs(expected).max()
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=tolerance)
    assert np.abs(expected).max() > 0.1  # not a trivially small comparison


READINGS = [dict(clique_conv="per_connection"), dict(stage_two_kernels="own_clique"),
            dict(stage_two_kernels="own"), dict(transition_kernel=3),
            dict(transition_width="keep"), dict(attention=True), dict(head_input="stage2"),
            dict(compression=True), dict(compression=True, head_input="stage2"),
            dict(clique_conv="per_connection", transition_width="keep",
                 stage_two_kernels="own"),
            # the lax-loop formulation reads each stage's own kernels too
            dict(stage_two_kernels="own", unroll=False),
            dict(clique_conv="per_connection", stage_two_kernels="own_clique", unroll=False)]


@pytest.mark.parametrize("reading", READINGS, ids=lambda r: ",".join(f"{k}={v}"
                                                                   for k, v in r.items()))
def test_each_reading_of_the_source_equals_its_written_out_wiring(reading):
    """Each open point of the source (docs/papers.md, MBCliqueNet parameter counts) builds
    the network written out above: the kernels it adds are used where it says."""
    config = small_config(**reading)
    model, variables, images = built(config)
    default = jax.eval_shape(lambda x: build_model(small_config(), 10).init(
        jax.random.PRNGKey(0), x), images)["params"]
    size = lambda tree: sum(leaf.size for leaf in jax.tree.leaves(tree))
    assert size(variables["params"]) != size(default)  # the reading changes the network
    logits = model.apply(variables, images, train=False)
    expected = jax.jit(lambda v, x: reference_logits(config, v, x, bn_epsilon(model), False))(
        variables, images)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert np.abs(expected).max() > 0.1


def test_every_layer_of_a_block_sends_gradient_to_its_one_m_filter():
    """dL/dM of each block is the sum of what every layer's modulated conv sends it. Written
    out with a copy of the block's M-filter per layer, the gradient with respect to each copy
    is that layer's part: every part is non-zero, and the model's gradient is their sum. A
    layer of the model with an M-filter of its own, or none, would leave its part out."""
    config = small_config()
    model, variables, images = built(config, seed=1)
    eps = bn_epsilon(model)
    weights = jax.random.normal(jax.random.PRNGKey(7), (4, 10))
    names = [f"block{b}" for b in range(1, len(config.model.layers) + 1)]
    m_filters = {name: variables["params"][name]["M_filter"] for name in names}

    def model_loss(m_filters):
        params = {key: dict(value, M_filter=m_filters[key]) if key in m_filters else value
                  for key, value in variables["params"].items()}
        return jnp.sum(model.apply(dict(variables, params=params), images) * weights)

    def written_loss(planes):
        return jnp.sum(reference_logits(config, variables, images, eps, planes=planes) * weights)

    copies = {b: {i: m_filters[f"block{b}"] for i in range(1, n + 1)}
              for b, n in enumerate(config.model.layers, start=1)}
    model_grads = jax.jit(jax.grad(model_loss))(m_filters)
    parts = jax.jit(jax.grad(written_loss))(copies)
    for b, name in enumerate(names, start=1):
        scale = float(jnp.abs(model_grads[name]).max())
        for i, part in parts[b].items():
            assert float(jnp.abs(part).max()) > 1e-2 * scale, f"{name} layer {i}"
        np.testing.assert_allclose(model_grads[name], sum(parts[b].values()), atol=1e-4 * scale)


def closest_reading():
    from cliquejax import reproduce
    return {key.removeprefix("model."): value
            for key, value in reproduce.CLOSEST_READING.items()}


# Every value of every reading's field at least once (with the default and the closest
# reading): the readings that add weights combined, so that each is built and trained.
slow = lambda reading: pytest.param(reading, marks=pytest.mark.slow)
LEARNING_READINGS = [
    {}, dict(stage_two_kernels="own", compression=True),
    slow(dict(clique_conv="per_connection", stage_two_kernels="own_clique",
              transition_kernel=3, transition_width="keep", attention=True,
              head_input="stage2", compression=True)),
    slow(dict(stage_two_kernels="own", unroll=False)),
    slow(dict(stage_two_kernels="own", variant="I+I")), slow("closest")]


@pytest.mark.parametrize("reading", LEARNING_READINGS, ids=lambda r: ",".join(
    f"{k}={v}" for k, v in r.items()) or "default" if isinstance(r, dict) else r)
def test_every_parameter_of_every_reading_learns(reading):
    """A reading counts only weights that get a gradient: on a small batch every parameter
    of the network has a non-zero gradient (a kernel that nothing reads would have none,
    and would still be counted against the paper's figures)."""
    config = small_config(**(closest_reading() if reading == "closest" else reading))
    model, variables, images = built(config)
    weights = jax.random.normal(jax.random.PRNGKey(3), (4, 10))

    def loss(params):
        logits, _ = model.apply(dict(variables, params=params), images, train=True,
                                mutable=["batch_stats"])
        return jnp.sum(logits * weights)

    grads = jax.jit(jax.grad(loss))(variables["params"])
    dead = [jax.tree_util.keystr(path) for path, g in jax.tree_util.tree_leaves_with_path(grads)
            if not float(jnp.max(jnp.abs(g))) > 0.0]
    assert not dead, dead
