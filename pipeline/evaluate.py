"""Stage 5, evaluate: test metrics and figures.

In: the fitted model, Encoded arrays (the test split is read here for the first time), the fit's
history and an EvaluateConfig. Out: Evaluation, with test_loss, test_accuracy, test_precision,
test_recall, test_f1_score, test_roc_auc and the confusion counts, the test probabilities, and figures
(matplotlib Figures, no pyplot state, drawn in fixed margins): the tutorial's loss and accuracy curves, the ROC
and precision-recall curves and the confusion matrix. `checkpoints` evaluates the fit's best and last epochs alike
(see Checkpoints) and leaves the model holding the weights evaluate.serve chose.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd

from pipeline.config import EvaluateConfig


@dataclass
class Evaluation:
    metrics: dict[str, float]
    probabilities: np.ndarray  # P(positive) for each test review, in test order
    figures: dict[str, object] = field(default_factory=dict)  # file name -> matplotlib Figure


# Each figure's margins, fixed: what layout="tight" found for these labels, without measuring them at every draw
CURVE_MARGINS = dict(left=0.09, right=0.98, bottom=0.11, top=0.93)
SQUARE_MARGINS = dict(left=0.13, right=0.98, bottom=0.1, top=0.98)  # ROC and precision-recall (square axes)
MATRIX_MARGINS = dict(left=0.22, right=0.96, bottom=0.11, top=0.93)


def figure_in(size: tuple[float, float], margins: dict):
    """A matplotlib Figure (not pyplot: no backend chosen, no figure kept open in the caller's process) of `size`
    inches whose axes sit in `margins` (fractions of the figure)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=size)
    figure.subplots_adjust(**margins)  # (Figure(subplotpars=...) is reset by the figure's own clear())
    return figure


def curves(history: pd.DataFrame) -> dict[str, object]:
    """The tutorial's figures: training vs validation loss, and training vs validation accuracy."""
    figures = {}
    for metric, title in (("loss", "Training and validation loss"), ("accuracy", "Training and validation accuracy")):
        figure = figure_in((7, 4.5), CURVE_MARGINS)
        axes = figure.subplots()
        axes.plot(history["epoch"], history[metric], "o", markersize=4, label=f"Training {metric}")
        axes.plot(history["epoch"], history[f"val_{metric}"], "-", label=f"Validation {metric}")
        if metric == "loss":
            best = history.loc[history["val_loss"].idxmin()]
            axes.axvline(best["epoch"], color="grey", linestyle=":", linewidth=1,
                         label=f"lowest validation loss (epoch {int(best['epoch'])})")
        axes.set(title=title, xlabel="Epoch", ylabel=metric.capitalize())
        axes.legend()
        figures[f"{metric}.png"] = figure
    return figures


