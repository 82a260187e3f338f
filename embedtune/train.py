"""One fine-tuning run: sentence-transformers' trainer with MultipleNegativesRankingLoss (or GIST).

`train()` is the function a sweep trial calls: it evaluates the base model (epoch 0), trains for
the asked epochs with a TripletEvaluator + InformationRetrievalEvaluator at the end of every
epoch, hands each epoch's metrics (and, if asked, a checkpoint) to a callback, and writes the
final model plus `metrics.json`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path

from embedtune import env
from embedtune.data import PreparedData
from embedtune.errors import EmbedtuneError
from embedtune.memory import PeakMemory
from embedtune.negatives import Triplets
from embedtune.records import EpochPoint, best_point
from embedtune.rundir import TRAIN_MARKER
from embedtune.specs import TrainConfig
from embedtune.specs.metrics import DEFAULT_SWEEP_METRIC, IR_K

log = logging.getLogger(__name__)


@dataclass
class EpochMetrics(EpochPoint):
    seconds: float = 0.0


@dataclass
class TrainResult:
    model_dir: Path | None
    history: list[EpochMetrics] = field(default_factory=list)
    duration_s: float = 0.0
    device: str = "cpu"
    loss: str = ""  # the loss class that trained
    gradient_checkpointing: bool = False  # whether the trained model recomputed its activations

    def best(self, metric: str = DEFAULT_SWEEP_METRIC) -> EpochMetrics | None:
        """The best trained epoch by `metric` (the base model's when nothing was trained)."""
        return best_point(self.history, metric) or (self.history[0] if self.history else None)

    def to_json(self) -> dict:
        return {
            "model_dir": str(self.model_dir),
            "duration_s": self.duration_s,
            "device": self.device,
            "loss": self.loss,
            "gradient_checkpointing": self.gradient_checkpointing,
            "history": [asdict(h) for h in self.history],
        }


# (epoch, metrics, checkpoint dir or None) -> None. A Ray trial reports to Tune from here.
EpochCallback = Callable[[int, dict[str, float], Path | None], None]


def clean_metric_name(key: str) -> str:
    """`eval_ir_cosine_recall@10` -> `ir_recall_at_10` (MLflow metric names cannot hold '@')."""
    key = key.removeprefix("eval_").replace("cosine_", "").replace("@", "_at_")
    return key


def evaluator_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The retrieval and triplet metrics of an evaluator's (or the trainer's eval) output, renamed
    with `clean_metric_name`."""
    out = {}
    for k, v in metrics.items():
        name = clean_metric_name(k)
        if name.startswith(("ir_", "triplet_")) and isinstance(v, int | float):
            out[name] = float(v)
    return out


def build_evaluator(data: PreparedData, triplets: Triplets | None, batch_size: int = 64):
    # Its metrics key the base scores kept across runs: a change bumps BASE_SCORES_VERSION (sweep.inputs).
    from sentence_transformers.sentence_transformer.evaluation import (
        InformationRetrievalEvaluator,
        SequentialEvaluator,
        TripletEvaluator,
    )

    ir = InformationRetrievalEvaluator(
        queries=data.queries,
        corpus=data.corpus,
        relevant_docs={q: set(c) for q, c in data.relevant.items()},
        accuracy_at_k=list(IR_K),
        precision_recall_at_k=list(IR_K),
        mrr_at_k=[10],
        ndcg_at_k=[10],
        map_at_k=[10],
        batch_size=batch_size,
        name="ir",
        write_csv=False,
        score_functions=None,
    )
    evaluators = [ir]
    if triplets is not None and len(triplets.eval):
        ev = triplets.eval
        evaluators.insert(
            0,
            TripletEvaluator(
                ev["anchor"],
                ev["positive"],
                ev["negative"],
                name="triplet",
                batch_size=batch_size,
                write_csv=False,
            ),
        )
    return SequentialEvaluator(evaluators)


# Fault injection for reliability tests (like Ray's RAY_testing_* switches): the models named here
# (comma-separated, as in a spec's `models:`) get NaN weights as they are loaded for training, so
# their loss really goes NaN in the real trainer. Never set in normal use.
FAULT_ENV = "EMBEDTUNE_FAULT_NAN_WEIGHTS"


def _inject_fault(model, name: str) -> None:
    poisoned = {m.strip() for m in os.environ.get(FAULT_ENV, "").split(",") if m.strip()}
    if name in poisoned:
        import torch

        log.warning("%s: poisoning the weights of %s", FAULT_ENV, name)
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))


def training_rows(config: TrainConfig, data: PreparedData, triplets: Triplets | None):
    """The rows MNRL trains on: (anchor, positive, negative) triplets, or plain (anchor, positive) pairs."""
    from datasets import Dataset

    if config.hard_negatives:
        return triplets.train.select_columns(["anchor", "positive", "negative"])
    return Dataset.from_dict({"anchor": [q for q, _ in data.train], "positive": [a for _, a in data.train]})


class _EpochReporter:
    """Trainer callback (built by `_reporter`): at each epoch's evaluation, the metrics (with the
    last training loss and samples/s of optimizer steps) go to `history` and `on_epoch`, with a
    saved checkpoint when asked. A NaN/inf loss fails the run loudly (its trial is FAILED), not
    "finishes"."""

    def __init__(
        self, config, model, rows, start_epoch, history, on_epoch, scratch, checkpoint_every_epoch, timer
    ) -> None:
        self.config, self.model, self.rows = config, model, rows
        self.start_epoch, self.history, self.on_epoch = start_epoch, history, on_epoch
        self.scratch, self.checkpoint_every_epoch, self.timer = scratch, checkpoint_every_epoch, timer
        self.epoch_started = time.time()
        self.peak = PeakMemory("cpu")  # `train` sets the device's

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epoch_started = time.time()
        self.peak.reset()  # each epoch's peaks (training and its evaluation) are its own

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        epoch = self.start_epoch + max(1, round(state.epoch or 0))
        cleaned = evaluator_metrics(metrics or {})
        losses = [h["loss"] for h in state.log_history if "loss" in h]
        if losses:
            cleaned["train_loss"] = float(losses[-1])
        bad = next((float(x) for x in losses if not math.isfinite(float(x))), None)
        if bad is not None:
            raise EmbedtuneError(
                f"training loss went {bad} by epoch {epoch} (lr {self.config.lr:g}): the run diverged; "
                "lower the learning rate"
            )
        step_s = self.timer.take()
        if step_s > 0:  # training rows per second of optimizer steps (evaluation excluded)
            cleaned["train_samples_per_s"] = len(self.rows) / step_s
        cleaned.update(self.peak.read())
        self.history.append(EpochMetrics(epoch, cleaned, time.time() - self.epoch_started))
        _log_epoch(epoch, cleaned)
        ckpt = None
        every = self.checkpoint_every_epoch
        if every is True or (every and not isinstance(every, bool) and epoch in every):
            ckpt = self.scratch / f"epoch-{epoch}"
            self.model.save(str(ckpt / "model"))
        if self.on_epoch:
            self.on_epoch(epoch, cleaned, ckpt)
        if ckpt is not None:
            shutil.rmtree(ckpt, ignore_errors=True)


def _reporter(*args):
    from transformers import TrainerCallback

    class EpochReporter(_EpochReporter, TrainerCallback):
        pass

    return EpochReporter(*args)


def _training_args(config: TrainConfig, scratch: Path, rows, start_epoch: int, device: str, progress: bool):
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments

    steps_per_epoch = max(1, math.ceil(len(rows) / config.batch_size))
    if config.lr_schedule == "constant_with_warmup":
        # Warmup measured in one epoch's steps, not the run's: nothing depends on the total.
        warmup: int | float = math.ceil(config.warmup_ratio * steps_per_epoch)
    else:
        warmup = (
            config.warmup_ratio
        )  # a float below 1 is a ratio (`warmup_ratio` is deprecated in transformers 5)
    return SentenceTransformerTrainingArguments(
        output_dir=str(scratch / "trainer"),
        num_train_epochs=config.epochs - start_epoch,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.lr,
        lr_scheduler_type=config.lr_schedule,
        warmup_steps=warmup if start_epoch == 0 else 0,
        weight_decay=config.weight_decay,
        seed=config.seed,
        batch_sampler=BatchSamplers.NO_DUPLICATES,  # duplicates in a batch are false in-batch negatives
        eval_strategy="epoch",
        save_strategy="no",
        logging_steps=max(1, steps_per_epoch // 4),
        logging_nan_inf_filter=False,  # a NaN/inf loss must show in the log: it fails the run
        report_to="none",
        disable_tqdm=not progress,
        use_cpu=device == "cpu",
        fp16=config.fp16 and device == "cuda",
        activation_checkpointing=config.gradient_checkpointing,
        dataloader_num_workers=0,
    )


def load_guide(config: TrainConfig, device: str):
    """The GIST losses' guide: the untouched base model (`config.model`, from its local folder, also
    when a run resumes from a checkpoint), truncated like the model it guides and frozen: no
    gradients (the trainer's optimizer collects every trainable parameter of the loss), eval mode."""
    from sentence_transformers import SentenceTransformer

    from embedtune.models import resolve_model, truncate

    guide = SentenceTransformer(str(resolve_model(config.model)), device=device)
    truncate(guide, config.max_seq_length)
    guide.requires_grad_(False)
    return guide.eval()


def build_loss(config: TrainConfig, model, guide=None):
    """The spec's `train.loss`: MNRL, or its cached (GradCache) form, whose activation memory is set
    by `mini_batch_size` rather than the batch size (same in-batch negatives, slower); GIST and its
    cached form with `guide` (default: `load_guide`) masking the in-batch false negatives."""
    from sentence_transformers.sentence_transformer.losses import (
        CachedGISTEmbedLoss,
        CachedMultipleNegativesRankingLoss,
        GISTEmbedLoss,
        MultipleNegativesRankingLoss,
    )

    if config.loss == "cached_mnrl":
        loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=config.mini_batch_size)
    elif config.loss in ("gist", "cached_gist"):
        guide = guide if guide is not None else load_guide(config, str(model.device))
        rule = {
            "temperature": config.gist_temperature,
            "margin_strategy": config.gist_margin_strategy,
            "margin": config.gist_margin,
        }
        if config.loss == "cached_gist":
            loss = CachedGISTEmbedLoss(model, guide, mini_batch_size=config.mini_batch_size, **rule)
        else:
            loss = GISTEmbedLoss(model, guide, **rule)
    else:
        loss = MultipleNegativesRankingLoss(model)
    return matryoshka(loss, model, config.matryoshka_dims)


