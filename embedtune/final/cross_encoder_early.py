"""The final stage's cross-encoders, trained beside the trials.

A cross-encoder trained here depends only on the data, its mined negatives and the spec, never on
a trial, so the driver starts that training in a thread of its own while Ray Tune runs the trials
(the driver is otherwise idle then; on a cluster it runs on the head, whose cores the trials do not
use). The final stage then finds each model in the reranker cache (`train_reranker` caches by its
inputs) and only gates it. Measured on `make sweep-local` (2 cores, both busy with trials): the
cross-encoder part of the final stage went from ~100 s to the gate alone (README, "Where the time
went"). Ctrl-C or a failed trial phase stops the training at its next step and caches nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from embedtune.data import PreparedData
from embedtune.errors import EmbedtuneError
from embedtune.final.cross_encoder_gate import held_back_questions
from embedtune.final.cross_encoder_train import TrainingStopped, train_reranker
from embedtune.specs import FinalSpec, MiningSpec, RerankerTrainConfig

log = logging.getLogger(__name__)


@dataclass
class RerankerJob:
    """One dataset's cross-encoder training, as the final stage runs it."""

    label: str
    data: PreparedData
    triplets: Any  # its mined triplets (None: mined for the cross-encoder's base when trained)
    held_back: set[str]
    config: RerankerTrainConfig

    def train(self, stop: threading.Event | None = None):
        from embedtune.negatives import mine

        trip = self.triplets or mine(self.data, MiningSpec(model=self.config.base))
        return train_reranker(self.data, trip, self.config, exclude=self.held_back, stop=stop)


def reranker_jobs(
    spec: FinalSpec, datasets: dict[str, PreparedData], triplets: dict[str, Any]
) -> Iterator[RerankerJob]:
    """The cross-encoder trainings `spec` asks for (none unless `cross_encoder: train` and the
    cross-encoder is among the rerankers)."""
    if spec.cross_encoder != "train" or "cross-encoder" not in spec.eval.rerankers:
        return
    config = RerankerTrainConfig(base=spec.cross_encoder_base, max_pairs=spec.cross_encoder_max_pairs)
    for label, data in datasets.items():
        yield RerankerJob(label, data, triplets.get(label), held_back_questions(data), config)


class EarlyCrossEncoders:
    """Train `jobs` in a background thread; `wait()` before the final stage, `cancel()` when the
    sweep stops short of it. A failure is logged, not raised: the final stage trains again and
    reports it there."""

    def __init__(self, jobs: list[RerankerJob]) -> None:
        self.jobs = jobs
        self.seconds: float | None = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="embedtune-cross-encoder", daemon=True)

    @classmethod
    def start(
        cls, spec: FinalSpec, datasets: dict[str, PreparedData], triplets: dict[str, Any]
    ) -> EarlyCrossEncoders | None:
        jobs = list(reranker_jobs(spec, datasets, triplets))
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
                job.train(self._stop)
        except TrainingStopped:
            pass
        except Exception as exc:  # noqa: BLE001 - logged; the final stage retrains and raises there
            self.error = exc
            log.warning(
                "cross-encoder training beside the trials failed (%s); the final stage retries it", exc
            )
        finally:
            self.seconds = time.monotonic() - started

    def wait(self) -> None:
        """Until the training is done (the final stage's own calls then hit the cache)."""
        self._thread.join()
        if self.error is None and self.seconds is not None:
            log.info("cross-encoder(s) trained beside the trials in %.0f s", self.seconds)

    def cancel(self, timeout: float = 120.0) -> None:
        """Stop at the next training step and wait for the thread (nothing half-trained is cached)."""
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise EmbedtuneError(f"the cross-encoder training did not stop within {timeout:.0f} s")

    @property
    def running(self) -> bool:
        return self._thread.is_alive()
