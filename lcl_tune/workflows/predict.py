"""``lcl-tune predict MODEL_DIR --text ... | --file F``: classify texts with a model ``train --final`` saved.

The model folder is a plain transformers folder (:func:`lcl_tune.workflows.final.save_model`), so
this is a thin layer over transformers' ``pipeline("text-classification")``: read the texts, run the
pipeline with ``top_k`` and the training's truncation, and shape one row per text.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lcl_tune.schema.trial import ConfigError, check_data_file, file_format

TEXT_SUFFIXES = (".txt", ".text")


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """The transformers folder of ``path``: the folder itself, or the ``model/`` inside a
    ``seed<k>`` folder of ``train --final``. A folder in the private format of lcl_tune 0.1
    (``encoder/`` + ``head.pt``) is refused with what to do, since its raw-[CLS] head has no
    transformers equivalent."""
    folder = Path(path).expanduser()
    if (folder / "model" / "config.json").is_file():
        folder = folder / "model"
    if (folder / "head.pt").is_file() and (folder / "encoder").is_dir():
        raise ConfigError("MODEL_DIR", f"{folder} was saved by lcl_tune 0.1 (encoder/ + head.pt), which transformers "
                          "cannot load", "train it again with this version: lcl-tune train CONFIG --final")
    if not (folder / "config.json").is_file():
        raise ConfigError("MODEL_DIR", f"no model in {folder} (no config.json)",
                          "pass the model folder of train --final: lcl_runs/final/NAME/seed<k>/model")
    return folder


def read_texts(path: str | os.PathLike, text_column: str = "text") -> list[str]:
    """The texts of ``path``: a ``.txt`` file is one text per non-blank line; CSV / TSV / JSONL /
    Parquet files give their ``text_column``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--file", f"file not found: {path}", "check the path")
    if path.suffix.lower() in TEXT_SUFFIXES:
        _check_file(path, "text")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            line = path.read_bytes()[:e.start].count(b"\n") + 1
            raise ConfigError("--file", f"line {line} of {path.name} is not UTF-8 text", "re-save it as UTF-8") from None
        texts = [t for t in lines if t.strip()]
    else:
        texts = _table_texts(path, text_column)
    if not texts:
        raise ConfigError("--file", f"{path.name} holds no text", "give it one text per line (or row)")
    return texts


def _table_texts(path: Path, text_column: str) -> list[str]:
    import pyarrow as pa

    from lcl_tune.core.data import read_table

    try:
        fmt = file_format(str(path))
    except ConfigError:
        raise ConfigError("--file", f"cannot tell the format of {path.name} from its extension",
                          "use .txt (one text per line), .csv, .tsv, .jsonl or .parquet") from None
    _check_file(path, fmt)
    try:
        table = read_table(str(path), fmt)
    except (pa.ArrowException, UnicodeDecodeError, OSError) as e:
        raise ConfigError("--file", f"cannot read {path.name} as {fmt} ({str(e).splitlines()[0][:120]})",
                          "check the file, or pass plain text as a .txt file") from None
    if text_column not in table.column_names:
        raise ConfigError("--text-column", f"column {text_column!r} not in {path.name} "
                          f"(columns: {', '.join(table.column_names)})", "pass --text-column NAME")
    return ["" if t is None else str(t) for t in table.column(text_column).to_pylist()]


def _check_file(path: Path, fmt: str) -> None:
    """The data-file checks (empty, binary), named by this command's option."""
    try:
        check_data_file(str(path), fmt)
    except ConfigError as e:
        raise ConfigError("--file", e.problem, e.fix) from None


def load_pipeline(model_dir: str | os.PathLike, device: str = "auto") -> Any:
    """transformers' own text-classification pipeline over the saved folder (local files only)."""
    import torch
    from transformers import pipeline

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = resolve_model_dir(model_dir)
    return pipeline("text-classification", model=str(folder), device=device, local_files_only=True)


def predict(classifier: Any, texts: list[str], top_k: int = 3, batch_size: int = 32) -> list[dict[str, Any]]:
    """One row per text: the predicted ``label``, its ``probability``, and the ``top`` ``top_k``
    (label, probability) pairs, most likely first. Texts are truncated at the length the model
    was trained with (the saved tokenizer's ``model_max_length``)."""
    k = max(1, min(top_k, classifier.model.config.num_labels))
    outputs = classifier(texts, top_k=k, truncation=True, batch_size=batch_size)
    rows = []
    for text, scores in zip(texts, outputs):
        top = [(s["label"], float(s["score"])) for s in scores]
        rows.append({"text": text, "label": top[0][0], "probability": top[0][1], "top": top})
    return rows


def to_frame(rows: list[dict[str, Any]]) -> Any:
    """The rows as a table: ``text, label, probability``, then ``top<i>_label`` / ``top<i>_probability``."""
    import pandas as pd

    flat = []
    for row in rows:
        item = {"text": row["text"], "label": row["label"], "probability": row["probability"]}
        for i, (label, p) in enumerate(row["top"], 1):
            item[f"top{i}_label"], item[f"top{i}_probability"] = label, p
        flat.append(item)
    return pd.DataFrame(flat)


def format_rows(rows: list[dict[str, Any]], width: int = 60) -> str:
    """A terminal table: the text (shortened), the label with its probability, the other top-k."""
    lines = []
    for row in rows:
        text = row["text"].replace("\n", " ")
        text = text if len(text) <= width else text[:width - 1] + "…"
        rest = ", ".join(f"{label} {p:.3f}" for label, p in row["top"][1:])
        lines.append(f"{text:<{width}}  {row['label']} {row['probability']:.3f}" + (f"  ({rest})" if rest else ""))
    return "\n".join(lines)
