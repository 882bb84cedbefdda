"""Tests of distill_jax.models on tiny configs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.config import base_config
from distill_jax.diffusion.parameterisation import network_input, xhat_from_output
from distill_jax.diffusion.schedule import logsnr_schedule_cosine
from distill_jax.models import (
    GUIDANCE_BRANCH,
    GUIDANCE_HEAD,
    MLPDenoiser,
    UNet,
    build_model,
    count_params,
    guidance_fourier_features,
    init_params,
    logsnr_to_unit_interval,
    make_denoise_fn,
    sinusoidal_embedding,
    student_params_from_teacher,
)

NUM_CLASSES = 3
IMAGE = (8, 8, 1)
POINT = (2,)


def model_config(**overrides):
    m = base_config().model
    m.update(
        dict(
            channels=16,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attn_resolutions=(),
            num_heads=2,
            dropout=0.0,
            emb_dim=32,
            mlp_hidden=32,
            mlp_depth=2,
            guidance_fourier_dim=8,
        )
    )
    m.update(overrides)
    return m


@functools.partial(jax.jit, static_argnums=0, static_argnames="train")
def apply(model, params, z, t, labels, w=None, *, train=False, rngs=None):
    """Jitted model.apply: one compile per model beats op-by-op dispatch on a tiny CPU."""
    return model.apply({"params": params}, z, t, labels, w, train=train, rngs=rngs)


@jax.jit
def call(denoise_fn, z, t, labels, w):
    """Jitted denoise_fn call; works because a denoise_fn is a pytree."""
    return denoise_fn(z, t, labels, w)


@pytest.fixture(autouse=True, scope="module")
def fast_compiles():
    """Tiny models on a shared CPU: XLA compile time dominates, so skip its optimisations."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


def perturb(params, seed, scale=0.1):
    """Add noise to every leaf, so zero-initialised layers become non-trivial."""
    # NumPy noise: eager jax.random draws would compile once per leaf shape.
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda p: jnp.asarray(np.asarray(p) + scale * rng.standard_normal(p.shape, np.float32)),
        params,
    )


def inputs(data_shape, batch=4, seed=0):
    kz, kt = jax.random.split(jax.random.key(seed))
    z = jax.random.normal(kz, (batch, *data_shape))
    t = jax.random.uniform(kt, (batch,), minval=0.05, maxval=0.95)
    labels = jnp.arange(batch, dtype=jnp.int32) % NUM_CLASSES
    w = jnp.linspace(0.0, 4.0, batch)
    return z, t, labels, w


def build(data_shape=IMAGE, use_guidance=False, seed=0, **overrides):
    kind = "mlp" if len(data_shape) == 1 else "unet"
    model = build_model(
        model_config(kind=kind, **overrides),
        data_shape=data_shape,
        num_classes=NUM_CLASSES,
        use_guidance=use_guidance,
    )
    return model, init_params(model, jax.random.key(seed), data_shape=data_shape)


@pytest.fixture(scope="module")
def unet_teacher():
    model, params = build()
    return model, params, perturb(params, seed=1)


@pytest.fixture(scope="module")
def mlp_teacher():
    model, params = build(POINT)
    return model, params, perturb(params, seed=1)


@pytest.fixture(scope="module")
def unet_student():
    return build(use_guidance=True, seed=2)


@pytest.mark.parametrize(
    "data_shape, overrides, out_channels",
    [
        ((8, 8, 1), dict(attn_resolutions=()), 1),
        ((16, 16, 3), dict(attn_resolutions=(8,), parameterisation="eps"), 3),
        ((8, 8, 1), dict(parameterisation="both"), 2),
        ((32, 32, 3), dict(channel_mult=(1, 2, 2), attn_resolutions=(16, 8)), 3),
        ((28, 28, 1), dict(channel_mult=(1, 2, 2), num_res_blocks=2), 1),
    ],
)
def test_unet_output_shapes(data_shape, overrides, out_channels):
    model = build_model(
        model_config(**overrides), data_shape=data_shape, num_classes=10, use_guidance=True
    )
    z, t, labels, w = inputs(data_shape, batch=2)
    shapes = jax.eval_shape(
        lambda r: model.apply(
            {"params": init_params(model, r, data_shape=data_shape)}, z, t, labels, w, train=False
        ),
        jax.random.key(0),
    )
    assert shapes.shape == (2, *data_shape[:2], out_channels)
    assert shapes.dtype == jnp.float32


