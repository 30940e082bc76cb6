"""flax_train.hlo_cost: FLOPs and collective traffic counted from compiled programs (8 CPU devices,
set in conftest), against the figures worked out by hand for each program."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from flax_train import hlo_cost


def compiled_text(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def test_a_scanned_fsdp_gradient_counts_every_layer_and_its_gathers():
    layers, width, batch, devices = 10, 64, 16, 8
    mesh = jax.make_mesh((devices,), ("fsdp",))
    w = jax.ShapeDtypeStruct((layers, width, width), jnp.float32, sharding=NamedSharding(mesh, P(None, "fsdp")))
    x = jax.ShapeDtypeStruct((batch, width), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))

    def grad(w, x):
        def loss(w):
            h, _ = jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)
            return jnp.sum(h**2)

        return jax.grad(loss)(w)

    text = compiled_text(grad, w, x)
    cost = hlo_cost.analyse(text, devices)
    per_device = batch // devices
    matmul = 2 * per_device * width * width
    # Forward h @ w; backward dL/dh and dL/dw: three products per layer, every layer.
    assert cost.flops == 3 * layers * matmul
    # XLA's own count sees one layer's products, not ten.
    assert jax.jit(grad).lower(w, x).compile().cost_analysis()["flops"] < 2 * 3 * matmul
    # Each layer's weight is gathered in the forward and again in the backward: every device
    # receives the other seven eighths of it each time.
    gathered = 2 * layers * (devices - 1) * (width // devices) * width * 4
    assert cost.collective_bytes_by_kind["all-gather"] == gathered
    # The weight gradient is reduced over the devices (all-reduce or reduce-scatter, as XLA picks).
    reduced = cost.collective_bytes - gathered
    full_gradient = layers * width * width * 4
    assert reduced in (
        pytest.approx(2 * (devices - 1) / devices * full_gradient),
        pytest.approx((devices - 1) / devices * full_gradient),
    )
    assert cost.loops_without_trip_count == 0


def test_gradient_accumulation_counts_each_micro_batch():
    def accumulate(w, xs):
        loss = lambda w, x: jnp.tanh(x @ w).sum()  # noqa: E731
        grads, _ = jax.lax.scan(lambda g, x: (g + jax.grad(loss)(w, x), None), jnp.zeros_like(w), xs)
        return w - grads

    w = jax.ShapeDtypeStruct((64, 32), jnp.float32)
    per_micro_batch = 2 * (16 * 64 * 32) * 2  # forward x @ w, backward dL/dw (dL/dx is not needed)
    for n in (1, 4):
        xs = jax.ShapeDtypeStruct((n, 16, 64), jnp.float32)
        assert hlo_cost.analyse(compiled_text(accumulate, w, xs)).flops == n * per_micro_batch


@pytest.mark.parametrize("stride", [1, 2])
def test_convolutions_and_their_gradients_count_the_taps_that_read_the_input(stride):
    def conv(x, k):
        return jax.lax.conv_general_dilated(x, k, (stride, stride), "SAME", feature_group_count=2,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    x = jax.ShapeDtypeStruct((2, 16, 16, 8), jnp.float32)
    k = jax.ShapeDtypeStruct((3, 3, 4, 12), jnp.float32)  # 8 input channels in 2 groups of 4
    # Convolving ones with ones sums, over every output element, the taps that land on the input
    # (not on the padding) times the input channels they read: the multiply-adds that count.
    multiply_adds = float(conv(jnp.ones(x.shape), jnp.ones(k.shape)).sum())
    assert multiply_adds < 2 * 16 * 16 * 12 * 3 * 3 * 4 / stride**2  # the padding's taps are out
    assert hlo_cost.analyse(compiled_text(conv, x, k)).flops == 2 * multiply_adds

    # The input and kernel gradients are convolutions with the same multiply-adds (XLA writes them
    # with dilations and paddings of their own).
    def gradients(x, k, cotangent):
        return jax.vjp(conv, x, k)[1](cotangent)

    cotangent = jax.ShapeDtypeStruct((2, 16 // stride, 16 // stride, 12), jnp.float32)
    assert hlo_cost.analyse(compiled_text(gradients, x, k, cotangent)).flops == 2 * 2 * multiply_adds


def test_a_conditional_counts_its_dearest_branch():
    def branchy(p, a):
        return jax.lax.cond(p, lambda a: a @ a @ a, lambda a: a @ a, a)

    a = jax.ShapeDtypeStruct((32, 32), jnp.float32)
    assert hlo_cost.analyse(compiled_text(branchy, jax.ShapeDtypeStruct((), bool), a)).flops == 2 * 2 * 32**3


@pytest.mark.parametrize(
    "attrs, size",
    [
        ("replica_groups=mesh['x'=2,'y'=4] {'y'}, dimensions={0}", 4),
        ("replica_groups=mesh['x'=2,'y'=4] {'x','y'}", 8),
        # A TPU hybrid mesh (data 2 x FSDP 4) whose devices are numbered in another order.
        ("replica_groups=mesh['a0'=1,'a2'=4,'a4'=2], device_ids=([2,4]T(1,0)) {'a2'}, dimensions={2}", 4),
        ("replica_groups=[2,4]<=[8], dimensions={0}", 4),
        ("replica_groups={{0,1},{2,3},{4,5},{6,7}}", 2),
        ("source_target_pairs={{0,1},{1,0}}", 8),
    ],
)
def test_replica_group_spellings(attrs, size):
    assert hlo_cost.group_size(attrs, 8) == size


def test_transfers_between_slices_are_counted_as_data_centre_network_traffic():
    """A multislice program is one slice's, its transfers to the other slices host-transfer sends
    (shortened from a compile for two v5p-8 slices): a device's gradient shard all-reduced across 2
    slices receives 2 (2-1)/2 of it, a shard all-gathered (2-1) x, in a loop as often as it runs.
    None of it is counted as the slice's own interconnect."""
    text = """\
%body (p: (s32[], f32[1000])) -> (s32[], f32[1000]) {
  %p = (s32[], f32[1000]) parameter(0)
  %g = f32[1000]{0} get-tuple-element(%p), index=1
  %token = token[] after-all(), frontend_attributes={MegascaleRendezvousKeyName="all-reduce.1_0"}
  %send = (f32[1000]{0}, u32[], token[]) send(%g, %token), channel_id=5, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_reduce_operation="SUM",_xla_megascale_target="{1,2}x{0:3}",_xla_megascale_transfer_type="ALL_REDUCE"}
  %recv = (f32[1000]{0}, u32[], token[]) recv(%token), channel_id=4, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_transfer_type="ALL_REDUCE"}
  %i = s32[] get-tuple-element(%p), index=0
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[1000]) tuple(%next, %g)
}

%cond (p: (s32[], f32[1000])) -> pred[] {
  %p = (s32[], f32[1000]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(3)
  ROOT %c = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (g: f32[1000], w: bf16[500]) -> (s32[], f32[1000]) {
  %g = f32[1000]{0} parameter(0)
  %w = bf16[500]{0} parameter(1)
  %token = token[] after-all()
  %send = (bf16[500]{0}, u32[], token[]) send(%w, %token), channel_id=3, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_target={{100000,200000}},_xla_megascale_transfer_type="ALL_GATHER"}
  %zero = s32[] constant(0)
  %init = (s32[], f32[1000]) tuple(%zero, %g)
  ROOT %loop = (s32[], f32[1000]) while(%init), condition=%cond, body=%body
}
"""
    cost = hlo_cost.analyse(text, 4, slices=2)
    assert cost.dcn_bytes == 3 * 4000 + 1000 and cost.collective_bytes == 0
    assert hlo_cost.summary(cost)["dcn_bytes_per_device"] == 13000
    assert hlo_cost.analyse(text, 4, slices=4).dcn_bytes == 3 * (2 * 3 / 4 * 4000) + 3 * 1000


