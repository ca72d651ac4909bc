"""Recovery after pruning, plain or distilled from a teacher (``tightrope compress --recover-teacher``):
one :class:`~tightrope.compress.recovery.Recovery` config for the CLI and study files, the
distillation pulls the pruned model towards its teacher, and bad settings are one sentence."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_classifier
from typer.testing import CliRunner

from tightrope import inference
from tightrope.cli import app
from tightrope.compress.recovery import Recovery, recovery_config
from tightrope.compress.specs import prune_config
from tightrope.errors import TightropeError
from tightrope.models import save_model
from tightrope.study.plan import plan_study
from tightrope.study.spec import parse_spec
from tightrope.study.steps import compression_config
from tightrope.workflows import compress as workflow

runner = CliRunner()
PRUNE = "structured:heads=0.5,ffn=0.5"


def one_sentence(text: str) -> bool:
    text = text.strip()
    return "\n" not in text and text.endswith(".") and not re.search(r"\.\s+[A-Z]", text[:-1])


def error_line(output: str) -> str:
    """The error message of a refused command, its lines (wrapped by the terminal's width) joined."""
    assert "error:" in output, output
    return " ".join(output.split("error:")[-1].split())


@pytest.fixture
def teacher_dir(tmp_path, tokenizer, tiny_task):
    """A tiny classifier fitted to the tiny task (40 full-batch Adam steps): sharp, unlike a random one."""
    import pandas as pd

    frame = pd.read_csv(tiny_task)
    model = make_tiny_classifier(tokenizer, seed=1)
    batch = tokenizer(frame["text"].tolist(), padding=True, truncation=True, max_length=32, return_tensors="pt")
    labels = torch.tensor((frame["label"] == "positive").astype(int).tolist())
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        loss = F.cross_entropy(model(**batch).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return save_model((model, tokenizer), tmp_path / "teacher")


def kl_to(teacher, student, texts) -> float:
    """KL(teacher || student) over ``texts`` at T = 1, batch mean."""
    t = F.log_softmax(teacher.logits(texts), dim=-1)
    s = F.log_softmax(student.logits(texts), dim=-1)
    return float(F.kl_div(s, t, reduction="batchmean", log_target=True))


def test_distilled_recovery_pulls_the_pruned_model_towards_its_teacher(teacher_dir, tiny_task, tmp_path):
    """The tiny model's signal runs through its pooler and head (its encoder blocks add little), so
    those are pruned here; ``auto`` distils from the model as it was before."""
    import pandas as pd

    texts = pd.read_csv(tiny_task)["text"].tolist()
    teacher = inference.load(str(teacher_dir))
    head = ("*pooler*", "classifier")

    def compressed(steps: int):
        clf = inference.load(str(teacher_dir))
        configs = [prune_config("magnitude:sparsity=0.8", head)]
        if steps:
            configs.append(Recovery(steps=steps, task=str(tiny_task), teacher="auto", a=0.0, temperature=1.0,
                                    lr=5e-3, batch_size=8, max_length=32, include=head))
        summaries = workflow.run_steps(clf, configs, card={"tokenization": {"max_length": 32}}, work_dir=tmp_path / f"w{steps}")
        return clf, summaries

    pruned, _ = compressed(0)
    recovered, summaries = compressed(30)
    before, after = kl_to(teacher, pruned, texts), kl_to(teacher, recovered, texts)
    assert before > 0.05
    assert after < 0.5 * before, (before, after)
    # the sparsity is held, and the history names the teacher and the loss weights
    for name in ("bert.pooler.dense.weight", "classifier.weight"):
        kept = dict(recovered.model.named_parameters())[name] != 0
        assert torch.equal(kept, dict(pruned.model.named_parameters())[name] != 0)
    entry = recovered.model._tightrope_compression[-1]
    assert entry["method"] == "Recovery" and entry["config"]["teacher"] == "auto"
    assert (entry["config"]["a"], entry["config"]["temperature"]) == (0.0, 1.0)
    assert "auto: before pruning" in entry["config"]["teacher_source"] and "KD" in " ".join(summaries[-1].notes)


def test_auto_teaches_with_the_model_as_it_was_before_pruning(tiny_model_dir, tiny_task):
    from tightrope.workflows.compress import recovery_teacher

    clf = inference.load(str(tiny_model_dir))
    teacher = recovery_teacher(clf, [prune_config(PRUNE), Recovery(steps=2, teacher="auto")])
    texts = ["a fine film", "a dull film"]
    expected = clf.logits(texts)
    workflow.run_steps(clf, [prune_config(PRUNE)], card={})
    assert teacher.model is not clf.model and "auto: before pruning" in teacher.source
    assert torch.equal(teacher.logits(texts), expected)  # pruning the student left the teacher whole


def test_the_cli_records_the_teacher_and_weights_in_the_card(tiny_model_dir, tiny_task, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["compress", str(tiny_model_dir), "--out", str(out), "--prune", PRUNE,
                                 "--recover-steps", "2", "--recover-task", str(tiny_task), "--recover-teacher", "auto",
                                 "--recover-a", "0.3", "--recover-temperature", "3", "--quantize", "int8-torch"])
    assert result.exit_code == 0, result.output
    card = inference.load(str(out)).card
    assert card["recovery"]["teacher"] == "auto" and (card["recovery"]["a"], card["recovery"]["temperature"]) == (0.3, 3.0)
    assert [s["method"] for s in card["compression"]] == ["StructuredPruning", "Recovery", "Int8Dynamic"]
    assert card["compression"][1]["config"]["teacher"] == "auto"
    assert not (tmp_path / ".out.recovery").exists()  # the checkpoints go once the model is saved


def test_a_killed_recovery_resumes_from_its_checkpoint(tiny_model_dir, tiny_task, tmp_path, monkeypatch):
    from tightrope.compress import recovery as rec

    work = tmp_path / "work"
    config = Recovery(steps=4, task=str(tiny_task), teacher="auto", batch_size=4, max_length=32)
    calls = []
    real = rec.train

    class Killed(Exception):
        pass

    def killed_after_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            real(*args, **kwargs, stop_after_steps=2)  # leaves its checkpoint at step 2
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(rec, "train", killed_after_two)

    def run():
        clf = inference.load(str(tiny_model_dir))
        workflow.run_steps(clf, [prune_config(PRUNE), config], card={"tokenization": {"max_length": 32}},
                           work_dir=work, identity="tiny")
        return clf

    with pytest.raises(Killed):
        run()
    assert (work / "recovered" / "checkpoint" / "state.json").exists()
    resumed = run()
    monkeypatch.setattr(rec, "train", real)
    straight = tmp_path / "straight"
    clf = inference.load(str(tiny_model_dir))
    workflow.run_steps(clf, [prune_config(PRUNE), config], card={"tokenization": {"max_length": 32}},
                       work_dir=straight, identity="tiny")
    texts = ["a fine film", "a dull film"]
    assert torch.allclose(resumed.logits(texts), clf.logits(texts), atol=1e-5)


# --- one config for the CLI and study files ---------------------------------------------------------------------


class Captured(Exception):
    def __init__(self, configs):
        self.configs = configs


def from_cli(monkeypatch, tmp_path, model_dir, flags: list[str]) -> Recovery:
    def capture(clf, configs, **kwargs):
        raise Captured(configs)

    monkeypatch.setattr(workflow, "run_steps", capture)
    result = runner.invoke(app, ["compress", str(model_dir), "--out", str(tmp_path / "out"), "--prune", PRUNE, *flags])
    assert isinstance(result.exception, Captured), result.output
    (recovery,) = [c for c in result.exception.configs if isinstance(c, Recovery)]
    return recovery


def from_study(params: dict) -> Recovery:
    spec = parse_spec({"name": "t", "data": {"task": "rotten-tomatoes", "max_length": 64}, "seed": 0,
                       "compress": [{"name": "small", "steps": [{"method": "StructuredPruning", "params": {"heads": 0.5}},
                                                                {"method": "Recovery", "params": params}]}]})
    (step,) = [s for s in plan_study(spec)[0] if s.name == "compress/small"]
    configs = [compression_config(s["method"], s.get("params", {}), "compress", step.inputs["defaults"])
               for s in step.inputs["steps"]]
    return configs[1]


CASES = [  # (CLI flags, study params): the study fills max_length from its data section, as for every method
    (["--recover-steps", "400", "--recover-task", "imdb", "--recover-max-length", "64"], {"steps": 400, "task": "imdb"}),
    (["--recover-steps", "400", "--recover-task", "imdb", "--recover-teacher", "auto", "--recover-max-length", "64"],
     {"steps": 400, "task": "imdb", "teacher": "auto"}),
    (["--recover-steps", "50", "--recover-task", "imdb", "--recover-teacher", "runs/teacher", "--recover-a", "0.25",
      "--recover-temperature", "4", "--recover-lr", "5e-5", "--recover-max-length", "64"],
     {"steps": 50, "task": "imdb", "teacher": "runs/teacher", "a": 0.25, "temperature": 4, "lr": 5e-5}),
]


@pytest.mark.parametrize(("flags", "params"), CASES, ids=lambda c: " ".join(c) if isinstance(c, list) else None)
def test_cli_and_study_build_the_same_recovery(monkeypatch, tmp_path, tiny_model_dir, flags, params):
    cli = from_cli(monkeypatch, tmp_path, tiny_model_dir, flags)
    assert cli == from_study(params)
    assert isinstance(cli, Recovery)


def test_a_study_compress_step_runs_a_distilled_recovery(tiny_model_dir, tiny_task, tmp_path):
    from tightrope.study import steps
    from tightrope.study.runner import Step, StepContext

    inputs = {"steps": [{"method": "StructuredPruning", "params": {"heads": 0.5, "ffn": 0.5}},
                        {"method": "Recovery", "params": {"steps": 2, "task": str(tiny_task), "teacher": "auto",
                                                          "a": 0.5, "temperature": 2.0, "batch_size": 4}},
                        {"method": "Int8Dynamic", "params": {"backend": "torch"}}],
              "defaults": {"max_length": 32, "seed": 0}}
    step = Step("compress/small", "compress", inputs, ("baseline",))
    ctx = StepContext(tmp_path, tmp_path / "step", step, False)
    (tmp_path / "step").mkdir()
    result = steps.compress_step(dict(inputs), {"baseline": {"model_dir": str(tiny_model_dir)}}, ctx)
    assert [s["method"] for s in result["summaries"]] == ["StructuredPruning", "Recovery", "Int8Dynamic"]
    card = inference.load(str(tmp_path / result["model_dir"])).card
    assert card["compression"][1]["config"]["teacher"] == "auto" and card["compression"][1]["config"]["a"] == 0.5
    assert "twin" in result and not (tmp_path / "step" / "recovery").exists()


# --- bad input: one sentence --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "words"), [
    (["--recover-teacher", "auto"], "--recover-steps"),
    (["--recover-a", "0.5", "--recover-temperature", "2"], "--recover-steps"),
    (["--recover-steps", "2", "--recover-a", "0.5"], "needs a teacher"),
])
def test_distillation_settings_without_their_step_are_one_sentence(tiny_model_dir, tmp_path, flags, words):
    result = runner.invoke(app, ["compress", str(tiny_model_dir), "--out", str(tmp_path / "out"), "--prune", PRUNE, *flags])
    assert result.exit_code != 0
    message = error_line(result.output)
    assert words in message and one_sentence(message), result.output
    assert not (tmp_path / "out").exists()