@pytest.mark.parametrize("parameterisation, out_dim", [("v", 2), ("both", 4)])
def test_mlp_output_shapes(parameterisation, out_dim):
    model = build_model(
        model_config(kind="mlp", parameterisation=parameterisation),
        data_shape=POINT,
        num_classes=NUM_CLASSES,
        use_guidance=True,
    )
    assert isinstance(model, MLPDenoiser)
    out = jax.eval_shape(
        lambda r: apply(model, init_params(model, r, data_shape=POINT), *inputs(POINT, batch=5)),
        jax.random.key(0),
    )
    assert out.shape == (5, out_dim) and out.dtype == jnp.float32


def test_attention_is_built_at_listed_resolutions():
    model = build_model(
        model_config(attn_resolutions=(4,)), data_shape=IMAGE, num_classes=10, use_guidance=False
    )
    assert isinstance(model, UNet)
    params = jax.eval_shape(lambda r: init_params(model, r, data_shape=IMAGE), jax.random.key(0))
    assert {"down_1_attn_0", "mid_attn", "up_1_attn_0"} <= set(params)
    assert not any(name.startswith(("down_0_attn", "up_0_attn")) for name in params)


@pytest.mark.parametrize("data_shape", [IMAGE, POINT])
def test_fresh_output_is_exactly_zero_until_perturbed(data_shape, unet_teacher, mlp_teacher):
    model, params, perturbed = unet_teacher if data_shape == IMAGE else mlp_teacher
    z, t, labels, _ = inputs(data_shape)
    fresh = apply(model, params, z, t, labels, train=False)
    np.testing.assert_array_equal(fresh, np.zeros_like(fresh))
    out = apply(model, perturbed, z, t, labels, train=False)
    assert np.all(np.isfinite(out)) and np.abs(out).mean() > 1e-3


def test_student_from_teacher_equals_teacher_for_every_w(unet_teacher, unet_student):
    teacher, _, teacher_params = unet_teacher
    student, student_init = unet_student
    params = student_params_from_teacher(teacher_params, student_init)
    # The teacher's weights everywhere, the student's fresh branch only under GUIDANCE_BRANCH.
    assert set(params["cond"]) == set(teacher_params["cond"]) | {GUIDANCE_BRANCH}
    for path, leaf in jax.tree_util.tree_leaves_with_path(teacher_params):
        copied = params
        for key in path:
            copied = copied[key.key]
        assert copied is leaf
    branch = params["cond"][GUIDANCE_BRANCH]
    assert branch["dense_0"]["kernel"] is student_init["cond"][GUIDANCE_BRANCH]["dense_0"]["kernel"]
    assert count_params(params) == count_params(teacher_params) + count_params(branch)

    z, t, labels, _ = inputs(IMAGE)
    expected = apply(teacher, teacher_params, z, t, labels, train=False)
    assert np.abs(expected).mean() > 1e-3
    for w_value in (0.0, 0.5, 4.0, 14.0):
        w = jnp.full((4,), w_value)
        out = apply(student, params, z, t, labels, w, train=False)
        np.testing.assert_allclose(out, expected, atol=1e-6, rtol=0)

    nudged = dict(params)
    nudged["cond"] = dict(params["cond"])
    nudged["cond"][GUIDANCE_BRANCH] = perturb(branch, seed=3)
    w = jnp.array([0.0, 1.0, 2.0, 4.0])
    out = apply(student, nudged, z, t, labels, w, train=False)
    assert np.abs(out - expected).max() > 1e-3


