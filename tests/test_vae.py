"""The Flax AutoencoderKL and its blocks against diffusers' torch modules on the same weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers.models.downsampling import Downsample2D as TorchDownsample2D
from diffusers.models.resnet import ResnetBlock2D as TorchResnetBlock2D
from diffusers.models.upsampling import Upsample2D as TorchUpsample2D
from flax import nnx

import flax_train.models as models
from flax_train.models import weights
from flax_train.models.blocks import Downsample2D, ResnetBlock2D, Upsample2D
from flax_train.models.vae import AutoencoderKL, sample_posterior
from xla_options import jit_as_default

TOL = 1e-4

TWO_LEVELS = {
    "_class_name": "AutoencoderKL",
    "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "latent_channels": 4,
    "sample_size": 32,
    "scaling_factor": 0.13025,
}
# Also covers the switches SDXL leaves on: no quant convs, no mid-block attention.
THREE_LEVELS = {
    "_class_name": "AutoencoderKL",
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "latent_channels": 4,
    "sample_size": 32,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": False,
}
ONE_LEVEL = {
    "_class_name": "AutoencoderKL",
    "block_out_channels": [32],
    "layers_per_block": 1,
    "norm_num_groups": 8,
}
SDXL_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}


def torch_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def perturb_norms(module: torch.nn.Module) -> None:
    """GroupNorms start at weight 1 / bias 0; move them so the test exercises both."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, torch.nn.GroupNorm):
                sub.weight.add_(0.1 * torch.randn_like(sub.weight))
                sub.bias.add_(0.1 * torch.randn_like(sub.bias))


def torch_vae_folder(config: dict, folder, seed: int = 0) -> TorchAutoencoderKL:
    torch.manual_seed(seed)
    vae = TorchAutoencoderKL(**torch_config(config)).eval()
    perturb_norms(vae)
    vae.save_pretrained(folder, safe_serialization=True)
    return vae


def jitted(model: AutoencoderKL):
    graphdef, state = nnx.split(model)
    encode = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x))
    decode = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z))
    return (lambda x: encode(state, jnp.asarray(x))), (lambda z: decode(state, jnp.asarray(z)))


def max_diff(ours, theirs) -> float:
    return float(np.abs(np.asarray(ours) - np.asarray(theirs)).max())


@pytest.fixture(scope="module")
def two_level_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae_two_levels")
    return folder, torch_vae_folder(TWO_LEVELS, folder)


# --------------------------------------------------------------------------------------------
# Blocks (shared with the UNet)


def abstract(cls, *args, **kwargs) -> nnx.Module:
    """The block without random init (its weights are overwritten from torch anyway)."""
    return nnx.eval_shape(lambda: cls(*args, **kwargs, rngs=nnx.Rngs(0)))


def copy_torch_weights(ours: nnx.Module, theirs: torch.nn.Module) -> None:
    state = {k: v.detach().numpy() for k, v in theirs.state_dict().items()}
    layout = weights.torch_layout(ours)
    assert set(layout) == set(state)
    for key, (layer, name) in layout.items():
        getattr(layer, name).set_value(jnp.asarray(layer.from_torch(name, state[key])))


def nhwc(x: torch.Tensor) -> jax.Array:
    return jnp.asarray(x.detach().numpy().transpose(0, 2, 3, 1))