# A loop as the TPU compiler's final HLO prints it: no known_trip_count, the bound in its condition.
LOOP = """\
HloModule m

%body (p: (s32[], bf16[128,256])) -> (s32[], bf16[128,256]) {
  %p = (s32[], bf16[128,256]) parameter(0)
  %x = bf16[128,256]{1,0} get-tuple-element(%p), index=1
  %y = bf16[32,256]{1,0} slice(%x), slice={[0:32], [0:256]}
  %start = (bf16[32,256]{1,0}, bf16[128,256]{1,0}) all-gather-start(%y), replica_groups=[1,4]<=[4], dimensions={0}
  %done = bf16[128,256]{1,0} all-gather-done(%start)
  %d = bf16[128,128]{1,0} dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={1}
  %i = s32[] get-tuple-element(%p), index=0
  %step = s32[] constant(STEP)
  %next = s32[] add(%i, %step)
  ROOT %t = (s32[], bf16[128,256]) tuple(%next, %done)
}

%cond (p: (s32[], bf16[128,256])) -> pred[] {
  %p = (s32[], bf16[128,256]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[]{:T(128)} constant(3)
  ROOT %c = pred[] CONDITION
}

ENTRY %main (a: bf16[128,256], y: bf16[32,256]) -> bf16[128,256] {
  %w = (s32[], bf16[128,256]) while(%init), condition=%cond, body=%body
  ROOT %r = bf16[128,256]{1,0} get-tuple-element(%w), index=1
}
"""


