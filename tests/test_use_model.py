"""Using a trained model: the bundle the trainer writes, catdog-export (TorchScript, ONNX), catdog-predict on real
and bad inputs, catdog-evaluate reproducing the trainer's validation metrics (1 and 2 ranks).

One tiny real run (scratch CNN at 64 px, 32 real photos prepared by the real catdog-prep) is shared by the tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from data_shards import rewrite_member
from PIL import Image
from prep_helpers import as_unprivileged, make_tree, real_photos, small_jpeg
from safetensors.torch import load_file
from train_helpers import BIN, ROOT, TINY, env, run_train

from data_prep.info import load_info
from train.config_io import load_config
from train.data.streams import eval_loader
from train.formats.bundle import BundleError
from train.models.registry import build_model

METRICS = ("loss", "accuracy", "precision", "recall", "f1", "auroc", "samples")


@pytest.fixture(scope="module")
def trained(real_data: Path, tmp_path_factory) -> dict:
    """Photos (pre-split: train/ and val/) -> catdog-prep shards (72 px) -> a 3-epoch tiny run with its bundle."""
    root = tmp_path_factory.mktemp("use_model")
    src = make_tree(real_data, root / "src", 16, layout="presplit")
    prep = subprocess.run(
        [sys.executable, "-m", "data_prep", src, root / "shards", "--image-size", "72", "--workers", "1", "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert prep.returncode == 0, prep.stderr
    run_dir = root / "run"
    run_train([*TINY, f"data.dir={root / 'shards'}", f"run.dir={run_dir}", "train.epochs=3", "optim.lr=0.003"])
    return {"root": root, "src": src, "shards": root / "shards", "run": run_dir, "bundle": run_dir / "model"}


def cli(name: str, *args, timeout: int = 180, prefix: tuple[str, ...] = (), **extra_env) -> subprocess.CompletedProcess:
    cmd = [*prefix, sys.executable, "-m", f"train.use.{name}", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess, prog: str) -> str:
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: "), proc.stderr
    return lines[0]


def in_run_logits(trained: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The model as the run holds it (registry + best checkpoint's weights, no bundle code) on the trainer's own
    val batches: (normalised images, logits)."""
    cfg = load_config(trained["run"] / "config.yaml")
    state = json.loads((trained["run"] / "final_metrics.json").read_text())
    model = build_model(cfg.model, 2)
    best = trained["run"] / "checkpoints" / state["best_checkpoint"]
    model.load_state_dict(load_file(str(best / "model.safetensors")))
    model.eval()
    info = load_info(trained["shards"])
    batches = eval_loader(
        cfg.data, info, split="val", batch_size=64, image_size=cfg.model.input_size(), rank=0, world_size=1
    )
    x = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        return x, model(x)


def test_bundle_torchscript_onnx_match_the_in_run_model(trained, capsys):
    from train.use import export
    from train.use.classifier import load_classifier

    meta = json.loads((trained["bundle"] / "model.json").read_text())
    assert meta["classes"] == ["cat", "dog"] and meta["model"]["name"] == "scratch_cnn"
    assert meta["input"] | {} == meta["input"] and meta["input"]["image_size"] == 64 and meta["input"]["resize"] == 73
    assert (
        meta["prep"]["image_size"] == 72 and meta["prep"]["quality"] == 90 and meta["prep"]["source"].endswith("args")
    )
    final = json.loads((trained["run"] / "final_metrics.json").read_text())
    assert meta["training"]["checkpoint"] == final["best_checkpoint"]
    assert meta["metrics"]["val/accuracy"] == final["best/val/accuracy"]
    assert set(meta["data"]["shards_sha256"]) == {p.name for p in trained["shards"].glob("*.tar")}

    for fmt, suffix, engine in (("torchscript", "pt", "torch.jit.load"), ("onnx", "onnx", "onnxruntime")):
        assert export.main([str(trained["run"]), "--format", fmt]) == 0  # in-process: saves a torch start-up
        stdout = capsys.readouterr().out
        assert f"wrote {trained['run'] / f'model.{suffix}'}" in stdout and f"checked with {engine}" in stdout
    x, reference = in_run_logits(trained)
    assert len(x) == 8  # the val split: 4 cats + 4 dogs
    for model in (trained["bundle"], trained["run"] / "model.pt", trained["run"] / "model.onnx"):
        got = load_classifier(model, device="cpu")(x)
        assert (got - reference).abs().max() <= 1e-4, model
        assert torch.equal(got.argmax(1), reference.argmax(1))
    onnx = load_classifier(trained["run"] / "model.onnx", device="cpu")
    assert onnx.describe().endswith(", fp32")
    # onnxruntime's default is a thread per core in every process; it takes the threads catdog gave torch.
    assert onnx.session.get_session_options().intra_op_num_threads == torch.get_num_threads()
    with pytest.raises(BundleError, match="runs as exported"):
        load_classifier(trained["run"] / "model.onnx", device="cpu", precision="bf16")


