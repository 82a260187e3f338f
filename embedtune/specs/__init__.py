"""Every spec (pydantic, validated before any work starts) and every shared constant: the bottom
layer, imported by each stage, importing none of them."""

from embedtune.specs.data import DataSpec
from embedtune.specs.evaluation import EncodeBackend, EvalSpec, FinalSpec, OodSpec, QueryType, RerankerName
from embedtune.specs.load import load_spec, parse_spec
from embedtune.specs.sweep import (
    CheckpointSpec,
    Distribution,
    MlflowSpec,
    RaySpec,
    Resources,
    SchedulerSpec,
    SearchSpace,
    SweepSpec,
)
from embedtune.specs.train import MiningSpec, RerankerTrainConfig, TrainConfig, TrainSettings

__all__ = [
    "CheckpointSpec",
    "DataSpec",
    "Distribution",
    "EncodeBackend",
    "EvalSpec",
    "FinalSpec",
    "MiningSpec",
    "MlflowSpec",
    "OodSpec",
    "QueryType",
    "RaySpec",
    "RerankerName",
    "RerankerTrainConfig",
    "Resources",
    "SchedulerSpec",
    "SearchSpace",
    "SweepSpec",
    "TrainConfig",
    "TrainSettings",
    "load_spec",
    "parse_spec",
]