def loop(condition: str, step: int = 1) -> str:
    return LOOP.replace("CONDITION", condition).replace("STEP", str(step))


def test_a_loop_runs_as_often_as_its_condition_and_step_say_and_async_collectives_count_once():
    cost = hlo_cost.analyse(loop("compare(%i, %n), direction=LT"), 4)
    assert cost.flops == 3 * 2 * 128 * 128 * 256
    assert cost.collective_bytes == 3 * 3 * 32 * 256 * 2  # 3 iterations x 3 other devices' quarters
    assert cost.loops_without_trip_count == 0
    # i = 0, 2 while i < 3: two iterations (the TPU compiler's collective matmuls step by 2).
    assert hlo_cost.analyse(loop("compare(%i, %n), direction=LT", step=2), 4).flops == 2 * 2 * 128 * 128 * 256
    # A condition it cannot read: the body counts once, and the loop is reported.
    unknown = hlo_cost.analyse(loop("constant(true)"), 4)
    assert unknown.flops == 2 * 128 * 128 * 256 and unknown.loops_without_trip_count == 1


def test_memory_traffic_of_a_scan_grows_with_its_length_not_its_square():
    """A scan reads one layer's slice of the stacked weights and writes one slice of its stacked
    outputs per iteration; counting the whole stacked buffers each time would grow as length^2."""

    def scanned(ws, h):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h * w), h), h, ws)

    width = 4096
    h = jax.ShapeDtypeStruct((width,), jnp.float32)
    traffic = {
        n: hlo_cost.analyse(compiled_text(scanned, jax.ShapeDtypeStruct((n, width), jnp.float32), h)).hbm_bytes
        for n in (10, 20)
    }
    assert traffic[20] / traffic[10] == pytest.approx(2.0, rel=0.1)
    # An elementwise program reads its input and writes its output once.
    assert hlo_cost.analyse(compiled_text(lambda x: x * 2 + 1, h)).hbm_bytes == 2 * width * 4


