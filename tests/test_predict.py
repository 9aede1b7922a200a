"""The final model is a transformers folder: ``AutoModelForSequenceClassification``, the pipeline and
``lcl-tune predict`` load it and reproduce the project's own test-split predictions exactly."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import CUES, write_cued_texts

from lcl_tune.cli.main import main
from lcl_tune.workflows.final import MODEL_DIR, PREDICTIONS_FILE, TRIAL_CONFIG, train_final


def _final_model(cfg, out) -> tuple[dict, object]:
    """Train ``cfg`` with ``train --final``; return its summary and its seed folder."""
    [summary] = train_final(cfg, out)
    return summary, out / f"seed{cfg.seed}"


@pytest.fixture(scope="module")
def tiny_final(tmp_path_factory, minilm_path):
    """A tiny random-initialised BERT trained with ``train --final`` on cued texts (4 classes,
    200 test rows, a third of them ambiguous)."""
    from lcl_tune.schema import trial as C

    tmp = tmp_path_factory.mktemp("tiny_final")
    for split, n, seed, ambiguous in [("train", 256, 1, 0.0), ("dev", 64, 2, 0.0), ("test", 200, 3, 0.35)]:
        write_cued_texts(tmp / f"{split}.csv", n, seed, ambiguous)
    cfg = C.from_dict({
        "model": {"name": "tiny", "max_length": 32},
        "data": {"train_file": str(tmp / "train.csv"), "dev_file": str(tmp / "dev.csv"),
                 "test_file": str(tmp / "test.csv"), "label_names": list(CUES), "cache_dir": str(tmp / "cache")},
        "loss": {"name": "lcl", "temperature": 0.3, "lam": 0.5}, "weighting": {"name": "self"},
        "optim": {"lr": 2e-3}, "train": {"batch_size": 32, "max_steps": 160, "eval_every": 80, "threads": 2,
                                         "log_every": 1000},
        "seed": 3,
    })
    summary, seed_dir = _final_model(cfg, tmp / "final")
    return cfg, summary, seed_dir


def _hf_logits(model_dir, texts: list[str]) -> torch.Tensor:
    """Logits of the saved folder through transformers alone, one text at a time (no padding)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return torch.cat([model(**tokenizer(t, truncation=True, return_tensors="pt")).logits for t in texts])


def _check_identical_predictions(cfg, summary, seed_dir) -> pd.DataFrame:
    """AutoModelForSequenceClassification and the pipeline predict every test row as the project's
    evaluation did (``test_predictions.csv``, whose accuracy is the reported test accuracy)."""
    from transformers import pipeline

    ours = pd.read_csv(seed_dir / PREDICTIONS_FILE, keep_default_na=False)
    texts = ours["text"].tolist()
    assert np.mean(ours["label"] == ours["predicted"]) == pytest.approx(summary["test"]["accuracy"], abs=1e-12)

    model_dir = seed_dir / MODEL_DIR
    logits = _hf_logits(model_dir, texts)
    probs = torch.softmax(logits, -1)
    from transformers import AutoConfig

    id2label = AutoConfig.from_pretrained(model_dir).id2label
    assert [id2label[i] for i in probs.argmax(-1).tolist()] == ours["predicted"].tolist()
    np.testing.assert_allclose(probs.max(-1).values.numpy(), ours["probability"].to_numpy(), atol=1e-5)

    classifier = pipeline("text-classification", model=str(model_dir), device="cpu")
    piped = classifier(texts, truncation=True, batch_size=16)
    assert [p["label"] for p in piped] == ours["predicted"].tolist()
    np.testing.assert_allclose([p["score"] for p in piped], ours["probability"].to_numpy(), atol=1e-5)
    return ours


