"""``lcl-tune``: the command line.

Heavy modules (torch, ray, mlflow) are imported inside each command, so ``lcl-tune --help`` and
``lcl-tune validate`` answer instantly and a bad config fails before anything heavy loads.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from lcl_tune.schema.trial import DATA_ENV, ConfigError
from lcl_tune.util import json_safe, log, redact, write_json

ADDRESS_HELP = "Ray cluster address, or auto for the one running on this machine (default: start a new local Ray)"


def cmd_train(args: argparse.Namespace) -> int:
    from lcl_tune.schema import trial as C

    cfg = C.load(args.config, args.set or [])
    if args.final:
        return _train_final(args, cfg)
    if args.seeds:
        raise ConfigError("--seeds", "only applies to --final", "add --final, or set the seed with --set seed=N")
    out = Path(args.out or f"lcl_runs/train/{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
    print(f"lcl-tune train: {cfg.loss.name} (τ={cfg.loss.temperature}, λ={cfg.loss.lam}, "
          f"weighting={cfg.weighting.name if cfg.uses_weighting else '-'}) -> {out}", file=sys.stderr)

    from lcl_tune.core.engine import Trainer  # heavy: torch + transformers

    # Each report is appended as it arrives: a crash keeps every evaluation done so far.
    with open(out / "reports.jsonl", "w") as fh:
        def on_report(report: dict) -> None:
            fh.write(json.dumps(json_safe(report)) + "\n")
            fh.flush()

        summary = Trainer(cfg).fit(on_report)
    write_json(out / "metrics.json", summary)
    final = summary["final"]
    print(f"done in {summary['wall_s']:.0f}s: dev accuracy {final.get('dev/accuracy', float('nan')):.4f} "
          f"(majority class {summary['majority_dev_accuracy']:.4f}), weighted-F1 "
          f"{final.get('dev/weighted_f1', float('nan')):.4f}; best {summary['best']['metric']} "
          f"{summary['best']['value']:.4f} at step {summary['best']['step']}\n"
          f"wrote {out / 'metrics.json'}", file=sys.stderr)
    return 0


def _train_final(args: argparse.Namespace, cfg) -> int:
    from lcl_tune.workflows.export import read_provenance
    from lcl_tune.workflows.final import train_final

    out = Path(args.out or f"lcl_runs/final/{Path(args.config).stem}").resolve()
    summaries = train_final(cfg, out, args.seeds, read_provenance(args.config))
    for seed, s in zip(args.seeds or [cfg.seed], summaries):
        test = s.get("test", {})
        print(f"seed {seed}: dev {s['final'].get('dev/' + cfg.train.metric, float('nan')):.4f} "
              f"test accuracy {test.get('accuracy', float('nan')):.4f} weighted-F1 "
              f"{test.get('weighted_f1', float('nan')):.4f} -> {s['model_dir']}", file=sys.stderr)
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from lcl_tune.schema.ablation import load_ablation

    ab = load_ablation(args.ablation, args.set or [])  # every check runs before Ray starts
    from lcl_tune.adapters.ablation_runner import run_ablation

    run_ablation(ab, args.storage, address=args.address, tracking_uri=args.tracking_uri, final=args.final)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import dataclasses

    from lcl_tune.adapters.ablation_runner import FINAL_DIR, write_ablation_report, write_test_report
    from lcl_tune.schema.ablation import load_ablation

    folder = Path(args.dir).resolve()
    if not (folder / "ablation.yaml").is_file():
        raise ConfigError("DIR", f"no ablation.yaml in {folder}", "pass the folder of an `lcl-tune ablate` run")
    ab = load_ablation(folder / "ablation.yaml", check_files=False)
    write_ablation_report(ab, folder)
    if any((folder / FINAL_DIR).glob("*.json")):  # the final phase ran: its test-split report too
        write_test_report(dataclasses.replace(ab, final=True), folder)
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    """Send what a study's (or ablation's) tracking spools still hold, then, for a study whose
    end could not write its MLflow summary, write it now."""
    from lcl_tune.adapters import spool as S
    from lcl_tune.adapters import tracking as T

    folder = Path(args.dir).resolve()
    if not (folder / "study.yaml").is_file() and not (folder / "ablation.yaml").is_file():
        raise ConfigError("DIR", f"no study.yaml or ablation.yaml in {folder}", "pass a study or ablation folder")
    paths = S.spools(folder / T.SPOOL_DIR)
    before = {p.name: len(S.Spool(p).pending()) for p in paths}
    left = T.drain_spools(folder, args.timeout)
    sent = sum(before.values()) - sum(left.values())
    print(f"{folder.name}: sent {sent} tracking records from {sum(1 for n in before.values() if n)} spools"
          + (f"; {sum(left.values())} still pending in {len(left)} (is the server up?)" if left else ""))
    if left:
        return 1
    results = folder / "results.parquet"
    if (folder / "study.yaml").is_file() and results.is_file() and paths:
        import pandas as pd

        from lcl_tune.adapters.study_runner import summarise_in_mlflow
        from lcl_tune.schema.study import load_study

        study = load_study(folder / "study.yaml", check_files=False)
        uri = next((S.Spool(p).acked().get("target", {}).get("uri") for p in paths), None)
        target = T.start_study(study.name, folder, kind="study", uri=uri)
        summarise_in_mlflow(target, pd.read_parquet(results), study, folder)
        print(f"{folder.name}: MLflow summary written")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """A study's or ablation's progress from its progress.json (or, for a folder of an earlier
    version, its results): the same table as the live one. Light: no Ray, torch or MLflow."""
    from lcl_tune.analysis.progress import watch_status

    watch_status(Path(args.dir).resolve(), sys.stdout, args.watch)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from lcl_tune.workflows.compare import compare, to_markdown, write_compare

    result = compare(args.dirs, args.select)
    print(to_markdown(result))
    files = write_compare(result, args.out)
    print(f"wrote {files['markdown']} and {files['plot']}", file=sys.stderr)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Label, probability and top-k of each text, from a model folder of ``train --final``."""
    from lcl_tune.workflows.predict import format_rows, load_pipeline, predict, read_texts, resolve_model_dir, to_frame

    resolve_model_dir(args.model_dir)  # a wrong folder is one line, before transformers loads
    texts = args.text if args.text else read_texts(args.file, args.text_column)
    rows = predict(load_pipeline(args.model_dir, args.device), texts, args.top_k, args.batch_size)
    if not args.out:
        print(format_rows(rows))
        return 0
    from lcl_tune.util import atomic_write

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: to_frame(rows).to_csv(tmp, index=False))
    print(f"wrote {len(rows)} predictions to {out}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lcl_tune.workflows.export import export, write_export

    doc = export(args.dir, args.select)
    out = Path(args.output or "best.yaml")
    write_export(doc, out)
    sel = doc["provenance"]["selection"]
    print(f"exported {doc['provenance']['source']} {doc['provenance']['name']!r}, {sel['rule']} by {sel['metric']}"
          f" -> {out}\nfinal training:  lcl-tune train {out} --final --seeds {doc['seed']}", file=sys.stderr)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Check a study (or trial config) and print its budget, without starting Ray or loading torch."""
    from lcl_tune.schema import trial as C
    from lcl_tune.schema.study import load_study

    tree = C.load_yaml(args.file)
    from lcl_tune.schema.ablation import is_ablation, load_ablation

    if is_ablation(tree):
        ab = load_ablation(args.file, args.set or [])
        b = ab.budget()
        print(f"{args.file}: valid ablation {ab.name!r}\n  arms       {', '.join(ab.arms)} (baseline {ab.baseline})\n"
              f"  seeds      {ab.seeds}\n  cells      {b['cells']}"
              + (f"\n  tuning     {b['tuning_trials']} trials before the cells" if ab.tune else ""))
        return 0
    if "space" not in tree:
        cfg = C.load(args.file, args.set or [])
        print(f"{args.file}: valid trial config ({cfg.loss.name}, weighting {cfg.weighting.name})")
        return 0
    study = load_study(args.file, args.set or [])
    if study.sampler_options:  # checked against the Optuna sampler's own arguments (imports Optuna)
        from lcl_tune.adapters.searcher import check_sampler_options

        check_sampler_options(study)
    b = study.budget()
    print(f"{args.file}: valid study {study.name!r}\n"
          f"  metric     {study.tune_metric} ({study.mode})\n"
          f"  space      {', '.join(f'{p.key} ({p.type})' for p in study.params)}\n"
          f"  search     {b['sampler']} sampler, {b['trials']} trials, {b['concurrency']} at a time"
          + (f" ({b['startup_trials']} random start-up trials)" if b['startup_trials'] else "") + "\n"
          f"  scheduler  {b['scheduler']}, max_t {b['max_t']} {b['time_unit']}s"
          + (f" per trial, at most {b['max_periods_total']} periods in all" if b['max_periods_total'] else "") + "\n"
          f"  resources  {b['resources']['cpu']:g} CPU, {b['resources']['gpu']:g} GPU per trial")
    _print_memory(study)
    for note in study.notes():
        print(f"note: {note}")
    return 0


def _print_memory(study) -> None:
    """The memory a trial of the study needs (largest batch / length / a second encoder if searched)."""
    from lcl_tune.core.memory import GPU_MEMORY_GIB, GiB, estimate_for_arch, heaviest_trial, safe_gpu_fraction

    est = estimate_for_arch(heaviest_trial(study))
    fits = []
    for gpu in ("T4", "A10G", "L40S", "H100"):  # from the GPU table: what a card can use
        gib = GPU_MEMORY_GIB[gpu]
        try:
            fits.append(f"{round(1 / safe_gpu_fraction(est, int(gib * GiB)))} per {gpu} ({gib:g} GiB)")
        except ValueError:
            fits.append(f"none on a {gpu} ({gib:g} GiB)")
    print(f"  memory     ~{est.total / GiB:.1f} GiB per trial (estimate: {', '.join(fits)})")


def cmd_tune(args: argparse.Namespace) -> int:
    from lcl_tune.schema.study import load_study

    study = load_study(args.space, args.set or [])  # every check runs before Ray starts
    if args.name:
        study.name = args.name
    from lcl_tune.adapters.study_runner import run_study  # heavy: ray, optuna, torch

    table = run_study(study, args.storage, resume=args.resume, address=args.address, tracking_uri=args.tracking_uri)
    return 0 if len(table) else 1


def cmd_ui(args: argparse.Namespace) -> int:
    from lcl_tune.cli.ui import serve  # heavy: mlflow

    return serve(study_dir=args.study_dir, tracking_uri=args.tracking_uri, host=args.host, port=args.port)


class _Plain(logging.Formatter):
    """The library's log lines as the command's own output: info as it is, problems prefixed."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def setup_logging(verbosity: int) -> None:
    """The ``lcl_tune`` logger prints to stderr: ``-q`` warnings only, ``-v`` debug too."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Plain("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel({-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG))
    log.propagate = False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lcl-tune", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_const", const=1, default=0, dest="verbosity",
                   help="also print debug messages")
    p.add_argument("-q", "--quiet", action="store_const", const=-1, dest="verbosity",
                   help="print warnings and errors only")
    p.add_argument("--data-root", metavar="DIR", help=f"folder of local dataset copies, one sub-folder per preset "
                   f"(goemotions/, sst5/, ...; sets {DATA_ENV}); default: ${DATA_ENV}, else the Hugging Face hub")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="one fine-tuning run from a trial config (no Ray)")
    t.add_argument("config", help="trial config YAML (see configs/)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a dotted key; repeatable")
    t.add_argument("--out", help="output folder (default lcl_runs/train/<timestamp>, or lcl_runs/final/<name>)")
    t.add_argument("--final", action="store_true",
                   help="final training: evaluate test once, save the model, log a run linked to the exported one")
    t.add_argument("--seeds", type=int, nargs="+", help="with --final: train once per seed")
    t.set_defaults(func=cmd_train)

    a = sub.add_parser("ablate", help="run an ablation: arms × paired seeds, with statistics (resumable)")
    a.add_argument("ablation", help="ablation YAML (see search_spaces/ablation_*.yaml)")
    a.add_argument("--set", action="append", metavar="KEY=VALUE", help="override seeds=[1,2], a trial key, ...")
    a.add_argument("--storage", default="lcl_runs")
    a.add_argument("--address", help=ADDRESS_HELP)
    a.add_argument("--tracking-uri", help="MLflow tracking server (default: the SQLite store STORAGE/mlflow.db)")
    a.add_argument("--final", action="store_true",
                   help="then train each arm's selected configuration on every seed again and evaluate the test split "
                        "once per seed: report/test/ (mean ± 95%% CI, paired tests, paper_table.tex)")
    a.set_defaults(func=cmd_ablate)

    r = sub.add_parser("report", help="(re)write the statistics report of an ablation folder")
    r.add_argument("dir")
    r.set_defaults(func=cmd_report)

    e = sub.add_parser("export", help="export the best trial or arm as a trial config with provenance")
    e.add_argument("dir", help="a study or ablation folder (STORAGE/NAME)")
    e.add_argument("--select", default="best", help="best (trial or cell) | mean | lcb (ablation arms)")
    e.add_argument("-o", "--output", help="output YAML (default best.yaml)")
    e.set_defaults(func=cmd_export)

    pr = sub.add_parser("predict", help="classify texts with a model saved by train --final (a transformers folder)")
    pr.add_argument("model_dir", help="the model folder of train --final (lcl_runs/final/NAME/seed<k>/model)")
    source = pr.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", help="a text to classify; repeatable")
    source.add_argument("--file", help="texts to classify: .txt (one per line), or .csv/.tsv/.jsonl/.parquet")
    pr.add_argument("--text-column", default="text", help="the text column of a table --file (default text)")
    pr.add_argument("--top-k", type=int, default=3, help="labels to list per text, most likely first (default 3)")
    pr.add_argument("--out", help="write a CSV (text, label, probability, top<i>_label, top<i>_probability) "
                    "instead of printing")
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--device", default="auto", help="auto (a GPU when there is one) | cpu | cuda | cuda:N")
    pr.set_defaults(func=cmd_predict)

    s = sub.add_parser("tune", help="run a study: Ray Tune + Optuna + ASHA over a YAML search space")
    s.add_argument("space", help="study YAML (see search_spaces/)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a study key (search.num_samples=4) or a trial key (train.max_steps=10)")
    s.add_argument("--storage", default="lcl_runs", help="folder holding studies (default ./lcl_runs)")
    s.add_argument("--name", help="study name (default: the YAML's name); the study lives in STORAGE/NAME")
    s.add_argument("--resume", action="store_true", help="continue an interrupted study")
    s.add_argument("--address", help=ADDRESS_HELP)
    s.add_argument("--tracking-uri", help="MLflow tracking server, e.g. http://head:5000 "
                   "(default: the SQLite store STORAGE/mlflow.db, shared by the studies of STORAGE)")
    s.set_defaults(func=cmd_tune)

    u = sub.add_parser("ui", help="start the MLflow UI for a storage root, a study folder or a tracking URI, "
                       "and print its URL")
    u.add_argument("study_dir", nargs="?", help="a storage root (lcl_runs: every study, one experiment each) "
                   "or a study folder in it (lcl_runs/NAME: its runs)")
    u.add_argument("--tracking-uri", help="browse this store (sqlite:///...) or running server (http://host:5000) "
                   "instead of a folder")
    u.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; 0.0.0.0 exposes the "
                   "UI, which has no login, to the network)")
    u.add_argument("--port", type=int, default=5000, help="port to listen on (default 5000; 0: a free one)")
    u.set_defaults(func=cmd_ui)

    c = sub.add_parser("compare", help="the best configuration and metric of studies / ablations side by side")
    c.add_argument("dirs", nargs="+", help="study or ablation folders (STORAGE/NAME)")
    c.add_argument("--select", default="best", help="best | mean | lcb (how an ablation's arm is chosen, as in export)")
    c.add_argument("--out", default="lcl_runs/compare", help="folder for compare.md and compare.png")
    c.set_defaults(func=cmd_compare)

    y = sub.add_parser("sync", help="send the MLflow records a study kept while its tracking server was down")
    y.add_argument("dir", help="a study or ablation folder (STORAGE/NAME)")
    y.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds (default 300)")
    y.set_defaults(func=cmd_sync)

    st = sub.add_parser("status", help="the trials table and progress of a running or finished study or ablation "
                        "(from its progress.json; instant, no Ray)")
    st.add_argument("dir", help="a study or ablation folder (STORAGE/NAME)")
    st.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until it ends (Ctrl-C stops)")
    st.set_defaults(func=cmd_status)

    v = sub.add_parser("validate", help="check a study or trial config and print its budget (no Ray, no torch)")
    v.add_argument("file")
    v.add_argument("--set", action="append", metavar="KEY=VALUE")
    v.set_defaults(func=cmd_validate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbosity)
    if args.data_root:  # an environment variable, so Ray workers (started by this process) inherit it
        os.environ[DATA_ENV] = str(Path(args.data_root).expanduser().resolve())
    try:
        return args.func(args)
    except ConfigError as e:
        print(redact(f"error: {e}"), file=sys.stderr)
        return 2
    finally:
        stop_tracking_senders()


SENDERS_STOP_S = 60.0  # how long a command waits, at its end, for tracking records still being sent


def stop_tracking_senders() -> None:
    """Stop the tracking senders a command left running (their records stay spooled if the store
    does not answer in time): none may still be sending while the interpreter shuts down."""
    tracking = sys.modules.get("lcl_tune.adapters.tracking")  # never imported by a light command
    if tracking is None:
        return
    for spool_dir in tracking.close_driver_senders(SENDERS_STOP_S):
        log.warning(f"tracking: records in {spool_dir} could not be sent within {SENDERS_STOP_S:.0f}s; "
                    f"send them when the server answers: lcl-tune sync {Path(spool_dir).parent}")


if __name__ == "__main__":
    sys.exit(main())
