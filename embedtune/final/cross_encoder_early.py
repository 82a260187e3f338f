"""The final stage's cross-encoders, trained and gated beside the trials.

A cross-encoder trained here depends only on the data, its mined negatives and the spec, never on
a trial, so the driver trains it in a thread of its own while Ray Tune runs the trials (the driver
is otherwise idle then; on a cluster it runs on the head, whose cores the trials do not use) and
gates it on its held-back questions there too. The final stage takes a finished job as it is when
it is the job it would run itself (`RerankerJob.key`), else trains (a cache hit, keyed by the same
inputs) and gates again. Measured by `make bench --only sweep` (README, "Where the time went"): the
final stage 205 s → 121 s. Ctrl-C or a failed trial phase stops the training at its next step and
caches nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedtune.data import PreparedData
from embedtune.errors import EmbedtuneError
from embedtune.final.cross_encoder_gate import GateResult, gate_cross_encoder, held_back_questions
from embedtune.final.cross_encoder_train import TrainingStopped, train_reranker
from embedtune.specs import FinalSpec, MiningSpec, RerankerTrainConfig

log = logging.getLogger(__name__)


@dataclass
class RerankerJob:
    """One dataset's cross-encoder, as the final stage makes it: trained without the held-back
    training questions, then gated on them against the dataset's bi-encoder (`cross_encoder_gate`)."""

    label: str
    data: PreparedData
    triplets: Any  # its mined triplets (None: mined for the cross-encoder's base when trained)
    held_back: set[str]
    config: RerankerTrainConfig
    bi_encoder: str  # the ordering it must improve: the dataset's first base model
    metric: str
    batch_size: int
    max_seq_length: int | None  # the bi-encoder's input cut, as the final stage evaluates it

    def key(self) -> tuple:
        """What makes two jobs the same work (the data by fingerprint, the negatives by cache key)."""
        trip = getattr(self.triplets, "key", None)
        return (self.label, self.data.fingerprint, trip, self.config, self.bi_encoder, self.metric,
                self.batch_size, self.max_seq_length, tuple(sorted(self.held_back)))  # fmt: skip

    def train(self, stop: threading.Event | None = None) -> Path:
        from embedtune.negatives import mine

        trip = self.triplets or mine(self.data, MiningSpec(model=self.config.base))
        return train_reranker(self.data, trip, self.config, exclude=self.held_back, stop=stop)

    def gate(self, path: Path) -> GateResult | None:
        return gate_cross_encoder(
            self.data,
            self.held_back,
            str(path),
            self.bi_encoder,
            self.metric,
            self.batch_size,
            self.max_seq_length,
        )


def reranker_jobs(
    spec: FinalSpec,
    datasets: dict[str, PreparedData],
    triplets: dict[str, Any],
    bi_encoders: dict[str, str] | None = None,
) -> Iterator[RerankerJob]:
    """The cross-encoder trainings `spec` asks for (none unless `cross_encoder: train` and the
    cross-encoder is among the rerankers); `bi_encoders[label]` (default: the cross-encoder's own
    base) is what each must beat."""
    if spec.cross_encoder != "train" or "cross-encoder" not in spec.eval.rerankers:
        return
    config = RerankerTrainConfig(base=spec.cross_encoder_base, max_pairs=spec.cross_encoder_max_pairs)
    for label, data in datasets.items():
        yield RerankerJob(
            label,
            data,
            triplets.get(label),
            held_back_questions(data),
            config,
            (bi_encoders or {}).get(label, spec.cross_encoder_base),
            spec.leaderboard_metric,
            spec.eval.batch_size,
            spec.eval.max_seq_length,
        )


class EarlyCrossEncoders:
    """Train `jobs` in a background thread; `wait()` before the final stage, `cancel()` when the
    sweep stops short of it. A failure is logged, not raised: the final stage trains again and
    reports it there."""

    def __init__(self, jobs: list[RerankerJob]) -> None:
        self.jobs = jobs
        self.done: dict[str, tuple[RerankerJob, Path, GateResult | None]] = {}  # label -> job, model, gate
        self.seconds: float | None = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="embedtune-cross-encoder", daemon=True)

    @classmethod
    def start(
        cls,
        spec: FinalSpec,
        datasets: dict[str, PreparedData],
        triplets: dict[str, Any],
        bi_encoders: dict[str, str] | None = None,
    ) -> EarlyCrossEncoders | None:
        jobs = list(reranker_jobs(spec, datasets, triplets, bi_encoders))
        if not jobs:
            return None
        early = cls(jobs)
        early._thread.start()
        log.info("training %d cross-encoder(s) beside the trials", len(jobs))
        return early

    def _run(self) -> None:
        started = time.monotonic()
        try:
            for job in self.jobs:
                if self._stop.is_set():
                    return
                path = job.train(self._stop)
                self.done[job.label] = (job, path, job.gate(path))
        except TrainingStopped:
            pass
        except Exception as exc:  # noqa: BLE001 - logged; the final stage retrains and raises there
            self.error = exc
            log.warning(
                "cross-encoder training beside the trials failed (%s); the final stage retries it", exc
            )
        finally:
            self.seconds = time.monotonic() - started

    def wait(self) -> dict[str, tuple[RerankerJob, Path, GateResult | None]]:
        """Until the training is done: label -> (job, model folder, gate result) of each finished."""
        self._thread.join()
        if self.error is None and self.seconds is not None:
            log.info("cross-encoder(s) trained and gated beside the trials in %.0f s", self.seconds)
        return dict(self.done)

    def cancel(self, timeout: float = 120.0) -> None:
        """Stop at the next training step and wait for the thread (nothing half-trained is cached)."""
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise EmbedtuneError(f"the cross-encoder training did not stop within {timeout:.0f} s")

    @property
    def running(self) -> bool:
        return self._thread.is_alive()