def test_bundle_works_with_the_shards_moved_away(trained, tmp_path):
    away = tmp_path / "shards-away"
    shutil.move(trained["shards"], away)
    try:
        photos = trained["src"] / "val"
        r = cli("predict", trained["bundle"], photos, "--workers", "0", "--no-progress")
        assert r.returncode == 0, r.stderr
        assert "8 inputs = 8 classified + 0 skipped" in r.stderr
        rows = [line for line in r.stdout.splitlines()[1:] if line.strip()]
        assert len(rows) == 8 and all(line.split()[1] in ("cat", "dog") for line in rows)
    finally:
        shutil.move(away, trained["shards"])


def test_predict_reports_every_bad_input_and_never_stops(trained, real_data, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(trained["src"] / "val", folder / "good")
    photo = real_photos(real_data, "train", "cat", 30)[-1]
    bad = folder / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    data = photo.read_bytes()
    (bad / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (bad / "notes.jpg").write_text("these are my notes, not a photo\n")
    (bad / "folder.jpg").mkdir()
    os.mkfifo(bad / "pipe.jpg")  # reading it would block forever
    (bad / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    Image.new("1", (12_000, 12_000)).save(bad / "bomb.png")  # 144 Mpx: over catdog-prep's --max-pixels
    Image.open(photo).resize((20, 15)).save(bad / "tiny.jpg")
    locked = bad / "locked.jpg"
    locked.write_bytes(small_jpeg(photo))
    locked.chmod(0)
    # EXIF-rotated and non-RGB photos are handled as catdog-prep handles them (classified, not skipped).
    with Image.open(photo) as im:
        exif = im.getexif()
        exif[0x0112] = 6
        im.save(folder / "rotated.jpg", exif=exif)
        im.convert("LA").save(folder / "grey-alpha.png")
        im.convert("P").save(folder / "palette.gif")
    out = tmp_path / "rows.jsonl"
    r = cli(
        "predict", trained["bundle"], folder, tmp_path / "missing.jpg", "-o", out, "--batch-size", "4",
        prefix=as_unprivileged(),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    rows = {Path(row["path"]).name: row for row in map(json.loads, out.read_text().splitlines())}
    reasons = {name: row["skipped"] for name, row in rows.items() if "skipped" in row}
    assert reasons == {
        "empty.jpg": "empty",
        "truncated.jpg": "truncated",
        "notes.jpg": "not_an_image",
        "folder.jpg": "not_a_file",
        "pipe.jpg": "not_a_file",
        "dangling.jpg": "broken_symlink",
        "bomb.png": "too_large",
        "tiny.jpg": "too_small",
        "locked.jpg": "unreadable",
        "missing.jpg": "not_found",
    }
    classified = {name: row for name, row in rows.items() if "prediction" in row}
    assert len(classified) == 8 + 3 and {"rotated.jpg", "grey-alpha.png", "palette.gif"} <= set(classified)
    for row in classified.values():
        assert row["prediction"] in ("cat", "dog") and abs(sum(row["probs"].values()) - 1) < 1e-5
    assert "21 inputs = 11 classified + 10 skipped" in r.stderr
    # --workers not given: the CPU default, one process per CPU, each decoding and scoring whole batches (at most
    # one per batch: 11 readable photos in batches of 4)
    if not torch.cuda.is_available():  # --device auto picks a GPU where there is one
        workers = min(len(os.sched_getaffinity(0)), 16, 3)
        assert f"{workers} worker process" in r.stderr and "decoding and scoring" in r.stderr, r.stderr
        assert "fast decode" in r.stderr


def test_predict_with_no_readable_input_fails_with_one_line(trained, tmp_path, capsys):
    from train.use.predict import main  # in-process: the same main() the console script runs, without a torch start-up

    def error_line(*args) -> tuple[int, str]:
        code = main([*map(str, args), "--workers", "0", "--no-progress"])
        captured = capsys.readouterr()
        lines = [line for line in captured.err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("catdog-predict: ") and not captured.out, captured
        return code, lines[0]

    (tmp_path / "a.jpg").write_text("not a photo")
    (tmp_path / "b.jpg").write_bytes(b"")
    code, line = error_line(trained["bundle"], tmp_path)
    assert code == 1 and "none of the 2 inputs could be classified" in line and "not_an_image" in line
    empty = tmp_path / "nothing"
    empty.mkdir()
    code, line = error_line(trained["bundle"], empty)
    assert code == 2 and "no images found" in line
    code, line = error_line(tmp_path / "no-model", tmp_path)
    assert code == 2 and "no-model" in line


def _val_metrics(trained) -> dict:
    """The trainer's val metrics of the best checkpoint (the epoch row of metrics.jsonl whose step it is)."""
    final = json.loads((trained["run"] / "final_metrics.json").read_text())
    step = int(final["best_checkpoint"].removeprefix("step_"))
    rows = [json.loads(line) for line in (trained["run"] / "metrics.jsonl").read_text().splitlines()]
    row = next(r for r in rows if r["step"] == step)
    return {k: row[f"val/{k}"] for k in METRICS}


def test_evaluate_on_photo_folders_reproduces_the_trainers_val_metrics(trained, tmp_path):
    expected = _val_metrics(trained)
    flat = tmp_path / "flat"  # Kaggle layout: cat.0.jpg, labels from the names
    flat.mkdir()
    for p in (trained["src"] / "val").rglob("*.jpg"):
        shutil.copy(p, flat / p.name)
    runs = {
        "presplit": (trained["src"], "--split", "val"),
        "class folders": (trained["src"] / "val",),
        "kaggle flat": (flat,),
        "shards": (trained["shards"], "--split", "val"),
    }
    for name, data in runs.items():
        out = tmp_path / name.replace(" ", "_")
        r = cli("evaluate", trained["bundle"], *data, "--out", out, "--batch-size", "8", "--workers", "1")
        assert r.returncode == 0, f"{name}: {r.stderr[-3000:]}"
        got = json.loads((out / "metrics.json").read_text())
        for k, v in expected.items():
            assert got[k] == pytest.approx(v, abs=1e-6), f"{name}: {k} {got[k]} vs the trainer's {v}"
    out = tmp_path / "presplit"
    for f in ("confusion_matrix.png", "roc.png", "pr.png", "reliability.png", "mistakes.png", "mistakes.html"):
        assert (out / f).stat().st_size > 0, f
    got = json.loads((out / "metrics.json").read_text())
    cm = got["confusion_matrix"]
    mistakes = cm[0][1] + cm[1][0]
    assert len(list((out / "mistakes").glob("*.png"))) == min(mistakes, 16)
    assert (out / "mistakes.html").read_text().count("<figure>") == min(mistakes, 16)
    assert set(got["per_class"]) == {"cat", "dog"} and 0 <= got["calibration_error"] <= 1
    assert len((out / "predictions.csv").read_text().splitlines()) == 1 + 8


def test_precision_auto_follows_the_run_and_the_hardware(monkeypatch):
    import train.use.classifier as inference

    meta = {"training": {"mixed_precision": "auto"}}
    monkeypatch.setattr(inference, "native_bf16", lambda device: True)
    assert inference.resolve_precision("auto", meta, "cpu") == "bf16"  # auto-trained here means bf16-trained
    assert inference.resolve_precision("auto", {"training": {"mixed_precision": "bf16"}}, "cpu") == "bf16"
    assert inference.resolve_precision("auto", {"training": {"mixed_precision": "no"}}, "cpu") == "fp32"
    assert inference.resolve_precision("auto", {}, "cpu") == "fp32"  # a bundle that does not say: fp32
    # What validation really computed in wins over the configured value: auto that ran in fp32 (no native bf16
    # where it trained) stays fp32 even here.
    ran_fp32 = {"training": {"mixed_precision": "auto", "precision": "no"}}
    assert inference.resolve_precision("auto", ran_fp32, "cpu") == "fp32"
    assert (
        inference.resolve_precision("auto", {"training": {"mixed_precision": "auto", "precision": "bf16"}}, "cpu")
        == "bf16"
    )
    assert inference.resolve_precision("fp32", meta, "cpu") == "fp32"
    monkeypatch.setattr(inference, "native_bf16", lambda device: False)  # simulated: a CPU without AVX512-BF16/AMX
    assert inference.resolve_precision("auto", meta, "cpu") == "fp32"
    assert inference.resolve_precision("bf16", meta, "cpu") == "bf16"  # asked for explicitly: emulated, still bf16
    with pytest.raises(BundleError, match="fp16"):
        inference.resolve_precision("fp16", meta, "cpu")


def test_decode_workers_and_batch_follow_where_the_model_runs(trained):
    import train.use.classifier as inference
    from data_prep.cpus import CPU_DECODE_WORKERS, decode_workers
    from train.use.inputs import scores_in_workers

    # CPU, model in this process (ONNX): it shares the cores with decoding; the measured default.
    assert decode_workers(False, env={}, affinity=64) == CPU_DECODE_WORKERS == 2
    # CPU, a torch model: the workers decode and score, one per CPU, at most 16.
    assert decode_workers(False, affinity=2, scores=True) == 2
    assert decode_workers(False, affinity=64, scores=True) == 16
    assert decode_workers(False, affinity=1, scores=True) == 1
    # GPU: decoding is the bottleneck, so every CPU of the rank but one (as data.num_workers=auto), at most 16.
    assert decode_workers(True, env={}, affinity=8) == 7
    assert decode_workers(True, env={}, affinity=64) == 16
    assert decode_workers(True, env={}, affinity=1) == 0  # one CPU: decode in the process
    four_ranks = {"LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "4"}  # accelerate launch on a 32-CPU, 4-GPU node
    assert decode_workers(True, env=four_ranks, affinity=32) == 7
    clf = inference.load_classifier(trained["bundle"], device="cpu")
    assert inference.runs_on_gpu(clf) is False
    assert scores_in_workers(clf) is True  # Linux: workers fork with the model

    class FakeCudaSession:  # stands in for an onnxruntime-gpu session (no GPU here)
        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    onnx_on_gpu = inference.OnnxClassifier.__new__(inference.OnnxClassifier)
    onnx_on_gpu.session = FakeCudaSession()
    assert inference.runs_on_gpu(onnx_on_gpu) is True
    assert scores_in_workers(onnx_on_gpu) is False  # onnxruntime runs in this process


def test_device_typos_and_missing_gpus_are_one_clear_line(monkeypatch):
    import train.use.classifier as inference
    from train.formats.bundle import BundleError

    for bad, message in (("gpu", "is not a device"), ("mps", "runs on cpu or cuda")):
        with pytest.raises(BundleError, match=message):
            inference.resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(BundleError, match="no CUDA device is available here"):
            inference.resolve_device("cuda:0")
    # MOCKED GPUs (none here): two visible devices, and the user asks for a third.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert inference.resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(BundleError, match="has 2 CUDA device.s., cuda:0 to cuda:1"):
        inference.resolve_device("cuda:2")


def test_evaluate_reproduces_a_bf16_run_in_its_precision(trained, tmp_path):
    """The default config trains in bf16 where the CPU has it: catdog-evaluate's default (--precision auto) then
    scores in bf16 too and gets the trainer's validation numbers; --precision fp32 is the other, close, answer."""
    from train.hardware.precision import cpu_has_bf16

    if not cpu_has_bf16():
        pytest.skip("this CPU has no native bf16: mixed_precision=auto trains in fp32 here (covered above)")
    run_dir = tmp_path / "bf16run"
    tiny = [o for o in TINY if not o.startswith("train.mixed_precision")]
    run_train([*tiny, f"data.dir={trained['shards']}", f"run.dir={run_dir}", "train.epochs=2", "optim.lr=0.003",
               "train.mixed_precision=auto", "train.channels_last=true"])  # fmt: skip
    expected = _val_metrics({"run": run_dir})
    meta = json.loads((run_dir / "model" / "model.json").read_text())
    assert meta["training"]["mixed_precision"] == "auto" and meta["training"]["precision"] == "bf16"
    got = {}
    for precision in ("auto", "fp32"):
        out = tmp_path / precision
        args = ("--split", "val", "--out", out, "--batch-size", "8", "--workers", "0", "--precision", precision)
        r = cli("evaluate", run_dir / "model", trained["shards"], *args)
        assert r.returncode == 0, r.stderr[-3000:]
        got[precision] = json.loads((out / "metrics.json").read_text())
    assert got["auto"]["model"].endswith(", bf16") and got["fp32"]["model"].endswith(", fp32")
    for k, v in expected.items():
        assert got["auto"][k] == pytest.approx(v, abs=1e-6), f"{k}: evaluate {got['auto'][k]} vs the trainer's {v}"
    assert got["fp32"]["loss"] != pytest.approx(expected["loss"], abs=1e-6)  # bf16 rounding is really in play
    assert got["fp32"]["loss"] == pytest.approx(expected["loss"], abs=0.02)
    # Exporting checks the file against the fp32 PyTorch model, so the check must run the export in fp32 too.
    from train.use import export

    assert export.main([str(run_dir), "--format", "torchscript", "--out", str(tmp_path / "bf16.pt")]) == 0


def test_evaluate_refuses_other_class_names(trained, tmp_path):
    data = tmp_path / "animals"
    for cls, src in (("bird", "cat"), ("cat", "cat")):
        (data / cls).mkdir(parents=True)
        for p in (trained["src"] / "val" / src).glob("*.jpg"):
            shutil.copy(p, data / cls / p.name)
    line = one_error_line(cli("evaluate", trained["bundle"], data, "--out", tmp_path / "o"), "catdog-evaluate")
    assert "['bird', 'cat']" in line and "['cat', 'dog']" in line
    line = one_error_line(cli("evaluate", trained["bundle"], trained["shards"]), "catdog-evaluate")
    assert "split 'test'" in line and "--split" in line  # the shards have no test split


@pytest.mark.slow
def test_two_rank_evaluate_equals_one_rank(trained, tmp_path, port):
    args = [trained["bundle"], trained["src"], "--split", "val", "--batch-size", "3", "--workers", "0"]
    one = cli("evaluate", *args, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    launch = [
        str(BIN / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        str(port),
    ]
    two = subprocess.run(
        [*launch, "-m", "train.use.evaluate", *map(str, args), "--out", str(tmp_path / "two")],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-4000:]
    assert "on 2 process(es)" in two.stdout
    a = json.loads((tmp_path / "one" / "metrics.json").read_text())
    b = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert (a.pop("processes"), b.pop("processes")) == (1, 2)
    assert a == b and a["samples"] == 8

    # Shards with corrupt samples in batches of both ranks: the skip count is of samples, whatever the ranks.
    shards = tmp_path / "shards"
    shutil.copytree(trained["shards"], shards)
    (val_shard,) = sorted(shards.glob("val-*.tar"))
    with tarfile.open(val_shard) as t:
        keys = sorted({Path(name).stem for name in t.getnames() if name.endswith(".jpg")})
    for key in (keys[1], keys[4]):  # eval batches of 3: batch 0 goes to rank 0, batch 1 to rank 1
        rewrite_member(val_shard, key, "jpg", b"\xff\xd8 not really a jpeg")
    args = [trained["bundle"], shards, "--split", "val", "--batch-size", "3", "--workers", "0"]
    one = cli("evaluate", *args, "--out", tmp_path / "one_shards")
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [*launch, "-m", "train.use.evaluate", *map(str, args), "--out", str(tmp_path / "two_shards")],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-4000:]
    for out in ("one_shards", "two_shards"):
        m = json.loads((tmp_path / out / "metrics.json").read_text())
        assert (m["samples"], m["skipped"], m["skipped_by_reason"]) == (6, 2, {"corrupt": 2}), out
        rows = [json.loads(line) for line in (tmp_path / out / "skipped.jsonl").read_text().splitlines()]
        assert rows == [
            {"path": val_shard.name, "reason": "corrupt", "samples": 2, "detail": "2 corrupt sample(s) skipped"}
        ]


def test_predict_fast_decode_and_flip_tta_stay_close_to_exact(trained, real_data, tmp_path, monkeypatch):

    import train.use.predict as predict_mod
    from train.use.predict import main

    # A CPU run keeps freed memory in the heap (train/hardware/memory.py, whose effect is tested in a fresh interpreter
    # there); a stub, so this pytest process's allocator stays as it was.
    switched = []
    monkeypatch.setattr(predict_mod, "keep_freed_memory", lambda: switched.append(1) or "stub")

    # A bundle whose shards were 192 px (as the demo's): exact decode goes 192 px -> JPEG -> 73 px, fast straight to 73.
    bundle = tmp_path / "model"
    shutil.copytree(trained["bundle"], bundle)
    meta = json.loads((bundle / "model.json").read_text())
    meta["prep"]["image_size"] = 192
    (bundle / "model.json").write_text(json.dumps(meta))
    photos = tmp_path / "originals"  # full-size photos
    photos.mkdir()
    for cls in ("cat", "dog"):
        for p in real_photos(real_data, "val", cls, 4):
            shutil.copy(p, photos / p.name)
    runs = {}
    for name, extra in {
        "exact": ["--decode", "exact"],
        "fast": [],
        "flip": ["--decode", "exact", "--tta", "flip"],
    }.items():
        out = tmp_path / f"{name}.jsonl"
        args = [str(bundle), str(photos), "-o", str(out), "--workers", "0", "--device", "cpu", "--no-progress"]
        assert main(args + extra) == 0
        runs[name] = {r["path"]: r["probs"]["dog"] for r in map(json.loads, out.read_text().splitlines())}
    assert runs["exact"].keys() == runs["fast"].keys() == runs["flip"].keys() and len(runs["exact"]) == 8
    assert len(switched) == 3
    # Fast decode (the default) skips the 192-px intermediate, TTA averages with the mirror image: close, not equal.
    for name in ("fast", "flip"):
        diffs = [abs(runs[name][k] - v) for k, v in runs["exact"].items()]
        assert 0 < max(diffs) < 0.1, (name, diffs)

    # Real worker processes, each decoding a batch and running the model on it (the CPU default), give the rows
    # the model gives in this process; every input once, in input order.
    for name, extra in {"fast": [], "flip": ["--decode", "exact", "--tta", "flip"]}.items():
        out = tmp_path / f"{name}-workers.jsonl"
        r = cli("predict", bundle, photos, "-o", out, "--workers", "2", "--batch-size", "3", "--device", "cpu", *extra)
        assert r.returncode == 0, r.stderr
        assert "8 inputs = 8 classified" in r.stderr and "2 worker processes decoding and scoring" in r.stderr
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [row["path"] for row in rows] == list(runs[name])
        assert max(abs(row["probs"]["dog"] - runs[name][row["path"]]) for row in rows) < 1e-5, name


def test_predict_scores_in_the_worker_processes_on_cpu(trained, tmp_path, monkeypatch):
    import train.use.inputs as inference
    from train.use.predict import main

    # Which processes ran the model: each scoring call appends its pid (the workers are forked from this process,
    # so they inherit the wrapper).
    pids = tmp_path / "pids"
    real = inference.probabilities

    def recording(clf, x, tta="none"):
        with open(pids, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(clf, x, tta)

    monkeypatch.setattr(inference, "probabilities", recording)
    out = tmp_path / "rows.jsonl"
    photos = trained["src"] / "val"  # 8 photos -> 3 batches of 3 over 2 workers
    args = [
        str(trained["bundle"]),
        str(photos),
        "-o",
        str(out),
        "--device",
        "cpu",
        "--no-progress",
        "--batch-size",
        "3",
    ]
    assert main([*args, "--workers", "2"]) == 0
    ran = pids.read_text().split()
    assert len(ran) == 3 and str(os.getpid()) not in ran and len(set(ran)) == 2
    in_workers = out.read_text()
    pids.unlink()
    assert main([*args, "--workers", "0"]) == 0  # everything in this process
    assert pids.read_text().split() == [str(os.getpid())] * 3
    assert out.read_text() == in_workers  # the same rows, to the printed digit


def test_predict_says_so_in_one_line_when_a_worker_is_killed(trained, tmp_path, monkeypatch, capsys):
    import signal

    import train.use.inputs as inference
    from train.use.predict import main

    parent = os.getpid()
    real = inference.probabilities

    def killed_in_a_worker(clf, x, tta="none"):  # as the OOM killer would: SIGKILL, no exception, no cleanup
        if os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(clf, x, tta)

    monkeypatch.setattr(inference, "probabilities", killed_in_a_worker)
    out = tmp_path / "rows.jsonl"
    args = [str(trained["bundle"]), str(trained["src"] / "val"), "-o", str(out), "--device", "cpu", "--no-progress"]
    assert main([*args, "--workers", "2", "--batch-size", "3"]) == 1
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("catdog-predict: a data loading worker process (pid"), captured.err
    assert "was killed (SIGKILL" in lines[0]
    assert "--workers (were 2)" in lines[0] and "--batch-size (was 3)" in lines[0]
    assert not out.exists()  # no half-written rows file


def test_predict_on_a_shard_folder_reads_every_sample_as_validation_did(trained, tmp_path):
    from train.use.classifier import load_classifier

    # A copy of the run's shards with one corrupt val sample: a row saying so, every other sample scored.
    shards = tmp_path / "shards"
    shutil.copytree(trained["shards"], shards)
    (val_shard,) = sorted(shards.glob("val-*.tar"))
    with tarfile.open(val_shard) as t:
        keys = sorted({Path(name).stem for name in t.getnames() if name.endswith(".jpg")})
    rewrite_member(val_shard, keys[2], "jpg", b"\xff\xd8 not really a jpeg")
    info = load_info(shards)
    # _info.json lists val twice (also as timm's "validation"): each sample must be scored once.
    assert info.splits["validation"].filenames == info.splits["val"].filenames
    samples = {split: s.num_samples for split, s in info.splits.items() if split != "validation"}
    out = tmp_path / "rows.jsonl"
    r = cli("predict", trained["bundle"], shards, "-o", out, "--batch-size", "4", "--device", "cpu", "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    scored = {row["path"]: row["probs"]["dog"] for row in rows if "prediction" in row}
    skipped = [row for row in rows if "skipped" in row]
    assert (samples["train"], samples["val"], samples.get("test", 0)) == (24, 8, 0)
    assert len(scored) == sum(samples.values()) - 1
    assert skipped == [{"path": f"{shards}/{val_shard.name}", "skipped": "corrupt", "detail": skipped[0]["detail"]}]
    assert f"{sum(samples.values())} inputs = {len(scored)} classified + 1 skipped" in r.stderr
    # The shard loader only decodes (2 processes by default, at most one per batch); the model runs in this one.
    assert "2 worker processes decoding)" in r.stderr, r.stderr

    # The same probabilities as the bundle's model on the trainer's own val batches, key by key.
    cfg = load_config(trained["run"] / "config.yaml")
    clf = load_classifier(trained["bundle"], device="cpu")
    loader = eval_loader(
        cfg.data, info, split="val", batch_size=64, image_size=cfg.model.input_size(), rank=0, world_size=1,
        with_keys=True,
    )  # fmt: skip
    reference = {}
    for x, _, batch_keys in loader:
        for key, p in zip(batch_keys, clf(x).softmax(1)[:, 1].tolist(), strict=True):
            reference[f"{shards}/val/{key}"] = p
    assert len(reference) == samples["val"] - 1 and reference.keys() <= scored.keys()
    assert max(abs(scored[k] - p) for k, p in reference.items()) < 1e-4
