"""Input photos for predict and evaluate, fed exactly as validation fed their shard copies.

A photo reaches the model through the same code as its shard copy did during training's validation:

1. catdog-prep's own decode/normalise step (``data_prep.encode.encode_image``: EXIF orientation, colour modes,
   alpha on white, 16-bit scaling, aspect crop, short side to the bundle's ``prep.image_size``, JPEG at
   ``prep.quality``), with its skip reasons for bad files;
2. the decoder the shard reader uses (``train.data.reader.decode_rgb``);
3. the eval transform (``train.data.transforms.eval_resize`` per image, ``normalise`` per batch).

So ``catdog-evaluate`` on a folder of raw photos reproduces the trainer's validation metrics on the shards
catdog-prep made from them. ``catdog-predict`` does the same with ``--decode exact``; its default (``fast``) runs
step 1 straight to the eval resize size instead of the shards' (``Classifier.prep``).
"""

from __future__ import annotations

import glob
import os
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from data_prep.encode import EncodeOptions, Skip, encode_image
from data_prep.info import INFO_NAME, shard_root
from data_prep.scan import kind_problem, walk_images
from data_prep.storage import Location, is_url
from train.data.reader import decode_rgb
from train.data.transforms import eval_resize, normalise
from train.data.workers import guarded, loader_context, quiet_worker
from train.use.classifier import Classifier, TorchClassifier, probabilities, runs_on_gpu


@dataclass(frozen=True)
class Entry:
    """One input image: what to show for it, where to read it, and a problem known before reading (or None)."""

    name: str
    path: Path | None
    problem: tuple[str, str] | None = None
    label: int = -1  # class index for evaluation; -1 when unlabelled


def _has_glob(arg: str) -> bool:
    return any(c in arg for c in "*?[")


def expand_inputs(args: Sequence[str]) -> tuple[list[Entry], list[Path | Location]]:
    """Files, folders (recursive, image extensions only), globs -> entries in argument order; shard folders
    (holding _info.json; every URL is one) are returned separately. A path that does not exist becomes an entry
    with a problem; a URL that storage cannot open (``foo://x``) is an InfoError."""
    entries: list[Entry] = []
    shard_dirs: list[Path | Location] = []
    for arg in args:
        if is_url(arg):  # a shard folder in object storage (s3://, https://); load_info says what is wrong with it
            shard_dirs.append(shard_root(arg))
            continue
        p = Path(arg)
        if not p.exists() and not p.is_symlink() and _has_glob(arg):
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                entries.append(Entry(arg, None, ("not_found", "the pattern matches no file")))
            sub_entries, sub_shards = expand_inputs(matches)
            entries += sub_entries
            shard_dirs += sub_shards
        elif p.is_dir():
            if (p / INFO_NAME).is_file():
                shard_dirs.append(p)
                continue
            found, _ = walk_images(p)
            entries += [Entry(str(p / rel), p / rel, kind_problem(kind)) for rel, kind, _ in found]
        elif p.is_symlink() and not p.exists():
            entries.append(Entry(arg, p, kind_problem("broken_symlink")))
        elif not p.exists():
            entries.append(Entry(arg, None, ("not_found", "no such file or folder")))
        else:
            entries.append(Entry(arg, p))
    return entries, shard_dirs


def read_image(entry: Entry, prep: EncodeOptions) -> Tensor:
    """uint8 RGB CHW as catdog-prep would have stored and the shard reader decoded it; raises Skip."""
    if entry.problem is not None:
        raise Skip(*entry.problem)
    try:
        st = os.stat(entry.path)
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the read forever
            raise Skip("not_a_file", "not a regular file (folder, FIFO, socket or device)")
        data = entry.path.read_bytes()
    except OSError as e:
        raise Skip("unreadable", f"{type(e).__name__}: {e.strerror or e}") from None
    if not data:
        raise Skip("empty", "zero-byte file")
    try:
        jpg, _ = encode_image(data, prep)
    except Skip:
        raise
    except Exception as e:  # noqa: BLE001 -- a decoder bug on one odd file must not stop the run (as in catdog-prep)
        raise Skip("decode_error", f"{type(e).__name__}: {e}") from None
    return decode_rgb(bytearray(jpg))  # writable: torch.frombuffer warns on read-only bytes


