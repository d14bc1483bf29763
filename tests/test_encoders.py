"""Reward-proxy encoders for real images: CLIP (tiny random, built from a config and saved to a
folder), the VAE-latent fallback (tiny AutoencoderKL) and the free-text prompt encoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from feedback_store import FeedbackStore
from rlr_core.backends.latent import DiffusersLatentBackend
from rlr_core.feedback import encoders
from rlr_core.feedback.encoders import CLIPImageEncoder, EncoderError, VAELatentEncoder, make_image_encoder
from rlr_core.feedback.prompt_encoders import (
    BagOfWordsPromptEncoder,
    HashedWordsPromptEncoder,
    default_prompt_encoder,
    prompt_encoder_from_config,
)
from rlr_core.feedback.reward_proxy import FitConfig, RewardProxy, fit, load_proxy, train_from_store
from tests.test_latent_backend import tiny_pipeline

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)


def save_tiny_clip(folder: Path, seed: int = 0, full: bool = True) -> Path:
    """A random CLIPModel (or vision tower with projection) of a tiny config, as safetensors."""
    torch.manual_seed(seed)
    if full:
        config = CLIPConfig(text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, max_position_embeddings=16, bos_token_id=0,
                                             eos_token_id=1, pad_token_id=1),
                            vision_config=VISION, projection_dim=24)
        CLIPModel(config).save_pretrained(folder)
    else:
        CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION, projection_dim=24)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def clip(clip_dir) -> CLIPImageEncoder:
    return make_image_encoder(f"clip:{clip_dir}")


@pytest.fixture(scope="module")
def latent_backend() -> DiffusersLatentBackend:
    return DiffusersLatentBackend.from_pipeline(tiny_pipeline(), name="tiny-sd")


def test_clip_features_match_the_model_and_gradients_reach_the_pixels(clip, clip_dir):
    assert clip.name == "clip-image" and clip.dim == 24 and clip.spec == f"clip:{clip_dir}"
    images = torch.rand(3, 3, 48, 64, requires_grad=True)  # not square, not the model's size
    emb = clip.embed(images)
    assert emb.shape == (3, 24)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    # the same numbers as transformers' CLIPModel on the torch-preprocessed pixels
    full = CLIPModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        ref = full.get_image_features(pixel_values=clip.preprocess(images))
    ref = getattr(ref, "pooler_output", ref)
    torch.testing.assert_close(emb.detach(), torch.nn.functional.normalize(ref, dim=-1), atol=1e-5, rtol=1e-4)
    assert clip.preprocess(images).shape == (3, 3, 32, 32)  # short side resized, centre crop

    (emb * torch.randn(3, 24)).sum().backward()
    g = images.grad
    assert g is not None and torch.isfinite(g).all()
    assert (g.abs().flatten(1).sum(1) > 0).all()  # every image gets a gradient
    assert g[:, :, :, :4].abs().sum() == 0  # the centre crop drops the left and right borders


def test_clip_vision_only_folder_loads(tmp_path):
    enc = make_image_encoder(f"clip:{save_tiny_clip(tmp_path / 'vision', full=False)}")
    assert enc.dim == 24 and enc.embed(torch.rand(2, 3, 32, 32)).shape == (2, 24)


def test_proxy_on_clip_saves_loads_and_refuses_another_encoder(clip, clip_dir, tmp_path, latent_backend):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(16, 3, 32, 32, generator=g)
    prompts = ["a photo of a red car"] * 8 + ["a watercolor cat, soft light"] * 8
    comparisons = [(i, j, 1.0) for i in range(0, 16, 2) for j in (i + 1,)]
    proxy = RewardProxy(clip, default_prompt_encoder(prompts), n_heads=3)
    assert isinstance(proxy.prompt_encoder, HashedWordsPromptEncoder)
    fit(proxy, images, prompts, comparisons, [(0, 5), (1, 1)], FitConfig(steps=20))
    proxy.save(tmp_path / "proxy")
    meta = json.loads((tmp_path / "proxy" / "reward_proxy.json").read_text())
    assert meta["image_encoder"] == {"name": "clip-image", "dim": 24, "fingerprint": clip.fingerprint(),
                                     "spec": f"clip:{clip_dir}"}

    again = load_proxy(tmp_path / "proxy")  # the encoder is rebuilt from the recorded spec
    with torch.no_grad():
        torch.testing.assert_close(again(images, prompts), proxy(images, prompts))

    other = make_image_encoder(f"clip:{save_tiny_clip(tmp_path / 'other-clip', seed=1)}")
    assert (other.name, other.dim) == (clip.name, clip.dim) and other.fingerprint() != clip.fingerprint()
    with pytest.raises(ValueError, match="weights"):
        RewardProxy.load(tmp_path / "proxy", image_encoder=other)
    with pytest.raises(ValueError, match="clip-image"):
        RewardProxy.load(tmp_path / "proxy", image_encoder=make_image_encoder("vae", latent_backend))
    with pytest.raises(ValueError, match="clip-image"):
        RewardProxy.load(tmp_path / "proxy")  # the default (perception) encoder is refused too


def test_vae_encoder_is_deterministic_and_differentiable(latent_backend):
    enc = make_image_encoder("vae", latent_backend)
    assert isinstance(enc, VAELatentEncoder) and enc.vae is latent_backend.vae
    assert enc.dim == 4 * (2 + 16)
    enc.size = 16  # the tiny VAE: keep the test small
    images = torch.rand(5, 3, 24, 24, requires_grad=True)
    emb = enc.embed(images)
    assert emb.shape == (5, enc.dim) and torch.isfinite(emb).all()
    torch.testing.assert_close(enc.embed(images.detach()), emb.detach())
    emb.sum().backward()
    assert images.grad is not None and (images.grad.abs().flatten(1).sum(1) > 0).all()
    enc.max_batch = 2  # chunked embedding gives the same features
    torch.testing.assert_close(enc.embed(images.detach()), emb.detach(), atol=1e-6, rtol=1e-5)
    assert len(enc.fingerprint()) == 16


def test_vae_options_are_in_the_spec_and_rebuild_the_encoder(latent_backend, tmp_path):
    """size and grid travel in the spec ("vae:size=..,grid=.."); plain "vae" is the defaults."""
    plain = make_image_encoder("vae", latent_backend)
    assert plain.spec == "vae" and (plain.size, plain.grid) == (256, 4)
    assert make_image_encoder(plain.spec, latent_backend).spec == "vae"
    assert VAELatentEncoder(latent_backend.vae, size=256, grid=4).spec == "vae"  # the defaults, spelt out

    enc = VAELatentEncoder(latent_backend.vae, size=16, grid=2)
    assert enc.spec == "vae:size=16,grid=2" and enc.dim == 4 * (2 + 4)
    rebuilt = make_image_encoder(enc.spec, latent_backend)
    assert isinstance(rebuilt, VAELatentEncoder) and (rebuilt.size, rebuilt.grid, rebuilt.dim) == (16, 2, enc.dim)
    images = torch.rand(3, 3, 24, 24)
    torch.testing.assert_close(rebuilt.embed(images), enc.embed(images))
    one = make_image_encoder("vae:grid=3", latent_backend)  # either option alone; the other keeps its default
    assert (one.size, one.grid) == (256, 3) and one.spec == "vae:size=256,grid=3"
    enc.size = 24  # changing an option later changes the spec with it
    assert enc.spec == "vae:size=24,grid=2"

    # a saved proxy records the spec, and load_proxy rebuilds the same encoder from it
    store = FeedbackStore(tmp_path / "store")
    rng = np.random.default_rng(0)
    ids = [store.add_sample((rng.random((24, 24, 3)) * 255).astype(np.uint8), "a photo", seed=i) for i in range(4)]
    store.add_comparison(ids[0], ids[1], "left", "me", 1.0)
    store.add_comparison(ids[2], ids[3], "right", "me", 1.0)
    proxy, _ = train_from_store(store, enc, cfg=FitConfig(steps=2), n_heads=2)
    store.close()
    proxy.save(tmp_path / "proxy")
    loaded = load_proxy(tmp_path / "proxy", backend=latent_backend)
    assert loaded.image_encoder.spec == "vae:size=24,grid=2" and loaded.image_encoder.dim == enc.dim

    for bad in ("vae:size=abc", "vae:depth=3", "vae:size", "vae:size=16,size=32", "vae:grid=0"):
        with pytest.raises(EncoderError, match="vae"):
            make_image_encoder(bad, latent_backend)


class _VideoStub:
    """What make_image_encoder(for_clips=True) asks of a video backend."""

    is_video, vae, image_size, frames = True, None, (32, 32), 8

    def default_reward_encoder(self) -> str:
        return "clip-perception"


def test_for_clips_keeps_clip_encoders_and_wraps_image_ones(clip, clip_dir, latent_backend):
    from rlr_core.shapesworld.clip_perception import ClipPerceptionEncoder

    video = _VideoStub()
    own = make_image_encoder("perception", video, for_clips=True)  # takes clips: used as it is
    assert isinstance(own, ClipPerceptionEncoder) and encoders.takes_clips(own, video)
    per_frame = make_image_encoder(f"clip:{clip_dir}", video, for_clips=True)  # an image encoder: frame by frame
    assert isinstance(per_frame, encoders.PerFrameClipEncoder) and per_frame.spec == f"per-frame:clip:{clip_dir}"
    assert per_frame.embed(torch.rand(2, 8, 3, 32, 32)).shape == (2, 2 * clip.dim)
    fallback = make_image_encoder("vae", video, for_clips=True)  # no VAE here: perception frame by frame
    assert fallback.spec == "per-frame:perception"
    assert make_image_encoder(per_frame.spec, video).spec == per_frame.spec  # the saved spec rebuilds it
    # an image model: for_clips changes nothing
    assert make_image_encoder("vae", latent_backend, for_clips=True).spec == "vae"


def test_free_text_prompt_encoder():
    enc = HashedWordsPromptEncoder(word_buckets=128, bigram_buckets=32)
    f = enc.encode(["A photo of a zebra", "a photo of a zebra", "a zebra of a photo", "an astronaut riding"])
    assert f.shape == (4, 160)
    torch.testing.assert_close(f[0], f[1])  # case does not matter
    assert torch.equal(f[0, :128], f[2, :128]) and not torch.equal(f[0], f[2])  # same words, other order
    assert f[3].sum() >= 3 and not torch.equal(f[0], f[3])  # unknown words count
    assert torch.equal(prompt_encoder_from_config(enc.config()).encode(["a zebra"]), enc.encode(["a zebra"]))
    # the ShapesWorld bag of words would see nothing in these words
    assert BagOfWordsPromptEncoder().encode(["astronaut riding zebra"]).sum() == 0
    assert isinstance(default_prompt_encoder(["a red circle", "a blue square on the left"]), BagOfWordsPromptEncoder)
    assert isinstance(default_prompt_encoder(["a red circle", "an astronaut"]), HashedWordsPromptEncoder)


def test_make_image_encoder_specs_and_errors(builtin_backend, latent_backend, tmp_path, monkeypatch):
    assert make_image_encoder("auto", builtin_backend).name == "shapesworld-perception"
    assert make_image_encoder("perception").spec == "perception"
    with pytest.raises(EncoderError, match="unknown reward encoder"):
        make_image_encoder("resnet")
    with pytest.raises(EncoderError, match="needs a hub id or a folder"):
        make_image_encoder("clip:")
    with pytest.raises(EncoderError, match="needs a latent model"):
        make_image_encoder("vae", builtin_backend)
    (tmp_path / "not-clip").mkdir()
    (tmp_path / "not-clip" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(EncoderError, match="not CLIP"):
        make_image_encoder(f"clip:{tmp_path / 'not-clip'}")

    # auto on a latent model: a known CLIP in the local cache if there is one, else the VAE
    monkeypatch.setattr(encoders, "cached_clip", lambda: None)
    assert make_image_encoder("auto", latent_backend).name == "vae-latent"


def test_auto_finds_a_cached_clip(latent_backend, tmp_path, monkeypatch):
    """A hub-cache layout (models--org--name/snapshots/<rev>) holding a tiny CLIP under a known id."""
    from huggingface_hub import constants

    repo = encoders.KNOWN_CLIPS[0]
    root = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    rev = "0" * 40
    save_tiny_clip(root / "snapshots" / rev)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(rev)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert encoders.cached_clip() == repo
    enc = make_image_encoder("auto", latent_backend)
    assert enc.name == "clip-image" and enc.spec == f"clip:{repo}"


def test_train_from_store_with_clip_and_free_text(clip, tmp_path):
    """Real store, PNGs of two colours, free-text prompts: the proxy learns "red wins"."""
    store = FeedbackStore(tmp_path / "store")
    rng = np.random.default_rng(0)
    ids = []
    for i in range(12):
        base = np.full((32, 32, 3), 0.5) + rng.normal(0, 0.05, (32, 32, 3))
        is_red = i % 2 == 0
        base[..., 0 if is_red else 2] += 0.4
        ids.append(store.add_sample((base.clip(0, 1) * 255).astype(np.uint8), "a vintage photo of a sports car",
                                    seed=i))
    reds, blues = ids[0::2], ids[1::2]
    for k in range(6):  # red beats blue, shown on either side
        store.add_comparison(reds[k], blues[k], "left", "me", 1.0)
        store.add_comparison(blues[k], reds[(k + 1) % 6], "right", "me", 1.0)
    proxy, report = train_from_store(store, clip, cfg=FitConfig(steps=80), n_heads=3)
    assert isinstance(proxy.prompt_encoder, HashedWordsPromptEncoder)
    assert report["n_comparisons"] == 12 and report["train_accuracy"] == 1.0
    store.close()


def test_a_clip_hub_id_comes_from_the_cache_or_the_hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(EncoderError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set.*"
                                           "hf download nobody/no-such-clip"):
        make_image_encoder("clip:nobody/no-such-clip")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    asked = []

    def hub(repo_id, **kwargs):  # the download, recorded: this machine has no hub
        asked.append((repo_id, kwargs))
        raise OSError("no hub here")

    monkeypatch.setattr("huggingface_hub.snapshot_download", hub)
    with pytest.raises(EncoderError, match="the hub did not answer"):
        encoders.clip_folder("nobody/no-such-clip")
    assert asked[0][1] == {"local_files_only": True}  # the cache first
    assert "model.safetensors" in asked[1][1]["allow_patterns"]  # then the hub: safetensors, no pickles
    assert encoders.clip_folder(str(tmp_path)) == str(tmp_path)  # a folder is used as it is