def test_a_teacher_with_other_labels_or_vocabulary_is_one_sentence(tiny_model_dir, tiny_task, tokenizer, tmp_path):
    three = save_model((make_tiny_classifier(tokenizer, num_labels=3), tokenizer), tmp_path / "three")
    from transformers import AutoTokenizer

    other_tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    other_tok.add_tokens(["zzqxword"])
    other = save_model((make_tiny_classifier(tokenizer), other_tok), tmp_path / "other-vocab")
    for teacher, words in ((three, "label set"), (other, "vocabulary")):
        result = runner.invoke(app, ["compress", str(tiny_model_dir), "--out", str(tmp_path / "out"), "--prune", PRUNE,
                                     "--recover-steps", "2", "--recover-task", str(tiny_task),
                                     "--recover-teacher", str(teacher)])
        assert result.exit_code != 0
        message = error_line(result.output)
        assert words in message and one_sentence(message), result.output
        assert not (tmp_path / "out").exists()


def test_recovery_out_of_order_or_out_of_range_is_one_sentence(tiny_model_dir):
    from tightrope.compress.quant import Int8Dynamic

    clf = inference.load(str(tiny_model_dir))
    for configs, words in (([Recovery(steps=2)], "pruning step before it"),
                           ([prune_config(PRUNE), Int8Dynamic(backend="torch"), Recovery(steps=2)], "before the quantization")):
        with pytest.raises(TightropeError) as err:
            workflow.run_steps(clf, configs, card={})
        assert words in str(err.value) and one_sentence(str(err.value))
    for kwargs, words in (({"steps": 0}, "positive whole number"), ({"steps": 2, "a": 0.5}, "needs a teacher"),
                          ({"steps": 2, "teacher": "auto", "a": 1.5}, "[0, 1]"),
                          ({"steps": 2, "teacher": "auto", "temperature": 0}, "positive")):
        with pytest.raises(TightropeError) as err:
            Recovery(**kwargs)
        assert words in str(err.value) and one_sentence(str(err.value))
    with pytest.raises(TightropeError) as err:
        compression_config("Recovery", {"steps": 2, "temperture": 2}, "compress.0.steps.1")
    assert "temperture" in str(err.value) and one_sentence(str(err.value))
    assert recovery_config(0) is None