class ImageBatches(Dataset):
    """Batch k = entries ``batches[k]``, read, prepared and normalised in a DataLoader worker, and passed through
    ``score`` there when given (``scored_batches``).

    Returns ``(x or None, [entry indices in x], [(entry index, reason, detail), ...])``: a bad file becomes a skip
    record, never an exception, and the batch shrinks instead (each input is counted exactly once).
    """

    def __init__(
        self,
        entries: Sequence[Entry],
        batches: Sequence[Sequence[int]],
        prep: EncodeOptions,
        resize,
        norm,
        score: Callable[[Tensor], Tensor] | None = None,
    ):
        self.entries = entries
        self.batches = batches
        self.prep = prep
        self.resize = resize
        self.norm = norm
        self.score = score

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> tuple[Tensor | None, list[int], list[tuple[int, str, str]]]:
        images, ok, skips = [], [], []
        for i in self.batches[k]:
            try:
                images.append(self.resize(read_image(self.entries[i], self.prep)))
                ok.append(i)
            except Skip as e:
                skips.append((i, e.reason, e.detail))
        x = self.norm(torch.stack(images)) if images else None
        if x is not None and self.score is not None:
            x = self.score(x)
        return x, ok, skips


def image_loader(
    clf: Classifier,
    entries: Sequence[Entry],
    batches: Sequence[Sequence[int]],
    *,
    workers: int,
    decode: str = "exact",
    score: Callable[[Tensor], Tensor] | None = None,
) -> DataLoader:
    """Batches of ``entries`` prepared for ``clf``, decoded by ``workers`` processes, in order (``decode``: see
    ``Classifier.prep``); ``score`` applied to each batch in the worker (see ``ImageBatches``)."""
    cfg = clf.data_config()
    dataset = ImageBatches(entries, batches, clf.prep(decode), eval_resize(cfg, clf.image_size), normalise(cfg), score)
    workers = min(workers, len(batches))
    return DataLoader(
        dataset,
        batch_size=None,  # the dataset builds whole batches
        shuffle=False,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        pin_memory=runs_on_gpu(clf),  # not for a CPU model on a GPU host: pinning starts CUDA on GPU 0
        # Scoring workers get the model by fork, whatever the default start method (see workers_can_score). Its
        # queues never wait on a message a killed worker left half-written (train/data/workers.py).
        multiprocessing_context=loader_context("fork" if score is not None else None) if workers else None,
        worker_init_fn=quiet_worker,
    )


def workers_can_score(device: str | torch.device) -> bool:
    """Whether catdog-predict's worker processes can run a torch model on ``device``: on CPU, on Linux, where they are
    forked with the model (``scored_batches`` asks for fork explicitly: spawn or forkserver, Python 3.14's default,
    would pickle the model into every worker, and a TorchScript module does not pickle). macOS forks unsafely and
    Windows cannot: there the model stays in the main process."""
    return torch.device(device).type == "cpu" and sys.platform.startswith("linux")


def scores_in_workers(clf: Classifier) -> bool:
    """Whether catdog-predict's worker processes run the model too: a PyTorch or TorchScript model where
    ``workers_can_score``.

    Each worker then decodes a whole batch and scores it on one torch thread, and only the probabilities travel back:
    every core does complete work, where decode workers beside a model in the main process time-share the cores with
    it and send it float32 batches through shared memory. Measured on 2 cores (AVX512-BF16 AMD, demo model in bf16,
    1,000 val photos, 2 workers either way, 5 interleaved passes): 879 vs 751 img/s median with ``--decode fast``,
    565 vs 509 with ``exact``. Each worker holds one batch's activations: ~0.4 GB for InceptionV3 at 299 px and
    batch 32 in fp32, ~0.2 GB in bf16 (peak RSS over the loaded model, measured)."""
    return isinstance(clf, TorchClassifier) and workers_can_score(clf.device)


def scored_batches(
    clf: Classifier,
    entries: Sequence[Entry],
    batches: Sequence[Sequence[int]],
    *,
    workers: int,
    decode: str = "exact",
    tta: str = "none",
):
    """``(probabilities or None, [entry indices], [(entry index, reason, detail), ...])`` per batch, in order: the
    model run in the worker processes where ``scores_in_workers``, else in this process on batches the workers
    decoded (GPU, ONNX, ``workers=0``)."""
    if workers and scores_in_workers(clf):
        yield from guarded(
            image_loader(
                clf, entries, batches, workers=workers, decode=decode, score=partial(probabilities, clf, tta=tta)
            )
        )
        return
    for x, ok, skips in guarded(image_loader(clf, entries, batches, workers=workers, decode=decode)):
        yield (None if x is None else probabilities(clf, x, tta)), ok, skips


def chunk(indices: Sequence[int], size: int) -> list[list[int]]:
    return [list(indices[i : i + size]) for i in range(0, len(indices), size)]


def denormalise(x: Tensor, meta: dict) -> Tensor:
    """Normalised NCHW float -> uint8 NCHW: the crop the model saw, for galleries."""
    mean = torch.tensor(meta["input"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(meta["input"]["std"]).view(1, 3, 1, 1)
    return (x.float().cpu() * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8)
