"""Classification metrics a quality engineer reads: per-class P/R/F1, confusion, escapes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tlbuild.fileio import atomic_path


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], ok_class: str | None = None
) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1/support, confusion matrix (rows = truth).

    With `ok_class`, also the escape rate (defective parts predicted ok, over all defective
    parts) and the false-reject rate (ok parts predicted defective, over all ok parts).
    """
    k = len(classes)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    tp = np.diag(cm).astype(float)
    support = cm.sum(1)
    predicted = cm.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(
        2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0
    )
    out: dict[str, Any] = {
        "images": int(cm.sum()),
        "accuracy": float(tp.sum() / max(1, cm.sum())),
        "macro_f1": float(f1[support > 0].mean()) if (support > 0).any() else 0.0,
        "per_class": {
            c: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, c in enumerate(classes)
        },
        "confusion_matrix": {"labels": list(classes), "rows_true_cols_pred": cm.tolist()},
    }
    if ok_class is not None:
        ok = classes.index(ok_class)
        defect_rows = [i for i in range(k) if i != ok]
        n_defect = int(cm[defect_rows].sum())
        n_ok = int(cm[ok].sum())
        escapes = int(cm[defect_rows, ok].sum())
        false_rejects = n_ok - int(cm[ok, ok])
        out["ok_class"] = ok_class
        out["escape_rate"] = escapes / n_defect if n_defect else 0.0
        out["false_reject_rate"] = false_rejects / n_ok if n_ok else 0.0
        out["escapes"], out["false_rejects"] = escapes, false_rejects
    return out


def best_label(epoch: int) -> str:
    """The shipped weights in words: an epoch, or the linear probe (epoch -1)."""
    return f"epoch {epoch + 1}" if epoch >= 0 else "the linear probe (body unchanged)"


def fine_tuning_gain(metrics: dict[str, Any]) -> str | None:
    """'val accuracy next to the head-only one' from metrics.json, or None without the latter."""
    head, val = metrics.get("head_only"), metrics.get("val")
    if not head or not val:
        return None
    if metrics.get("best_epoch") == -1:
        return (
            f"Validation accuracy {val['accuracy']:.1%}: the linear probe (frozen body, fitted "
            "head) shipped, since no epoch of fine-tuning beat its validation loss"
        )
    gain = (val["accuracy"] - head["accuracy"]) * 100
    return (
        f"Validation accuracy {val['accuracy']:.1%}; head only ({head['source']}) "
        f"{head['accuracy']:.1%}: fine-tuning the body {'added' if gain >= 0 else 'changed'} "
        f"{gain:+.1f} points"
    )


def plot_confusion(metrics: dict[str, Any], path: Path, title: str) -> None:
    """Confusion matrix PNG: counts and row-normalised colour, so rare classes stay visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = metrics["confusion_matrix"]["labels"]
    cm = np.asarray(metrics["confusion_matrix"]["rows_true_cols_pred"], dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = max(4.0, 0.6 * len(labels) + 2.5)
    fig, ax = plt.subplots(figsize=(size, size * 0.85), dpi=110)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(
                j,
                i,
                f"{int(cm[i, j])}",
                ha="center",
                va="center",
                color="white" if norm[i, j] > 0.5 else "black",
                fontsize=9,
            )
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title} (accuracy {metrics['accuracy']:.1%})")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    """Training curves: loss and accuracy per epoch, train vs validation, phases marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] + 1 for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    a1.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    a1.plot(ep, [h["val_loss"] for h in history], "o-", label="val")
    a2.plot(ep, [h["train_acc"] for h in history], "o-", label="train")
    a2.plot(ep, [h["val_acc"] for h in history], "o-", label="val")
    for prev, cur in zip(history, history[1:], strict=False):
        if cur["stage"] != prev["stage"]:  # history rows keep the key "stage" (history.csv)
            for a in (a1, a2):
                a.axvline(cur["epoch"] + 0.5, color="grey", ls="--", lw=0.8)
    a1.set_title("loss")
    a2.set_title("accuracy")
    for a in (a1, a2):
        a.set_xlabel("epoch")
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