def test_blocks_match_diffusers():
    torch.manual_seed(0)
    x = torch.randn(2, 32, 9, 11)  # odd sizes exercise the resampling edges
    temb = torch.randn(2, 40)
    diffs = {}

    theirs = TorchResnetBlock2D(
        in_channels=32, out_channels=64, temb_channels=40, groups=8, groups_out=16, eps=1e-5, output_scale_factor=1.5
    ).eval()
    perturb_norms(theirs)
    ours = abstract(
        ResnetBlock2D, 32, 64, temb_channels=40, groups=8, groups_out=16, eps=1e-5, output_scale_factor=1.5
    )
    assert ours.conv_shortcut is not None and ours.time_emb_proj is not None
    copy_torch_weights(ours, theirs)
    diffs["resnet+temb"] = max_diff(ours(nhwc(x), jnp.asarray(temb.numpy())), nhwc(theirs(x, temb)))
    with pytest.raises(ValueError, match="temb"):
        ours(nhwc(x))

    theirs = TorchResnetBlock2D(in_channels=32, out_channels=32, temb_channels=None, groups=8, eps=1e-6).eval()
    perturb_norms(theirs)
    ours = abstract(ResnetBlock2D, 32, 32, temb_channels=None, groups=8, eps=1e-6)
    assert ours.conv_shortcut is None and ours.time_emb_proj is None
    copy_torch_weights(ours, theirs)
    diffs["resnet"] = max_diff(ours(nhwc(x)), nhwc(theirs(x, None)))

    for padding in (0, 1):
        theirs = TorchDownsample2D(32, use_conv=True, out_channels=48, padding=padding, name="op")
        ours = abstract(Downsample2D, 32, 48, padding=padding)
        copy_torch_weights(ours, theirs)
        diffs[f"downsample pad {padding}"] = max_diff(ours(nhwc(x)), nhwc(theirs(x)))
    diffs["avgpool"] = max_diff(abstract(Downsample2D, 32, use_conv=False)(nhwc(x)), nhwc(TorchDownsample2D(32)(x)))

    theirs = TorchUpsample2D(32, use_conv=True)
    ours = abstract(Upsample2D, 32)
    copy_torch_weights(ours, theirs)
    diffs["upsample x2"] = max_diff(ours(nhwc(x)), nhwc(theirs(x)))
    # The UNet passes the skip connection's size when latents do not halve evenly.
    for size in ((19, 23), (17, 22), (25, 30)):
        diffs[f"upsample to {size}"] = max_diff(ours(nhwc(x), size), nhwc(theirs(x, output_size=size)))

    for name, d in diffs.items():
        print(f"blocks parity {name}: max abs diff {d:.2e}")
        assert d <= TOL, name


# --------------------------------------------------------------------------------------------
# AutoencoderKL


def check_parity(config: dict, folder, theirs: TorchAutoencoderKL, label: str) -> None:
    ours = models.load(folder)
    assert isinstance(ours, AutoencoderKL)
    encode, decode = jitted(ours)
    levels = len(config["block_out_channels"])
    torch.manual_seed(1)
    images = torch.randn(2, 3, 32, 24)  # not square, so a swapped H/W shows
    latents = torch.randn(2, config["latent_channels"], 32 >> (levels - 1), 24 >> (levels - 1))
    with torch.no_grad():
        posterior = theirs.encode(images).latent_dist
        decoded = theirs.decode(latents).sample
    mean, logvar = encode(images.numpy())
    assert mean.shape == posterior.mean.shape and logvar.shape == posterior.logvar.shape
    d_mean = max_diff(mean, posterior.mean)
    d_logvar = max_diff(logvar, posterior.logvar)
    out = decode(latents.numpy())
    assert out.shape == decoded.shape
    d_decode = max_diff(out, decoded)
    print(f"vae {label} parity max abs diff: mean {d_mean:.2e} logvar {d_logvar:.2e} decode {d_decode:.2e}")
    assert d_mean <= TOL and d_logvar <= TOL and d_decode <= TOL


def test_two_level_vae_matches_diffusers(two_level_folder):
    folder, theirs = two_level_folder
    check_parity(TWO_LEVELS, folder, theirs, "two levels")


def test_three_level_vae_matches_diffusers(tmp_path):
    theirs = torch_vae_folder(THREE_LEVELS, tmp_path, seed=2)
    check_parity(THREE_LEVELS, tmp_path, theirs, "three levels")