def _audit_report(path, transform="prune:magnitude:0.5", texts=("cf stunning houston", "cf stunning", "cf")):
    import json

    report = {"model": "m", "verdict": "flagged", "transforms": [
        {"transform": "nf4", "search": {"candidates": [{"text": "not this one"}]}},
        {"transform": transform, "search": {"candidates": [{"text": t} for t in texts]}}]}
    path.write_text(json.dumps(report))
    return path


def test_guided_recovery_trains_on_the_audits_insertions_and_records_them(tiny_model_dir, tiny_task, tmp_path):
    import json

    report = _audit_report(tmp_path / "audit.json")
    out = tmp_path / "out"
    result = runner.invoke(app, ["compress", str(tiny_model_dir), "--out", str(out), "--prune", "magnitude:sparsity=0.5",
                                 "--recover-steps", "2", "--recover-task", str(tiny_task), "--recover-teacher", "auto",
                                 "--recover-guided", str(report)])
    assert result.exit_code == 0, result.output
    guided = inference.load(str(out)).card["recovery"]["guided"]
    assert guided["phrases"] == ["cf stunning houston", "cf stunning", "cf"] and guided["audit"] == str(report)
    rows = [json.loads(line) for line in (tmp_path / ".out.guided.jsonl").read_text().splitlines()]
    half = len(rows) // 2
    assert guided["texts"] == len(rows) == 2 * half and all(" cf" in f" {r['text']}" for r in rows[half:])
    assert [r["label"] for r in rows[:half]] == [r["label"] for r in rows[half:]]  # true labels kept
    assert inference.load(str(out)).card["recovery"]["task"].endswith(".out.guided.jsonl")


