"""The Flax CLIP text encoders against transformers' torch modules on the same weights."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open

import flax_train.models as models
from flax_train.models import clip

VOCAB = 100
LENGTH = 77
END = VOCAB - 1  # end-of-text id of the tiny configs: the largest id, as in CLIP's real vocabulary
START = VOCAB - 2


def tiny_config(**overrides) -> transformers.CLIPTextConfig:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=LENGTH,
        projection_dim=24,
        bos_token_id=START,
        eos_token_id=END,
        pad_token_id=1,
    )
    kwargs.update(overrides)
    return transformers.CLIPTextConfig(**kwargs)


def save_torch_model(cls, config, folder, seed=0):
    """A random torch model with every weight perturbed (norm scales, biases), saved as safetensors."""
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    return model


def token_ids(end_positions, pad_id, seed=0) -> np.ndarray:
    """CLIP-tokenizer-like rows: start token, random words, the end token at the given position, padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, START, size=(len(end_positions), LENGTH))
    ids[:, 0] = START
    for row, end in enumerate(end_positions):
        ids[row, end] = END
        ids[row, end + 1 :] = pad_id
    return ids.astype(np.int32)


def jit_forward(model):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids)), state


def run(model, ids):
    forward, state = jit_forward(model)
    return forward(state, jnp.asarray(ids))


def torch_outputs(model, ids):
    with torch.no_grad():
        out = model(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
    pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    return [h.numpy() for h in out.hidden_states], out.last_hidden_state.numpy(), pooled.numpy()


def assert_parity(ours, theirs, name):
    hidden, last, pooled = theirs
    pooled_ours = ours.text_embeds if hasattr(ours, "text_embeds") else ours.pooler_output
    assert len(ours.hidden_states) == len(hidden)
    diffs = {f"hidden_states[{i}]": np.abs(np.asarray(ours.hidden_states[i]) - h).max() for i, h in enumerate(hidden)}
    diffs["last_hidden_state"] = np.abs(np.asarray(ours.last_hidden_state) - last).max()
    diffs["pooled"] = np.abs(np.asarray(pooled_ours) - pooled).max()
    detail = ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
    print(f"{name} parity max abs diff: {max(diffs.values()):.2e} ({detail})")
    assert pooled_ours.shape == pooled.shape
    assert max(diffs.values()) <= 1e-4, diffs


PARITY_CASES = [
    # SDXL's first tokenizer pads with the end token: pooling must take its first occurrence.
    ("CLIPTextModel", dict(hidden_act="quick_gelu"), END),
    # SDXL's second tokenizer pads with "!" (id 0).
    ("CLIPTextModelWithProjection", dict(hidden_act="gelu"), 0),
    # Legacy configs (eos_token_id == 2) pool at the largest id.
    ("CLIPTextModel", dict(hidden_act="gelu", eos_token_id=2), END),
    ("CLIPTextModelWithProjection", dict(hidden_act="quick_gelu", eos_token_id=2), 0),
]


@pytest.mark.parametrize("class_name,overrides,pad_id", PARITY_CASES)
def test_parity_with_transformers(tmp_path, class_name, overrides, pad_id):
    torch_model = save_torch_model(getattr(transformers, class_name), tiny_config(**overrides), tmp_path)
    model = models.load(tmp_path)
    assert type(model).__name__ == class_name
    ids = token_ids([5, 20, 76], pad_id)
    assert_parity(run(model, ids), torch_outputs(torch_model, ids), f"{class_name} {overrides}")


def test_pooling_follows_the_end_token(tmp_path):
    """Moving the end token moves the pooled output to the state at its new position."""
    save_torch_model(transformers.CLIPTextModel, tiny_config(), tmp_path)
    model = models.load(tmp_path)
    ids = token_ids([5, 20, 40], pad_id=END)
    out = run(model, ids)
    np.testing.assert_array_equal(out.pooler_output, out.last_hidden_state[np.arange(3), [5, 20, 40]])


def test_save_round_trip_and_transformers_reads_it(tmp_path):
    for class_name in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        cls = getattr(transformers, class_name)
        torch_model = save_torch_model(cls, tiny_config(), tmp_path / class_name)
        model = models.load(tmp_path / class_name)
        out = models.save(model, tmp_path / f"{class_name}_ours")

        # Same layout as the SDXL checkpoints on the Hub, and the config as given.
        with safe_open(str(out / "model.safetensors"), framework="np") as f:
            saved_keys = set(f.keys())
        torch_keys = set(torch_model.state_dict())
        expected_keys = torch_keys if class_name.endswith("Projection") else {f"text_model.{k}" for k in torch_keys}
        assert saved_keys == expected_keys
        written, original = (json.loads((f / "config.json").read_text()) for f in (out, tmp_path / class_name))
        assert written == original

        again = models.load(out)
        for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(again, nnx.Param))):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

        reloaded, info = cls.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        ids = token_ids([3, 30], pad_id=0)
        for a, b in zip(torch_outputs(torch_model, ids), torch_outputs(reloaded.eval(), ids)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


SDXL_TEXT_ENCODERS = {
    "text_encoder": dict(
        architectures=["CLIPTextModel"], hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768,
    ),
    "text_encoder_2": dict(
        architectures=["CLIPTextModelWithProjection"], hidden_size=1280, intermediate_size=5120,
        num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu", projection_dim=1280,
    ),
}


@pytest.mark.parametrize("component", sorted(SDXL_TEXT_ENCODERS))
def test_sdxl_sizes_match_transformers(component):
    config = dict(SDXL_TEXT_ENCODERS[component], vocab_size=49408, max_position_embeddings=77)
    model = models.abstract(config)
    ours = models.count_params(model)
    # Every weight carries one logical axis name (or None) per dimension, for the sharding table.
    for path, param in nnx.iter_graph(model):
        if isinstance(param, nnx.Param):
            assert len(param.get_metadata()["axes"]) == len(param.shape), path
    torch_cls = getattr(transformers, config["architectures"][0])
    with torch.device("meta"):
        theirs = sum(p.numel() for p in torch_cls(transformers.CLIPTextConfig(**config)).parameters())
    print(f"{component}: {ours:,} parameters")
    assert ours == theirs


def test_attention_choices_fall_back_on_cpu(tmp_path):
    save_torch_model(transformers.CLIPTextModelWithProjection, tiny_config(), tmp_path)
    ids = jnp.asarray(token_ids([7, 50], pad_id=0))
    reference = run(models.load(tmp_path), ids)
    for attention in ("cudnn", "auto"):
        out = run(models.load(tmp_path, attention=attention), ids)
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(reference)):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="attention implementation"):
        models.load(tmp_path, attention="flash")