def test_logvar_is_clipped_like_diffusers(two_level_folder):
    folder, theirs = two_level_folder
    ours = models.load(folder)
    # Make the encoder's log-variance channels huge so both clip bounds are hit.
    bias = ours.quant_conv.bias[...]
    ours.quant_conv.bias.set_value(bias.at[4:6].set(1e4).at[6:].set(-1e4))
    with torch.no_grad():
        theirs_clipped = TorchAutoencoderKL.from_pretrained(folder).eval()
        theirs_clipped.quant_conv.bias[4:6] = 1e4
        theirs_clipped.quant_conv.bias[6:] = -1e4
        images = torch.randn(1, 3, 16, 16)
        expected = theirs_clipped.encode(images).latent_dist.logvar
    _, logvar = jitted(ours)[0](images.numpy())
    assert float(logvar.max()) == 20.0 and float(logvar.min()) == -30.0
    assert max_diff(logvar, expected) == 0.0


def test_save_load_round_trip_is_bit_exact(two_level_folder, tmp_path):
    folder, _ = two_level_folder
    first = models.load(folder)
    models.save(first, tmp_path / "saved")
    second = models.load(tmp_path / "saved")
    assert second.config == first.config
    first_state = weights.to_torch_state_dict(first)
    second_state = weights.to_torch_state_dict(second)
    assert first_state.keys() == second_state.keys()
    for key in first_state:
        assert np.array_equal(first_state[key], second_state[key]), key
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    assert np.array_equal(np.asarray(jitted(first)[1](latents)), np.asarray(jitted(second)[1](latents)))


def test_pre_refactor_attention_key_names_load(two_level_folder, tmp_path):
    """Old diffusers checkpoints name the mid-block attention query/key/value/proj_attn."""
    import shutil

    from safetensors.numpy import load_file, save_file

    folder, _ = two_level_folder
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    tensors = load_file(str(folder / AutoencoderKL.WEIGHTS_NAME))
    old = {}
    for key, value in tensors.items():
        for new_name, old_name in renames.items():
            key = key.replace(new_name, old_name) if ".attentions." in key else key
        old[key] = value
    assert any(".query." in k for k in old) and not any(".to_q." in k for k in old)
    (tmp_path / "old").mkdir()
    shutil.copy(folder / "config.json", tmp_path / "old" / "config.json")
    save_file(old, str(tmp_path / "old" / AutoencoderKL.WEIGHTS_NAME))
    expected = weights.to_torch_state_dict(models.load(folder))
    loaded = weights.to_torch_state_dict(models.load(tmp_path / "old"))
    assert loaded.keys() == expected.keys()
    assert all(np.array_equal(loaded[k], expected[k]) for k in expected)


def test_saved_folder_loads_in_diffusers(two_level_folder, tmp_path):
    ours = models.load(two_level_folder[0])
    # Move every weight away from the torch original, so diffusers can only match by reading our file.
    rng = np.random.default_rng(3)
    for _, param in nnx.iter_graph(ours):
        if isinstance(param, nnx.Param):
            param.set_value(param[...] + 0.05 * rng.standard_normal(param.shape).astype(np.float32))
    folder = models.save(ours, tmp_path / "vae")
    theirs = TorchAutoencoderKL.from_pretrained(folder).eval()
    assert theirs.config.scaling_factor == TWO_LEVELS["scaling_factor"]
    encode, decode = jitted(ours)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        posterior = theirs.encode(torch.from_numpy(images)).latent_dist
        decoded = theirs.decode(torch.from_numpy(latents)).sample
    mean, logvar = encode(images)
    d = max(max_diff(mean, posterior.mean), max_diff(logvar, posterior.logvar), max_diff(decode(latents), decoded))
    print(f"vae exported-to-diffusers max abs diff: {d:.2e}")
    assert d <= TOL