def test_final_model_is_a_transformers_folder_with_labels_and_tokenizer(tiny_final):
    from transformers import AutoConfig, AutoTokenizer

    cfg, summary, seed_dir = tiny_final
    model_dir = seed_dir / MODEL_DIR
    config = AutoConfig.from_pretrained(model_dir)
    names = summary["label_names"]
    assert config.architectures == ["BertForSequenceClassification"]
    assert config.id2label == dict(enumerate(names)) and config.label2id == {n: i for i, n in enumerate(names)}
    assert names == list(CUES)
    assert AutoTokenizer.from_pretrained(model_dir).model_max_length == cfg.model.max_length
    from lcl_tune.schema import trial as C

    saved = C.load(model_dir / TRIAL_CONFIG)  # the config it was trained with, test split evaluated once
    assert (saved.model.name, saved.seed, saved.train.eval_test) == ("tiny", cfg.seed, True)
    assert not (model_dir / "head.pt").exists() and not (model_dir / "encoder").exists()


def test_transformers_and_pipeline_give_the_projects_test_predictions_tiny(tiny_final):
    ours = _check_identical_predictions(*tiny_final)
    assert len(ours) == 200 and ours["predicted"].nunique() == 4  # a trained model, not one label for all
    assert tiny_final[1]["test"]["accuracy"] > 0.7


