"""The generic loading rules of flax_train.weights / flax_train.models.load, on a tiny CLIP text encoder."""

import json
import pickle
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors.numpy import load_file, save_file

import flax_train.models as models
from flax_train.models.weights import WeightsError

END = 99
IDS = np.array([[98, 5, 17, 3, END] + [END] * 11, [98] + list(range(10, 22)) + [END, END, END]], np.int32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny transformers CLIPTextModel folder and its outputs on IDS."""
    folder = tmp_path_factory.mktemp("clip")
    config = transformers.CLIPTextConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=98, eos_token_id=END,
    )
    torch.manual_seed(0)
    model = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        expected = model(torch.from_numpy(IDS.astype(np.int64))).last_hidden_state.numpy()
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model, expected


def copy_of(folder, tmp_path):
    target = tmp_path / "component"
    shutil.copytree(folder, target)
    return target


def forward(model) -> np.ndarray:
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids).last_hidden_state)(state, IDS))


def rewrite_weights(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_loads_the_reference(checkpoint):
    folder, _, expected = checkpoint
    assert np.abs(forward(models.load(folder)) - expected).max() <= 1e-4


def test_missing_weights_file(checkpoint, tmp_path):
    folder = copy_of(checkpoint[0], tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no model.safetensors"):
        models.load(folder)


def test_missing_config(checkpoint, tmp_path):
    folder = copy_of(checkpoint[0], tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(WeightsError, match="missing config.json"):
        models.load(folder)


def test_other_model_family_is_refused(checkpoint, tmp_path):
    folder = copy_of(checkpoint[0], tmp_path)
    (folder / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(WeightsError, match="'BertModel' is not an SDXL component"):
        models.load(folder)


def test_wrong_shape_names_key_and_shapes(checkpoint, tmp_path):
    folder = copy_of(checkpoint[0], tmp_path)
    key = "encoder.layers.1.mlp.fc1.weight"

    def edit(tensors):
        tensors[key] = np.zeros((48, 32), np.float32)

    rewrite_weights(folder, edit)
    with pytest.raises(WeightsError, match=rf"'{key}' has shape \(48, 32\), expected \(64, 32\)"):
        models.load(folder)


def test_missing_and_unexpected_keys_are_named(checkpoint, tmp_path):
    folder = copy_of(checkpoint[0], tmp_path)

    def edit(tensors):
        del tensors["encoder.layers.0.self_attn.q_proj.bias"]
        tensors["encoder.layers.2.mlp.fc1.weight"] = np.zeros((64, 32), np.float32)

    rewrite_weights(folder, edit)
    with pytest.raises(WeightsError) as error:
        models.load(folder)
    message = str(error.value)
    assert "missing keys (1): text_model.encoder.layers.0.self_attn.q_proj.bias" in message
    assert "unexpected keys (1): text_model.encoder.layers.2.mlp.fc1.weight" in message


def test_legacy_layout_with_buffers_loads(checkpoint, tmp_path):
    """Hub checkpoints written by older transformers: `text_model.` prefix and a position_ids buffer."""
    folder, _, expected = checkpoint
    folder = copy_of(folder, tmp_path)

    def edit(tensors):
        for key in list(tensors):
            tensors[f"text_model.{key}"] = tensors.pop(key)
        tensors["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]

    rewrite_weights(folder, edit)
    assert np.abs(forward(models.load(folder)) - expected).max() <= 1e-4


def test_the_same_weight_under_two_layouts_is_refused(checkpoint, tmp_path):
    folder = copy_of(checkpoint[0], tmp_path)

    def edit(tensors):
        tensors["text_model.final_layer_norm.bias"] = tensors["final_layer_norm.bias"]

    rewrite_weights(folder, edit)
    with pytest.raises(WeightsError, match="both name the weight 'text_model.final_layer_norm.bias'"):
        models.load(folder)


def test_pickle_checkpoints_are_refused_unread(checkpoint, tmp_path, monkeypatch):
    folder = copy_of(checkpoint[0], tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(np.random.default_rng(0).bytes(256))

    def forbidden(*args, **kwargs):
        raise AssertionError("a pickle checkpoint was opened")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, forbidden)
    with pytest.raises(WeightsError, match="pytorch_model.bin.*Convert them to safetensors"):
        models.load(folder)


def test_sharded_checkpoint(checkpoint, tmp_path):
    _, torch_model, expected = checkpoint
    folder = tmp_path / "sharded"
    torch_model.save_pretrained(folder, safe_serialization=True, max_shard_size="20KB")
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert (folder / "model.safetensors.index.json").is_file() and len(shards) > 1, shards
    assert not (folder / "model.safetensors").exists()
    np.testing.assert_array_equal(forward(models.load(folder)), forward(models.load(checkpoint[0])))
    assert np.abs(forward(models.load(folder)) - expected).max() <= 1e-4


def test_sharded_loading_places_each_weight(checkpoint):
    folder, _, expected = checkpoint
    mesh = Mesh(np.array(jax.devices()).reshape(8), ("fsdp",))
    assert mesh.size == 8

    def sharding_fn(variable):
        # First dimension split over the 8 devices where it divides, else replicated.
        divisible = variable.shape[0] % 8 == 0
        return NamedSharding(mesh, PartitionSpec("fsdp" if divisible else None))

    model = models.load(folder, sharding_fn=sharding_fn)
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert any(p.sharding.spec == PartitionSpec("fsdp") for p in params)
    for p in params:
        assert p.sharding == sharding_fn(p), (p.shape, p.sharding)
        assert len(p.sharding.device_set) == 8
    # The loaded values are exactly those of an unsharded load ...
    plain = jax.tree.leaves(nnx.state(models.load(folder), nnx.Param))
    for sharded, unsharded in zip(params, plain):
        np.testing.assert_array_equal(np.asarray(sharded), np.asarray(unsharded))
    # ... and the model computes the reference outputs with them (a partitioned matmul sums in
    # another order, so agreement is to float32 rounding, not bit for bit).
    assert np.abs(forward(model) - expected).max() <= 1e-4


@pytest.mark.parametrize("keep", [0, 7, 100, 0.5, 0.999])
def test_a_truncated_weights_file_is_named(checkpoint, tmp_path, keep):
    """A download cut short: the header or the tensor bytes end early (``keep``: bytes, or a fraction)."""
    folder = copy_of(checkpoint[0], tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(keep * len(data)) if isinstance(keep, float) else keep])
    with pytest.raises(WeightsError, match="model.safetensors"):
        models.load(folder)


def test_a_config_that_does_not_match_the_weights_names_a_key(checkpoint, tmp_path):
    folder = copy_of(checkpoint[0], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 48
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="mlp.fc1"):
        models.load(folder)