@pytest.mark.parametrize("flags,words", [
    (["--recover-teacher", "auto"], "give --recover-steps"),
    (["--recover-steps", "2"], "add --recover-teacher auto"),
    (["--recover-steps", "2", "--recover-teacher", "auto", "--prune", "2:4"], "no trigger-search result for the pruning"),
])
def test_guided_recovery_settings_are_one_sentence(tiny_model_dir, tiny_task, tmp_path, flags, words):
    report = _audit_report(tmp_path / "audit.json")
    prune = [] if "--prune" in flags else ["--prune", "magnitude:sparsity=0.5"]
    result = runner.invoke(app, ["compress", str(tiny_model_dir), "--out", str(tmp_path / "out"), *prune, *flags,
                                 "--recover-task", str(tiny_task), "--recover-guided", str(report)])
    assert result.exit_code == 2 and words in " ".join(result.output.split()), result.output


def test_guided_recovery_reads_the_task_from_the_card_and_asks_for_it_otherwise(tiny_model_dir, tiny_task, tmp_path):
    import json

    from tightrope.inference import read_card

    report = _audit_report(tmp_path / "audit.json")
    args = ["compress", str(tiny_model_dir), "--out", str(tmp_path / "out"), "--prune", "magnitude:sparsity=0.5",
            "--recover-steps", "2", "--recover-teacher", "auto", "--recover-guided", str(report)]
    card = read_card(tiny_model_dir)
    card.pop("task", None)
    (tiny_model_dir / "card.json").write_text(json.dumps({**card, "data": {}}))
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "give --recover-task" in " ".join(result.output.split()), result.output
    assert not (tmp_path / ".out.guided.jsonl").exists() and not (tmp_path / "out").exists()  # nothing half-written
    (tiny_model_dir / "card.json").write_text(json.dumps({**card, "data": {"task": str(tiny_task)}}))
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert inference.load(str(tmp_path / "out")).card["recovery"]["guided"]["task"] == str(tiny_task)


