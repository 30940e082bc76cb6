"""The Flax SDXL UNet against diffusers' UNet2DConditionModel: same weights, same inputs, same output."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx

import flax_train.models as models
from flax_train.models.transformer import Attention
from flax_train.models.unet import UNet2DConditionModel
from xla_options import jit_as_default

# A: two levels, linear projections, per-level heads and transformer depths, SDXL's time settings.
CONFIG_A = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    cross_attention_dim=32,
    norm_num_groups=8,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 16,
    sample_size=16,
)
# B: SDXL's three-level layout, 1x1-conv projections, one head count for all levels, other
# cross-attention width, norm groups and sinusoid conventions.
CONFIG_B = dict(
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    transformer_layers_per_block=[1, 1, 2],
    attention_head_dim=4,
    use_linear_projection=False,
    cross_attention_dim=24,
    norm_num_groups=16,
    flip_sin_to_cos=False,
    freq_shift=1,
    mid_block_scale_factor=1.5,
    addition_embed_type="text_time",
    addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=6 * 4 + 20,
    sample_size=16,
)
# C: the less common options diffusers accepts: per-level lists, asymmetric transformer depths, no
# mid block, no text-time embedding, other kernel sizes and channel counts, centred input.
CONFIG_C = dict(
    block_out_channels=(32, 48),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=[1, 2],
    transformer_layers_per_block=[[1], [2, 1]],
    reverse_transformer_layers_per_block=[[1, 1, 2], [2, 1]],
    attention_head_dim=[2, 3],
    cross_attention_dim=24,
    norm_num_groups=8,
    mid_block_type=None,
    addition_embed_type=None,
    center_input_sample=True,
    time_embedding_dim=40,
    conv_in_kernel=1,
    in_channels=3,
    out_channels=5,
    upcast_attention=True,
)
# (config, pooled width, latent height, latent width): B's odd sizes exercise the upsample sizes.
CASES = {"A": (CONFIG_A, 16, 16, 16), "B": (CONFIG_B, 20, 18, 14), "C": (CONFIG_C, 4, 10, 12)}

# The module-scoped models and their compiled programs are shared: keep these tests on one worker.
pytestmark = pytest.mark.xdist_group("unet")

SDXL_CONFIG = dict(
    act_fn="silu",
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280],
    cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    norm_eps=1e-5,
    norm_num_groups=32,
    projection_class_embeddings_input_dim=2816,
    sample_size=128,
    transformer_layers_per_block=[1, 2, 10],
    use_linear_projection=True,
)
SDXL_PARAMS = 2_567_463_684


def flax_config(config):
    """A diffusers config.json as read from a folder (with the class name the registry keys on)."""
    return {"_class_name": "UNet2DConditionModel", **config}


def params_of(unet):
    return nnx.to_flat_state(nnx.state(unet, nnx.Param))


def make_inputs(config, pooled, height, width, seed=0):
    rng = np.random.default_rng(seed)
    batch, seq = 2, 8
    return dict(
        sample=rng.standard_normal((batch, config.get("in_channels", 4), height, width)).astype(np.float32),
        timesteps=np.array([999.0, 10.5], np.float32),
        encoder_hidden_states=rng.standard_normal((batch, seq, config["cross_attention_dim"])).astype(np.float32),
        text_embeds=rng.standard_normal((batch, pooled)).astype(np.float32),
        # original size, crop corner, target size, as the SDXL pipeline builds them
        time_ids=np.array([[1024, 1024, 0, 0, 1024, 1024], [512, 768, 16, 32, 512, 512]], np.float32),
    )


def torch_forward(unet, inputs):
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        out = unet(
            t["sample"],
            t["timesteps"],
            t["encoder_hidden_states"],
            added_cond_kwargs={"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]},
        )
    return out.sample.numpy()


@jax.jit
def _forward(graphdef, state, inputs):
    unet = nnx.merge(graphdef, state)
    return unet(
        inputs["sample"],
        inputs["timesteps"],
        inputs["encoder_hidden_states"],
        text_embeds=inputs["text_embeds"],
        time_ids=inputs["time_ids"],
    )


def flax_forward(unet, inputs):
    graphdef, state = nnx.split(unet)
    return np.asarray(_forward(graphdef, state, inputs))


def build_torch_unet(config, folder, seed=0):
    """A random diffusers UNet with perturbed norm scales/biases (torch initialises them to 1/0)."""
    torch.manual_seed(seed)
    unet = TorchUNet(**config).eval()
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    unet.save_pretrained(folder, safe_serialization=True)
    return unet


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    config, pooled, height, width = CASES[request.param]
    folder = tmp_path_factory.mktemp(f"unet_{request.param}")
    torch_unet = build_torch_unet(config, folder)
    inputs = make_inputs(config, pooled, height, width)
    if request.param == "C":
        inputs["timesteps"] = np.array(37.0, np.float32)  # one timestep for the whole batch
    return dict(
        name=request.param,
        folder=folder,
        torch_unet=torch_unet,
        inputs=inputs,
        reference=torch_forward(torch_unet, inputs),
        unet=models.load(folder),
    )


def test_matches_diffusers(case):
    out = flax_forward(case["unet"], case["inputs"])
    assert out.shape == case["reference"].shape
    diff = float(np.abs(out - case["reference"]).max())
    print(f"unet parity ({case['name']}) max abs diff: {diff:.2e}")
    assert diff <= 1e-4
    assert np.abs(case["reference"]).max() > 0.1  # the comparison is not between near-zero outputs


def test_save_load_round_trip_is_bit_exact(case, tmp_path):
    models.save(case["unet"], tmp_path)
    reloaded = models.load(tmp_path)
    ours, theirs = params_of(case["unet"]), params_of(reloaded)
    assert [path for path, _ in ours] == [path for path, _ in theirs]
    for (path, a), (_, b) in zip(ours, theirs):
        assert np.array_equal(np.asarray(a.get_value()), np.asarray(b.get_value())), path
    np.testing.assert_array_equal(flax_forward(reloaded, case["inputs"]), flax_forward(case["unet"], case["inputs"]))


def test_saved_folder_loads_in_diffusers(case, tmp_path):
    models.save(case["unet"], tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "UNet2DConditionModel"
    torch_unet = TorchUNet.from_pretrained(tmp_path, low_cpu_mem_usage=False).eval()
    original = case["torch_unet"].state_dict()
    loaded = torch_unet.state_dict()
    assert sorted(loaded) == sorted(original)
    for key, value in original.items():
        assert torch.equal(loaded[key], value), key
    np.testing.assert_array_equal(torch_forward(torch_unet, case["inputs"]), case["reference"])


def test_sdxl_config_parameter_count_and_axes():
    unet = models.abstract(flax_config(SDXL_CONFIG))
    assert isinstance(unet, UNet2DConditionModel)
    assert models.count_params(unet) == SDXL_PARAMS
    with torch.device("meta"):
        torch_unet = TorchUNet(**SDXL_CONFIG)
    assert sum(p.numel() for p in torch_unet.parameters()) == SDXL_PARAMS
    # Every weight names one logical axis (or None) per dimension, so one table can shard it.
    for path, variable in params_of(unet):
        axes = variable.get_metadata().get("axes")
        assert axes is not None and len(axes) == variable.get_value().ndim, (path, axes)
    # Heads are per level (the "attention_head_dim" quirk): head_dim is 64 everywhere.
    attn = unet.down_blocks[2].attentions[0].transformer_blocks[0].attn1
    assert (attn.heads, attn.head_dim) == (20, 64)
    assert len(unet.down_blocks[2].attentions[1].transformer_blocks) == 10


@pytest.mark.parametrize(
    "key, value",
    [
        ("class_embed_type", "timestep"),
        ("encoder_hid_dim_type", "text_proj"),
        ("time_cond_proj_dim", 16),
        ("addition_embed_type", "text"),
        ("time_embedding_type", "fourier"),
        ("resnet_time_scale_shift", "scale_shift"),
        ("only_cross_attention", True),
        ("down_block_types", ("DownBlock2D", "AttnDownBlock2D")),
    ],
)
def test_unsupported_option_is_an_error_naming_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        models.abstract(flax_config({**CONFIG_A, key: value}))


def test_num_attention_heads_is_refused_as_diffusers_does():
    config = {**CONFIG_A, "num_attention_heads": (2, 4)}
    with pytest.raises(ValueError, match="num_attention_heads"):
        TorchUNet(**config)
    with pytest.raises(ValueError, match="num_attention_heads"):
        models.abstract(flax_config(config))


# One level, one resnet and transformer per block, plus the mid block: the smallest cross-attention
# UNet, for the tests that compile extra programs (gradients, bf16) on top of the parity ones.
TINY_CONFIG = dict(
    block_out_channels=(32,),
    down_block_types=("CrossAttnDownBlock2D",),
    up_block_types=("CrossAttnUpBlock2D",),
    layers_per_block=1,
    transformer_layers_per_block=1,
    attention_head_dim=2,
    use_linear_projection=True,
    cross_attention_dim=32,
    norm_num_groups=8,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 16,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet_tiny")
    build_torch_unet(TINY_CONFIG, folder, seed=1)
    unet = models.load(folder)
    inputs = make_inputs(TINY_CONFIG, 16, 8, 8)
    return dict(config=models.read_config(folder), state=nnx.state(unet, nnx.Param), inputs=inputs)


def with_state(config, state, **options):
    unet = models.abstract(config, **options)
    nnx.update(unet, state)
    return unet


def test_random_init_gives_a_finite_prediction(tiny):
    # The "rbg" generator only because it initialises faster on CPU; the distributions are the same.
    rngs = nnx.Rngs(params=jax.random.key(3, impl="rbg"))
    unet = UNet2DConditionModel.from_config(tiny["config"], rngs=rngs)
    out = flax_forward(unet, tiny["inputs"])
    assert out.shape == tiny["inputs"]["sample"].shape and np.isfinite(out).all()
    assert 0.05 < out.std() < 20
    # torch-like fan-in init: uniform within 1/sqrt(fan_in)
    kernel = np.asarray(unet.down_blocks[0].attentions[0].transformer_blocks[0].ff.geglu.kernel.get_value())
    assert 0.5 / np.sqrt(32) < np.abs(kernel).max() <= 1 / np.sqrt(32)


def test_text_time_inputs_are_required(tiny):
    with pytest.raises(ValueError, match="time_ids"):
        flax_forward(with_state(tiny["config"], tiny["state"]), {**tiny["inputs"], "time_ids": None})


@pytest.mark.parametrize("attention", ["cudnn", "auto"])
def test_attention_switch_reaches_every_attention_and_falls_back_on_cpu(tiny, attention):
    unet = with_state(tiny["config"], tiny["state"], attention=attention)
    reference = with_state(tiny["config"], tiny["state"])
    found = [node for _, node in nnx.iter_graph(unet) if isinstance(node, Attention)]
    assert len(found) == 8 and all(a.attention == attention for a in found)
    # On CPU both resolve to the XLA path: the same numbers as attention="xla".
    block, block_ref = (u.mid_block.attentions[0] for u in (unet, reference))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 4, 4, 32)), jnp.float32)
    context = jnp.asarray(tiny["inputs"]["encoder_hidden_states"])
    np.testing.assert_array_equal(np.asarray(block(x, context)), np.asarray(block_ref(x, context)))


def _loss_and_grads(unet, inputs, as_default: bool = False):
    graphdef, params, rest = nnx.split(unet, nnx.Param, ...)

    def loss(params):
        model = nnx.merge(graphdef, params, rest)
        out = model(
            inputs["sample"],
            inputs["timesteps"],
            inputs["encoder_hidden_states"],
            text_embeds=inputs["text_embeds"],
            time_ids=inputs["time_ids"],
        )
        return jnp.mean(jnp.square(out - 0.5)), out

    fn = jax.value_and_grad(loss, has_aux=True)
    (_, out), grads = (jit_as_default(fn, params) if as_default else jax.jit(fn))(params)
    return np.asarray(out), [np.asarray(g) for g in jax.tree.leaves(grads)]


@pytest.fixture(scope="module")
def tiny_gradients(tiny):
    return _loss_and_grads(with_state(tiny["config"], tiny["state"]), tiny["inputs"], as_default=True)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_identical_outputs_and_gradients(tiny, tiny_gradients, policy):
    out_ref, grads_ref = tiny_gradients
    out, grads = _loss_and_grads(with_state(tiny["config"], tiny["state"], remat=policy), tiny["inputs"], as_default=True)
    np.testing.assert_array_equal(out, out_ref)  # as XLA compiles by default: see xla_options.py
    assert len(grads) == len(grads_ref) and all(np.abs(g).max() > 0 for g in grads_ref)
    for g, g_ref in zip(grads, grads_ref):
        # Recomputation is the same arithmetic, but XLA fuses the rematerialised graph differently,
        # so sums may round in another order: equal to float32 rounding, not necessarily bit for bit.
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6 * np.abs(g_ref).max())


def test_bf16_compute_stays_close_to_fp32(tiny):
    expected = flax_forward(with_state(tiny["config"], tiny["state"]), tiny["inputs"])
    unet16 = with_state(tiny["config"], tiny["state"], dtype=jnp.bfloat16)
    assert all(v.get_value().dtype == jnp.float32 for _, v in params_of(unet16))  # stored fp32, cast at use
    out16 = flax_forward(unet16, tiny["inputs"])
    assert out16.dtype == jnp.bfloat16
    rel = float(np.linalg.norm(out16.astype(np.float32) - expected) / np.linalg.norm(expected))
    print(f"unet bf16 relative error: {rel:.2e}")
    assert rel < 5e-2


def scan_lengths(unet, inputs) -> list[int]:
    """The lengths of the scans in the UNet's forward pass, nested ones included."""

    def lengths(jaxpr) -> list[int]:
        found = []
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "scan":
                found.append(eqn.params["length"])
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                found += lengths(sub)
        return found

    return sorted(lengths(jax.make_jaxpr(lambda: _forward(*nnx.split(unet), inputs))().jaxpr))


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_transformer_layers_give_the_unrolled_outputs_and_gradients(remat):
    # Three layers per transformer: with scan_layers each stack is one lax.scan over stacked weights.
    config = flax_config(dict(TINY_CONFIG, transformer_layers_per_block=3))
    unet = models.create(config, seed=2)
    state = nnx.state(unet, nnx.Param)
    inputs = make_inputs(config, 16, 8, 8)
    out_ref, grads_ref = _loss_and_grads(with_state(config, state, remat=remat), inputs)
    scanned = with_state(config, state, remat=remat, scan_layers=True)
    out, grads = _loss_and_grads(scanned, inputs)

    # The weights keep their per-layer names (what loading and saving use) ...
    assert [k for k, _ in params_of(scanned)] == [k for k, _ in params_of(unet)]
    # ... and the forward pass holds one scan of length 3 per transformer (down, mid, two up).
    assert scan_lengths(scanned, inputs) == [3, 3, 3, 3]

    np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-6 * np.abs(out_ref).max())
    assert len(grads) == len(grads_ref)
    for g, g_ref in zip(grads, grads_ref):
        # The same arithmetic in a loop: XLA fuses it differently, so sums may round in another order.
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6 * np.abs(g_ref).max())


def test_scanned_layers_with_lora_scan_without_dropout_and_match_the_unrolled():
    from flax_train import lora
    from flax_train.config import LoraConfig

    config = flax_config(dict(TINY_CONFIG, transformer_layers_per_block=3))
    state = nnx.state(models.create(config, seed=2), nnx.Param)
    inputs = make_inputs(config, 16, 8, 8)

    def with_lora(dropout, **options):
        unet = lora.inject(with_state(config, state, **options), LoraConfig(rank=2, dropout=dropout), seed=0)
        # B away from zero, so that the adapters change the output
        for _, layer in lora.targets(unet, lora.DEFAULT_TARGETS):
            layer.lora.b.set_value(layer.lora.b.get_value() + 0.1)
        return unet

    expected = flax_forward(with_lora(0.0), inputs)
    scanned = with_lora(0.0, scan_layers=True)
    assert scan_lengths(scanned, inputs) == [3, 3, 3, 3]
    np.testing.assert_allclose(flax_forward(scanned, inputs), expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    # With dropout every layer draws its own masks (a per-layer salt): those stacks run unrolled.
    assert scan_lengths(with_lora(0.1, scan_layers=True), inputs) == []
