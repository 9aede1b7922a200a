"""The GPU's failure paths, checked for real: the ``faults`` part of ``bench_gpu.py`` (it runs first).

No CPU test can see these, so the one GPU command checks them on the device:

* ``resume after SIGKILL``: a bf16 trial (``lcl-separate``: two encoders, both dropout streams)
  checkpoints every period in its own process, is killed with SIGKILL after period 2, and a new
  process restores the checkpoint on the GPU (CUDA random states included) and continues: its
  steps carry on from the checkpoint and it ends where an uninterrupted run ends; the difference
  of their last dev loss is recorded (bf16 kernels need not be bit-identical).
* ``out of memory``: with the process limited to a small share of the GPU
  (``torch.cuda.set_per_process_memory_fraction``, what a fractional-GPU trial meets), a large
  batch raises a real CUDA out-of-memory error; it must be classified as such
  (:func:`lcl_tune.core.failures.error_kind`), and the retry, at the full share and the normal
  batch, from the last checkpoint, must train.
* ``compile``: a ``train.compile`` trial trains a period, checkpoints, and a second compiled
  trainer restores and trains on: the parameter names of compiled and eager models agree.

On a CPU (the smoke run) the CUDA-only checks say ``not run (no CUDA)``; the resume check runs.
"""

from __future__ import annotations

import gc
import json
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_gpu as B  # noqa: E402
from lcl_tune.core.engine import Trainer, restore_first_good  # noqa: E402
from lcl_tune.core.failures import TrialOutOfMemory, error_kind, oom_is_a_resource_problem  # noqa: E402
from lcl_tune.util import write_json  # noqa: E402

PERIOD_STEPS, PERIODS, KILL_AFTER = 10, 3, 2


def fault_flat(b: Any, **extra: Any) -> dict[str, Any]:
    return {**b.base_flat(), **B.LOSS_CASES["lcl-separate"], "train.precision": "bf16",
            "train.max_steps": PERIOD_STEPS * PERIODS, "train.eval_every": PERIOD_STEPS, **extra}


def _history(trainer: Trainer) -> list[dict[str, float]]:
    return [{"step": r["step"], "dev/loss": r["dev/loss"]} for r in trainer.history]


def check_resume(b: Any, run_dir: Path) -> dict[str, Any]:
    """SIGKILL a checkpointing trial after period ``KILL_AFTER``; restore and finish in a new process."""
    run_dir.mkdir(parents=True, exist_ok=True)
    B.save_prepared(b.data.data, run_dir / "data.npz")
    flat = fault_flat(b)
    reference = Trainer(B.build_config(flat), data=b.data.data, progress=False)
    reference.fit()
    spec = {"flat": flat, "data": str(run_dir / "data.npz"), "dir": str(run_dir), "stub": b.data.stub_tokenizer}
    first = _worker(run_dir, "first", spec)
    deadline = time.monotonic() + 300
    while not (run_dir / f"ckpt_{KILL_AFTER}.pt").exists() or not (run_dir / "first.ready").exists():
        if first.poll() is not None or time.monotonic() > deadline:
            return {"check": "resume after SIGKILL", "status": "failed", "error": B._tail(run_dir / "first.log", 8)}
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    second = _worker(run_dir, "second", spec)
    second.wait(timeout=600)
    out = B._read_json(run_dir / "second.json")
    if second.returncode != 0 or out is None:
        return {"check": "resume after SIGKILL", "status": "failed", "error": B._tail(run_dir / "second.log", 8)}
    ref = _history(reference)
    resumed_steps = [h["step"] for h in out["history"]]
    continued = out["restored_step"] == KILL_AFTER * PERIOD_STEPS and resumed_steps == [h["step"] for h in ref]
    diff = abs(out["history"][-1]["dev/loss"] - ref[-1]["dev/loss"])
    return {"check": "resume after SIGKILL", "status": "ok" if continued else "failed",
            "restored_step": out["restored_step"], "steps": resumed_steps, "killed_after_period": KILL_AFTER,
            "last_dev_loss_resumed": out["history"][-1]["dev/loss"], "last_dev_loss_uninterrupted": ref[-1]["dev/loss"],
            "abs_diff_last_dev_loss": diff, "device": b.device_label}


