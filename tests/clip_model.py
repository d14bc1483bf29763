"""The clip model the video tests run on: the shipped one (models/shapesworld-clips) when it is
there, else a stand-in in the same format, built once into tests/tmp/ from the image model
(its motion modules are untrained: right for testing the app's path, not its pictures)."""

from __future__ import annotations

from pathlib import Path

from rlr_core.shapesworld import video_model

STAND_IN = Path(__file__).parent / "tmp" / "clip-stand-in"


def clip_model_dir() -> Path:
    if video_model.is_clip_model_folder(video_model.DEFAULT_CLIP_MODEL_DIR):
        return video_model.DEFAULT_CLIP_MODEL_DIR
    if not video_model.is_clip_model_folder(STAND_IN):
        from rlr_core.shapesworld import model

        video_model.from_image_model(model.load_model()).save(STAND_IN)
    return STAND_IN
