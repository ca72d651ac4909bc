"""Classification metrics as raw fractions (0.734, not "73.4%"); only reports round."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sklearn.metrics import confusion_matrix, f1_score


@dataclass(frozen=True)
class ClassificationMetrics:
    accuracy: float
    macro_f1: float
    per_class_f1: dict[str, float]
    confusion: list[list[int]]  # rows: true label, columns: predicted label
    label_names: list[str]
    examples: int

    def summary(self) -> dict:
        return {"accuracy": self.accuracy, "macro_f1": self.macro_f1}

    def to_dict(self) -> dict:
        return asdict(self)


def classification_metrics(labels: list[int], predictions: list[int], label_names: list[str]) -> ClassificationMetrics:
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    if not labels:
        raise ValueError("no examples to score")
    ids = list(range(len(label_names)))
    per_class = f1_score(labels, predictions, labels=ids, average=None, zero_division=0)
    return ClassificationMetrics(
        accuracy=sum(int(a == b) for a, b in zip(labels, predictions)) / len(labels),
        macro_f1=float(f1_score(labels, predictions, labels=ids, average="macro", zero_division=0)),
        per_class_f1={name: float(v) for name, v in zip(label_names, per_class)},
        confusion=confusion_matrix(labels, predictions, labels=ids).tolist(),
        label_names=list(label_names),
        examples=len(labels),
    )
