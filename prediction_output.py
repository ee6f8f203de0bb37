"""predict.py's rows on disk while it runs, and which images each process takes. Every process appends the rows
of each finished batch to its own part file in a folder beside --output (`result.csv.partial/`), as one framed
record with a checksum, so Ctrl-C, a crash, `kill -9` or a lost machine loses at most the batches in flight, and
`--resume` goes on from the rows found there. At the end the rows are written to --output in input order (whole,
renamed into place, never half a file) and the folder is removed. The folder's run.json says which model, inputs
and row-changing flags wrote it: a resume with others is refused in one line."""

import base64
import hashlib
import json
import os
import shutil
import struct
import time
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np

from cli import CLIError
from utils import atomic_open

FRAME = struct.Struct("<4sII")  # a batch's record: magic, payload length, crc32 of the payload (then the payload)
MAGIC = b"PRW1"
MANIFEST = "run.json"
FSYNC_SECONDS = 5.0  # part files are flushed to the disk at most this often (a lost machine loses the rest)
CACHED_FRAMES = 64  # decoded batches kept while the rows are put back in input order


def partial_dir(output):
    """The folder of an unfinished run's rows: --output's name plus .partial, beside it."""
    output = Path(output)
    return output.with_name(output.name + ".partial")


def file_digest(path, chunk=1 << 20):
    """sha256 of a file's bytes (the model a partial run was written with)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def inputs_digest(inputs):
    """sha256 of the [(path, label)] input list, in its order."""
    h = hashlib.sha256()
    for path, label in inputs:
        h.update(f"{path}\t{label}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def share(remaining, rank, world_size):
    """The part of `remaining` (indices still to predict, ascending) that process `rank` of `world_size` takes:
    every world_size-th one, so each process keeps ascending order and the shares differ by one at most."""
    return remaining[rank::world_size]


# ----------------------------------------------------------------------------- rows <-> frames


def pack_row(index, cells, pred=None, probs=None, unlike=None, features=None):
    """One row of a batch's record: its input index, its CSV cells, and what the end needs again (the task's
    decision, the float32 probabilities, out of distribution or not, and the penultimate features when they are
    kept); pred None = unreadable."""
    row = [int(index), cells, pred, unlike, pack_floats(probs)]
    return row if features is None else row + [pack_floats(features)]


def pack_floats(values):
    return None if values is None else base64.b64encode(np.asarray(values, dtype=np.float32).tobytes()).decode()


def unpack_floats(packed):
    return None if packed is None else np.frombuffer(base64.b64decode(packed), dtype=np.float32)


def encode_frame(rows):
    payload = json.dumps(rows, separators=(",", ":")).encode("utf-8", "surrogateescape")
    return FRAME.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def read_frames(path):
    """Yields (offset, rows) of each whole record of a part file, one at a time; returns (StopIteration's value)
    the end of the last whole one: a record cut by a kill, or garbled, ends the file's good part."""
    end = 0
    with open(path, "rb") as f:
        while len(header := f.read(FRAME.size)) == FRAME.size:
            magic, length, crc = FRAME.unpack(header)
            payload = f.read(length) if magic == MAGIC else b""
            if magic != MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
                break
            yield end, json.loads(payload.decode("utf-8", "surrogateescape"))
            end += FRAME.size + length
    return end


def read_frame_at(f, offset):
    f.seek(offset)
    _, length, _ = FRAME.unpack(f.read(FRAME.size))
    return json.loads(f.read(length).decode("utf-8", "surrogateescape"))


# ----------------------------------------------------------------------------- the partial folder


class PartialRun:
    """The partial folder of one --output. `manifest`: what must match for rows to be reused (the model's
    digest, the inputs' digest and count, the columns, the flags that change a row)."""

    def __init__(self, output, manifest, n_inputs):
        self.output, self.folder = Path(output), partial_dir(output)
        self.manifest, self.n = manifest, n_inputs
        self.repeated = 0  # rows found twice by rows_in_order (none unless something went wrong: the later is kept)

    def parts(self):
        return sorted(self.folder.glob("rank*.rows"))

    def check(self, resume):
        """Before any work, on every process (reads only): one error line when --resume has nothing to go on
        from, or rows of another model, input list or flags; or when rows of an interrupted run are there and
        --resume was not given (starting again would throw them away)."""
        exists = self.folder.is_dir()
        if not resume:
            if exists:
                raise CLIError(
                    f"{self.folder} holds the rows of an interrupted run of {self.output}: add --resume to "
                    "go on from them, or delete the folder to start again"
                )
            return
        if not exists:
            raise CLIError(
                f"--resume: no interrupted run of {self.output} to go on from ({self.folder} does not "
                "exist); nothing was changed"
            )
        try:
            saved = json.loads((self.folder / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CLIError(
                f"--resume: {self.folder / MANIFEST} cannot be read ({type(e).__name__}); nothing was changed"
            ) from None
        differ = [key for key in self.manifest if saved.get(key) != self.manifest[key]]
        if differ:
            words = [
                changed_flags(saved.get(k) or {}, self.manifest[k]) if k == "flags" else MANIFEST_WORDS.get(k, k)
                for k in differ
            ]
            raise CLIError(
                f"--resume: the rows in {self.folder} were written with another {', '.join(words)}; run "
                "the same command as before, or delete the folder to start again; nothing was changed"
            )

    def open(self):
        """On the main process only: the folder created with its manifest, or an interrupted run's part files cut
        after their last whole record. Returns a uint8 array, 1 for each input index already written."""
        done = np.zeros(self.n, dtype=np.uint8)
        if not self.folder.is_dir():
            self.folder.mkdir(parents=True)
            with atomic_open(self.folder / MANIFEST, "w", encoding="utf-8") as f:
                json.dump(self.manifest, f, indent=1)
            return done
        for part in self.parts():
            frames = read_frames(part)
            while True:
                try:
                    _, rows = next(frames)
                except StopIteration as stop:
                    end = stop.value
                    break
                done[[row[0] for row in rows]] = 1
            if end < part.stat().st_size:
                os.truncate(part, end)  # a record cut by the kill: its batch is predicted again
        return done

    def writer(self, rank):
        return PartWriter(self.folder / f"rank{rank}.rows")

    def rows_in_order(self):
        """(index, cells, pred, probs as float32 or None, unlike, features as float32 or None) of every input, in
        input order, read back from the part files with a few batches in memory at a time (an index written twice:
        the later row)."""
        parts = self.parts()
        where_part = np.full(self.n, -1, dtype=np.int16)
        where_offset = np.zeros(self.n, dtype=np.int64)
        where_row = np.zeros(self.n, dtype=np.int32)
        for p, part in enumerate(parts):
            for offset, rows in read_frames(part):
                for i, row in enumerate(rows):
                    self.repeated += int(where_part[row[0]] >= 0)
                    where_part[row[0]], where_offset[row[0]], where_row[row[0]] = p, offset, i
        missing = np.flatnonzero(where_part < 0)
        if len(missing):
            raise RuntimeError(f"{len(missing)} rows missing from {self.folder} (the first: input {missing[0]})")
        files = [open(part, "rb") for part in parts]
        cache = OrderedDict()
        try:
            for index in range(self.n):
                key = (int(where_part[index]), int(where_offset[index]))
                if key not in cache:
                    cache[key] = read_frame_at(files[key[0]], key[1])
                    if len(cache) > CACHED_FRAMES:
                        cache.popitem(last=False)
                _, cells, pred, unlike, *packed = cache[key][where_row[index]]  # probs, and features when kept
                packed = [unpack_floats(p) for p in packed] + [None]
                yield index, cells, pred, packed[0], unlike, packed[1]
        finally:
            for f in files:
                f.close()

    def remove(self):
        shutil.rmtree(self.folder, ignore_errors=True)


def changed_flags(before, now):
    """'--tta (was False, now True), ...': the flags that change a row and differ from the interrupted run's."""
    names = [k for k in dict.fromkeys([*before, *now]) if before.get(k) != now.get(k)]
    return "value of " + ", ".join(f"--{k} (was {before.get(k)!r}, now {now.get(k)!r})" for k in names)


MANIFEST_WORDS = {
    "model": "model (--model_fn's file differs)",
    "inputs": "input list",
    "n_inputs": "number of inputs",
    "columns": "set of columns",
    "flags": "set of flags that change the rows",
}


class PartWriter:
    """One process's part file, appended a batch at a time; flushed to the disk every FSYNC_SECONDS."""

    def __init__(self, path):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.synced = time.monotonic()

    def write(self, rows):
        data = memoryview(encode_frame(rows)) if rows else b""
        while data:
            data = data[os.write(self.fd, data) :]
        if time.monotonic() - self.synced > FSYNC_SECONDS:
            os.fsync(self.fd)
            self.synced = time.monotonic()

    def close(self):
        if self.fd is not None:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
