"""`kling batch MANIFEST`: many generations from a JSON Lines file, resumable.

Each line of the manifest is one create: any field of `POST /v1/generations`, with `image`
(a local file, uploaded, or an http(s) URL) in place of `image_url`/`upload_id`, and an
optional `out` (where its MP4 goes). What became of each line is kept in a state file next
to the manifest, written after every step, so a run that was stopped anywhere is run again
with the same command:

- every line is created with its own `Idempotency-Key` (`<run>/<line>`, the run's id kept
  in the state), so a line whose create was sent but not recorded answers the job it made;
- a local image is uploaded once: its `upload_id` is recorded before the create, so the
  create sent again carries the same body;
- lines refused for good (4xx) are recorded with their problem and not sent again; lines
  the API could not take now (429, 5xx in a batch's answer) are sent again on the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kling_client import Client, KlingError

# Items of one batch call (the API takes up to 500; smaller calls record progress sooner).
CHUNK = 100
OWN_KEYS = ("image", "out")


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
                f"the manifest changed since {path} was written: move that file away to "
                "start a new run"
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


def read(manifest: Path) -> tuple[list[Line], str]:
    """The manifest's lines (blank ones skipped) and its digest."""
    data = manifest.read_bytes()
    lines = []
    for number, text in enumerate(data.decode().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            fields = json.loads(text)
        except ValueError as exc:
            raise ManifestError(f"line {number} is not JSON: {exc}") from exc
        if not isinstance(fields, dict):
            raise ManifestError(f"line {number} is not a JSON object")
        lines.append(Line(number, fields))
    return lines, hashlib.sha256(data).hexdigest()


def _problem(exc: KlingError) -> dict[str, Any]:
    return exc.problem or {"status": exc.status, "code": exc.code, "detail": exc.detail}


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
    client: Client, lines: list[Line], state: State, base: Path, say: Callable[[str], None]
) -> None:
    """Upload each pending line's local image once. A refused image is that line's problem;
    an API that does not answer stops the run (the next one picks up from here)."""
    for line in lines:
        item, local = state.of(line), line.local_image(base)
        if local is None or _settled(item) or "upload_id" in item:
            continue
        try:
            item["upload_id"] = client.upload(local)["upload_id"]
        except OSError as exc:
            item["problem"] = {"code": "file_unreadable", "detail": f"{local}: {exc}"}
        except KlingError as exc:
            if exc.status is None or exc.status == 429 or exc.status >= 500:
                raise
            item["problem"] = _problem(exc)
        state.save()
        say(f"line {line.number}: uploaded {local.name}")


def create_jobs(client: Client, lines: list[Line], state: State, say: Callable[[str], None]) -> int:
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
                item.update(job_id=generation["id"], status=generation["status"])
            elif outcome["status"] == 429 or outcome["status"] >= 500:
                later += 1
            else:
                item["problem"] = outcome.get("problem") or {"status": outcome["status"]}
        state.save()
        say(f"sent lines {chunk[0].number}..{chunk[-1].number}")
    return later


def finish(
    client: Client,
    lines: list[Line],
    state: State,
    out_dir: Path | None,
    base: Path,
    say: Callable[[str], None],
) -> None:
    """Wait for every job to end and write each completed one's MP4 (its line's `out`, or
    `<out_dir>/line-<n>.mp4`) unless an earlier run wrote it."""
    for line in lines:
        item = state.of(line)
        if "job_id" not in item:
            continue
        if item.get("status") not in ("completed", "failed", "cancelled", "expired"):
            item["status"] = client.wait(item["job_id"])["status"]
            state.save()
        target = _target(line, out_dir, base)
        if target is not None and item["status"] == "completed" and "written" not in item:
            client.download(item["job_id"], target)
            item["written"] = str(target)
            state.save()
            say(f"line {line.number}: wrote {target}")


def _target(line: Line, out_dir: Path | None, base: Path) -> Path | None:
    out = line.fields.get("out")
    if out:
        path = Path(str(out))
        return path if path.is_absolute() else base / path
    return out_dir / f"line-{line.number}.mp4" if out_dir else None