def test_student_with_extra_blocks_starts_as_its_teacher(unet_teacher):
    teacher, _, teacher_params = unet_teacher
    student, student_init = build(use_guidance=True, seed=2, student_extra_blocks=1)
    params = student_params_from_teacher(teacher_params, student_init)
    extra = [n for n in params if "student_extra" in n]
    # One extra ResBlock after each of the teacher's: down path, middle (2), up path.
    assert len(extra) == len([n for n in teacher_params if "_res_" in n]) > 4
    z, t, labels, w = inputs(IMAGE)
    expected = apply(teacher, teacher_params, z, t, labels, train=False)
    np.testing.assert_allclose(
        apply(student, params, z, t, labels, w, train=False), expected, atol=1e-6, rtol=0
    )
    # Trained extra blocks change the output; a teacher never has them.
    nudged = dict(params, **{n: perturb(params[n], seed=4) for n in extra})
    assert np.abs(apply(student, nudged, z, t, labels, w, train=False) - expected).max() > 1e-3
    assert not [n for n in build(student_extra_blocks=1)[1] if "student_extra" in n]


@pytest.mark.parametrize("data_shape", [IMAGE, POINT])
def test_affine_head_student_starts_as_teacher_and_is_affine_in_w(
    data_shape, unet_teacher, mlp_teacher
):
    teacher, _, teacher_params = unet_teacher if data_shape == IMAGE else mlp_teacher
    student, student_init = build(data_shape, use_guidance=True, seed=2, guidance_head="affine")
    params = student_params_from_teacher(teacher_params, student_init)
    assert set(params) == set(teacher_params) | {GUIDANCE_HEAD}
    z, t, labels, _ = inputs(data_shape)
    expected = apply(teacher, teacher_params, z, t, labels, train=False)
    for w_value in (0.0, 1.0, 4.0):
        out = apply(student, params, z, t, labels, jnp.full((4,), w_value), train=False)
        np.testing.assert_allclose(out, expected, atol=1e-6, rtol=0)

    def outputs(params):
        return [apply(student, params, z, t, labels, jnp.full((4,), w)) for w in (0.0, 1.0, 3.0)]

    # A trained head: out(w) = out(0) + w * direction, exactly what the guided teacher is.
    with_head = dict(params, **{GUIDANCE_HEAD: perturb(params[GUIDANCE_HEAD], seed=5)})
    at_0, at_1, at_3 = outputs(with_head)
    assert np.abs(at_1 - at_0).mean() > 1e-3
    np.testing.assert_allclose(at_3 - at_0, 3.0 * (at_1 - at_0), atol=1e-5, rtol=1e-4)
    # The w embedding, once trained, bends that line: the student is not confined to it.
    bent = dict(with_head, cond=dict(with_head["cond"]))
    bent["cond"][GUIDANCE_BRANCH] = perturb(params["cond"][GUIDANCE_BRANCH], seed=6)
    at_0, at_1, at_3 = outputs(bent)
    assert np.abs((at_3 - at_0) - 3.0 * (at_1 - at_0)).max() > 1e-3


def test_student_from_teacher_rejects_mismatches(unet_teacher, unet_student):
    _, _, teacher_params = unet_teacher
    _, student_init = unet_student
    wider = dict(teacher_params)
    wider["input_conv"] = {"kernel": jnp.zeros((3, 3, 1, 8)), "bias": jnp.zeros((8,))}
    with pytest.raises(ValueError, match="input_conv/(kernel|bias): shape"):
        student_params_from_teacher(wider, student_init)
    extra = dict(teacher_params, extra_layer={"kernel": jnp.zeros((2,))})
    with pytest.raises(ValueError, match="extra_layer"):
        student_params_from_teacher(extra, student_init)
    missing = {k: v for k, v in teacher_params.items() if k != "mid_attn"}
    with pytest.raises(ValueError, match="mid_attn"):
        student_params_from_teacher(missing, student_init)


def test_teacher_guidance_branch_is_passed_on(unet_student):
    _, student_init = unet_student
    guided_teacher = perturb(student_init, seed=4)
    params = student_params_from_teacher(guided_teacher, student_init)
    copied = params["cond"][GUIDANCE_BRANCH]["dense_1"]["kernel"]
    assert copied is guided_teacher["cond"][GUIDANCE_BRANCH]["dense_1"]["kernel"]


