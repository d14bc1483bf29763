"""The built-in ShapesWorld model: its architecture, and its folder on disk.

A pixel-space diffusers ``UNet2DConditionModel``, a 2-layer transformers ``CLIPTextModel``
over the word-level tokenizer of :mod:`rlr_core.shapesworld.text`, and a diffusers ``DDIMScheduler``.
Each part is saved by its own library's ``save_pretrained`` (safetensors) in a sub-folder,
the way a diffusers pipeline folder is laid out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from rlr_core.shapesworld import text
from rlr_core.shapesworld.world import IMAGE_SIZE

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "shapesworld-tiny"
TEXT_DIM = 64


COORD_CHANNELS = 2


def with_coordinates(sample: torch.Tensor) -> torch.Tensor:
    """Append two channels holding each pixel's x and y in [-1, 1]."""
    b, _, h, w = sample.shape
    ys = torch.linspace(-1, 1, h, device=sample.device, dtype=sample.dtype)
    xs = torch.linspace(-1, 1, w, device=sample.device, dtype=sample.dtype)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"))  # (2, h, w): x then y
    return torch.cat([sample, grid.expand(b, -1, -1, -1)], dim=1)


class PositionAwareUNet(UNet2DConditionModel):
    """A ``UNet2DConditionModel`` that knows where each pixel is (CoordConv, Liu et al. 2018).

    "On the left" must become a shape on the left at the very first sampling step, when the
    input is pure noise: a plain UNet has no positional signal there but zero-padding effects.
    (Added to a model trained without it, it was not enough on its own: position words took a
    curriculum too; see the model card.) Two coordinate channels are appended to the input (``in_channels`` counts
    them); callers pass 3-channel images as usual. Saved and loaded with diffusers' own
    ``save_pretrained`` / ``from_pretrained``; LoRA (peft) sees the same module tree.
    """

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, *args, **kwargs):
        return super().forward(with_coordinates(sample), timestep, encoder_hidden_states, *args, **kwargs)


@dataclass
class BuiltinModel:
    unet: UNet2DConditionModel  # a PositionAwareUNet, or a plain one in older model folders
    text_encoder: CLIPTextModel
    tokenizer: PreTrainedTokenizerFast
    scheduler: DDIMScheduler

    def save(self, path: str | Path, card: dict | None = None) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(path / "unet", safe_serialization=True)
        self.text_encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
        self.tokenizer.save_pretrained(path / "tokenizer")
        self.scheduler.save_pretrained(path / "scheduler")
        index = {"kind": "shapesworld-builtin", "image_size": IMAGE_SIZE, **(card or {})}
        (path / "model_index.json").write_text(json.dumps(index, indent=2))

    def to(self, device: torch.device | str) -> BuiltinModel:
        self.unet.to(device)
        self.text_encoder.to(device)
        return self


def encode_captions(model: BuiltinModel, captions: list[str], device: torch.device | str) -> torch.Tensor:
    """Caption encodings (B, L, D) from a built-in image or clip model's tokenizer and text
    encoder, padded to the tokenizer's fixed length. Captions are used as given (no checking)."""
    ids = model.tokenizer(captions, padding="max_length", max_length=model.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids.to(device)
    return model.text_encoder(ids).last_hidden_state


def new_scheduler() -> DDIMScheduler:
    # Cosine schedule: reaches (almost) pure noise at t = T, the schedule of choice for
    # small pixel-space images; v-prediction keeps the targets well scaled at every t.
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        clip_sample=True,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
    )


def new_unet() -> PositionAwareUNet:
    # Attention only at 16x16 and 8x8: the 32x32 level is convolution-only, which keeps
    # a 20-step sample of 8 images within a few seconds on two CPU cores.
    # addition_embed_type="text" attention-pools the caption into the timestep embedding, so
    # every ResNet block sees the global attributes (kind, colour, background, position), not
    # only the cross-attention layers: the scene-level choices are made at high noise, where
    # the spatial features are still mostly noise.
    unet = PositionAwareUNet(
        sample_size=IMAGE_SIZE,
        in_channels=3 + COORD_CHANNELS,
        out_channels=3,
        block_out_channels=(32, 64, 96),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        layers_per_block=1,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=16,
        norm_num_groups=16,
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )
    # Zero-initialised output (as in adaLN-zero): a new pooled-text path starts as a no-op, so
    # weights from a model without it load unchanged and it is learned from there.
    torch.nn.init.zeros_(unet.add_embedding.norm2.weight)
    torch.nn.init.zeros_(unet.add_embedding.norm2.bias)
    return unet


def new_text_encoder(tokenizer: PreTrainedTokenizerFast) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=4 * TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=text.MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def new_model(seed: int = 0) -> BuiltinModel:
    """A randomly initialised built-in model (the start of pretraining)."""
    torch.manual_seed(seed)
    tokenizer = text.build_tokenizer()
    return BuiltinModel(new_unet(), new_text_encoder(tokenizer), tokenizer, new_scheduler())


def load_model(path: str | Path = DEFAULT_MODEL_DIR) -> BuiltinModel:
    path = Path(path)
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(f"{path} is not a built-in model folder (no model_index.json)")
    return BuiltinModel(
        unet=_unet_class(path / "unet").from_pretrained(path / "unet"),
        text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder"),
        tokenizer=PreTrainedTokenizerFast.from_pretrained(path / "tokenizer"),
        scheduler=DDIMScheduler.from_pretrained(path / "scheduler"),
    )


def _unet_class(folder: Path) -> type[UNet2DConditionModel]:
    """The class the folder was saved from: model folders from before the coordinate channels
    hold a plain ``UNet2DConditionModel`` and still load."""
    name = json.loads((folder / "config.json").read_text()).get("_class_name")
    return PositionAwareUNet if name == PositionAwareUNet.__name__ else UNet2DConditionModel


def read_card(path: str | Path = DEFAULT_MODEL_DIR) -> dict:
    return json.loads((Path(path) / "model_index.json").read_text())