def test_predict_prints_label_probability_and_top_k(tiny_final, capsys):
    _, _, seed_dir = tiny_final
    assert main(["predict", str(seed_dir / MODEL_DIR), "--text", "we were delighted at home", "--text",
                 "my friends were furious after work", "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("we were delighted at home")
    parsed = [re.fullmatch(r"(.+?) +(\w+) ([\d.]+)  \((\w+) ([\d.]+)\)", line).groups() for line in lines]
    assert [(text, label) for text, label, *_ in parsed] == [("we were delighted at home", "joy"),
                                                              ("my friends were furious after work", "anger")]
    assert all(1.0 >= float(p1) >= float(p2) and other != label for _, label, p1, other, p2 in parsed)


def test_predict_file_writes_csv_matching_the_projects_predictions(tiny_final, tmp_path):
    _, _, seed_dir = tiny_final
    ours = pd.read_csv(seed_dir / PREDICTIONS_FILE, keep_default_na=False).head(40)
    source = tmp_path / "texts.csv"
    ours[["text"]].rename(columns={"text": "tweet"}).to_csv(source, index=False)
    out = tmp_path / "preds" / "preds.csv"
    # a seed folder is accepted as well as its model/ folder
    assert main(["predict", str(seed_dir), "--file", str(source), "--text-column", "tweet", "--out", str(out)]) == 0
    preds = pd.read_csv(out, keep_default_na=False)
    assert list(preds.columns) == ["text", "label", "probability"] + [
        f"top{i}_{w}" for i in range(1, 4) for w in ("label", "probability")]
    assert preds["text"].tolist() == ours["text"].tolist()
    assert preds["label"].tolist() == ours["predicted"].tolist()
    np.testing.assert_allclose(preds["probability"], ours["probability"], atol=1e-5)
    assert (preds["top1_label"] == preds["label"]).all()
    assert (preds["top1_probability"] >= preds["top2_probability"]).all()
    assert (preds["top2_probability"] >= preds["top3_probability"]).all()
    assert (preds[["top1_probability", "top2_probability", "top3_probability"]].sum(axis=1) <= 1 + 1e-6).all()

    lines = tmp_path / "texts.txt"  # plain text: one text per line, blank lines skipped
    lines.write_text("\n".join(ours["text"].head(5).str.replace("\n", " ")) + "\n\n")
    out_txt = tmp_path / "preds_txt.csv"
    assert main(["predict", str(seed_dir / MODEL_DIR), "--file", str(lines), "--out", str(out_txt)]) == 0
    assert len(pd.read_csv(out_txt)) == 5


@pytest.mark.parametrize("args, expected", [
    (["{tmp}", "--text", "hi"], "MODEL_DIR: no model in"),
    (["{tmp}/old", "--text", "hi"], "saved by lcl_tune 0.1"),
    (["{model}", "--file", "{tmp}/nope.txt"], "--file: file not found"),
    (["{model}", "--file", "{tmp}/x.csv"], "--text-column: column 'text' not in x.csv"),
    (["{model}", "--file", "{tmp}/empty.txt"], "--file: empty.txt is empty"),
    (["{model}", "--file", "{tmp}/x.docx"], "--file: cannot tell the format"),
], ids=["no model", "old format", "missing file", "bad column", "empty file", "unknown format"])
def test_predict_errors_are_one_line(tiny_final, tmp_path, capsys, args, expected):
    (tmp_path / "old" / "encoder").mkdir(parents=True)
    (tmp_path / "old" / "head.pt").write_bytes(b"x")
    (tmp_path / "x.csv").write_text("tweet\nhello\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "x.docx").write_text("hello")
    argv = [a.format(tmp=tmp_path, model=tiny_final[2] / MODEL_DIR) for a in args]
    assert main(["predict", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


def test_head_parameters_are_the_classification_layers_only():
    from lcl_tune.core.model import build_classifier

    model = build_classifier("tiny", 5, vocab_size=100)
    head = {id(p) for p in model.head_parameters()}
    names = sorted(n for n, p in model.named_parameters() if id(p) in head)
    assert names == ["hf.classifier.bias", "hf.classifier.weight"]  # BERT's pooler belongs to the encoder
    logits, cls = model(torch.randint(0, 100, (3, 7)), torch.ones(3, 7, dtype=torch.long))
    assert logits.shape == (3, 5) and cls.shape == (3, 32)


@pytest.mark.slow
def test_transformers_and_pipeline_give_the_projects_test_predictions_minilm(tmp_path, shared_datasets, minilm_path):
    """The pretrained MiniLM (BERT architecture, pretrained pooler) fine-tuned for a few steps."""
    from lcl_tune.schema import trial as C

    cfg = C.from_dict({
        "model": {"name": str(minilm_path), "max_length": 48},
        "data": {"preset": "tweeteval_emotion", "root": str(shared_datasets / "tweeteval_emotion"),
                 "max_train_samples": 192, "max_dev_samples": 64, "max_test_samples": 300,
                 "cache_dir": str(tmp_path / "cache")},
        "loss": {"name": "lcl", "temperature": 0.3, "lam": 0.5}, "weighting": {"name": "self"},
        "optim": {"lr": 1e-4}, "train": {"batch_size": 32, "max_steps": 6, "threads": 2, "log_every": 100},
        "seed": 1,
    })
    summary, seed_dir = _final_model(cfg, tmp_path / "final")
    ours = _check_identical_predictions(cfg, summary, seed_dir)
    assert summary["test"]["accuracy"] > 0.4  # pretrained MiniLM learns something in 6 steps (majority ~0.4)
    assert len(ours) == 300


def test_identity_head_init_starts_the_head_on_the_cls_vector_itself():
    """``model.head_init: identity``: BERT's pooler (ELECTRA's classifier.dense) starts as the identity,
    so the head first reads tanh([CLS]) (gelu for ELECTRA); ``pretrained`` keeps the class's own init."""
    from transformers import AutoModelForSequenceClassification, ElectraConfig

    from lcl_tune.core.model import build_classifier, head_dense, identity_head

    bert = build_classifier("tiny", 3, vocab_size=100)
    assert head_dense(bert.hf)[0] == "bert.pooler.dense"
    assert torch.equal(bert.hf.bert.pooler.dense.weight, torch.eye(32)) and not bert.hf.bert.pooler.dense.bias.any()
    ids, mask = torch.randint(0, 100, (4, 6)), torch.ones(4, 6, dtype=torch.long)
    bert.eval()
    logits, cls = bert(ids, mask)
    torch.testing.assert_close(logits, bert.hf.classifier(torch.tanh(cls)))
    kept = build_classifier("tiny", 3, vocab_size=100, head_init="pretrained")
    assert not torch.equal(kept.hf.bert.pooler.dense.weight, torch.eye(32))

    electra = AutoModelForSequenceClassification.from_config(ElectraConfig(
        vocab_size=100, embedding_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=3))
    assert identity_head(electra) == "classifier.dense"
    assert torch.equal(electra.classifier.dense.weight, torch.eye(16))