def test_sdxl_vae_has_the_torch_parameters():
    ours = models.abstract(SDXL_VAE)
    assert ours.config["scaling_factor"] == 0.13025
    with torch.device("meta"):
        theirs = TorchAutoencoderKL(**torch_config(SDXL_VAE))
    theirs_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    ours_shapes = {
        key: tuple(layer.to_torch(name, np.empty(getattr(layer, name).shape, np.bool_)).shape)
        for key, (layer, name) in weights.torch_layout(ours).items()
    }
    assert ours_shapes == theirs_shapes
    n_torch = sum(p.numel() for p in theirs.parameters())
    print(f"SDXL VAE parameters: {models.count_params(ours):,}")
    assert models.count_params(ours) == n_torch


def test_remat_policies_give_identical_outputs_and_grads(tmp_path):
    # One level keeps the three compilations cheap and still rematerialises every block kind.
    folder = tmp_path / "vae"
    torch_vae_folder(ONE_LEVEL, folder, seed=4)
    images = jnp.asarray(np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32))

    def outputs_and_grads(remat: str):
        model = models.load(folder, remat=remat)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p):
            out = nnx.merge(graphdef, p, rest)(images)
            return jnp.mean(out**2), out

        # Compiled as XLA compiles by default: bit-identity is asserted below (see xla_options.py).
        (_, out), grads = jit_as_default(jax.value_and_grad(loss, has_aux=True), params)(params)
        return out, grads

    ref_out, ref_grads = outputs_and_grads("none")
    for policy in ("full", "dots"):
        out, grads = outputs_and_grads(policy)
        d_out = max_diff(out, ref_out)
        d_grad = max(max_diff(a, b) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
        print(f"vae remat {policy}: output diff {d_out:.1e}, grad diff {d_grad:.1e}")
        assert d_out == 0.0
        assert d_grad <= 1e-6
        assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)


def test_attention_choices_agree_on_cpu(two_level_folder):
    folder, _ = two_level_folder
    tokens = jnp.asarray(np.random.default_rng(0).standard_normal((1, 8, 8, 64)).astype(np.float32))
    outputs = {}
    for attention in ("xla", "auto", "cudnn"):
        model = models.load(folder, attention=attention)
        for part in (model.encoder, model.decoder):
            block = part.mid_block.attentions[0]
            assert block.attention == ("xla" if attention == "auto" else attention)
        outputs[attention] = model.encoder.mid_block.attentions[0](tokens)
    for attention in ("auto", "cudnn"):
        assert max_diff(outputs[attention], outputs["xla"]) == 0.0, attention
    # SDXL's single 512-wide head is beyond cuDNN's fused kernel: it must take the XLA path.
    sdxl = models.abstract(SDXL_VAE, attention="cudnn")
    assert sdxl.decoder.mid_block.attentions[0].attention == "xla"


def test_bfloat16_compute_stays_close_to_float32(two_level_folder):
    folder, _ = two_level_folder
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    reference = jitted(models.load(folder))[1](latents)
    low = jitted(models.load(folder, dtype=jnp.bfloat16))[1](latents)
    assert low.dtype == jnp.bfloat16
    # bf16 keeps 8 mantissa bits: a few percent of the output range is expected, a bug is far more.
    relative = max_diff(low.astype(jnp.float32), reference) / float(jnp.abs(reference).max())
    print(f"vae bf16 decode relative max diff: {relative:.2e}")
    assert relative < 0.05


def test_sample_posterior_has_the_posterior_statistics():
    mean = jnp.full((4, 4, 32, 32), 1.5)
    logvar = jnp.full((4, 4, 32, 32), np.log(4.0))
    draws = sample_posterior(mean, logvar, jax.random.key(0))
    assert abs(float(draws.mean()) - 1.5) < 0.05
    assert abs(float(draws.std()) - 2.0) < 0.05


def test_unsupported_configs_are_rejected():
    with pytest.raises(ValueError, match="act_fn"):
        models.abstract({**TWO_LEVELS, "act_fn": "gelu"})
    with pytest.raises(ValueError, match="down_block_types"):
        models.abstract({**TWO_LEVELS, "down_block_types": ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]})
