"""Training rounds (:mod:`.round`), LoRA adapters and version folders (:mod:`.lora`), and the
command line (``python -m rlr_core.training``, :mod:`.cli`)."""

from rlr_core.training.round import (
    DEFAULT_PROMPTS,
    EstimatorConfig,
    Progress,
    RoundResult,
    TrainConfig,
    TrainingDiverged,
    anchor_pool,
    run_round,
    trainable_parameters,
)

__all__ = ["DEFAULT_PROMPTS", "EstimatorConfig", "Progress", "RoundResult", "TrainConfig", "TrainingDiverged",
           "anchor_pool", "run_round", "trainable_parameters"]
