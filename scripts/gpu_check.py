"""The GPU check: catdog's CUDA paths in one run, each a PASS / FAIL / SKIP line with its figures.

    bash scripts/gpu_check.sh                      # what to run (installs .gpu/wheels, sets PYTHONPATH, runs this)
    python3 scripts/gpu_check.py --device cpu      # the same steps on CPU; the CUDA-only checks say "skipped: no CUDA"

Steps, each a subprocess with its own timeout inside one overall budget (a step that fails or times out is reported
and the check goes on): the environment; every module and command imports; catdog-prep on the photo set; 2 epochs of
configs/cnn.yaml through the real shard loader (pinned batches) with CATDOG_SYNC_DEBUG=1, i.e. torch.cuda's sync
debug mode "error" around every training step after the first (a host sync there raises) and the loader's wait
timed; catdog-evaluate on the GPU against the trainer's validation accuracy; catdog-predict on the GPU against the
CPU; TorchScript and ONNX exports against PyTorch on the GPU; bench/gpu.py's training steps (scratch CNN and
InceptionV3, bf16 and fp16, channels_last, eager and torch.compile) last, with what is left of the budget.
Commands run through scripts/catdog_cli.py (entry points from pyproject.toml). Writes gpu_check.txt (the report),
gpu_check.json and gpu_check.log (every step's output) into --out, rewritten after every step.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "scripts" / "catdog_cli.py"
LOADER_WAIT_MAX = 0.25  # share of the training loop spent waiting for batches, past the first one
# Max |probability difference| between two runs of one model in fp32: on one device (kernel choice), and between
# a GPU and a CPU (the GPU's convolutions and matmuls in TF32, as the model trained: train.tf32).
SAME_DEVICE_TOL, CROSS_DEVICE_TOL = 2e-3, 1e-2
EVAL_FLIPS = 2  # photos whose class catdog-evaluate may round the other way than the trainer's validation (bf16)
TIMEOUTS = {"environment": 90, "imports": 150, "prep": 120, "train": 240, "evaluate": 150, "predict": 120}
TIMEOUTS |= {"export": 180, "bench": 400}
# engine.SyncProbe's line, one per epoch: (desc, micro-batches, checked, wait s, loop s, first batch s)
SYNC_LINE = re.compile(
    r"sync-debug: (.*?): (\d+) micro-batches, (?:(\d+) checked.*?|no CUDA.*?); loader wait ([\d.]+) s of ([\d.]+) s"
    r".*?first batch ([\d.]+) s"
)
CPU_SLOWER = 3  # the per-step timeouts on CPU (dry runs): CPU training and exports take a few times longer

ENV_PROBE = """
import json, os, platform, torch
d = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
     "cpus": os.cpu_count(), "gpu": None}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    d.update(gpu=p.name, gpu_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
             gpus=torch.cuda.device_count())
try:
    import onnxruntime
    d["onnxruntime"] = onnxruntime.get_available_providers()
except ImportError as e:
    d["onnxruntime"] = [f"not importable: {e}"]
print(json.dumps(d))
"""

IMPORT_PROBE = """
import importlib, pkgutil, runpy, sys
failed, count = [], 0
for pkg in ("data_prep", "train", "launch"):
    mod = importlib.import_module(pkg)
    for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
        try:
            importlib.import_module(info.name)
            count += 1
        except Exception as e:
            failed.append(f"{info.name}: {type(e).__name__}: {e}")
print(f"{count} modules imported")
for line in failed:
    print("FAILED", line)
sys.argv = ["scripts/catdog_cli.py", "--list"]  # every command's entry point resolves (pyproject.toml)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclass
class Result:
    check: str
    status: str  # PASS | FAIL | SKIP
    detail: str = ""
    figures: dict = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class Proc:
    rc: int | None  # None: timed out or not started
    output: str = ""
    seconds: float = 0.0
    note: str = ""  # why rc is None

    def tail(self, n: int = 1) -> str:
        lines = [ln.strip() for ln in self.output.replace("\r", "\n").splitlines() if ln.strip()]
        return " | ".join(lines[-n:])[:400] if lines else "(no output)"

    def failure(self) -> str:
        return self.note or f"exit {self.rc}: {self.tail(1)}"


