"""model.attention: splash, the TPU flash-attention kernel shipped with JAX, against XLA attention.

On this CPU host the kernel runs in Pallas interpret mode (the same kernel code, executed as
ordinary JAX ops), so these tests check its numbers, padding, masking, scaling, gradients and
per-device sharding; the TPU lowering is checked by lowering for "tpu" (no TPU needed).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_train import config as cfg
from flax_train import hlo_cost
from flax_train import sharding
from flax_train.demo import CONFIG as DEMO_CONFIG
from sdxl_common.errors import BadInput
from flax_train.models import layers
from flax_train.models.unet import UNet2DConditionModel
from test_unet import TINY_CONFIG

pytestmark = pytest.mark.xdist_group("attention")

HEADS, HEAD_DIM = 2, 64  # SDXL's head_dim


def qkv(batch, q_len, k_len, seed=0, heads=HEADS):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, q_len, heads, HEAD_DIM))
    k, v = (rng.standard_normal((batch, k_len, heads, HEAD_DIM)) for _ in range(2))
    return tuple(jnp.asarray(t, jnp.float32) for t in (q, k, v))


def attend(implementation, dtype=jnp.float32, is_causal=False):
    def f(q, k, v):
        q, k, v = (t.astype(dtype) for t in (q, k, v))
        return layers.dot_product_attention(q, k, v, is_causal=is_causal, implementation=implementation)

    return jax.jit(f)


def loss_grads(implementation, is_causal=False):
    f = attend(implementation, is_causal=is_causal)
    # A loss that weighs every output element differently, so that no gradient term cancels out.
    loss = lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


# Self-attention at a length of whole blocks, cross-attention with SDXL's 77 text tokens (padded
# to 128 inside) and a query length that is not a block multiple either, CLIP's causal 77.
CASES = {"self_256": (256, 256, False), "cross_77": (200, 77, False), "causal_77": (77, 77, True)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_splash_equals_xla_in_float32_with_gradients(case):
    q_len, k_len, causal = CASES[case]
    q, k, v = qkv(2, q_len, k_len)
    out, ref = attend("splash", is_causal=causal)(q, k, v), attend("xla", is_causal=causal)(q, k, v)
    assert out.shape == ref.shape == (2, q_len, HEADS, HEAD_DIM) and out.dtype == jnp.float32
    # The same float32 arithmetic, blocked differently (online softmax): equal to rounding.
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)
    for g, g_ref in zip(loss_grads("splash", causal)(q, k, v), loss_grads("xla", causal)(q, k, v)):
        assert float(jnp.abs(g_ref).max()) > 1e-2
        np.testing.assert_allclose(g, g_ref, rtol=0, atol=1e-5 * float(jnp.abs(g_ref).max()))


# Odd lengths on each side: cuDNN's training kernels take even ones only, so they are padded.
ODD_CASES = {"cross_77": (200, 77, False), "odd_query": (201, 78, False), "causal_77": (77, 77, True)}


@pytest.mark.parametrize("case", sorted(ODD_CASES))
def test_odd_lengths_padded_to_even_give_the_unpadded_attention_and_gradients(case):
    # cuDNN's kernel cannot run on this host; jax.nn's XLA implementation takes the same padded
    # arrays and key lengths, so it checks the padding and masking. The GPU check
    # (benchmarks/gpu_attention_check.py) compares cuDNN itself with XLA at SDXL's shapes.
    q_len, k_len, causal = ODD_CASES[case]
    q, k, v = qkv(2, q_len, k_len, seed=3)

    def padded(q, k, v):
        return layers.even_length_attention(q, k, v, is_causal=causal, implementation="xla")

    out, ref = jax.jit(padded)(q, k, v), attend("xla", is_causal=causal)(q, k, v)
    assert out.shape == ref.shape == (2, q_len, HEADS, HEAD_DIM)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)
    grads = jax.grad(lambda q, k, v: jnp.sum(jnp.sin(padded(q, k, v))), argnums=(0, 1, 2))(q, k, v)
    for g, g_ref in zip(grads, loss_grads("xla", causal)(q, k, v)):
        assert g.shape == g_ref.shape and float(jnp.abs(g_ref).max()) > 1e-2
        np.testing.assert_allclose(g, g_ref, rtol=0, atol=1e-5 * float(jnp.abs(g_ref).max()))


@pytest.mark.parametrize("k_len", [256, 77])
def test_splash_bfloat16_is_within_one_rounding_step_of_xla(k_len):
    q, k, v = qkv(2, 256, k_len, seed=1)
    out = attend("splash", jnp.bfloat16)(q, k, v)
    ref = attend("xla", jnp.bfloat16)(q, k, v)
    assert out.dtype == ref.dtype == jnp.bfloat16
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    # Both compute the logits and softmax statistics in float32 from the same bf16 inputs, but
    # they round to bf16 at different points: XLA rounds the normalised weights before the
    # product with v, splash rounds unnormalised block weights and divides at the end. Each
    # output is rounded to bf16 (8 bits of mantissa), so they may differ by one rounding step,
    # a relative 2**-8 of the largest outputs, plus a step's worth of the weights' rounding.
    scale = np.abs(ref).max()
    np.testing.assert_allclose(out, ref, rtol=0, atol=2 * 2**-8 * scale)
    exact = np.asarray(attend("xla")(q, k, v))  # float32: both are as far from it as each other
    splash_error, xla_error = np.abs(out - exact).max(), np.abs(ref - exact).max()
    assert splash_error <= 1.5 * xla_error, (splash_error, xla_error)


def test_splash_runs_per_device_under_the_mesh():
    mesh = sharding.make_mesh(cfg.MeshConfig(data=2, fsdp=2, tensor=2))  # 8 fake CPU devices
    f = attend("splash")
    for batch, batch_spec in ((4, ("fsdp", "data")), (3, None)):
        q, k, v = qkv(batch, 128, 77, seed=batch)
        with jax.set_mesh(mesh):
            jaxpr = jax.make_jaxpr(f)(q, k, v)
            out = f(q, k, v)
        found = [e for e in jaxpr.eqns[0].params["jaxpr"].eqns if e.primitive.name == "shard_map"]
        assert len(found) == 1
        # Batch over the trainer's batch axes (none when they do not divide it), heads over tensor;
        # the kernel's output is (batch, heads, length, head_dim).
        assert found[0].params["out_specs"] == (jax.sharding.PartitionSpec(batch_spec, "tensor", None, None),)
        np.testing.assert_allclose(out, attend("xla")(q, k, v), rtol=0, atol=1e-5)
    # No mesh, no shard_map: the kernel runs on whatever the caller's jit gives it.
    jaxpr = jax.make_jaxpr(f)(q, k, v)
    assert not [e for e in jaxpr.eqns[0].params["jaxpr"].eqns if e.primitive.name == "shard_map"]


def test_lowered_for_tpu_the_program_runs_the_mosaic_kernel_and_on_cpu_the_interpreter():
    q = jax.ShapeDtypeStruct((2, 256, HEADS, HEAD_DIM), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 77, HEADS, HEAD_DIM), jnp.bfloat16)
    grads = jax.jit(jax.grad(lambda q, k, v: attend("splash")(q, k, v).sum(), argnums=(0, 1, 2)))
    tpu = grads.trace(q, kv, kv).lower(lowering_platforms=("tpu",)).as_text()
    cpu = grads.trace(q, kv, kv).lower().as_text()
    # Forward, dq and dkv kernels; interpret mode would be loops of plain ops instead.
    assert tpu.count("tpu_custom_call") == 3 and "stablehlo.while" not in tpu
    assert "tpu_custom_call" not in cpu and "stablehlo.while" in cpu


# test_unet's tiny UNet: self-attention over 8 x 8 = 64 tokens (padded to 128 inside),
# cross-attention over 8 text tokens, head_dim 16.
TINY_UNET = dict(_class_name="UNet2DConditionModel", **TINY_CONFIG)


def test_tiny_unet_forward_with_splash_equals_xla():
    rngs = nnx.Rngs(params=jax.random.key(0, impl="rbg"))
    state = nnx.state(UNet2DConditionModel.from_config(TINY_UNET, rngs=rngs), nnx.Param)
    rng = np.random.default_rng(0)
    inputs = (
        jnp.asarray(rng.standard_normal((2, 4, 8, 8)), jnp.float32),
        jnp.asarray([999.0, 10.5], jnp.float32),
        jnp.asarray(rng.standard_normal((2, 8, 32)), jnp.float32),
        jnp.asarray(rng.standard_normal((2, 16)), jnp.float32),
        jnp.asarray([[1024, 1024, 0, 0, 1024, 1024], [512, 768, 16, 32, 512, 512]], jnp.float32),
    )

    def forward(attention):
        unet = UNet2DConditionModel.from_config(TINY_UNET, rngs=nnx.Rngs(0), attention=attention)
        nnx.update(unet, state)
        graphdef, params = nnx.split(unet)

        @jax.jit
        def run(params, sample, t, context, text_embeds, time_ids):
            return nnx.merge(graphdef, params)(sample, t, context, text_embeds=text_embeds, time_ids=time_ids)

        return np.asarray(run(params, *inputs))

    out, ref = forward("splash"), forward("xla")
    assert np.isfinite(ref).all() and ref.std() > 0.05
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_config_accepts_splash():
    config = cfg.load(DEMO_CONFIG, ["model.attention=splash", "logging.chip=tpu_v5e"])
    cfg.validate(config, num_devices=8)
    assert config.model.attention == "splash"


def one_line(info) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_combinations_are_one_line_errors(monkeypatch):
    with pytest.raises(cfg.ConfigError) as info:
        cfg.validate(cfg.load(DEMO_CONFIG, ["model.attention=splash", "logging.chip=h100"]))
    # ConfigError lists one problem a line under "invalid config:".
    assert str(info.value).splitlines()[1:] == [
        "  model.attention: splash is the TPU kernel but logging.chip is h100; use cudnn, xla or auto"
    ]

    q, k, v = qkv(1, 128, 77)
    with pytest.raises(BadInput) as info:
        layers.dot_product_attention(q, k, v, is_causal=True, implementation="splash")
    assert "causal attention needs as many queries as keys, got 128 and 77" in one_line(info)
    with pytest.raises(BadInput) as info:
        layers.dot_product_attention(q, k, v[:, :, :1], implementation="splash")
    assert "must share batch, heads and head_dim" in one_line(info)

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.raises(BadInput) as info:
        layers.resolve_attention("splash")
    assert "on a GPU use cudnn, xla or auto" in one_line(info)


def test_tpu_estimate_rows_of_splash_leave_the_cost_model_out_and_price_attention_analytically():
    from benchmarks.tpu.compiled import without_kernel_costs
    from benchmarks.tpu.results import table
    from benchmarks.tpu.roofline import derive
    from benchmarks.tpu.scenarios import Scenario

    row = dict(
        scenario="v5e-8_fsdp_full_1024px_b1", **dataclasses.asdict(Scenario.parse("v5e-8_fsdp_full_1024px_b1")),
        unet="sdxl", depth=10, chips=8, global_batch=8, status="compiled", attention="splash",
        argument_gib=5.0, output_gib=5.0, alias_gib=5.0, temp_gib=3.0, code_gib=0.0,
        xla_flops_per_chip=1e13, xla_bytes_accessed_per_chip=1e12, optimal_seconds=1.0,
        hlo_flops_per_device=2.5e13, hlo_hbm_bytes_per_device=81.9e9, collective_bytes_per_device=100e9,
        hlo_accounting=hlo_cost.ACCOUNTING,
    )  # fmt: skip
    shown = derive(without_kernel_costs(row))
    # XLA's cost model cannot see the kernels: no step time, images/s or MFU from it.
    assert shown["total_gib"] == 8.0 and shown["optimal_seconds_outside_kernels"] == 1.0
    assert not {"optimal_seconds", "images_per_s", "mfu"} & set(shown)
    # The roofline: compute from the analytic FLOPs (4 x 6.761 TFLOP x 8 images over 8 chips of
    # 197 TFLOP/s), collectives over half of v5e's 400 GB/s bidirectional interconnect; here the
    # interconnect is the slower. HBM traffic from the HLO (81.9 GB at 819 GB/s) is shown beside.
    assert shown["compute_seconds"] == pytest.approx(4 * 6.761 / 197)
    assert shown["hbm_seconds"] == pytest.approx(0.1)
    assert shown["ici_seconds"] == pytest.approx(0.5)
    assert shown["roofline_seconds"] == pytest.approx(0.5) and shown["roofline_limited_by"] == "ici"
    assert shown["roofline_mfu"] == pytest.approx(3 * 6.761 * 8 / (0.5 * 197 * 8))
    line = table([shown]).splitlines()[-1]
    assert line.startswith("| v5e-8_fsdp_full_1024px_b1, splash attention | compiled |")
    assert "| 8.0 / 16 | 200.0 (outside kernels) | 216.4 | 0.137 | 0.100 | 0.500 | - | 0.500 (ici) | 16.00 | 21% | - |" in line
    # Collectives counted by earlier, over-counting rules (the HLO not kept to count again) price
    # nothing: the roofline is the compute's alone, and the table says why.
    stale = derive(without_kernel_costs({**row, "hlo_accounting": hlo_cost.ACCOUNTING - 1}))
    assert "ici_seconds" not in stale and stale["roofline_limited_by"] == "compute"
    assert stale["roofline_seconds"] == pytest.approx(4 * 6.761 / 197)
    assert "| 0.137 | 0.100 | not recounted | - | 0.137 (compute) |" in table([stale])