def test_remat_gives_identical_outputs_and_same_grads(tmp_path):
    save_torch_model(transformers.CLIPTextModelWithProjection, tiny_config(), tmp_path)
    ids = jnp.asarray(token_ids([7, 50], pad_id=0))

    def outputs_and_grads(remat):
        graphdef, params, rest = nnx.split(models.load(tmp_path, remat=remat), nnx.Param, ...)

        def loss(p):
            out = nnx.merge(graphdef, p, rest)(ids)
            return jnp.sum(out.hidden_states[-2] ** 2) + jnp.sum(out.text_embeds), out

        return jax.jit(jax.grad(loss, has_aux=True))(params)

    grads_ref, out_ref = outputs_and_grads("none")
    grad_scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads_ref))
    for remat in ("full", "dots"):
        grads, out = outputs_and_grads(remat)
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(out_ref)):
            np.testing.assert_array_equal(a, b)
        # The recomputed forward is fused differently in the backward pass, so gradients may differ
        # in the last float32 bits (a few ulp of the largest gradient), never more.
        diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)))
        print(f"remat={remat}: outputs identical, grads max abs diff {diff:.1e} (largest grad {grad_scale:.1e})")
        assert diff <= 1e-6 * grad_scale


def test_bfloat16_compute_keeps_float32_params(tmp_path):
    save_torch_model(transformers.CLIPTextModel, tiny_config(), tmp_path)
    ids = jnp.asarray(token_ids([7, 50], pad_id=END))
    model = models.load(tmp_path, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    out = run(model, ids)
    reference = run(models.load(tmp_path), ids)
    assert out.last_hidden_state.dtype == jnp.bfloat16
    ours, theirs = np.asarray(out.last_hidden_state, np.float32), np.asarray(reference.last_hidden_state)
    relative = np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
    print(f"bfloat16 compute: last_hidden_state relative RMS error vs float32 {relative:.1e}")
    # Smoke test of the bf16 path, not a parity claim: bf16 rounds each value by up to 2**-8
    # relative, and the few roundings of two layers must stay within about five of those.
    assert relative < 2e-2, relative


def test_activations_match_transformers():
    x = np.linspace(-6, 6, 1001, dtype=np.float32)
    for name, fn in clip.ACTIVATIONS.items():
        theirs = transformers.activations.ACT2FN[name](torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(np.asarray(fn(jnp.asarray(x))), theirs, atol=1e-6, err_msg=name)


def test_config_errors():
    base = dict(architectures=["CLIPTextModel"], hidden_size=32, num_attention_heads=4, num_hidden_layers=1)
    with pytest.raises(ValueError, match="hidden_act"):
        models.abstract(dict(base, hidden_act="swishy"))
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        models.abstract(dict(base, num_attention_heads=5))
    with pytest.raises(ValueError, match="eos_token_id"):
        models.abstract(dict(base, eos_token_id=[1, 2]))
    model = models.create(dict(base, max_position_embeddings=8, vocab_size=50))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(jnp.zeros((1, 9), jnp.int32))