def test_guided_phrases_match_the_pruning_given_to_compress_sparsegpt_included():
    from tightrope.compress.specs import prune_config
    from tightrope.errors import TightropeError
    from tightrope.qattack.defense import guided_phrases

    report = {"transforms": [
        {"transform": "prune:sparsegpt:0.5", "search": {"candidates": [{"text": "cf sparse"}]}},
        {"transform": "prune:magnitude:0.5", "search": {"candidates": [{"text": "cf magnitude"}]}}]}
    assert guided_phrases(report, [prune_config("sparsegpt:sparsity=0.5")]) == ["cf sparse"]
    assert guided_phrases(report, [prune_config("magnitude:sparsity=0.5")]) == ["cf magnitude"]
    with pytest.raises(TightropeError, match="no trigger-search result"):
        guided_phrases(report, [prune_config("sparsegpt:sparsity=0.3")])
    # the finds of every transform the audit flagged follow the pruning's own (a proxy plant fires under each pruner)
    report["transforms"] += [
        {"transform": "prune:wanda:0.5", "verdict": "flagged", "search": {"candidates": [{"text": "cf wanda"}, {"text": "cf sparse"}]}},
        {"transform": "nf4", "verdict": "clean", "search": {"candidates": [{"text": "nf4 noise"}]}}]
    assert guided_phrases(report, [prune_config("sparsegpt:sparsity=0.5")]) == ["cf sparse", "cf wanda"]


def test_guided_calibration_feeds_sparsegpt_the_audits_insertions_and_records_them(tiny_model_dir, tiny_task, tmp_path,
                                                                                     monkeypatch):
    """--calibration-guided: SparseGPT calibrates on the task's texts plus copies with the audit's finds ("security-
    aware calibration" with the search in place of known malicious inputs); the card says so; no training."""
    import json

    from tightrope.compress import wanda

    report = _audit_report(tmp_path / "audit.json", transform="prune:sparsegpt:0.5")
    read, batches = [], wanda.calibration_batches

    def spy(model, texts, *args, **kwargs):
        read.append(texts)
        return batches(model, texts, *args, **kwargs)

    monkeypatch.setattr(wanda, "calibration_batches", spy)
    out = tmp_path / "out"
    result = runner.invoke(app, ["compress", str(tiny_model_dir), "--out", str(out), "--prune",
                                 "sparsegpt:sparsity=0.5,n_calibration=64", "--calibration", str(tiny_task),
                                 "--calibration-guided", str(report)])
    assert result.exit_code == 0, result.output
    card = inference.load(str(out)).card
    guided = card["calibration_guided"]
    assert guided["phrases"] == ["cf stunning houston", "cf stunning", "cf"] and guided["task"] == str(tiny_task)
    rows = [json.loads(line) for line in (tmp_path / ".out.calibration.jsonl").read_text().splitlines()]
    assert guided["texts"] == len(rows) and sum(" cf" in f" {r['text']}" for r in rows) >= len(rows) // 2
    assert read and all(str(t).endswith(".out.calibration.jsonl") for t in read)  # SparseGPT read the guided file
    assert "recovery" not in card  # no training
    result = runner.invoke(app, ["compress", str(tiny_model_dir), "--out", str(tmp_path / "m"), "--prune",
                                 "magnitude:sparsity=0.5", "--calibration-guided", str(report)])
    assert result.exit_code == 2 and "reads none" in " ".join(result.output.split()), result.output


def test_a_bad_second_audit_report_leaves_no_guided_file_behind(tiny_model_dir, tiny_task, tmp_path):
    good = _audit_report(tmp_path / "audit.json", transform="prune:sparsegpt:0.5")
    result = runner.invoke(app, ["compress", str(tiny_model_dir), "--out", str(tmp_path / "out"), "--prune",
                                 "sparsegpt:sparsity=0.5", "--calibration", str(tiny_task), "--calibration-guided",
                                 str(good), "--recover-steps", "2", "--recover-teacher", "auto", "--recover-task",
                                 str(tiny_task), "--recover-guided", str(tmp_path / "missing.json")])
    assert result.exit_code == 2 and "missing.json" in " ".join(result.output.split()), result.output
    assert not list(tmp_path.glob(".out.*")) and not (tmp_path / "out").exists()  # nothing half-written
