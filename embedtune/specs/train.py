"""Training specs: one run's configuration, the settings every trial of a sweep shares, mining."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from embedtune.specs.base import Strict

# The training losses (`train.loss`, or the search axis `search.loss`). The cached forms are the
# same loss computed in chunks of `mini_batch_size` rows (GradCache): memory no longer grows with
# the batch size. The GIST forms use the untouched base model as a frozen guide that masks in-batch
# negatives it scores as close to the anchor as the positive (false negatives: near-duplicates).
Loss = Literal["mnrl", "cached_mnrl", "gist", "cached_gist"]
LOSS_HELP = (
    "mnrl: MultipleNegativesRankingLoss; cached_mnrl: its GradCache form (the same in-batch "
    "negatives, memory set by mini_batch_size instead of the batch size); gist: GISTEmbedLoss with "
    "the base model, frozen, as the guide that drops in-batch false negatives (a second copy of the "
    "model in memory, one more forward pass per step); cached_gist: its GradCache form"
)


class GistSettings(Strict):
    """The GIST losses' guide rule (`gist`, `cached_gist`): an in-batch candidate is masked when
    the frozen base model scores it above the anchor's own positive less the margin."""

    gist_temperature: float = Field(
        0.01,
        gt=0,
        description="gist: similarity temperature (sentence-transformers' default; MNRL's scale 20 is 0.05)",
    )
    gist_margin_strategy: Literal["absolute", "relative"] = Field(
        "relative",
        description="gist: mask candidates the guide scores above positive - margin (absolute) or "
        "positive x (1 - margin) (relative)",
    )
    gist_margin: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="gist: 0.05 relative, as mining's relative_margin: with 0 an exact duplicate of the "
        "positive ties with it and is not masked",
    )


MATRYOSHKA_HELP = (
    "train every listed leading slice of the embedding too (MatryoshkaLoss around train.loss, e.g. "
    "[384, 256, 128, 64]): the model can then be served truncated to any of them, and the final "
    "stage scores each as a cost/quality point; None: the full embedding only"
)


class MatryoshkaSettings(Strict):
    matryoshka_dims: list[int] | None = Field(None, description=MATRYOSHKA_HELP)

    @field_validator("matryoshka_dims")
    @classmethod
    def _dims(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return None
        if not v or any(d < 1 for d in v) or len(set(v)) != len(v):
            raise ValueError(
                "train.matryoshka_dims must be distinct positive dimensions, e.g. [384, 256, 128, 64] "
                "(or left out)"
            )
        return sorted(v, reverse=True)  # the order does not change the loss; one spelling hashes alike


class TrainSettings(GistSettings, MatryoshkaSettings):
    """Fixed training settings shared by every trial of a sweep (its `train:` block)."""

    max_seq_length: int | None = Field(128, ge=8)
    hard_negatives: bool = True
    weight_decay: float = Field(0.01, ge=0)
    fp16: bool = False
    loss: Loss = Field("mnrl", description=LOSS_HELP)
    mini_batch_size: int = Field(
        32, ge=1, description="cached_mnrl / cached_gist: rows per forward/backward chunk"
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations: less memory, ~30% slower")


class TrainConfig(GistSettings, MatryoshkaSettings):
    """Hyperparameters and settings of one fine-tuning run."""

    model: str = "all-MiniLM-L6-v2"
    epochs: int = Field(1, ge=1, description="training epochs (>= 1)")
    lr: float = Field(2e-5, gt=0, lt=1)
    batch_size: int = Field(32, ge=2, description="MNRL needs in-batch negatives: >= 2")
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    lr_schedule: Literal["linear", "constant_with_warmup"] = Field(
        "linear",
        description="linear: warmup over warmup_ratio of all steps, then linear decay to 0 at the end "
        "of the run; constant_with_warmup: warmup over warmup_ratio of ONE epoch's steps, then "
        "constant (the model after e epochs does not depend on the run's total: search.epochs_mode "
        "branch)",
    )
    weight_decay: float = Field(0.01, ge=0)
    seed: int = 42
    max_seq_length: int | None = Field(128, ge=8, description="truncate inputs (None = the model's own)")
    hard_negatives: bool = Field(True, description="train on mined triplets; False = plain pairs")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: all)")
    fp16: bool = Field(False, description="mixed precision on GPU")
    loss: Loss = Field("mnrl", description=LOSS_HELP)
    mini_batch_size: int = Field(
        32, ge=1, description="cached_mnrl / cached_gist: rows per forward/backward chunk"
    )
    gradient_checkpointing: bool = False


class RerankerTrainConfig(Strict):
    """Settings of one cross-encoder reranker training (`final.cross_encoder_train.train_reranker`);
    the defaults are the measured ones (see that module's note)."""

    base: str = Field("all-MiniLM-L6-v2", description="the bi-encoder the cross-encoder starts from")
    epochs: int = 1
    batch_size: int = 16
    max_pairs: int | None = Field(256, description="training pairs, sampled by seed (None = all)")
    max_length: int = 128
    lr: float = 2e-4
    seed: int = 42
    random_negatives: bool = Field(True, description="one random (easy) negative per question too")
    head_lr: float | None = Field(2e-3, description="learning rate of the fresh head and pooler")


class MiningSpec(Strict):
    """Settings passed to `mine_hard_negatives` (see its docs for the meaning of each)."""

    model: str = "all-MiniLM-L6-v2"
    num_negatives: int = Field(1, ge=1, description="negatives per pair (one triplet each)")
    range_min: int = Field(0, ge=0, description="skip the top range_min candidates (likely false negatives)")
    range_max: int | None = Field(50, ge=1, description="consider only the top range_max candidates")
    relative_margin: float | None = Field(
        0.05, ge=0, lt=1, description="negative must score < (1-m) x positive"
    )
    absolute_margin: float | None = Field(None, ge=0)
    sampling_strategy: str = Field("top", pattern="^(top|random)$")
    batch_size: int = Field(64, ge=1)
    max_seq_length: int | None = Field(
        None, ge=8, description="truncate texts while mining (None = the model's own)"
    )

    @model_validator(mode="after")
    def _check(self) -> MiningSpec:
        if self.range_max is not None and self.range_max <= self.range_min:
            raise ValueError(
                f"range_max ({self.range_max}) must be greater than range_min ({self.range_min})"
            )
        return self