class Check:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.cuda = args.device == "cuda"  # False once the environment step finds no GPU
        self.dev = "cuda:0" if self.cuda else "cpu"
        self.start = time.monotonic()
        self.deadline = self.start + args.budget_s
        self.out, self.work = Path(args.out), Path(args.work)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = open(self.out / "gpu_check.log", "w")
        self.env: dict = {}
        self.results: list[Result] = []
        self.bench_table = ""
        self.complete = False

    # -- running steps -------------------------------------------------------------------------------------------
    def timeout(self, step: str) -> float:
        return TIMEOUTS[step] * (1 if self.cuda else CPU_SLOWER)

    def run(self, name: str, argv: list[str], timeout: float, env: dict | None = None) -> Proc:
        """``argv`` in its own process group, killed with its children at ``timeout`` s or the overall deadline."""
        remaining = self.deadline - time.monotonic()
        if remaining < 5:
            return Proc(None, note=f"skipped: past the check's {self.args.budget_s:.0f} s budget")
        limit = min(timeout, remaining)
        self.log.write(f"\n===== {name}: {' '.join(argv)} (timeout {limit:.0f} s)\n")
        self.log.flush()
        t0 = time.monotonic()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
        p = subprocess.Popen(
            argv, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            errors="replace", start_new_session=True,
        )  # fmt: skip
        try:
            output, _ = p.communicate(timeout=limit)
            proc = Proc(p.returncode, output, time.monotonic() - t0)
        except subprocess.TimeoutExpired:
            output = self._kill(p)
            proc = Proc(None, output, time.monotonic() - t0, note=f"timed out after {limit:.0f} s")
        finally:
            if p.poll() is None:  # the check itself was stopped: leave no step behind
                self._kill(p)
        self.log.write(proc.output + f"\n===== {name}: {proc.note or f'exit {proc.rc}'} in {proc.seconds:.1f} s\n")
        self.log.flush()
        return proc

    @staticmethod
    def _kill(p: subprocess.Popen) -> str:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(p.pid, sig)
                return p.communicate(timeout=wait)[0] or ""
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        return ""

    def cli(self, name: str, *args: str) -> list[str]:
        return [sys.executable, str(CLI), name, *args]

    def add(self, result: Result) -> None:
        self.results.append(result)
        print(self.line(result), flush=True)
        self.write()

    @staticmethod
    def line(r: Result) -> str:
        return f"{r.status:<4}  {r.check}: {r.detail}" + (f"  [{r.seconds:.0f} s]" if r.seconds else "")

    def write(self) -> None:
        """The report so far, atomically: a check stopped half-way leaves a report that says it is incomplete."""
        elapsed = time.monotonic() - self.start
        state = "complete" if self.complete else "INCOMPLETE (stopped or still running)"
        head = [f"catdog GPU check, --device {self.args.device}: {state}, {elapsed:.0f} s", self.describe_env(), ""]
        text = "\n".join(head + [self.line(r) for r in self.results])
        if self.bench_table:
            text += "\n\nbench/gpu.py (synthetic batches: the training step alone)\n" + self.bench_table
        counts = {s: sum(r.status == s for r in self.results) for s in ("PASS", "FAIL", "SKIP")}
        text += "\n\n" + ", ".join(f"{n} {s.lower()}" for s, n in counts.items()) + "\n"
        doc = {"complete": self.complete, "device": self.args.device, "seconds": round(elapsed, 1), "env": self.env}
        doc |= {"counts": counts, "results": [asdict(r) for r in self.results]}
        for name, body in (("gpu_check.txt", text), ("gpu_check.json", json.dumps(doc, indent=2) + "\n")):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(body)
            os.replace(tmp, self.out / name)

    def describe_env(self) -> str:
        e = self.env
        if not e:
            return "environment: unknown"
        gpu = f"{e['gpu']} ({e['gpu_gib']} GiB, capability {e['capability']})" if e.get("gpu") else "no CUDA GPU"
        return (
            f"{gpu}; torch {e['torch']} (CUDA {e['cuda']}), Python {e['python']}, {e['cpus']} CPUs; "
            f"onnxruntime providers: {', '.join(e.get('onnxruntime', []))}"
        )

    def skip_no_cuda(self, check: str) -> bool:
        if not self.cuda:
            self.add(Result(check, "SKIP", "skipped: no CUDA"))
        return not self.cuda

    # -- the steps -----------------------------------------------------------------------------------------------
    def environment(self) -> None:
        p = self.run("environment", [sys.executable, "-c", ENV_PROBE], self.timeout("environment"))
        line = next((ln for ln in reversed(p.output.splitlines()) if ln.startswith("{")), None)
        if p.rc != 0 or line is None:
            self.cuda = False
            self.add(
                Result("environment", "FAIL", f"python3 -c 'import torch' failed: {p.failure()}", seconds=p.seconds)
            )
            return
        self.env = json.loads(line)
        if self.args.device == "cuda" and not self.env.get("gpu"):
            self.cuda, self.dev = False, "cpu"
            self.add(Result("environment", "FAIL", "no CUDA GPU visible to torch; " + self.describe_env()))
            return
        self.add(Result("environment", "PASS", self.describe_env(), self.env, p.seconds))

    def imports(self) -> None:
        p = self.run("imports", [sys.executable, "-c", IMPORT_PROBE], self.timeout("imports"))
        failed = [ln.removeprefix("FAILED ") for ln in p.output.splitlines() if ln.startswith("FAILED ")]
        commands = [ln.split(" = ")[0] for ln in p.output.splitlines() if re.match(r"^catdog-\S+ = ", ln)]
        modules = re.search(r"(\d+) modules imported", p.output)
        if p.rc == 0 and not failed:
            detail = (
                f"{modules.group(1) if modules else '?'} modules of data_prep, train, launch; {len(commands)} commands"
            )
            self.add(Result("imports", "PASS", detail + f" ({', '.join(commands)})", seconds=p.seconds))
        else:
            self.add(Result("imports", "FAIL", "; ".join(failed[:4]) or p.failure(), seconds=p.seconds))

    def prep(self) -> Path | None:
        shards = self.work / "shards"
        p = self.run(
            "prep",
            self.cli("catdog-prep", self.args.photos, str(shards), "--image-size", "192", "--no-progress"),
            self.timeout("prep"),
        )
        if p.rc != 0:
            self.add(Result("catdog-prep", "FAIL", p.failure(), seconds=p.seconds))
            return None
        splits = json.loads((shards / "_info.json").read_text())["splits"]
        n = {k: v["num_samples"] for k, v in splits.items() if v.get("num_samples") and k != "validation"}  # = val
        self.add(Result("catdog-prep", "PASS", f"{self.args.photos} -> shards at 192 px: {n}", n, p.seconds))
        return shards

    def train(self, shards: Path) -> Path | None:
        """One real training run checks three things: it trains, no step syncs, the loader keeps up."""
        run_dir = self.work / "run"
        overrides = [f"data.dir={shards}", "train.epochs=2", "train.batch_size=32", "track.backends=[csv]"]
        argv = self.cli("catdog-launch", "local", "--config", "configs/cnn.yaml", *overrides)
        # train.log_every=0: the progress bar's periodic loss read (a host sync) is off, the rest is the real loop.
        hooked = argv + [f"run.dir={run_dir}", "train.log_every=0"]
        p = self.run("train (CATDOG_SYNC_DEBUG=1)", hooked, self.timeout("train"), {"CATDOG_SYNC_DEBUG": "1"})
        probes = SYNC_LINE.findall(p.output)
        self.add(self.sync_result(p, probes))
        self.add(self.loader_result(probes, p))
        if p.rc != 0:  # the checks below need a trained model: train again without the hook
            run_dir = self.work / "run_plain"
            p = self.run("train (plain)", argv + [f"run.dir={run_dir}"], self.timeout("train"))
        check = "trainer: 2 epochs of configs/cnn.yaml"
        if p.rc != 0:
            self.add(Result(check, "FAIL", p.failure(), seconds=p.seconds))
            return None
        best = json.loads((run_dir / "final_metrics.json").read_text())["best/val/accuracy"]
        layout = re.search(r"INFO (\S+ on \d+ process\(es\) \(.*?\)):", p.output)
        detail = f"best val accuracy {best:.4f}" + (f"; {layout.group(1)}" if layout else "")
        self.add(Result(check, "PASS", detail, {"best_val_accuracy": best}, p.seconds))
        return run_dir

    def sync_result(self, p: Proc, probes: list[tuple]) -> Result:
        check = "no host sync in the training step"
        synced = re.search(r"^.*called a synchronizing CUDA operation.*$", p.output, re.M)  # main or pin thread
        if synced:  # the innermost frame of our own code says which line synchronised
            ours = re.findall(r'File "([^"]*/(?:train|launch|data_prep)/[^"]+)", line (\d+)', p.output)
            at = f" at {os.path.relpath(ours[-1][0], ROOT)}:{ours[-1][1]}" if ours else ""
            return Result(check, "FAIL", synced.group(0).strip()[:200] + at, seconds=p.seconds)
        if p.rc != 0:
            return Result(check, "FAIL", f"the trainer failed: {p.failure()}", seconds=p.seconds)
        if not self.cuda:
            return Result(check, "SKIP", f"skipped: no CUDA (the hook ran in {len(probes)} epochs)")
        checked = sum(int(m[2] or 0) for m in probes)
        detail = f"{checked} micro-batches of the real trainer ran under torch.cuda.set_sync_debug_mode('error')"
        return Result(check, "PASS" if checked else "FAIL", detail, {"checked": checked})

    def loader_result(self, probes: list[tuple], p: Proc) -> Result:
        check = "loader keeps the GPU busy"
        if not probes:
            return Result(check, "FAIL" if self.cuda else "SKIP", f"not measured: the trainer failed ({p.failure()})")
        wait, loop = sum(float(m[3]) for m in probes), sum(float(m[4]) for m in probes)
        share = wait / max(loop, 1e-9)
        first = [float(m[5]) for m in probes]
        figures = {"wait_s": wait, "loop_s": loop, "share": round(share, 4), "first_batch_s": first}
        detail = (
            f"the loop waited {wait:.2f} s of {loop:.2f} s ({100 * share:.1f} %) for batches after each epoch's first "
            f"(first batch: {', '.join(f'{f:.2f}' for f in first)} s); pinned batches, default workers"
        )
        if not self.cuda:
            return Result(check, "SKIP", f"skipped: no CUDA; on CPU {detail}", figures)
        ok = share <= LOADER_WAIT_MAX
        return Result(check, "PASS" if ok else "FAIL", f"{detail} (limit {LOADER_WAIT_MAX:.0%})", figures)

    def evaluate(self, run_dir: Path, shards: Path) -> None:
        check = f"catdog-evaluate on {self.dev} reproduces the trainer's val accuracy"
        # The trainer's eval batch: the same batch shapes make the same kernel choices likelier.
        batch = yaml.safe_load((run_dir / "config.yaml").read_text())["eval"]["batch_size"]
        out = self.work / "eval"
        model = str(run_dir / "model")
        argv = self.cli(
            "catdog-evaluate", model, str(shards), "--split", "val", "--device", self.dev, "--out", str(out)
        )
        p = self.run("evaluate", argv + ["--batch-size", str(batch)], self.timeout("evaluate"))
        if p.rc != 0:
            self.add(Result(check, "FAIL", p.failure(), seconds=p.seconds))
            return
        trained = json.loads((run_dir / "final_metrics.json").read_text())["best/val/accuracy"]
        scored = json.loads((out / "metrics.json").read_text())
        acc, n = scored["accuracy"], scored["samples"]
        # Same photos, weights and precision (bf16 on a GPU): a kernel choice may round a borderline photo otherwise.
        ok = round(abs(acc - trained) * n) <= EVAL_FLIPS
        detail = f"{acc:.4f} vs the trainer's {trained:.4f} on {n} photos (allowed: {EVAL_FLIPS} photos)"
        self.add(Result(check, "PASS" if ok else "FAIL", detail, {"evaluate": acc, "trainer": trained}, p.seconds))

    def predict(self, model: Path, device: str, tag: str) -> tuple[dict | None, Proc]:
        """{photo: probabilities} of catdog-predict in fp32 on the val photos."""
        csv_path = self.work / f"pred_{tag}.csv"
        photos = str(Path(self.args.photos) / "val")
        options = ["--device", device, "--precision", "fp32", "--no-progress", "-o", str(csv_path)]
        argv = self.cli("catdog-predict", str(model), photos, *options)
        p = self.run(f"predict {tag}", argv, self.timeout("predict"))
        if p.rc != 0:
            return None, p
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        return {r["path"]: [float(v) for k, v in r.items() if k.startswith("p_") and v] for r in rows}, p

    @staticmethod
    def compare(a: dict, b: dict) -> tuple[float, int, int]:
        """(max |probability difference|, photos whose predicted class differs, photos) over the photos in both."""
        common = [k for k in a if k in b and a[k] and b[k]]
        diff = max((abs(x - y) for k in common for x, y in zip(a[k], b[k], strict=True)), default=float("nan"))
        flips = sum(a[k].index(max(a[k])) != b[k].index(max(b[k])) for k in common)
        return diff, flips, len(common)

    def predictions_and_exports(self, run_dir: Path) -> None:
        ref, p = self.predict(run_dir / "model", self.dev, "bundle_" + self.dev.replace(":", ""))
        if ref is None:
            self.add(Result(f"catdog-predict on {self.dev}", "FAIL", p.failure(), seconds=p.seconds))
            return
        if not self.skip_no_cuda("catdog-predict on cuda:0 matches the CPU"):
            cpu, q = self.predict(run_dir / "model", "cpu", "bundle_cpu")
            check = "catdog-predict on cuda:0 matches the CPU"
            self.add(self.agreement(check, ref, cpu, q, "cuda:0 vs cpu", CROSS_DEVICE_TOL))
        for fmt, suffix in (("torchscript", "pt"), ("onnx", "onnx")):
            path = self.work / f"model.{suffix}"
            check = f"{fmt} export matches PyTorch on {self.dev}"
            p = self.run(
                f"export {fmt}",
                self.cli("catdog-export", str(run_dir), "--format", fmt, "--out", str(path)),
                self.timeout("export"),
            )
            if p.rc != 0:
                self.add(Result(check, "FAIL", f"catdog-export --format {fmt}: {p.failure()}", seconds=p.seconds))
                continue
            got, q = self.predict(path, self.dev, f"{fmt}_{self.dev.replace(':', '')}")
            providers = self.env.get("onnxruntime", [])
            on_cpu = fmt == "onnx" and self.cuda and "CUDAExecutionProvider" not in providers  # ORT falls back
            tol = CROSS_DEVICE_TOL if on_cpu else SAME_DEVICE_TOL
            result = self.agreement(check, ref, got, q, f"{fmt} vs the bundle", tol)
            if on_cpu and result.status == "PASS":
                result.status = "SKIP"
                result.detail = (
                    f"skipped: onnxruntime has no CUDA provider ({', '.join(providers)}); on its CPU: {result.detail}"
                )
            self.add(result)

    def agreement(self, check: str, ref: dict, got: dict | None, p: Proc, what: str, tol: float) -> Result:
        if got is None:
            return Result(check, "FAIL", p.failure(), seconds=p.seconds)
        diff, flips, n = self.compare(ref, got)
        ok = n > 0 and diff <= tol
        detail = f"{what}: max |p diff| {diff:.2e} over {n} photos (limit {tol:g}), {flips} predicted class(es) differ"
        return Result(
            check, "PASS" if ok else "FAIL", detail, {"max_abs_diff": diff, "flips": flips, "photos": n}, p.seconds
        )

    def bench(self) -> None:
        rows_path = self.work / "bench.json"
        if self.cuda:
            budget = max(20.0, self.deadline - time.monotonic() - 120)  # a compiled InceptionV3 row takes up to ~90 s
            args = ["--steps", "50", "--warmup", "5", "--budget-s", f"{budget:.0f}"]
        else:
            args = ["--device", "cpu", "--steps", "1"]
        p = self.run(
            "bench/gpu.py", [sys.executable, "bench/gpu.py", "--json", str(rows_path), *args], self.timeout("bench")
        )
        rows = json.loads(rows_path.read_text()) if rows_path.is_file() else []
        table = p.output.split("\n\n")[-1].strip().splitlines()
        self.bench_table = "\n".join(ln for ln in table if not ln.startswith("total")) if p.rc == 0 else ""
        seen = set()
        for r in rows:
            name = "scratch_cnn" if r["model"] == "cnn" else "inception_v3"
            mode = "compiled" if r["compiled"] else "eager"
            seen.add((name, r["precision"], mode))
            check = f"train step {name} {r['size']} px x{r['batch']} {r['precision']} channels_last {mode}"
            check += f" on {r['ranks']} ranks" if r["ranks"] > 1 else ""
            if r["note"].startswith(("failed", "torchrun failed", "timed out")):
                self.add(Result(check, "FAIL", r["note"], r))
            elif r["note"].startswith("skipped"):
                self.add(Result(check, "SKIP", r["note"], r))
            else:
                peak = f", peak {r['peak_gib']:.2f} GiB" if r.get("peak_gib") is not None else ""
                speed = f"{r['images_per_s']:,.0f}" if r["images_per_s"] >= 100 else f"{r['images_per_s']:.2f}"
                detail = f"{speed} img/s, {r['step_ms']:.1f} ms/step{peak}, warm-up {r['warmup_s']:.1f} s"
                self.add(Result(check, "PASS", detail + (f" ({r['note']})" if r["note"] else ""), r))
        for name, prec, mode in itertools.product(
            ("scratch_cnn", "inception_v3"), ("bf16", "fp16"), ("eager", "compiled")
        ):
            if (name, prec, mode) not in seen:  # every combination gets its line, run or not
                status, why = (
                    ("FAIL", f"not run: bench/gpu.py {p.failure()}") if self.cuda else ("SKIP", "skipped: no CUDA")
                )
                self.add(Result(f"train step {name} {prec} channels_last {mode}", status, why))

    def main(self) -> int:
        self.environment()
        self.imports()
        shards = self.prep()
        run_dir = self.train(shards) if shards else None
        if run_dir is not None:
            self.evaluate(run_dir, shards)
            self.predictions_and_exports(run_dir)
        self.bench()
        self.complete = True
        self.write()
        print("\n" + (self.out / "gpu_check.txt").read_text(), flush=True)
        return 1 if any(r.status == "FAIL" for r in self.results) else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=os.environ.get("DEVICE", "cuda"), choices=("cuda", "cpu"))
    ap.add_argument("--photos", default=".gpu/photos", help="train/ and val/ photo folders (scripts/gpu_prepare.sh)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "outputs/gpu_check", help="report folder (default $OUT)")
    ap.add_argument("--work", help="folder for shards, the run and exports (default: a temporary folder)")
    ap.add_argument("--budget-s", type=float, help="no step starts after this (default 450 on CUDA, 1800 on CPU)")
    args = ap.parse_args(argv)
    args.budget_s = args.budget_s or (450.0 if args.device == "cuda" else 1800.0)
    args.photos, args.out = str(Path(args.photos).resolve()), str(Path(args.out).resolve())
    args.work = args.work and str(Path(args.work).resolve())
    if not (Path(args.photos) / "train").is_dir() or not (Path(args.photos) / "val").is_dir():
        ap.error(f"--photos {args.photos}: no train/ and val/ folders; run scripts/gpu_prepare.sh first")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through run(): its step is killed too
    with tempfile.TemporaryDirectory(prefix="catdog-gpu-check-") as tmp:
        args.work = args.work or tmp
        return Check(args).main()


if __name__ == "__main__":
    sys.exit(main())