def _worker(run_dir: Path, phase: str, spec: dict[str, Any]) -> subprocess.Popen:
    path = run_dir / f"{phase}.spec.json"
    path.write_text(json.dumps({**spec, "phase": phase}))
    log = open(run_dir / f"{phase}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(path)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=str(HERE.parent))


def worker_main(spec_path: str) -> int:
    """``first``: train, checkpoint every period, wait to be killed after ``KILL_AFTER``;
    ``second``: restore the newest good checkpoint and train to the end."""
    spec = json.loads(Path(spec_path).read_text())
    if spec["stub"]:
        B.stub_engine_tokenizer()
    run_dir = Path(spec["dir"])
    trainer = Trainer(B.build_config(spec["flat"]), data=B.load_prepared(Path(spec["data"])), progress=False)
    if spec["phase"] == "first":
        for report in trainer.run():
            trainer.save(run_dir / f"ckpt_{report['period']}.pt")
            if report["period"] == KILL_AFTER:
                (run_dir / "first.ready").touch()
                time.sleep(3600)  # killed here
        return 1
    candidates = sorted(run_dir.glob("ckpt_*.pt"), key=lambda p: int(p.stem.split("_")[1]), reverse=True)
    restore_first_good(trainer, candidates)
    restored = trainer.step
    trainer.fit()
    write_json(run_dir / "second.json", {"restored_step": restored, "history": _history(trainer)})
    return 0


def check_oom(b: Any, run_dir: Path) -> dict[str, Any]:
    """A real CUDA OOM at a small memory share, classified, then retried from the checkpoint."""
    if not b.device.startswith("cuda"):
        return {"check": "out of memory", "status": "not run (no CUDA)"}
    device = torch.device(b.device)
    big = fault_flat(b, **{"train.batch_size": 4096, "train.pad_to": b.args.max_length})
    kind, message = None, ""
    torch.cuda.set_per_process_memory_fraction(0.02, device)
    try:
        with oom_is_a_resource_problem(0.02, 4096):
            trainer = Trainer(B.build_config(big), data=b.data.data, progress=False)
            trainer.train_step(trainer.epoch_batches(0)[0])
    except TrialOutOfMemory:
        kind, message = error_kind(traceback.format_exc()), traceback.format_exc().strip().splitlines()[-1][:300]
    except Exception:  # noqa: BLE001 - anything else is a failed check, with its reason
        kind, message = "exception", traceback.format_exc().strip().splitlines()[-1][:300]
    finally:
        trainer = None
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    retried = Trainer(B.build_config(fault_flat(b)), data=b.data.data, progress=False)
    restored = restore_first_good(retried, [run_dir / f"ckpt_{KILL_AFTER}.pt"])
    steps_before = retried.step
    report = next(retried.run())
    ok = kind == "out of memory" and restored is not None and report["step"] == steps_before + PERIOD_STEPS
    return {"check": "out of memory", "status": "ok" if ok else "failed", "classified_as": kind, "error": message,
            "retry_restored_step": steps_before, "retry_reached_step": report["step"]}


def check_compile(b: Any, run_dir: Path) -> dict[str, Any]:
    """``train.compile``: train a period, checkpoint, restore into a second compiled trainer, go on."""
    if b.args.no_compile or "train.compile" not in b.keys:
        return {"check": "compile", "status": "not run (--no-compile)"}
    flat = fault_flat(b, **{"train.compile": True})
    t0 = time.perf_counter()
    first = Trainer(B.build_config(flat), data=b.data.data, progress=False)
    report = next(first.run())
    compile_s = time.perf_counter() - t0
    first.save(run_dir / "compiled.pt")
    second = Trainer(B.build_config(flat), data=b.data.data, progress=False)
    second.restore(run_dir / "compiled.pt")
    nxt = next(second.run())
    ok = nxt["step"] == report["step"] + PERIOD_STEPS and all(map(_finite, (report["dev/loss"], nxt["dev/loss"])))
    return {"check": "compile", "status": "ok" if ok else "failed", "first_period_s_with_compile": compile_s,
            "steps": [report["step"], nxt["step"]]}


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def part_faults(b: Any) -> dict[str, Any]:
    run_dir = b.out / "_faults"
    rows = []
    for check in (check_resume, check_oom, check_compile):
        try:
            rows.append(check(b, run_dir))
        except Exception as e:  # noqa: BLE001 - a crash is a failed check, reported with its reason
            rows.append({"check": check.__name__, "status": "failed", "error": f"{type(e).__name__}: {e}"[:500]})
        b.log(f"faults: {rows[-1]['check']}: {rows[-1]['status']}")
    failed = [r for r in rows if r["status"] == "failed"]
    return {"rows": rows, "status": "failed" if failed else "ok"}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2]))
    sys.exit("run through bench_gpu.py (--parts faults)")
