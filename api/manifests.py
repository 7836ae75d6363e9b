"""`kling batch MANIFEST`: many generations from a JSON Lines or CSV file, resumable.

Each line of the manifest is one create: any field of `POST /v1/generations`, with `image`
(a local file, uploaded, or an http(s) URL) in place of `image_url`/`upload_id`, and an
optional `out` (where its MP4 goes). A CSV has these as its header's columns (`metadata` a
JSON object; an empty cell is no value). What became of each line is kept in a state file next
to the manifest, written after every step, so a run that was stopped anywhere is run again
with the same command:

- every line is created with its own `Idempotency-Key` (`<run>/<line>`, the run's id kept
  in the state), so a line whose create was sent but not recorded answers the job it made;
- a local image is uploaded once: its `upload_id` is recorded before the create, so the
  create sent again carries the same body;
- lines refused for good (4xx) are recorded with their problem and not sent again; lines
  the API could not take now (429, 5xx in a batch's answer) are sent again on the next run;
- a video is written once, as soon as its job is seen completed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from kling_client import Client, KlingError

# Items of one batch call (the API takes up to 500; smaller calls record progress sooner).
CHUNK = 50
OWN_KEYS = ("image", "out")
ENDED_BADLY = ("failed", "cancelled", "expired")
ENDED = ("completed", *ENDED_BADLY)
# CSV cells are text: these columns are read as the API's types.
CSV_TYPES: dict[str, Callable[[str], Any]] = {
    "guidance_scale": float,
    "duration": int,
    "metadata": json.loads,
}


class ManifestError(ValueError):
    """The manifest or its state cannot be used as they are."""


@dataclass
class Line:
    number: int
    fields: dict[str, Any]

    @property
    def image(self) -> str | None:
        value = self.fields.get("image")
        return str(value) if value is not None else None

    def local_image(self, base: Path) -> Path | None:
        image = self.image
        if image is None or image.startswith(("http://", "https://")):
            return None
        path = Path(image)
        return path if path.is_absolute() else base / path


@dataclass
class State:
    """What each line became (`items`, by line number), saved after every step."""

    path: Path
    manifest_sha256: str
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    items: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path, manifest_sha256: str) -> State:
        if not path.exists():
            return cls(path, manifest_sha256)
        saved = json.loads(path.read_text())
        if saved["manifest_sha256"] != manifest_sha256:
            raise ManifestError(
                f"the manifest changed since {path} was written: restore it to resume, or "
                "move that file away to start a new run (which creates every line again, "
                "those already created included)"
            )
        return cls(path, manifest_sha256, saved["run"], saved["items"])

    def save(self) -> None:
        # Replaced whole: a run stopped mid-write leaves the previous state, never half of one.
        body = {"manifest_sha256": self.manifest_sha256, "run": self.run, "items": self.items}
        partial = self.path.with_name(self.path.name + ".part")
        partial.write_text(json.dumps(body, indent=2))
        os.replace(partial, self.path)

    def of(self, line: Line) -> dict[str, Any]:
        return self.items.setdefault(str(line.number), {})

    def key(self, line: Line) -> str:
        return f"kling-batch-{self.run}/{line.number}"


@dataclass(frozen=True)
class Tally:
    """Where a run's lines stand: the progress bar's figures."""

    lines: int
    queued: int = 0
    processing: int = 0
    completed: int = 0
    failed: int = 0  # failed, cancelled, expired, or refused
    spent: Decimal = Decimal(0)

    @property
    def ended(self) -> int:
        return self.completed + self.failed


def read(manifest: Path) -> tuple[list[Line], str]:
    """The manifest's lines (blank ones skipped) and its digest; `.csv` is read as CSV,
    anything else as JSON Lines."""
    data = manifest.read_bytes()
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{manifest} is not UTF-8 text: {exc}") from exc
    rows = _csv(text) if manifest.suffix.lower() == ".csv" else _json_lines(text)
    return [Line(number, fields) for number, fields in rows], hashlib.sha256(data).hexdigest()


def _json_lines(text: str) -> Iterable[tuple[int, dict[str, Any]]]:
    for number, row in enumerate(text.splitlines(), start=1):
        if not row.strip():
            continue
        try:
            fields = json.loads(row)
        except ValueError as exc:
            raise ManifestError(f"line {number} is not JSON: {exc}") from exc
        if not isinstance(fields, dict):
            raise ManifestError(f"line {number} is not a JSON object")
        yield number, fields


def _csv(text: str) -> Iterable[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text), restkey="\0extra")
    for row in reader:
        number = reader.line_num
        if "\0extra" in row:
            raise ManifestError(f"line {number} has more cells than the header has columns")
        fields = {}
        for column, cell in row.items():
            if cell is None or not cell.strip():
                continue
            try:
                fields[column] = CSV_TYPES.get(column, str)(cell.strip())
            except ValueError as exc:
                raise ManifestError(f"line {number}, column {column}: {exc}") from exc
        if fields:
            yield number, fields


def _problem(exc: KlingError) -> dict[str, Any]:
    return exc.problem or {"status": exc.status, "code": exc.code, "detail": exc.detail}


def _for_later(status: int | None) -> bool:
    """An answer that says "not now" (no answer, 429, 5xx): the next run sends it again."""
    return status is None or status == 429 or status >= 500


def _settled(item: dict[str, Any]) -> bool:
    return "job_id" in item or "problem" in item


def _body(line: Line, item: dict[str, Any]) -> dict[str, Any]:
    body = {k: v for k, v in line.fields.items() if k not in OWN_KEYS}
    if "upload_id" in item:
        body["upload_id"] = item["upload_id"]
    elif line.image is not None:
        body["image_url"] = line.image
    return body


def upload_images(
    client: Client,
    lines: list[Line],
    state: State,
    base: Path,
    say: Callable[[str], None],
    concurrency: int = 4,
) -> None:
    """Upload each pending line's local image once, `concurrency` at a time. A refused image
    is that line's problem; an API that does not answer stops the run once the uploads under
    way have been recorded (the next run picks up from there)."""
    todo = [
        (line, local)
        for line in lines
        if (local := line.local_image(base)) is not None
        and not _settled(state.of(line))
        and "upload_id" not in state.of(line)
    ]
    with ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="upload") as pool:
        running = {pool.submit(client.upload, local): (line, local) for line, local in todo}
        stop: KlingError | None = None
        for done in as_completed(running):
            if done.cancelled():
                continue
            line, local = running[done]
            item = state.of(line)
            try:
                item["upload_id"] = done.result()["upload_id"]
            except OSError as exc:
                item["problem"] = {"code": "file_unreadable", "detail": f"{local}: {exc}"}
            except KlingError as exc:
                if _for_later(exc.status):
                    # Those not started yet wait for the next run; those under way finish.
                    stop = stop or exc
                    for waiting in running:
                        waiting.cancel()
                    continue
                item["problem"] = _problem(exc)
            else:
                say(f"line {line.number}: uploaded {local.name}")
            state.save()
    if stop is not None:
        raise stop


def create_jobs(
    client: Client, lines: list[Line], state: State, on_step: Callable[[], None]
) -> int:
    """Create every pending line, `CHUNK` to a batch call; answers how many the API could
    not take now (sent again by the next run)."""
    pending = [line for line in lines if not _settled(state.of(line))]
    later = 0
    for start in range(0, len(pending), CHUNK):
        chunk = pending[start : start + CHUNK]
        items = [{**_body(line, state.of(line)), "idempotency_key": state.key(line)}
                 for line in chunk]  # fmt: skip
        answer = client.batch(items)
        for line, outcome in zip(chunk, answer["items"], strict=True):
            item = state.of(line)
            generation = outcome.get("generation")
            if generation:
                item.update(_record(generation))
            elif _for_later(outcome["status"]):
                later += 1
            else:
                item["problem"] = outcome.get("problem") or {"status": outcome["status"]}
        state.save()
        on_step()
    return later


def follow(
    client: Client,
    lines: list[Line],
    state: State,
    out_dir: Path | None,
    base: Path,
    say: Callable[[str], None],
    on_step: Callable[[], None],
    concurrency: int = 4,
    interval: float = 1.0,
) -> None:
    """Until every created job has ended: read the unfinished ones, `concurrency` at a time,
    and write each completed one's MP4 (its line's `out`, or `<out_dir>/line-<n>.mp4`) as
    soon as it is seen completed, unless an earlier run wrote it."""
    with ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="follow") as pool:
        while True:
            live = [
                line for line in lines if _unfinished(state.of(line), _target(line, out_dir, base))
            ]
            if not live:
                return
            started = time.monotonic()
            rounds = [pool.submit(_advance, client, state.of(line), _target(line, out_dir, base))
                      for line in live]  # fmt: skip
            for line, done in zip(live, rounds, strict=True):
                written = done.result()
                if written is not None:
                    say(f"line {line.number}: wrote {written}")
            state.save()
            on_step()
            time.sleep(max(0.0, interval - (time.monotonic() - started)))


def _unfinished(item: dict[str, Any], target: Path | None) -> bool:
    if "job_id" not in item:
        return False
    if item.get("status") not in ENDED:
        return True
    return target is not None and item["status"] == "completed" and "written" not in item


def _advance(client: Client, item: dict[str, Any], target: Path | None) -> Path | None:
    """One look at a line's job (a thread of its own: only this item is changed); answers
    the file it wrote, if it wrote one."""
    if item.get("status") not in ENDED:
        item.update(_record(client.get(item["job_id"])))
    if target is None or item["status"] != "completed" or "written" in item:
        return None
    client.download(item["job_id"], target)
    item["written"] = str(target)
    return target


def _record(generation: Any) -> dict[str, Any]:
    """What the state keeps of a job record."""
    error = generation.get("error") or {}
    kept = {
        "job_id": generation["id"],
        "status": generation["status"],
        "cost_usd": generation.get("cost_usd"),
        "charged": generation.get("charged"),
    }
    if error:
        kept["error"] = error.get("code")
    return kept


def _target(line: Line, out_dir: Path | None, base: Path) -> Path | None:
    out = line.fields.get("out")
    if out:
        path = Path(str(out))
        return path if path.is_absolute() else base / path
    return out_dir / f"line-{line.number}.mp4" if out_dir else None


def tally(lines: list[Line], state: State) -> Tally:
    """Where the lines stand now; spend counts what was charged (or may have been)."""
    counts = {"queued": 0, "processing": 0, "completed": 0, "failed": 0}
    spent = Decimal(0)
    for line in lines:
        item = state.of(line)
        status = item.get("status")
        if "problem" in item or status in ENDED_BADLY:
            counts["failed"] += 1
        elif status in ("completed", "queued"):
            counts[status] += 1
        elif status is not None:
            counts["processing"] += 1
        if item.get("charged") in ("true", "unknown"):
            spent += _usd(item.get("cost_usd"))
    return Tally(len(lines), spent=spent, **counts)


def _usd(value: Any) -> Decimal:
    try:
        return Decimal(str(value)) if value is not None else Decimal(0)
    except InvalidOperation:
        return Decimal(0)


def write_report(lines: list[Line], state: State, path: Path) -> None:
    """One JSON line per manifest line: its job, where it ended, what it cost, its video."""
    rows = []
    for line in lines:
        item = state.of(line)
        problem = item.get("problem") or {}
        rows.append(json.dumps({
            "line": line.number, "job_id": item.get("job_id"),
            "status": "refused" if problem else item.get("status", "not_sent"),
            "error": problem.get("code") or item.get("error"),
            "cost_usd": item.get("cost_usd"), "charged": item.get("charged"),
            "video": item.get("written"),
        }))  # fmt: skip
    partial = path.with_name(path.name + ".part")
    partial.write_text("".join(row + "\n" for row in rows))
    os.replace(partial, path)
