"""The built-in clip model: the image model's UNet with AnimateDiff motion modules.

AnimateDiff turns an image UNet into a video UNet by running the image layers on every frame
and inserting temporal transformers (a diffusers ``MotionAdapter``) after each ResNet or
attention layer. diffusers' ``UNetMotionModel.from_unet2d`` does this for SD-like UNets, but it
drops two parts the built-in image model depends on: the coordinate input channels and the
caption pooled into the timestep embedding (``addition_embed_type="text"``). So here the image
UNet is kept whole and the adapter's modules run after the same layers through forward hooks;
both parts save and load with their library's ``save_pretrained`` / ``from_pretrained``, the
way AnimateDiff ships a motion adapter beside an image model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, MotionAdapter, UNet2DConditionModel
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from transformers import CLIPTextModel, PreTrainedTokenizerFast

from rlr_core.shapesworld import model as image_model
from rlr_core.shapesworld import text
from rlr_core.shapesworld.clips import NUM_FRAMES
from rlr_core.shapesworld.trajectory import TrajectoryHead, shift_frames, whole_pixel_offsets
from rlr_core.shapesworld.world import IMAGE_SIZE

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CLIP_MODEL_DIR = REPO_ROOT / "models" / "shapesworld-clips"
MODEL_KIND = "shapesworld-clips"


class _MotionHook:
    """Runs one motion module on a layer's output. A plain object holding its owner, so that
    ``copy.deepcopy`` of the owner (versions, training copies) points the copy's hooks at the
    copy's own motion modules."""

    def __init__(self, owner: MotionUNet, block: str, index: int, layer: int):
        self.owner, self.block, self.index, self.layer = owner, block, index, layer

    def __call__(self, module: torch.nn.Module, args, output):
        adapter = self.owner.motion_adapter
        group = adapter.mid_block if self.block == "mid" else getattr(adapter, self.block)[self.index]
        motion = group.motion_modules[self.layer]
        frames = self.owner.current_frames
        if isinstance(output, tuple):  # attention layers return (hidden_states,)
            return (motion(output[0], num_frames=frames), *output[1:])
        if hasattr(output, "sample"):
            output.sample = motion(output.sample, num_frames=frames)
            return output
        return motion(output, num_frames=frames)


