"""MBCliqueNet: modulated binary convs, initialisation scales, u-MBCliqueNet identity,
storage accounting, the alternating update and learning on learnable data."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cliquejax import binary, bits, ops, summary
from cliquejax.models import build_model
from cliquejax.train import step
from configs import mbclique_cifar10
from tests.test_binary import reconstructed_filters


def small_config(**model):
    config = mbclique_cifar10.get_config()
    config.model.update(dict(widths=(8, 8, 16), layers=(2, 2, 2), K=4))
    config.model.update(model)
    return config


def test_recorded_1_bit_weights_are_the_ones_the_forward_pass_binarises():
    """The `bits` record comes from the layer that quantizes: rescaling every weight it marks
    1-bit by a positive factor (same signs) leaves the network's output unchanged, and
    rescaling the others changes it."""
    config = small_config(binarize_stem=True)
    model = build_model(config, 10)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
    variables = model.init(jax.random.PRNGKey(1), x)
    mask = bits.binary_mask(variables)
    assert sum(jax.tree.leaves(mask)) == 3 * (4 + 2) + 2 + 2  # blocks, stem, transitions, head
    scaled = lambda which: dict(variables, params=jax.tree.map(
        lambda leaf, binary: leaf * 3.0 if binary == which else leaf, variables["params"], mask))
    out = model.apply(variables, x)
    np.testing.assert_array_equal(model.apply(scaled(True), x), out)
    assert not np.allclose(model.apply(scaled(False), x), out)


def test_cifar10_storage_is_at_least_32x_smaller():
    report = summary.summarize(mbclique_cifar10.get_config())
    assert report["conv_compression"] >= 32
    # the MBCliqueNet paper's bracketed u-MBCliqueNet stores the width / K latent filters in
    # float32: against it the ratio is just under 32 (M-filters and the stem stay float)
    assert 31.0 < report["conv_compression_vs_u_mbcliquenet"] < 32.0
    text = summary.format_table(report)
    assert f"{report['conv_compression_vs_full_precision']:.1f}x smaller than the full-pre" in text
    assert f"{report['conv_compression_vs_u_mbcliquenet']:.1f}x smaller than u-MBCliqueNet" in text
    assert report["binary_params"] + report["float_params"] == report["params"]
    assert report["float32_bytes"] == 4 * (report["params"] + report["batch_stats"])
    assert report["latent_compression"] == pytest.approx(
        report["float32_bytes"] / report["packed_bytes"])
    blocks = {row["module"]: row for row in report["modules"]}
    assert blocks["transition1"]["ratio"] == 32.0  # a binary 1x1 conv: 1 bit per weight
    assert blocks["stem"]["ratio"] == 1.0  # kept in float by default


def test_storage_counts_by_hand():
    """Block 1 of widths (8, 8, 16), 2 layers, K = 4: 1x1 pieces W_0to1, W_0to2 (8 -> 8) and
    W_1to2, W_2to1 (8 -> 8) binary, two modulated 3x3 convs of 8/4 = 2 latent filters each,
    one M-filter (4 x 3 x 3) and BNs in float."""
    report = summary.summarize(small_config())
    block1 = next(r for r in report["modules"] if r["module"] == "block1")
    binary_bits = 4 * 64 + 2 * (9 * 8 * 2)
    bn_channels = (8 + 16) + 2 * 8 + 2 * 8 + 2 * 8  # BN_I_1/2, BN_II_1/2, 4 bottleneck BNs
    float_bits = 32 * (36 + 2 * bn_channels)
    assert block1["bits"] == binary_bits + float_bits


@pytest.mark.parametrize("clique_conv", ["bottleneck", "per_connection"])
def test_conv_ratios_against_both_baselines_come_from_the_real_models(clique_conv):
    """u-MBCliqueNet (binarize=False) is built and its conv filters are all float32: its own
    conv bytes are the baseline. The full-precision unmodulated network has the filters of
    u-MBCliqueNet with K = 1 (one plane per filter) less its one-plane M-filters, whichever
    convs are modulated (`model.clique_conv`: the 3x3 of each layer, or every clique kernel)."""
    report = summary.summarize(small_config(clique_conv=clique_conv))
    u_report = summary.summarize(small_config(binarize=False, clique_conv=clique_conv))
    assert u_report["binary_params"] == 0
    assert report["conv_u_mbcliquenet_bytes"] == u_report["conv_packed_bytes"]
    assert report["conv_compression_vs_u_mbcliquenet"] == pytest.approx(
        u_report["conv_packed_bytes"] / report["conv_packed_bytes"])
    unmodulated = summary.summarize(small_config(binarize=False, K=1, clique_conv=clique_conv))
    one_plane_m_filters = 4 * 3 * 9  # three blocks, one 3x3 plane each, float32
    assert report["conv_float32_bytes"] == unmodulated["conv_packed_bytes"] - one_plane_m_filters
    assert report["conv_compression_vs_full_precision"] == report["conv_compression"]
    assert report["conv_compression_vs_full_precision"] == pytest.approx(
        report["conv_float32_bytes"] / report["conv_packed_bytes"])
    assert set(report["storage_baselines"]) == {"conv_compression_vs_full_precision",
                                                "conv_compression_vs_u_mbcliquenet"}


def effective_binary_weights(variables):
    """The weights a binary net convolves with: sign(C) for modulated latents (the M-filter
    scales them), sign(C) * sqrt(2 / fan_in) for the other 1-bit kernels."""
    def effective(path, leaf, is_binary):
        if not is_binary:
            return leaf
        signs = jnp.where(leaf >= 0, 1.0, -1.0)
        if str(path[-1].key).startswith("W_bottleneck"):
            return signs
        return signs * (2.0 / np.prod(leaf.shape[:3])) ** 0.5
    mask = bits.binary_mask(variables)  # as the layers recorded it at init
    return jax.tree_util.tree_map_with_path(effective, variables["params"], mask)


def test_u_mbcliquenet_is_mbcliquenet_with_signs_as_latents():
    binary_config, u_config = small_config(), small_config(binarize=False)
    binary_net, u_net = build_model(binary_config, 10), build_model(u_config, 10)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
    variables = binary_net.init(jax.random.PRNGKey(1), x)
    trained = lambda v: {k: v[k] for k in ("params", "batch_stats")}  # bits differ, 1 vs 32
    assert jax.tree.structure(trained(variables)) == jax.tree.structure(
        trained(u_net.init(jax.random.PRNGKey(1), x)))
    signed = dict(variables, params=effective_binary_weights(variables))
    for train in (False, True):
        kwargs = dict(train=train, mutable=["batch_stats"]) if train else {}
        out_binary = binary_net.apply(variables, x, **kwargs)
        out_u = u_net.apply(signed, x, **kwargs)
        np.testing.assert_allclose(jax.tree.leaves(out_binary)[0], jax.tree.leaves(out_u)[0],
                                   rtol=1e-4, atol=1e-4)


def test_reconstructed_filters_have_he_std_at_init():
    config = mbclique_cifar10.get_config()
    net = build_model(config, 10)
    # 8 initialisations, as one jitted program over the seeds (eager, each takes seconds)
    init = jax.vmap(lambda key: net.init(key, jnp.zeros((1, 32, 32, 3)))["params"])
    params = jax.jit(init)(jax.random.split(jax.random.PRNGKey(0), 8))
    for block, width in zip(("block1", "block2", "block3"), config.model.widths, strict=True):
        reconstruct = jax.vmap(reconstructed_filters)
        qs = [reconstruct(params[block][f"W_bottleneck_{i}"], params[block]["M_filter"])
              for i in (1, 2, 3, 4)]
        std = float(jnp.std(jnp.stack(qs)))
        assert std == pytest.approx((2.0 / (9 * width)) ** 0.5, rel=0.10)


def test_activation_scale_matches_full_precision_through_depth():
    """The initialisation makes binary and full-precision (u-) nets propagate activations at
    the same scale (inference mode at init, where nothing renormalises)."""
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 32, 32, 3))
    scales = {}
    for binarize in (True, False):
        net = build_model(small_config(binarize=binarize, widths=(16, 32, 64), layers=(3, 3, 3)),
                          10)
        variables = net.init(jax.random.PRNGKey(0), x)
        _, state = net.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
        scales[binarize] = [float(jnp.std(state["intermediates"][b]["__call__"][0][1]))
                            for b in ("block1", "block2", "block3")]
    ratios = np.array(scales[True]) / np.array(scales[False])
    assert np.all((ratios > 0.67) & (ratios < 1.5)), (scales, ratios)


@pytest.mark.parametrize("field,value,message", [
    ("K", 3, "model.K=3"), ("layers", (2, 2), "model.layers has 2"),
    ("sign_fn", "tanh", "model.sign_fn='tanh'"), ("update_order", "both", "model.update_order")])
def test_bad_config_is_a_one_line_error(field, value, message):
    config = small_config(**{field: value})
    with pytest.raises(ValueError) as error:
        build_model(config, 10)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.slow
def test_alternating_update_uses_the_gradient_at_the_new_filters():
    config = small_config(update_order="alternating")
    config.optimizer.momentum, config.optimizer.weight_decay = 0.0, 0.0
    net = build_model(config, 10)
    lr = 0.05
    tx = optax.sgd(lr)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
    batch = {"image": x, "label": jnp.array([0, 1, 2, 3])}
    state = step.init_state(net, step.make_transforms(config, tx, net.init(
        jax.random.PRNGKey(0), x)["params"]), (8, 8, 3), 0)
    transforms = step.make_transforms(config, tx, state["params"])
    new, _ = step.train_step(state, batch, model=net, transforms=transforms,
                             schedule=lambda s: lr, seed=0)
    loss = step._loss_fn(net, state, batch, jax.random.fold_in(jax.random.PRNGKey(0), 0))
    grads = jax.grad(lambda p: loss(p)[0])(state["params"])
    is_m = lambda path: str(path[-1].key) == "M_filter"
    filters_first = jax.tree_util.tree_map_with_path(
        lambda path, p, g: p if is_m(path) else p - lr * g, state["params"], grads)
    grads_at_new = jax.grad(lambda p: loss(p)[0])(filters_first)
    expected = jax.tree_util.tree_map_with_path(
        lambda path, p, g: p - lr * g if is_m(path) else p, filters_first, grads_at_new)
    for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_short_run_learns_learnable_data():
    """Labels are the brightest quadrant of random images: the loss must fall."""
    config = small_config()
    config.train.epochs, config.optimizer.lr = 1, 0.05
    net = build_model(config, 4)
    images = jax.random.uniform(jax.random.PRNGKey(0), (256, 8, 8, 3))
    labels = jnp.arange(256) % 4
    offsets = [(0, 0), (0, 4), (4, 0), (4, 4)]
    for q, (dy, dx) in enumerate(offsets):
        images = images.at[labels == q, dy:dy + 4, dx:dx + 4, :].add(0.6)
    tx, schedule = optax.sgd(0.05, momentum=0.9), lambda s: 0.05
    state = step.init_state(net, (tx,), (8, 8, 3), 0)
    train = jax.jit(lambda s, b: step.train_step(s, b, model=net, transforms=(tx,),
                                                 schedule=schedule, seed=0))
    losses = []
    for i in range(60):
        idx = slice((i % 8) * 32, (i % 8 + 1) * 32)
        state, metrics = train(state, {"image": images[idx], "label": labels[idx]})
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-8:]) < 0.5 * np.mean(losses[:8]), losses


@pytest.mark.parametrize("variant,x,stage_two", [
    ("I+I", 0, []), pytest.param("X", 1, [1], marks=pytest.mark.slow),
    pytest.param("II+II", 0, [1, 2], marks=pytest.mark.slow)])
def test_the_clique_variants_wire_mbcliquenets_blocks(variant, x, stage_two):
    """`model.variant` is CliqueNet's wiring: the Stage-II BNs of each block are those of the
    layers the variant updates twice, and the network trains (finite, non-zero gradients)."""
    model = build_model(small_config(variant=variant, x=x), 10)
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
    variables = model.init(jax.random.PRNGKey(1), images)
    for block in ("block1", "block2", "block3"):
        names = variables["params"][block]
        assert sorted(int(n.rsplit("_", 1)[1]) for n in names
                      if n.startswith("BN_II_") and "bottleneck" not in n) == stage_two

    def loss(params):
        logits, _ = model.apply(dict(variables, params=params), images, train=True,
                                mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.array([1, 2])).mean()

    grads = jax.grad(loss)(variables["params"])
    norms = [float(jnp.sum(g ** 2)) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and sum(norms) > 0


def one_step_with_the_configs_optimizer(clip_latent):
    """One training step of `jit_steps` (the trainer's), at a learning rate big enough to
    carry latent filters far outside [-1, 1]; (params after, 1-bit mask)."""
    from cliquejax.train import optim
    config = small_config()
    config.optimizer.lr, config.optimizer.clip_latent = 1000.0, clip_latent
    config.schedule.name = "constant"
    net = build_model(config, 10)
    tx, schedule = optim.make_optimizer(config, steps_per_epoch=1)
    variables = bits.abstract_variables(net, (16, 16, 3))
    mask = bits.binary_mask(variables)
    state = step.init_state(net, (tx,), (16, 16, 3), 0)
    shardings = step.make_shardings(4)
    train, _ = step.jit_steps(net, (tx,), schedule, config, shardings, state, mask,
                              train_view=lambda b: b, eval_view=lambda b: b)
    batch = {"image": jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3)),
             "label": jnp.array([0, 1, 2, 3])}
    new, _ = train(jax.tree.map(jnp.copy, state), batch)
    return new["params"], mask


@pytest.mark.slow
def test_clip_latent_keeps_the_1_bit_filters_in_range_and_nothing_else():
    """`optimizer.clip_latent` (BinaryConnect's update rule) clips the latent weights of the
    1-bit layers to [-1, 1] after the step, and only them."""
    free, mask = one_step_with_the_configs_optimizer(False)
    clipped, _ = one_step_with_the_configs_optimizer(True)
    outside = [float(jnp.max(jnp.abs(p))) for p, b in zip(
        jax.tree.leaves(free), jax.tree.leaves(mask), strict=True) if b]
    assert max(outside) > 1.0, outside  # without the clip the step leaves [-1, 1]
    for f, c, b in zip(jax.tree.leaves(free), jax.tree.leaves(clipped), jax.tree.leaves(mask),
                       strict=True):
        if b:
            assert float(jnp.max(jnp.abs(c))) <= 1.0
            np.testing.assert_allclose(c, jnp.clip(f, -1.0, 1.0), rtol=1e-6, atol=1e-6)
        else:  # M-filters, BN, full-precision stem: the same step as without the clip
            np.testing.assert_allclose(c, f, rtol=1e-6, atol=1e-6)
    assert sum(jax.tree.leaves(mask)) and not all(jax.tree.leaves(mask))


def per_leaf_step(state, batch, *, model, transforms, schedule, seed, binary_mask, clip_mask):
    """`step.train_step` as it was before its state went through few kernels: a gradient
    norm and a flip ratio summed leaf by leaf (one reduction each), and `keep_if`."""
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), state["step"])
    loss = step._loss_fn(model, state, batch, rng)
    params, opt_states, finite = state["params"], [], jnp.array(True)
    for idx, tx in enumerate(transforms):
        (ce, (logits, batch_stats)), grads = jax.value_and_grad(loss, has_aux=True)(params)
        grad_norm = optax.tree.norm(grads)
        if idx == 0:
            first = ce, batch_stats, grad_norm
        updates, opt_state = tx.update(grads, state["opt_state"][idx], params)
        params = step.clip_latent(optax.apply_updates(params, updates), clip_mask)
        opt_states.append(opt_state)
        finite &= jnp.isfinite(ce) & jnp.isfinite(grad_norm)
    ce, batch_stats, grad_norm = first
    new = step.keep_if(finite, {"step": state["step"] + 1, "params": params,
                                "batch_stats": batch_stats, "opt_state": tuple(opt_states)},
                       state)
    leaves = lambda tree: [leaf for leaf, is_binary in zip(
        jax.tree.leaves(tree), jax.tree.leaves(binary_mask), strict=True) if is_binary]
    flip = binary.flip_ratio(leaves(state["params"]), leaves(new["params"]))
    return new, {"loss": ce, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32),
                 "flip_ratio": flip}


@pytest.mark.slow  # compiles both steps, of both passes
def test_the_step_equals_the_per_leaf_formulation():
    """Three steps (momentum, weight decay, the latent clip, the alternating update) of the
    step and of `per_leaf_step`, each from the same state in one program (so that both use
    the same forward and backward pass), then a non-finite batch, which keeps the whole
    state. The reference operations (what accelerators run). Only the gradient norm and the
    flip ratio are computed otherwise, but XLA:CPU fuses the gradients' last sums with
    their consumers, and float32 sums in another order move the M-filters (shared by a
    block: their gradient sums over all its filters) by up to 3e-4 relative (measured
    2.6e-4 on inputs scaled by 3), 1e-3 allowed; the other leaves within 1e-6."""
    config = small_config(update_order="alternating")
    net = build_model(config, 10).clone(ops=ops.REFERENCE)
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 16, 16, 3))
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
    state = step.init_state(net, (tx,), (16, 16, 3), 0)
    transforms = step.make_transforms(config, tx, state["params"])
    state = step.init_state(net, transforms, (16, 16, 3), 0)
    mask = bits.binary_mask(net.init(jax.random.PRNGKey(0), x[:1]))
    kwargs = dict(model=net, transforms=transforms, schedule=lambda s: 0.1, seed=0,
                  binary_mask=mask, clip_mask=mask)
    both = jax.jit(lambda s, b: (step.train_step(s, b, **kwargs), per_leaf_step(s, b, **kwargs)))
    for i in range(4):
        images = x * (i + 1) if i < 3 else x.at[0, 0, 0, 0].set(jnp.nan)
        (new, new_metrics), (old, old_metrics) = both(state, {"image": images,
                                                              "label": jnp.arange(8) % 10})
        for name, value in old_metrics.items():
            np.testing.assert_allclose(new_metrics[name], value, rtol=1e-5, err_msg=name)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(new), jax.tree.leaves(old),
                                strict=True):
            m_filter = "M_filter" in jax.tree_util.keystr(path)
            np.testing.assert_allclose(a, b, rtol=1e-3 if m_filter else 1e-6,
                                       atol=1e-4 if m_filter else 1e-7,
                                       err_msg=jax.tree_util.keystr(path))
        before, state = state, new
    assert float(new_metrics["finite"]) == 0.0
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)
