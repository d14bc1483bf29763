import torch

from rlr_core.backends.builtin import BuiltinBackend
from rlr_core.sampler import SamplerSettings, generate
from rlr_core.shapesworld import model as builtin_model


def test_shipped_model_folder_is_small_and_safetensors():
    folder = builtin_model.DEFAULT_MODEL_DIR
    files = [f for f in folder.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 50e6
    weights = [f for f in files if f.suffix in {".bin", ".pt", ".pth", ".ckpt", ".safetensors"}]
    assert weights and all(f.suffix == ".safetensors" for f in weights)


def test_save_load_round_trip_reproduces_outputs(tmp_path):
    model = builtin_model.new_model(seed=3)
    model.save(tmp_path / "m", card={"note": "test"})
    again = builtin_model.load_model(tmp_path / "m")
    assert builtin_model.read_card(tmp_path / "m")["note"] == "test"
    for a, b in [(model.unet, again.unet), (model.text_encoder, again.text_encoder)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert again.scheduler.config.prediction_type == "v_prediction"
    x1 = generate(BuiltinBackend(model), ["a red circle"], SamplerSettings(steps=3), seed=5)
    x2 = generate(BuiltinBackend(again), ["a red circle"], SamplerSettings(steps=3), seed=5)
    assert torch.equal(x1, x2)


def test_generation_is_deterministic_under_a_seed(builtin_backend):
    prompts = ["a large red circle on the left, black background", "a blue square"]
    a = generate(builtin_backend, prompts, SamplerSettings(steps=4), seed=11)
    b = generate(builtin_backend, prompts, SamplerSettings(steps=4), seed=11)
    c = generate(builtin_backend, prompts, SamplerSettings(steps=4), seed=12)
    assert a.shape == (2, 3, 32, 32)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert 0.0 <= a.min() and a.max() <= 1.0


def test_backend_interface_on_builtin(builtin_backend):
    cond = builtin_backend.encode_prompts(["a red circle", ""])
    assert cond.shape[0] == 2 and cond.shape[-1] == builtin_model.TEXT_DIM
    x = torch.randn(2, *builtin_backend.state_shape)
    out = builtin_backend.model_output(x, torch.tensor([500, 500]), cond)
    assert out.shape == x.shape
    images = builtin_backend.decode(x)
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    names = {n.split(".")[-1] for n, _ in builtin_backend.denoiser.named_modules()}
    assert {"to_q", "to_k", "to_v"} <= names


def test_the_unet_sees_pixel_coordinates():
    from rlr_core.shapesworld.model import with_coordinates

    x = torch.zeros(2, 3, 4, 5)
    out = with_coordinates(x)
    assert out.shape == (2, 5, 4, 5)
    assert torch.equal(out[:, 3, 0], torch.linspace(-1, 1, 5).expand(2, 5))  # x runs left to right
    assert torch.equal(out[:, 4, :, 0], torch.linspace(-1, 1, 4).expand(2, 4))  # y runs top to bottom
    unet = builtin_model.new_unet()
    assert unet.config.in_channels == 5 and unet.conv_in.weight.shape[1] == 5


def test_warm_start_from_a_unet_without_coordinate_channels():
    from diffusers import UNet2DConditionModel

    from rlr_core.shapesworld.pretrain import widen_input

    torch.manual_seed(0)
    new = builtin_model.new_unet()
    old = UNet2DConditionModel.from_config({**new.config, "in_channels": 3})
    new.load_state_dict(widen_input(old.state_dict(), new))
    assert torch.equal(new.conv_in.weight[:, :3], old.conv_in.weight)  # the old channels kept
    coords = new.conv_in.weight.detach()[:, 3:]
    assert 0.5 < float(coords.std() / old.conv_in.weight.detach().std()) < 2  # new ones at the same scale
    assert all(torch.equal(v, new.state_dict()[k]) for k, v in old.state_dict().items() if k != "conv_in.weight")


def test_redrawn_token_embeddings_are_distinct_and_scaled():
    from rlr_core.shapesworld.pretrain import redraw_token_embeddings

    model = builtin_model.new_model(seed=1)
    table = model.text_encoder.get_input_embeddings().weight
    before = table.detach().clone()
    redraw_token_embeddings(model, ["left", "right"], scale=3.0)
    ids = [model.tokenizer.convert_tokens_to_ids(w) for w in ("left", "right")]
    changed = (table.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert sorted(changed) == sorted(ids)
    mean_norm = before.norm(dim=1).mean()
    after = table.detach()
    for i in ids:
        assert abs(float(after[i].norm() / mean_norm) - 3.0) < 0.1
    assert float((after[ids[0]] - after[ids[1]]).norm()) > mean_norm


def test_high_noise_timesteps_take_their_fraction_and_range():
    from rlr_core.shapesworld.pretrain import sample_timesteps

    gen = torch.Generator().manual_seed(0)
    t = sample_timesteps(4000, 1000, gen, high_frac=0.5, high_min=900)
    assert 0 <= int(t.min()) and int(t.max()) <= 999
    assert abs(float((t >= 900).float().mean()) - (0.5 + 0.5 * 0.1)) < 0.03  # 0.5 forced + 10% of the rest
    plain = sample_timesteps(50, 1000, torch.Generator().manual_seed(1), 0.0, 900)
    assert torch.equal(plain, torch.randint(0, 1000, (50,), generator=torch.Generator().manual_seed(1)))


def test_pretraining_resumes_bit_for_bit_and_logs_the_position_gap(tmp_path):
    import json

    from safetensors.torch import load_file

    from rlr_core.shapesworld import pretrain

    common = ["--batch", "2", "--every", "2", "--threads", "1", "--warmup", "2", "--high-noise-frac", "0.5"]
    pretrain.main(["--out", str(tmp_path / "straight"), "--steps", "4", *common])
    pretrain.main(["--out", str(tmp_path / "resumed"), "--steps", "2", *common])
    pretrain.main(["--out", str(tmp_path / "resumed"), "--steps", "4", "--resume", *common])
    a = load_file(tmp_path / "straight" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    gaps = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    gaps = [g["position_gap"] for g in gaps if "position_gap" in g]
    assert len(gaps) == 2 and all(g >= 0 for g in gaps)
    assert (tmp_path / "straight" / "grid_000004.png").exists()
