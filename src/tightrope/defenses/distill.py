"""The seed paper's training loss: L = a * CE(student, y) + (1 - a) * KD(student, teacher).

KD is the distillation term of Hinton, Vinyals and Dean (2015), "Distilling the Knowledge in a
Neural Network", Sec. 2: the KL divergence between the teacher's and the student's softened
distributions at temperature T, multiplied by T^2 so that its gradients keep the same scale as
those of the hard-label term when T changes:

    KD(s, t) = T^2 * KL( softmax(t / T) || softmax(s / T) )      (batch mean)

The teacher is frozen (``requires_grad=False``, eval mode, no_grad forwards). It may use a
different tokenizer from the student's (``mpnet-base`` teaching MiniLM): it then reads the batch's
raw texts (the ``texts`` key that :func:`tightrope.train.train` puts in every batch) through its
own tokenizer and max length. Embedding-space perturbations apply to the student only; the teacher
always sees the clean text, so its logits are computed once per batch and reused.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tightrope.errors import TightropeError


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch (Hinton et al. 2015)."""
    T = temperature
    log_p_student = F.log_softmax(student_logits.float() / T, dim=-1)  # (B, K)
    log_p_teacher = F.log_softmax(teacher_logits.float() / T, dim=-1)  # (B, K)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * T * T


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      a: float, temperature: float) -> torch.Tensor:
    """The seed's L = a * CE(student, y) + (1 - a) * KD(student, teacher) (Sec. III, loss of adversarial training)."""
    ce = F.cross_entropy(student_logits.float(), labels)
    if a == 1.0:
        return ce
    return a * ce + (1.0 - a) * kd_loss(student_logits, teacher_logits, temperature)


def freeze_(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and no parameter gradients: a teacher is never updated."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def label_permutation(student_labels: list[str], teacher_labels: list[str]) -> list[int] | None:
    """Teacher column for each student label; None when the order already agrees.

    Raises a one-sentence error when the two label sets differ.
    """
    if [s.lower() for s in student_labels] == [t.lower() for t in teacher_labels]:
        return None
    if sorted(s.lower() for s in student_labels) != sorted(t.lower() for t in teacher_labels):
        raise TightropeError(
            f"The teacher predicts the labels {list(teacher_labels)} but the student predicts {list(student_labels)}; "
            "a teacher must be fine-tuned on the same label set."
        )
    where = {t.lower(): i for i, t in enumerate(teacher_labels)}
    return [where[s.lower()] for s in student_labels]


@dataclass
class Distillation:
    """A criterion ``(student_logits, batch) -> loss`` with the seed's a * CE + (1 - a) * KD.

    ``teacher`` is a :class:`tightrope.inference.TextClassifier` (load one with
    ``tightrope.inference.load(path)``); it is frozen here. ``student_labels`` are the student's
    label names, checked against the teacher's. ``student_tokenizer`` lets the teacher reuse the
    student's token ids when both share a vocabulary; otherwise the batch must carry ``texts``.
    ``student_ids``: the teacher always reads the student's token ids, never the raw texts (the same
    input the student sees, as in recovery after pruning, whose teacher is the unpruned model); the
    two tokenizers must then share a vocabulary.
    """

    teacher: object
    a: float = 0.5
    temperature: float = 2.0
    student_labels: list[str] | None = None
    student_tokenizer: object | None = None
    student_ids: bool = False

    def __post_init__(self):
        if not 0.0 <= self.a <= 1.0:
            raise TightropeError(f"The loss weight a must lie in [0, 1], got {self.a}.")
        if not self.temperature > 0:
            raise TightropeError(f"The distillation temperature must be positive, got {self.temperature}.")
        if self.a == 1.0:
            warnings.warn("a = 1 gives the distillation term no weight, so the teacher is ignored; "
                          "use a < 1 to distil, or drop the teacher.", UserWarning, stacklevel=3)
        model = getattr(self.teacher, "model", None)
        if not isinstance(model, torch.nn.Module):
            raise TightropeError("The teacher must be a PyTorch classifier loaded with tightrope.inference.load.")
        freeze_(model)
        self._columns = None
        if self.student_labels is not None:
            self._columns = label_permutation(list(self.student_labels), list(self.teacher.label_names))
        self._shares_vocab = (self.student_tokenizer is not None
                              and self.student_tokenizer.get_vocab() == self.teacher.tokenizer.get_vocab())
        if self.student_ids and not self._shares_vocab:
            raise TightropeError("The teacher tokenizes with another vocabulary than the student, so it cannot read "
                                 "the student's token ids; give a teacher with the same tokenizer.")
        self._memo: tuple[object, torch.Tensor] | None = None

    def teacher_logits(self, batch: dict) -> torch.Tensor:
        """The teacher's logits on the batch's clean inputs, computed once per batch (no grad)."""
        if self._memo is not None and self._memo[0] is batch:
            return self._memo[1]
        model = self.teacher.model
        model.eval()  # in case someone switched it back
        with torch.no_grad():
            if "texts" in batch and not self.student_ids:
                logits = self.teacher.logits(list(batch["texts"]))
            elif self._shares_vocab:
                logits = self.teacher.forward_ids(batch["input_ids"], batch["attention_mask"])
            else:
                raise TightropeError("The teacher uses another tokenizer, so it needs the raw texts of each batch "
                                     "(a 'texts' key), which this training loop does not provide.")
        if self._columns is not None:
            logits = logits[:, self._columns]
        logits = logits.to(batch["labels"].device)
        self._memo = (batch, logits)
        return logits

    def __call__(self, student_logits: torch.Tensor, batch: dict) -> torch.Tensor:
        if self.a == 1.0:
            return F.cross_entropy(student_logits.float(), batch["labels"])
        return distillation_loss(student_logits, self.teacher_logits(batch), batch["labels"], self.a, self.temperature)
