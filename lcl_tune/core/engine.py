"""The training loop: plain PyTorch, no Ray, no MLflow.

``Trainer(cfg).run()`` yields one report (a flat dict of scalars plus ``details``) after every
evaluation period; the Ray trainable reports and checkpoints each of them, the CLI prints them.
``Trainer.fit()`` runs to the end and returns the summary. Everything a trial does is decided by
its :class:`~lcl_tune.schema.trial.TrialConfig` and its seed: on CPU the same seed gives the same metrics.

The objective of the main encoder is ``λ·CE + (1−λ)·contrastive`` (``λ = loss.lam``), where the
contrastive term is SCL or LCL on the [CLS] vector; a ``separate`` weighting network adds its own
``λ·CE`` (see :mod:`lcl_tune.core.weighting`).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lcl_tune.schema.trial import ConfigError, TrialConfig
from lcl_tune.core.data import (PreparedData, RawData, batch_indices, bucketed_batch_indices, load_raw,
                                 majority_accuracy, prepare_data)
from lcl_tune.core.losses import label_aware_contrastive_loss, mixed_objective, supervised_contrastive_loss
from lcl_tune.core.metrics import classification_metrics
from lcl_tune.core.model import EncoderClassifier, build_classifier, is_builtin, load_tokenizer, tokenizer_source
from lcl_tune.core.rng import RngStreams
from lcl_tune.core.weighting import WeightingNetwork, build_weighting
from lcl_tune.util import atomic_write
from lcl_tune.util import log as logger

Report = dict[str, Any]


def seed_everything(seed: int) -> None:
    """Seed every RNG the loop touches (Python, numpy, torch CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device: {name} requested but CUDA is not available. Fix: --set train.device=cpu")
    return torch.device(name)


def set_cuda_precision(device: torch.device, precision: str, tf32: bool) -> None:
    """On a GPU: fp32 matmuls in TF32 where the GPU has it (``train.tf32``, on by default: about
    8× the fp32 matmul rate on Ampere and newer for a 10-bit mantissa, which fine-tuning does not
    notice; off for full fp32), and a warning when bf16 would be emulated (T4, V100: slower than
    fp32). Nothing on a CPU."""
    if device.type != "cuda":
        return
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    if precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        logger.warning(f"train.precision=bf16 on {torch.cuda.get_device_name(device)}, which has no native bf16 "
                       "(compute capability below 8.0): emulated, slower than fp32. Fix: --set train.precision=fp32")


def prepare_trial_data(cfg: TrialConfig, *, raw: RawData | None = None,
                       progress: bool = True) -> tuple[PreparedData, PreparedData | None]:
    """Tokenised data for the main encoder, plus a second tokenisation when a ``separate`` weighting
    encoder uses a different tokenizer (rows align: both come from the same raw data, read once;
    ``raw`` when the caller has read it already)."""
    main_tok = tokenizer_source(cfg.model.name, cfg.model.tokenizer)
    raw = raw if raw is not None else load_raw(cfg.data)
    data = prepare_data(cfg.data, load_tokenizer(cfg.model.name, cfg.model.tokenizer), cfg.model.max_length,
                        raw=raw, progress=progress)
    w_name = cfg.weighting.model
    if not (cfg.uses_weighting_encoder and w_name):
        return data, None
    if tokenizer_source(w_name) == main_tok:
        return data, None
    w_data = prepare_data(cfg.data, load_tokenizer(w_name), cfg.model.max_length, raw=raw, progress=progress)
    return data, w_data


def _param_groups(model: nn.Module, lr: float, head_lr: float, weight_decay: float, tag: str) -> list[dict]:
    """AdamW groups: no weight decay on biases and LayerNorm weights (the usual BERT recipe); the
    task heads of the classifiers in ``model`` (the layers outside their encoders) at ``head_lr``."""
    heads = {id(p) for m in model.modules() if isinstance(m, EncoderClassifier) for p in m.head_parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = id(p) in heads
        no_decay = p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name
        groups.setdefault((is_head, no_decay), []).append(p)
    return [{"params": ps, "lr": head_lr if is_head else lr, "weight_decay": 0.0 if nd else weight_decay,
             "name": f"{tag}.{'head' if is_head else 'encoder'}{'.no_decay' if nd else ''}"}
            for (is_head, nd), ps in groups.items()]


def linear_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up to 1, then linear decay to 0 at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


class Trainer:
    """One fine-tuning run. Build it, then iterate :meth:`run` or call :meth:`fit`."""

    def __init__(self, cfg: TrialConfig, data: PreparedData | None = None, w_data: PreparedData | None = None,
                 *, log: Callable[[str], None] | None = None, progress: bool = True, device: str | None = None):
        """``device`` overrides ``cfg.train.device`` without changing the config the trial records
        (the trainable's choice from what the trial reserved; see ``adapters.trainable.trial_device``)."""
        self.cfg = cfg
        self.log = log or logger.info
        self.progress = progress
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        self.device = pick_device(device or t.device)
        self.use_bf16 = t.precision == "bf16" and self.device.type == "cuda"
        set_cuda_precision(self.device, t.precision, t.tf32)
        if t.precision == "bf16" and not self.use_bf16:
            logger.warning("train.precision=bf16 runs on CUDA only; training in fp32 on CPU")

        if data is None:
            data, w_data = prepare_trial_data(cfg, progress=progress)
        self.data, self.w_data = data, w_data
        c = data.num_labels

        # Same seed -> the same initial main model, batches and main-encoder dropout masks in every
        # arm, whatever the weighting choice: each purpose draws from its own stream (core/rng.py).
        seed_everything(cfg.seed)
        self.rng = RngStreams(cfg.seed, self.device)
        with self.rng.use("init"):
            self.model = _classifier(cfg.model.name, cfg.model.tokenizer, c, cfg.model.random_init,
                                     cfg.model.dropout, data.label_names, cfg.model.head_init).to(self.device)
        self.weighting: WeightingNetwork | None = None
        if cfg.uses_weighting:
            own = cfg.weighting.model  # None: a second copy of the main encoder
            with self.rng.use("weighting_init"):
                self.weighting = build_weighting(
                    cfg.weighting, c, len(data.train),
                    lambda: _classifier(own or cfg.model.name, None if own else cfg.model.tokenizer, c,
                                        cfg.model.random_init and not own, cfg.model.dropout, data.label_names,
                                        cfg.model.head_init),
                ).to(self.device)

        o = cfg.optim
        groups = _param_groups(self.model, o.lr, o.head_lr or o.lr, o.weight_decay, "main")
        if self.weighting is not None and any(True for _ in self.weighting.parameters()):
            groups += _param_groups(self.weighting, o.weighting_lr or o.lr, o.weighting_lr or o.head_lr or o.lr,
                                    o.weight_decay, "weighting")
        self.optimizer = torch.optim.AdamW(groups, lr=o.lr, eps=o.adam_eps, fused=True if o.fused else None)
        if t.compile:  # in place: parameter names (and so checkpoints) stay those of the eager model
            # Dynamo caches graphs per code object, so in a reused actor every earlier trial's graphs
            # (another dropout is another guarded constant) stay in the same caches until the
            # recompile limit sends the encoder back to eager, silently: each trial starts clean.
            # Dynamic shapes: one graph for every padded length and the last short batch.
            torch._dynamo.reset()
            self.model.compile(dynamic=True)
            if self.weighting is not None and self.weighting.has_encoder:
                self.weighting.classifier.compile(dynamic=True)

        self.steps_per_epoch, self.total_steps, self.eval_every = cfg.schedule(len(data.train))
        # train.stop_step ends training early on the full schedule: the state a study selected at that step
        self.end_step = min(self.total_steps, t.stop_step or self.total_steps)
        warmup = int(o.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, linear_schedule(warmup, self.total_steps))

        self.step = 0
        self.samples = 0
        self.best: float | None = None
        self.best_step = 0
        self.history: list[dict[str, float]] = []
        self.train_seconds = 0.0
        self.test: dict[str, Any] | None = None  # the test split's evaluation, when train.eval_test asks

    # ------------------------------------------------------------------ the loop

    def run(self) -> Iterator[Report]:
        """Train to ``end_step`` (``total_steps`` unless ``train.stop_step``); yield a report after
        every evaluation period."""
        t = self.cfg.train
        sums: dict[str, torch.Tensor] = {}  # loss parts summed on the device: no host sync per step
        n = 0
        window_start, window_samples = time.perf_counter(), 0
        while self.step < self.end_step:
            for rows in self.epoch_batches(self.step // self.steps_per_epoch)[self.step % self.steps_per_epoch:]:
                t0 = time.perf_counter()  # (resumed runs skip the batches they already did)
                parts = self._step(rows)
                self.train_seconds += time.perf_counter() - t0
                for k, v in parts.items():
                    sums[k] = sums[k] + v if k in sums else v
                n += 1
                window_samples += len(rows)
                log_now = self.progress and (self.step % t.log_every == 0 or self.step == self.end_step)
                eval_now = self.step % self.eval_every == 0 or self.step == self.end_step
                if log_now or eval_now:
                    t1 = time.perf_counter()
                    means = {k: float(v) / n for k, v in sums.items()}  # the one host sync of a window
                    self.train_seconds += time.perf_counter() - t1  # waiting for the device is training time
                if log_now:
                    rate = window_samples / max(time.perf_counter() - window_start, 1e-9)
                    self.log(self._progress_line(means, rate))
                    window_start, window_samples = time.perf_counter(), 0
                if eval_now:
                    yield self._report(means)
                    sums, n = {}, 0
                if self.step >= self.end_step:
                    break

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """This epoch's batches; a function of (seed, epoch) only, so arms with the same seed see
        the same batches and a resumed run continues the same order."""
        t = self.cfg.train
        if t.length_buckets:
            return bucketed_batch_indices(self.data.train.lengths, t.batch_size, seed=self.cfg.seed, epoch=epoch)
        return batch_indices(len(self.data.train), t.batch_size, shuffle=True, seed=self.cfg.seed, epoch=epoch)

    def train_step(self, rows: np.ndarray) -> dict[str, float]:
        """One optimiser step on the training rows ``rows``; returns the loss parts as floats."""
        return {k: float(v) for k, v in self._step(rows).items()}

    def _step(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """One optimiser step; the loss parts stay on the device (detached)."""
        self.model.train()
        if self.weighting is not None:
            self.weighting.train()
        batch = self._batch(self.data.train, rows, self.w_data.train if self.w_data else None)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            total, parts = self.objective(batch)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.cfg.optim.max_grad_norm > 0:  # per network: a weighting encoder's gradients never shrink the main one's
            for net in (self.model, self.weighting):
                params = [p for p in net.parameters() if p.grad is not None] if net is not None else []
                if params:
                    torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.samples += len(rows)
        return parts

    def objective(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``λ·CE + (1−λ)·contrastive`` (+ the weighting network's own ``λ·CE``)."""
        loss = self.cfg.loss
        with self.rng.use("dropout"):
            logits, cls = self.model(batch["input_ids"], batch["attention_mask"])
        labels = batch["labels"]
        ce = F.cross_entropy(logits.float(), labels)
        parts: dict[str, torch.Tensor] = {"ce": ce.detach()}
        contrastive, extra = None, None
        if loss.name == "scl" and loss.lam < 1:
            contrastive = supervised_contrastive_loss(cls, labels, loss.temperature)
        elif self.weighting is not None:  # lcl with λ < 1
            with self.rng.use("weighting_dropout"):
                w = self.weighting(batch, logits, loss.lam)
            # labels were range-checked once, in PreparedData: no host sync per step
            contrastive = label_aware_contrastive_loss(cls, labels, w.probs, loss.temperature, check_labels=False)
            extra = w.loss
        total = mixed_objective(ce, contrastive, loss.lam if loss.name != "ce" else 1.0)
        if contrastive is not None:
            parts["contrastive"] = contrastive.detach()
        if extra is not None:
            total = total + extra
            parts["weighting_ce"] = extra.detach() / loss.lam
        parts["loss"] = total.detach()
        return total, parts

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def predict(self, split: str = "dev") -> torch.Tensor:
        """The model's logits [n, C] (fp32, on the CPU) for every row of ``split``, in row order.

        Rows are batched in length order (less padding); the order changes no row's prediction.
        """
        data = getattr(self.data, split)
        if data is None:
            raise ValueError(f"no {split} split in this dataset")
        self.model.eval()
        order = np.argsort(data.lengths, kind="stable")
        bs = self.cfg.train.eval_batch_size
        out = torch.empty(len(data), self.data.num_labels)
        for start in range(0, len(order), bs):
            rows = order[start:start + bs]
            batch = self._batch(data, rows, None)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
                logits, _ = self.model(batch["input_ids"], batch["attention_mask"])
            out[torch.from_numpy(rows)] = logits.float().cpu()
        return out

    def evaluate(self, split: str = "dev") -> dict[str, Any]:
        """CE loss, accuracy, macro-/weighted-F1, per-class F1 and confusion matrix on ``split``."""
        logits = self.predict(split)
        labels = getattr(self.data, split).labels
        out = classification_metrics(labels, logits.argmax(-1).numpy(), self.data.label_names)
        out["loss"] = float(F.cross_entropy(logits, torch.tensor(labels), reduction="sum")) / max(len(labels), 1)
        return out

    # ------------------------------------------------------------------ reports

    def _report(self, means: dict[str, float]) -> Report:
        t = self.cfg.train
        dev = self.evaluate("dev")
        value = dev[t.metric]
        better = self.best is None or (value < self.best if t.metric == "loss" else value > self.best)
        if better:
            self.best, self.best_step = value, self.step
        report: Report = {
            "step": self.step,
            "period": len(self.history) + 1,
            "epoch": round(self.step / self.steps_per_epoch, 4),
            "samples": self.samples,
            "lr": self.scheduler.get_last_lr()[0],
            **{f"train/{k}": v for k, v in means.items()},
            **{f"dev/{k}": dev[k] for k in ("loss", "accuracy", "macro_f1", "weighted_f1")},
            f"best/dev/{t.metric}": self.best,
            "best/step": self.best_step,
            "time/train_s": self.train_seconds,
            "time/samples_per_s": self.samples / max(self.train_seconds, 1e-9),
            "finished": self.step >= self.end_step,
        }
        details = {"label_names": self.data.label_names, "dev/per_class_f1": dev["per_class_f1"],
                   "dev/confusion": dev["confusion"]}
        if report["finished"] and t.eval_test and self.data.test is not None:  # once, at the end, never earlier
            self.test = self.evaluate("test")
            report.update({f"test/{k}": self.test[k] for k in ("loss", "accuracy", "macro_f1", "weighted_f1")})
            details.update({"test/per_class_f1": self.test["per_class_f1"], "test/confusion": self.test["confusion"]})
        self.history.append({k: v for k, v in report.items() if isinstance(v, (int, float))})
        report["details"] = details
        if self.progress:
            self.log(f"eval step {self.step}: dev acc {dev['accuracy']:.4f} macro-F1 {dev['macro_f1']:.4f} "
                     f"weighted-F1 {dev['weighted_f1']:.4f} (best {t.metric} {self.best:.4f} @ {self.best_step})")
        return report

    def _progress_line(self, means: dict[str, float], rate: float) -> str:
        parts = " ".join(f"{k} {v:.4f}" for k, v in means.items() if k != "loss")
        left = (self.total_steps - self.step) * self.cfg.train.batch_size / max(rate, 1e-9)
        return (f"step {self.step}/{self.total_steps} | epoch {self.step / self.steps_per_epoch:.2f} | "
                f"loss {means.get('loss', 0.0):.4f} ({parts}) | lr {self.scheduler.get_last_lr()[0]:.2e} | "
                f"{rate:.1f} samples/s | eta {_fmt_seconds(left)}")

    def fit(self, on_report: Callable[[Report], None] | None = None) -> dict[str, Any]:
        """Run to the end, handing each report to ``on_report``; return the summary: the last
        report, the best value of the selection metric, the history and (if asked) the test split."""
        start = time.perf_counter()
        last: Report = {}
        for last in self.run():
            if on_report is not None:
                on_report(last)
        summary = {"final": {k: v for k, v in last.items() if k != "details"}, "details": last.get("details", {}),
                   "best": {"metric": f"dev/{self.cfg.train.metric}", "value": self.best, "step": self.best_step},
                   "history": self.history, "label_names": self.data.label_names,
                   "data_fingerprint": self.data.fingerprint, "majority_dev_accuracy": majority_accuracy(self.data),
                   "wall_s": time.perf_counter() - start}
        if self.test is not None:
            summary["test"] = self.test
        return summary

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, optimiser, schedule, counters, RNG.

        Only tensors and plain containers, so :func:`torch.load` with ``weights_only=True`` reads it
        (a checkpoint never executes pickled code)."""
        return {
            "model": self.model.state_dict(),
            "weighting": self.weighting.state_dict() if self.weighting is not None else {},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "trainer": {"step": self.step, "samples": self.samples, "best": self.best, "best_step": self.best_step,
                        "history": self.history, "train_seconds": self.train_seconds},
            "rng": self.rng.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.weighting is not None:
            self.weighting.load_state_dict(state["weighting"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        tr = state["trainer"]
        self.step, self.samples, self.best, self.best_step = tr["step"], tr["samples"], tr["best"], tr["best_step"]
        self.history, self.train_seconds = list(tr["history"]), tr["train_seconds"]
        self.rng.load_state_dict(state["rng"])

    def save(self, path: str | os.PathLike) -> None:
        atomic_write(path, lambda tmp: torch.save(self.state_dict(), tmp))

    def restore(self, path: str | os.PathLike) -> None:
        """Load a checkpoint written on any device: everything is read to the CPU, then
        ``load_state_dict`` places each tensor where its parameter lives (the model's and the
        optimiser's on the trial's device; the random states stay CPU byte tensors, which is all
        ``set_rng_state`` accepts).

        Raises :class:`DamagedCheckpoint` when the file cannot be read (truncated, corrupt, not a
        checkpoint) and :class:`ConfigError` when it belongs to another model shape; in both cases
        nothing of the trainer has changed yet."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - zip, pickle and EOF errors all mean "unreadable"
            first = (str(e).splitlines() or [""])[0][:160]
            raise DamagedCheckpoint(f"{path}: cannot be read ({type(e).__name__}{': ' + first if first else ''})") from e
        if not isinstance(state, dict) or not {"model", "optimizer", "trainer"} <= set(state):
            raise DamagedCheckpoint(f"{path}: not a training checkpoint (no model/optimizer/trainer state)")
        self._check_shapes(path, state["model"], self.model.state_dict(), "model")
        if self.weighting is not None:
            self._check_shapes(path, state.get("weighting") or {}, self.weighting.state_dict(), "weighting")
        self.load_state_dict(state)

    @staticmethod
    def _check_shapes(path: str | os.PathLike, saved: dict[str, Any], own: dict[str, Any], part: str) -> None:
        """A checkpoint of another architecture, label count or weighting choice: one line, before loading."""
        missing = sorted(set(own) - set(saved))
        wrong = [k for k in own if k in saved and tuple(saved[k].shape) != tuple(own[k].shape)]
        if missing or wrong:
            k = (wrong or missing)[0]
            what = (f"{k} has shape {tuple(saved[k].shape)}, this trial's {tuple(own[k].shape)}" if wrong
                    else f"{len(missing)} of this trial's tensors are missing, e.g. {k}")
            raise ConfigError(f"{part} checkpoint", f"{path} was written by another model shape ({what})",
                              "resume with the config that wrote it, or start a new study name")

    # ------------------------------------------------------------------ helpers

    def _batch(self, split, rows: np.ndarray, w_split) -> dict[str, torch.Tensor]:
        pad_to = self.cfg.train.pad_to
        batch = split.collate(rows, self.data.pad_id, pad_to)
        if w_split is not None:
            wb = w_split.collate(rows, self.w_data.pad_id, pad_to)
            batch["w_input_ids"], batch["w_attention_mask"] = wb["input_ids"], wb["attention_mask"]
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}


class DamagedCheckpoint(RuntimeError):
    """A checkpoint file that cannot be read: truncated by a crash or a full disk, or corrupt."""


def restore_first_good(trainer: Trainer, candidates: list[Path]) -> Path | None:
    """Restore the newest of ``candidates`` (newest first) that can be read, warning for each
    damaged one by name; None, with a warning, when none can (the trial starts at step 0). A
    checkpoint of another model shape is a config error, not damage: it is raised."""
    for path in candidates:
        try:
            trainer.restore(path)
            return path
        except DamagedCheckpoint as e:
            logger.warning(f"damaged checkpoint {e}; falling back to the previous one")
    if candidates:
        logger.warning(f"none of the {len(candidates)} checkpoints could be restored: starting from step 0")
    return None


def _classifier(name: str, tokenizer: str | None, num_labels: int, random_init: bool, dropout: float,
                label_names: list[str], head_init: str) -> EncoderClassifier:
    """Build a classifier; built-in random architectures take their tokenizer's vocabulary size."""
    vocab = len(load_tokenizer(name, tokenizer)) if is_builtin(name) else None
    return build_classifier(name, num_labels, random_init=random_init, dropout=dropout, vocab_size=vocab,
                            label_names=label_names, head_init=head_init)


def _fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def train(cfg: TrialConfig, **kwargs: Any) -> dict[str, Any]:
    """Convenience: ``Trainer(cfg, **kwargs).fit()``."""
    return Trainer(cfg, **kwargs).fit()