def test_labels_matter_and_null_label_is_valid(unet_teacher):
    model, _, params = unet_teacher
    z, t, _, _ = inputs(IMAGE)
    outs = [
        apply(model, params, z, t, jnp.full((4,), c, jnp.int32), train=False)
        for c in (0, 1, NUM_CLASSES)
    ]
    assert all(np.all(np.isfinite(o)) for o in outs)
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        assert np.abs(outs[a] - outs[b]).max() > 1e-3


def test_student_requires_w(unet_student):
    model, params = unet_student
    z, t, labels, _ = inputs(IMAGE)
    with pytest.raises(ValueError, match="guidance weight w"):
        apply(model, params, z, t, labels, train=False)
    with pytest.raises(ValueError, match="guidance weight w"):
        make_denoise_fn(model, params)(z, t, labels, None)


def test_bfloat16_compute_keeps_float32_params_and_output(unet_teacher):
    model32, _, params = unet_teacher
    model16 = build_model(
        model_config(dtype="bfloat16"),
        data_shape=IMAGE,
        num_classes=NUM_CLASSES,
        use_guidance=False,
    )
    params16 = jax.eval_shape(
        lambda r: init_params(model16, r, data_shape=IMAGE), jax.random.key(0)
    )
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params16)} == {jnp.dtype("float32")}
    z, t, labels, _ = inputs(IMAGE)
    out16 = apply(model16, params, z, t, labels, train=False)
    out32 = apply(model32, params, z, t, labels, train=False)
    assert out16.dtype == jnp.float32
    assert not np.array_equal(out16, out32)  # the compute really ran in bfloat16
    np.testing.assert_allclose(out16, out32, atol=0.1 * np.abs(out32).max())


def test_dropout_only_when_training():
    model, params = build(POINT, dropout=0.5)
    params = perturb(params, seed=1)
    z, t, labels, _ = inputs(POINT, batch=8)
    evaluation = apply(model, params, z, t, labels)
    np.testing.assert_array_equal(
        evaluation, apply(model, params, z, t, labels, rngs={"dropout": jax.random.key(5)})
    )
    train_a = apply(model, params, z, t, labels, train=True, rngs={"dropout": jax.random.key(1)})
    train_b = apply(model, params, z, t, labels, train=True, rngs={"dropout": jax.random.key(2)})
    assert np.abs(train_a - evaluation).max() > 1e-4
    assert np.abs(train_a - train_b).max() > 1e-4
    with pytest.raises(ValueError, match="dropout_rng"):
        make_denoise_fn(model, params, train=True)
    trained_fn = make_denoise_fn(model, params, train=True, dropout_rng=jax.random.key(1))
    eval_fn = make_denoise_fn(model, params)
    trained = call(trained_fn, z, t, labels, None)
    assert np.abs(trained - call(eval_fn, z, t, labels, None)).max() > 1e-4


@pytest.mark.parametrize(
    "overrides, data_shape, match",
    [
        (dict(kind="transformer"), IMAGE, "model.kind"),
        (dict(kind="unet", channel_mult=(1, 2, 2)), (6, 6, 1), "channel_mult"),
        (dict(kind="unet"), (7, 8, 1), "image size 7x8"),
        (dict(kind="unet"), POINT, r"\(H, W, C\)"),
        (dict(kind="mlp"), IMAGE, r"\(D,\)"),
        (dict(kind="unet", dtype="float64"), IMAGE, "model.dtype"),
        (dict(kind="unet", parameterisation="score"), IMAGE, "parameterisation"),
        (dict(kind="mlp", guidance_head="linear"), POINT, "model.guidance_head"),
    ],
)
def test_bad_config_raises(overrides, data_shape, match):
    with pytest.raises(ValueError, match=match):
        build_model(
            model_config(**overrides), data_shape=data_shape, num_classes=10, use_guidance=False
        )


def test_heads_must_divide_attention_channels():
    model = build_model(
        model_config(num_heads=3), data_shape=IMAGE, num_classes=10, use_guidance=False
    )
    with pytest.raises(ValueError, match="num_heads=3"):
        jax.eval_shape(lambda r: init_params(model, r, data_shape=IMAGE), jax.random.key(0))