def predict(model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """P(positive) for each row of `x`: the model called on `batch_size` rows at a time (evaluate.batch_size), eagerly.
    For one pass this is quicker than model.predict, which first builds an input pipeline and traces a predict
    function; each call costs a few milliseconds beyond its rows, so the calls are few and big."""
    return np.concatenate([np.asarray(model(x[start:start + batch_size], training=False)).reshape(-1)
                           for start in range(0, len(x), batch_size)] or [np.zeros(0, np.float32)])


def evaluate(model, data, history: pd.DataFrame, cfg: EvaluateConfig) -> Evaluation:
    """Score the test split once and draw the training curves."""
    return score(predict(model, data.x_test, cfg.batch_size), data.y_test, history, cfg)


def score(probabilities: np.ndarray, y_test: np.ndarray, history: pd.DataFrame, cfg: EvaluateConfig,
          drawn: Optional[dict] = None) -> Evaluation:
    """The test metrics and figures from the model's test probabilities. `drawn`: these probabilities' threshold
    figures, drawn before (filled here when empty): the same figures, not drawn again."""
    drawn = {} if drawn is None else drawn
    if not drawn:
        predicted = (probabilities > cfg.threshold).astype(int)
        drawn.update(threshold_curves(y_test.astype(int), probabilities, predicted))
    return Evaluation(metrics=measure(probabilities, y_test, cfg), probabilities=probabilities,
                      figures={**curves(history), **drawn})


def measure(probabilities: np.ndarray, y_test: np.ndarray, cfg: EvaluateConfig) -> dict[str, float]:
    """test_loss, test_accuracy, test_precision, ... and the confusion counts, from the test probabilities."""
    from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score, roc_auc_score

    # Loss and accuracy follow from the probabilities as Keras computes them (binary cross-entropy with
    # outputs clipped to [1e-7, 1 - 1e-7]; accuracy at 0.5).
    predicted = (probabilities > cfg.threshold).astype(int)
    truth = y_test.astype(int)
    clipped = np.clip(probabilities.astype(np.float64), 1e-7, 1 - 1e-7)
    loss = -np.mean(truth * np.log(clipped) + (1 - truth) * np.log1p(-clipped))
    accuracy = np.mean((probabilities > 0.5) == truth)
    metrics = {
        "test_loss": float(loss),
        "test_accuracy": float(accuracy),
        "test_precision": float(precision_score(truth, predicted, zero_division=0)),
        "test_recall": float(recall_score(truth, predicted, zero_division=0)),
        "test_f1_score": float(f1_score(truth, predicted, zero_division=0)),
        "test_roc_auc": float(roc_auc_score(truth, probabilities)),
    }
    counts = confusion_matrix(truth, predicted, labels=[0, 1]).ravel()
    metrics.update({f"test_{name}": float(count) for name, count in
                    zip(("true_negatives", "false_positives", "false_negatives", "true_positives"), counts)})
    return metrics


@dataclass
class Checkpoint:
    role: str  # best, last, "best,last" (one set of weights is both) or epoch (fit.checkpoint_every)
    epoch: int  # the epoch whose weights these are (the LoggedModel's step)
    weights: list  # model.get_weights()
    metrics: dict[str, float] = field(default_factory=dict)  # test metrics (best and last only)
    measured: float = 0.0  # when the other checkpoint's metrics were computed (time.time()): their timestamp


@dataclass
class Checkpoints:
    """The fit's checkpoints: `served` (evaluate.serve's choice; its test metrics are the run's test_*),
    `other` (the other of best and last; None when they coincide) and `every` (fit.checkpoint_every)."""
    served: Checkpoint
    other: Optional[Checkpoint]
    every: list[Checkpoint]
    evaluation: Evaluation  # the served checkpoint's, with the figures

    def summary(self) -> dict[str, float]:
        """best.epoch, best.test_accuracy, best.test_loss and the same for last: what a sweep compares."""
        pairs = [self.served] + ([self.other] if self.other else [])
        return {f"{role}.{key}": float(ck.epoch if key == "epoch" else ck.metrics[key])
                for ck in pairs for role in ck.role.split(",") for key in ("epoch", "test_accuracy", "test_loss")}

    def line(self) -> str:
        """Both test accuracies side by side, for the terminal."""
        if self.other is None:
            return (f"best and last are one model (epoch {self.served.epoch}): test accuracy "
                    f"{self.served.metrics['test_accuracy']:.4f}, test loss {self.served.metrics['test_loss']:.4f}")
        text = {ck.role: f"{ck.role} (epoch {ck.epoch}) {ck.metrics['test_accuracy']:.4f}"
                for ck in (self.served, self.other)}
        return (f"test accuracy {text['best']} vs {text['last']}; serving {self.served.role}, test loss "
                f"{self.served.metrics['test_loss']:.4f}")


def checkpoints(model, data, fitted, cfg: EvaluateConfig, scored: Optional[dict] = None) -> Checkpoints:
    """Evaluate the best and the last epoch's weights on the test split (the one not served first, its
    metrics only), keep every N-th epoch's as they are, and leave `model` holding the served weights.
    `scored`: what this training's weights gave on the test split, by epoch (filled here): an epoch scored before is
    not scored again, and its threshold figures not drawn again (a shared training's budgets, pipeline/budgets.py)."""
    scored = {} if scored is None else scored
    final = model.get_weights()
    best, last = fitted.kept_best, fitted.final_epoch
    every = [Checkpoint("epoch", epoch, weights) for epoch, weights in sorted(fitted.kept.items())
             if epoch not in (best, last)]
    other = None
    if best is None or best == last:  # e.g. early stopping restored the best weights: one model, said once
        served = Checkpoint("best,last", last, final)
    else:
        pair = {"best": Checkpoint("best", best, fitted.kept[best]), "last": Checkpoint("last", last, final)}
        served, other = pair.pop(cfg.serve), pair.popitem()[1]
        other.measured = time.time()
        other.metrics = measure(_scored(model, data, other, cfg, scored), data.y_test, cfg)
    evaluation = score(_scored(model, data, served, cfg, scored), data.y_test, fitted.history, cfg,
                       scored.setdefault(("figures", served.epoch), {}))
    model.set_weights(served.weights)
    served.metrics = evaluation.metrics
    return Checkpoints(served, other, every, evaluation)


def _scored(model, data, checkpoint: Checkpoint, cfg: EvaluateConfig, scored: dict) -> np.ndarray:
    """The checkpoint's test probabilities: as scored before, or now (the model then holds its weights)."""
    if checkpoint.epoch not in scored:
        model.set_weights(checkpoint.weights)
        scored[checkpoint.epoch] = predict(model, data.x_test, cfg.batch_size)
    return scored[checkpoint.epoch]


def threshold_curves(truth: np.ndarray, probabilities: np.ndarray, predicted: np.ndarray) -> dict[str, object]:
    """ROC and precision-recall curves of the test probabilities, and the confusion matrix at the
    threshold (scikit-learn's displays, drawn on the axes given them)."""
    from sklearn.metrics import ConfusionMatrixDisplay, PrecisionRecallDisplay, RocCurveDisplay

    figures = {}
    for name, display in (("roc_curve.png", RocCurveDisplay), ("precision_recall_curve.png", PrecisionRecallDisplay)):
        figure = figure_in((5.5, 5), SQUARE_MARGINS)
        display.from_predictions(truth, probabilities, ax=figure.subplots(), name="test split")
        figures[name] = figure
    figure = figure_in((5, 4.5), MATRIX_MARGINS)
    axes = figure.subplots()
    ConfusionMatrixDisplay.from_predictions(truth, predicted, display_labels=["negative", "positive"], ax=axes,
                                            colorbar=False)
    axes.set_title("Test split, at the threshold")
    figures["confusion_matrix.png"] = figure
    return figures