class MotionUNet(PeftAdapterMixin, torch.nn.Module):  # diffusers' LoRA methods, as on its UNets
    """An image UNet run per frame, with a ``MotionAdapter``'s temporal layers between its layers.
    LoRA adapters attach through diffusers' ``PeftAdapterMixin``, as on any diffusers model.

    ``forward`` takes clips (B, F, C, H, W), a timestep per clip and one caption encoding per
    clip, and returns ``.sample`` of the clips' shape, like a diffusers model.

    With a ``trajectory_head`` (:mod:`rlr_core.shapesworld.trajectory`), the network sees each
    clip in the moving shape's frame of reference: frames are shifted back by the caption's
    velocity on the way in and forward on the way out. ``velocity`` (B, 2) overrides the head's
    reading (training passes the true one; guidance passes the conditional one to both halves)."""

    def __init__(self, unet: UNet2DConditionModel, motion_adapter: MotionAdapter,
                 trajectory_head: TrajectoryHead | None = None):
        super().__init__()
        self.unet = unet
        self.motion_adapter = motion_adapter
        self.trajectory_head = trajectory_head
        self.current_frames = 1
        self._attach()

    def _attach(self) -> None:
        for block, blocks in (("down_blocks", self.unet.down_blocks), ("up_blocks", self.unet.up_blocks)):
            for i, unet_block in enumerate(blocks):
                layers = list(getattr(unet_block, "attentions", None) or unet_block.resnets)
                group = getattr(self.motion_adapter, block)[i].motion_modules
                # With fewer temporal layers than image layers, they follow the last ones.
                first = len(layers) - len(group)
                for j, layer in enumerate(layers[first:]):
                    layer.register_forward_hook(_MotionHook(self, block, i, j))
        if self.motion_adapter.mid_block is not None:
            self.unet.mid_block.attentions[0].register_forward_hook(_MotionHook(self, "mid", 0, 0))

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def velocity(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Pixels per frame (B, 2) the captions ask for; None for a model without a head."""
        return None if self.trajectory_head is None else self.trajectory_head(encoder_hidden_states)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int,
                encoder_hidden_states: torch.Tensor, return_dict: bool = True,
                velocity: torch.Tensor | None = None, **kwargs):
        b, f = sample.shape[:2]
        timestep = torch.as_tensor(timestep, device=sample.device)
        timestep = timestep.expand(b) if timestep.ndim == 0 else timestep
        self.current_frames = f
        frames = sample.flatten(0, 1)
        if velocity is None:
            velocity = self.velocity(encoder_hidden_states)
        if velocity is not None:
            offsets = whole_pixel_offsets(velocity, f).flatten(0, 1)
            frames = shift_frames(frames, -offsets)  # into the shape's frame of reference
        out = self.unet(frames, timestep.repeat_interleave(f),
                        encoder_hidden_states.repeat_interleave(f, dim=0), **kwargs).sample
        if velocity is not None:
            out = shift_frames(out, offsets)
        out = out.unflatten(0, (b, f))
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


def new_motion_adapter(max_frames: int = 16) -> MotionAdapter:
    """Motion modules sized to the image UNet; their output projections start at zero, so the
    new clip model starts as the image model run on each frame (as AnimateDiff initialises)."""
    adapter = MotionAdapter(
        block_out_channels=(32, 64, 96),
        # No temporal layers in the 32x32 down block and one (not two) in the 32x32 up block:
        # most of the cost at the full resolution for little gain (motion is decided coarse);
        # the clip model then samples 4 clips in about the time budget (docs/video.md).
        motion_layers_per_block=(0, 1, 1),
        motion_num_attention_heads=(2, 4, 4),
        motion_norm_num_groups=16,
        motion_max_seq_length=max_frames,
        use_motion_mid_block=True,
    )
    for module in adapter.modules():
        if hasattr(module, "proj_out") and isinstance(module.proj_out, torch.nn.Linear):
            torch.nn.init.zeros_(module.proj_out.weight)
            torch.nn.init.zeros_(module.proj_out.bias)
    return adapter


@dataclass
class ClipModel:
    """The built-in clip model's parts, saved in a diffusers-style folder."""

    denoiser: MotionUNet
    text_encoder: CLIPTextModel
    tokenizer: PreTrainedTokenizerFast
    scheduler: DDIMScheduler
    num_frames: int = NUM_FRAMES

    def save(self, path: str | Path, card: dict | None = None) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.denoiser.unet.save_pretrained(path / "unet", safe_serialization=True)
        self.denoiser.motion_adapter.save_pretrained(path / "motion_adapter", safe_serialization=True)
        if self.denoiser.trajectory_head is not None:
            self.denoiser.trajectory_head.save_pretrained(path / "trajectory_head", safe_serialization=True)
        self.text_encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
        self.tokenizer.save_pretrained(path / "tokenizer")
        self.scheduler.save_pretrained(path / "scheduler")
        index = {"kind": MODEL_KIND, "image_size": IMAGE_SIZE, "num_frames": self.num_frames, **(card or {})}
        (path / "model_index.json").write_text(json.dumps(index, indent=2))

    def to(self, device: torch.device | str) -> ClipModel:
        self.denoiser.to(device)
        self.text_encoder.to(device)
        return self


def from_image_model(image: image_model.BuiltinModel, seed: int = 0) -> ClipModel:
    """The start of clip pretraining: the image model's weights, fresh (zero-output) motion
    modules, and the text encoder with rows for the clip grammar's new words."""
    torch.manual_seed(seed)
    tokenizer = text.build_tokenizer(video=True)
    old_vocab, new_vocab = image.tokenizer.get_vocab(), tokenizer.get_vocab()
    assert all(new_vocab[w] == i for w, i in old_vocab.items()), "clip vocabulary must extend the image one"
    text_encoder = image.text_encoder
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():  # new words start near the existing words' embedding scale
        table = text_encoder.get_input_embeddings().weight
        old = table[: len(old_vocab)]
        table[len(old_vocab):] = old.mean(0) + old.std(0) * torch.randn(len(new_vocab) - len(old_vocab), table.shape[1])
    head = TrajectoryHead(embed_dim=text_encoder.config.hidden_size)
    return ClipModel(MotionUNet(image.unet, new_motion_adapter(), head), text_encoder, tokenizer, image.scheduler)


def is_clip_model_folder(path: str | Path) -> bool:
    index = Path(path) / "model_index.json"
    return index.is_file() and json.loads(index.read_text()).get("kind") == MODEL_KIND


def load_clip_model(path: str | Path = DEFAULT_CLIP_MODEL_DIR) -> ClipModel:
    path = Path(path)
    if not is_clip_model_folder(path):
        raise FileNotFoundError(f"{path} is not a built-in clip model folder")
    card = json.loads((path / "model_index.json").read_text())
    unet = image_model.PositionAwareUNet.from_pretrained(path / "unet")
    head = TrajectoryHead.from_pretrained(path / "trajectory_head") if (path / "trajectory_head").is_dir() else None
    return ClipModel(
        denoiser=MotionUNet(unet, MotionAdapter.from_pretrained(path / "motion_adapter"), head),
        text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder"),
        tokenizer=PreTrainedTokenizerFast.from_pretrained(path / "tokenizer"),
        scheduler=DDIMScheduler.from_pretrained(path / "scheduler"),
        num_frames=int(card.get("num_frames", NUM_FRAMES)),
    )