def matryoshka(loss, model, dims: list[int] | None):
    """`loss` on each leading slice `dims` of the embedding as well (MatryoshkaLoss, equal weights;
    it handles the cached losses' chunks itself), or `loss` as it is without dims."""
    if not dims:
        return loss
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss

    full = int((getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension)())
    if max(dims) > full:
        raise EmbedtuneError(
            f"train.matryoshka_dims {dims}: the model embeds in {full} dimensions; "
            f"list dimensions of at most {full}"
        )
    return MatryoshkaLoss(model, loss, matryoshka_dims=dims)


def checkpointing_on(model) -> bool:
    """Whether any module of `model` recomputes its activations in the backward pass."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _save(model, out_dir: Path, result: TrainResult) -> None:
    """Write the final model and metrics.json: `out_dir` appears whole or not at all."""
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save(str(staging))
        (staging / "metrics.json").write_text(json.dumps(result.to_json(), indent=2))
        (staging / TRAIN_MARKER).write_text("written by embedtune train\n")  # --overwrite may replace it
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)


def train(
    config: TrainConfig,
    data: PreparedData,
    triplets: Triplets | None,
    out_dir: Path | None,
    on_epoch: EpochCallback | None = None,
    checkpoint_every_epoch: bool | Collection[int] = False,
    resume_from: Path | None = None,
    start_epoch: int = 0,
    progress: bool = True,
    evaluate_base: bool = True,
    scratch_root: Path | None = None,
) -> TrainResult:
    """Fine-tune `config.model` on `data` and write the final model to `out_dir`.

    `resume_from` + `start_epoch` continue a run from a per-epoch checkpoint (model weights; the
    optimizer restarts, with no second warmup). With `checkpoint_every_epoch` (True, or the epochs to
    checkpoint), each such epoch's model is saved to `<ckpt>/model` and `<ckpt>` is passed to
    `on_epoch` (None for the others), then deleted once it returns (a Tune report has copied it to
    storage by then). `out_dir=None` skips writing the final model
    (a sweep trial's last checkpoint already holds it). Scratch files go under `scratch_root`
    (default: the system temp dir); none is left behind, also on a crash or Ctrl-C."""
    if config.hard_negatives and triplets is None:
        raise EmbedtuneError(
            "hard_negatives is on but no triplets were given; mine them first (embedtune.negatives.mine)"
        )
    import torch
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from transformers.trainer_callback import PrinterCallback

    from embedtune.models import resolve_model, truncate

    if config.threads:
        torch.set_num_threads(config.threads)
    device = env.device()
    started = time.time()
    source = resolve_model(config.model) if resume_from is None else Path(resume_from)
    model = SentenceTransformer(str(source), device=device)
    truncate(model, config.max_seq_length)
    _inject_fault(model, config.model)
    rows = training_rows(config, data, triplets)
    if len(rows) < config.batch_size:
        log.warning("only %d training rows for batch size %d", len(rows), config.batch_size)
    evaluator = build_evaluator(data, triplets)
    history: list[EpochMetrics] = []
    if start_epoch == 0 and evaluate_base:
        t0 = time.time()
        base = evaluator_metrics(evaluator(model))
        history.append(EpochMetrics(0, base, time.time() - t0))
        _log_epoch(0, base)
        if on_epoch:
            on_epoch(0, base, None)
    scratch = Path(tempfile.mkdtemp(prefix="embedtune-train-", dir=scratch_root))
    loss = build_loss(config, model)
    try:
        if config.epochs > start_epoch:
            timer = step_timer()
            reporter = _reporter(
                config, model, rows, start_epoch, history, on_epoch, scratch, checkpoint_every_epoch, timer
            )
            reporter.peak = PeakMemory(device)
            trainer = SentenceTransformerTrainer(
                model=model,
                args=_training_args(config, scratch, rows, start_epoch, device, progress),
                train_dataset=rows,
                loss=loss,
                evaluator=evaluator,
                callbacks=[timer, reporter],
            )
            if not progress:  # no per-step log dicts either (a sweep shows its own progress)
                trainer.remove_callback(PrinterCallback)
            trainer.train()
        result = TrainResult(Path(out_dir) if out_dir else None, history, time.time() - started, device,
                             type(loss).__name__, checkpointing_on(model))  # fmt: skip
        if out_dir is not None:
            _save(model, Path(out_dir), result)
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def step_timer():
    """A TrainerCallback summing the wall time of training steps (forward, backward, optimizer):
    the same clock for a sweep trial and `make bench`'s plain training script. `take()` returns the
    seconds since the last call."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds = 0.0
            self._began = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds += time.perf_counter() - self._began

        def take(self) -> float:
            seconds, self.seconds = self.seconds, 0.0
            return seconds

    return StepTimer()


def _log_epoch(epoch: int, metrics: dict[str, float]) -> None:
    keys = [
        "ir_recall_at_10",
        "ir_accuracy_at_1",
        "ir_mrr_at_10",
        "ir_ndcg_at_10",
        "triplet_accuracy",
        "train_loss",
    ]
    shown = "  ".join(f"{k.removeprefix('ir_')}={metrics[k]:.4f}" for k in keys if k in metrics)
    label = "base" if epoch == 0 else f"epoch {epoch}"
    log.info("%8s: %s", label, shown)


# ---------------------------------------------------------------- memory probe


def probe_memory(
    config: TrainConfig, device: str | None = None
) -> dict[str, float | int | str | bool | None]:
    """One optimizer step of `config` at its worst case, measured: `batch_size` rows whose texts all
    fill `max_seq_length` tokens (with a negative column when `hard_negatives`), through the same
    training arguments and loss as `train`. Returns the span's peaks (`peak_gpu_bytes`: reserved on
    CUDA, None elsewhere; `peak_rss_bytes`), the device's total memory and name, whether gradient
    checkpointing was on, and `out_of_memory` when the step did not fit the device at all."""
    import dataclasses

    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from transformers.trainer_callback import PrinterCallback

    from embedtune.models import resolve_model, truncate

    device = device or env.device()
    peak = PeakMemory(device)
    if peak.cuda:
        torch.cuda.empty_cache()
    peak.reset()  # the model's weights count: a trial holds them too
    started = time.time()
    model = SentenceTransformer(str(resolve_model(config.model)), device=device)
    truncate(model, config.max_seq_length)
    filler = " word" * (config.max_seq_length or model.max_seq_length or 512)  # longer than the cap
    columns = ["anchor", "positive", "negative"] if config.hard_negatives else ["anchor", "positive"]
    rows = Dataset.from_dict({c: [f"{c} {i}{filler}" for i in range(config.batch_size)] for c in columns})
    scratch = Path(tempfile.mkdtemp(prefix="embedtune-probe-"))
    try:
        args = _training_args(config.model_copy(update={"epochs": 1}), scratch, rows, 0, device, False)
        args = dataclasses.replace(args, max_steps=1, eval_strategy="no", logging_strategy="no")
        trainer = SentenceTransformerTrainer(
            model=model, args=args, train_dataset=rows, loss=build_loss(config, model)
        )
        trainer.remove_callback(PrinterCallback)
        out_of_memory = False
        try:
            trainer.train()
        except torch.OutOfMemoryError:  # the answer, not a failure: it needs more than the device
            out_of_memory = True
            trainer = None
        out = {
            "device": device,
            "device_name": torch.cuda.get_device_name() if peak.cuda else "cpu",
            "device_total_bytes": torch.cuda.get_device_properties(0).total_memory if peak.cuda else None,
            "peak_gpu_bytes": peak.peak_gpu_bytes(),
            "peak_rss_bytes": peak.peak_rss_bytes(),
            "gradient_checkpointing": checkpointing_on(model),
            "seconds": time.time() - started,
            "out_of_memory": out_of_memory,
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    del model
    if peak.cuda:
        torch.cuda.empty_cache()
    return out