def test_gpu_library_calls_count_as_the_products_they_compute():
    """On a GPU XLA hands dots to cuBLAS and convolutions to cuDNN as custom calls (no GPU here:
    the two instructions are written as XLA prints them)."""
    text = """\
ENTRY %main (a: f32[4,128,32], b: f32[4,32,64], x: f32[2,8,8,16], k: f32[3,3,16,24]) -> f32[4,128,64] {
  %a = f32[4,128,32]{2,1,0} parameter(0)
  %b = f32[4,32,64]{2,1,0} parameter(1)
  %x = f32[2,8,8,16]{3,2,1,0} parameter(2)
  %k = f32[3,3,16,24]{3,2,1,0} parameter(3)
  %gemm = (f32[4,128,64]{2,1,0}, s8[4194304]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"alpha_real":1,"dot_dimension_numbers":{"lhs_contracting_dimensions":["2"],"rhs_contracting_dimensions":["1"],"lhs_batch_dimensions":["0"],"rhs_batch_dimensions":["0"]}}}
  %conv = (f32[2,8,8,24]{3,2,1,0}, u8[0]{0}) custom-call(%x, %k), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convForward"
  ROOT %out = f32[4,128,64]{2,1,0} get-tuple-element(%gemm), index=0
}
"""
    taps = (8 * 3 - 2) ** 2  # per output channel and image: the 3x3 taps that land on the 8x8 input
    assert hlo_cost.analyse(text).flops == 2 * 4 * 128 * 64 * 32 + 2 * 2 * 24 * taps * 16


def test_an_asynchronous_collective_split_into_fusions_counts_once():
    """The TPU compiler splits one asynchronous all-gather into a start fusion, fusions that
    overlap it with compute and a done fusion, each printing the same all-gather (same channel_id);
    shortened from a v5e compile of the SDXL step. The products inside still count."""
    gather = ("bf16[3,3,256,128]{{3,2,1,0}} all-gather(%{}), channel_id=942, "
              "replica_groups=[2,4]<=[4,2]T(1,0), dimensions={{2}}, use_global_device_ids=true")
    text = f"""\
%start_fusion (s0: bf16[3,3,64,128]) -> (bf16[3,3,64,128], bf16[3,3,256,128]) {{
  %s0 = bf16[3,3,64,128]{{3,2,1,0}} parameter(0)
  %g1 = {gather.format("s0")}
  ROOT %cs = (bf16[3,3,64,128]{{3,2,1,0}}, bf16[3,3,256,128]{{3,2,1,0}}) custom-call(%g1), custom_call_target="AsyncCollectiveStart"
}}

%overlap_fusion (o0: bf16[3,3,64,128], x: bf16[16,256]) -> (bf16[16,16], bf16[3,3,256,128]) {{
  %o0 = bf16[3,3,64,128]{{3,2,1,0}} parameter(0)
  %x = bf16[16,256]{{1,0}} parameter(1)
  %g2 = {gather.format("o0")}
  %d = bf16[16,16]{{1,0}} dot(%x, %x), lhs_contracting_dims={{1}}, rhs_contracting_dims={{1}}
  ROOT %t = (bf16[16,16]{{1,0}}, bf16[3,3,256,128]{{3,2,1,0}}) tuple(%d, %g2)
}}

%done_fusion (d0: bf16[3,3,64,128], d1: bf16[3,3,256,128]) -> bf16[3,3,256,128] {{
  %d0 = bf16[3,3,64,128]{{3,2,1,0}} parameter(0)
  %d1 = bf16[3,3,256,128]{{3,2,1,0}} parameter(1)
  %g3 = {gather.format("d0")}
  ROOT %cd = bf16[3,3,256,128]{{3,2,1,0}} custom-call(%d0, %d1, %g3), custom_call_target="AsyncCollectiveDone"
}}

ENTRY %main (w: bf16[3,3,64,128], x: bf16[16,256]) -> bf16[3,3,256,128] {{
  %w = bf16[3,3,64,128]{{3,2,1,0}} parameter(0)
  %x = bf16[16,256]{{1,0}} parameter(1)
  %start = (bf16[3,3,64,128]{{3,2,1,0}}, bf16[3,3,256,128]{{3,2,1,0}}) fusion(%w), kind=kCustom, calls=%start_fusion
  %s = bf16[3,3,64,128]{{3,2,1,0}} get-tuple-element(%start), index=0
  %overlap = (bf16[16,16]{{1,0}}, bf16[3,3,256,128]{{3,2,1,0}}) fusion(%s, %x), kind=kCustom, calls=%overlap_fusion
  %o = bf16[3,3,256,128]{{3,2,1,0}} get-tuple-element(%overlap), index=1
  ROOT %done = bf16[3,3,256,128]{{3,2,1,0}} fusion(%s, %o), kind=kCustom, calls=%done_fusion
}}
"""
    cost = hlo_cost.analyse(text, 8)
    assert cost.collective_bytes == 3 * 3 * 3 * 64 * 128 * 2  # once: the 3 other devices' quarters
    assert dict(cost.collective_bytes_by_kind) == {"all-gather": cost.collective_bytes}
    assert cost.flops == 2 * 16 * 16 * 256
    # Two collectives with different channels are two collectives.
    assert hlo_cost.analyse(text.replace("channel_id=942", "channel_id=1", 1), 8).collective_bytes == 2 * cost.collective_bytes