@pytest.mark.parametrize("parameterisation", ["eps", "both", "flow"])
def test_denoise_fn_returns_xhat(parameterisation):
    model, params = build(POINT, use_guidance=True, parameterisation=parameterisation)
    params = perturb(params, seed=1)
    z, t, labels, w = inputs(POINT)
    denoise_fn = make_denoise_fn(model, params)
    logsnr = logsnr_schedule_cosine(t)
    # A flow network is fed the flow's z = z / (alpha + sigma); the others z itself.
    net_z = network_input(z, logsnr, parameterisation=parameterisation)
    assert (parameterisation == "flow") != bool(np.allclose(net_z, z))
    output = apply(model, params, net_z, t, labels, w, train=False)
    expected = xhat_from_output(output, z, logsnr, parameterisation=parameterisation)
    np.testing.assert_allclose(call(denoise_fn, z, t, labels, w), expected, rtol=1e-5, atol=1e-5)
    # Scalar t and w broadcast to the batch.
    np.testing.assert_allclose(
        call(denoise_fn, z, 0.5, labels, 2.0),
        call(denoise_fn, z, jnp.full((4,), 0.5), labels, jnp.full((4,), 2.0)),
    )


def test_denoise_fn_is_a_pytree_and_jit_does_not_retrace(mlp_teacher):
    model, params, _ = mlp_teacher
    assert isinstance(make_denoise_fn(model, params), jax.tree_util.Partial)
    traces = []

    @jax.jit
    def run(denoise_fn, z, t, labels):
        traces.append(1)
        return denoise_fn(z, t, labels, None)

    z, t, labels, _ = inputs(POINT)
    first = run(make_denoise_fn(model, params), z, t, labels)
    other = perturb(params, seed=1)
    second = run(make_denoise_fn(model, other), z, t, labels)
    assert len(traces) == 1
    assert not np.allclose(first, second)
    np.testing.assert_allclose(second, make_denoise_fn(model, other)(z, t, labels, None), atol=1e-5)
    leaves = jax.tree_util.tree_leaves(make_denoise_fn(model, params))
    assert len(leaves) == len(jax.tree_util.tree_leaves(params))


def test_init_params_is_eval_shape_friendly():
    model = build_model(
        model_config(kind="mlp"), data_shape=POINT, num_classes=NUM_CLASSES, use_guidance=True
    )
    shapes = jax.eval_shape(lambda r: init_params(model, r, data_shape=POINT), jax.random.key(0))
    assert shapes["cond"][GUIDANCE_BRANCH]["dense_1"]["kernel"].shape == (32, 32)
    hidden, depth, out = 32, 2, 2
    assert shapes["input_dense"]["kernel"].shape == (2, hidden)
    assert len([k for k in shapes if k.startswith("block_")]) == depth
    assert shapes["output_dense"]["kernel"].shape == (hidden, out)
    expected = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))
    assert count_params(init_params(model, jax.random.key(0), data_shape=POINT)) == expected


def test_embeddings():
    x = jnp.array([0.0, 0.25, 1.0])
    emb = sinusoidal_embedding(x, 8)
    assert emb.shape == (3, 8)
    np.testing.assert_allclose(emb[0], [0, 0, 0, 0, 1, 1, 1, 1], atol=1e-7)
    with pytest.raises(ValueError, match="even"):
        sinusoidal_embedding(x, 7)
    feats = guidance_fourier_features(jnp.array([0.0, 0.1, 4.0, 14.0]), 8)
    assert feats.shape == (4, 8)
    distances = np.linalg.norm(feats[:, None] - feats[None], axis=-1)
    assert np.all(distances[~np.eye(4, dtype=bool)] > 0.01)
    with pytest.raises(ValueError, match="guidance_fourier_dim"):
        guidance_fourier_features(x, 3)
    unit = logsnr_to_unit_interval(logsnr_schedule_cosine(jnp.linspace(0.0, 1.0, 11)))
    assert np.all(np.diff(unit) > 0) and unit[0] >= 0.0 and unit[-1] <= 1.0