def test_an_all_reduce_that_keeps_its_own_slice_is_a_reduce_scatter():
    """The TPU compiler writes FSDP's gradient reduce-scatter as a fusion that all-reduces and
    keeps each device's 1/n (shortened from a v5e compile of the SDXL step): each device receives
    (n-1)/n of the operand, not an all-reduce's 2(n-1)/n. A plain all-reduce stays one."""
    text = """\
%all-reduce-scatter.1 (input: bf16[3,3,256,128]) -> bf16[3,3,64,128] {
  %input = bf16[3,3,256,128]{3,2,1,0} parameter(0)
  %ar = bf16[3,3,256,128]{3,2,1,0} all-reduce(%input), channel_id=7, replica_groups={{0,1,2,3},{4,5,6,7}}, use_global_device_ids=true, to_apply=%add
  %zero = u32[] constant(0)
  %table = u32[8]{0} constant({0, 1, 2, 3, 0, 1, 2, 3})
  %pid = u32[] partition-id()
  %row = u32[1]{0} dynamic-slice(%table, %pid), dynamic_slice_sizes={1}
  %shard = u32[] bitcast(%row)
  %width = u32[] constant(64)
  %offset = u32[] multiply(%shard, %width)
  ROOT %mine = bf16[3,3,64,128]{3,2,1,0} dynamic-slice(%ar, %zero, %zero, %offset, %zero), dynamic_slice_sizes={3,3,64,128}
}

%add (a: bf16[], b: bf16[]) -> bf16[] {
  %a = bf16[] parameter(0)
  %b = bf16[] parameter(1)
  ROOT %s = bf16[] add(%a, %b)
}

ENTRY %main (g: bf16[3,3,256,128]) -> (bf16[3,3,64,128], bf16[3,3,256,128]) {
  %g = bf16[3,3,256,128]{3,2,1,0} parameter(0)
  %scattered = bf16[3,3,64,128]{3,2,1,0} fusion(%g), kind=kCustom, calls=%all-reduce-scatter.1
  %reduced = bf16[3,3,256,128]{3,2,1,0} all-reduce(%g), channel_id=8, replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add
  ROOT %out = (bf16[3,3,64,128]{3,2,1,0}, bf16[3,3,256,128]{3,2,1,0}) tuple(%scattered, %reduced)
}
"""
    operand = 3 * 3 * 256 * 128 * 2
    assert dict(hlo_cost.analyse(text, 8).collective_bytes_by_kind) == {
        "reduce-scatter": 3 / 4 * operand,
        "all-reduce": 2 * 3 / 4 * operand,
    }
