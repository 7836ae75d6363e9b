"""Copying a large output into S3: `workers.storage.Storage.put_stream` fed from an HTTP
download, against boto3's `upload_file` of the same bytes from local disk, into the same moto S3.

    python -m bench.copy [--megabytes 500] [--part-mib 8]

A child process serves the body on 127.0.0.1, generated on the fly (a 1 MiB pseudo-random block
repeated; never held whole in memory). Every variant runs in a fresh interpreter, so each one's
memory figure is its own: peak RSS (sampled every 5 ms) minus RSS just before the transfer.

- `download`: the HTTP body read and dropped (what the source alone allows);
- `put_stream`: httpx `iter_raw()` into `Storage.put_stream` (8 MiB parts by default, as the
  product's `S3_PART_SIZE`);
- `put_stream_tee`: the same with `tee=` a temporary file, exactly as `Pipeline._copy_output`
  does it (the copy is then probed);
- `upload_file` (baseline): the bytes already on local disk, `boto3` `upload_file` with its
  default `TransferConfig` (8 MiB parts, 10 threads), same client settings as the product's.

`--profile DIR` writes each variant's transfer as cProfile stats (wall time) to DIR/<variant>.prof.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import multiprocessing
import random
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.harness import emit, mib
from sandbox.processes import free_port
from sandbox.services import EmbeddedS3
from workers.storage import Storage, make_s3_client

BLOCK = 1024 * 1024
BUCKET = "bench-copy"


def block() -> bytes:
    return random.Random(20261124).randbytes(BLOCK)


# -- the source: a body of any length, made as it is sent ----------------------------------


class BlobHandler(BaseHTTPRequestHandler):
    """`GET /<bytes>`: that many bytes, the 1 MiB block over and over."""

    data = block()

    def do_GET(self) -> None:
        size = int(self.path.strip("/"))
        self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        view = memoryview(self.data)
        left = size
        while left > 0:
            chunk = view[: min(left, BLOCK)]
            self.wfile.write(chunk)
            left -= len(chunk)

    def log_message(self, *_: Any) -> None:
        pass


def serve(port: int) -> None:
    ThreadingHTTPServer(("127.0.0.1", port), BlobHandler).serve_forever()


def expected_sha256(size: int) -> str:
    digest, data, left = hashlib.sha256(), block(), size
    while left > 0:
        digest.update(data[: min(left, BLOCK)])
        left -= BLOCK
    return digest.hexdigest()


def sandbox_s3(url: str) -> Any:
    """The product's boto3 client settings, with the embedded S3's fixed stand-in keys."""
    return make_s3_client(
        endpoint_url=url, region="us-east-1", access_key_id="sandbox",
        secret_access_key="sandbox",  # noqa: S106 - moto's stand-in, as in sandbox/services.py
    )  # fmt: skip


# -- one variant, in its own interpreter ------------------------------------------------------


class PeakRss:
    """Samples this process's RSS on a thread; `peak` is the highest seen."""

    def __init__(self, interval: float = 0.005) -> None:
        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def variant(
    name: str, source: str, s3_url: str, size: int, part_mib: int, work: str, profile: str | None
) -> dict[str, Any]:
    """Run one variant and answer its figures (called in a spawned child)."""
    s3 = sandbox_s3(s3_url)
    storage = Storage(s3, BUCKET, part_size=part_mib * 2**20)
    http = httpx.Client(timeout=httpx.Timeout(60.0, connect=5.0))
    local = Path(work) / "local.bin"
    key = f"bench/{name}.bin"
    s3.put_object(Bucket=BUCKET, Key="bench/warm-up", Body=b"x")  # load botocore's models now
    http.get(f"{source}/16").raise_for_status()
    before = psutil.Process().memory_info().rss
    profiler = cProfile.Profile() if profile else None
    with PeakRss() as rss:
        started = time.perf_counter()
        if profiler:
            profiler.enable()
        stored = _transfer(name, http, storage, s3, source, size, key, local, work)
        seconds = time.perf_counter() - started
    if profiler and profile:
        profiler.disable()
        Path(profile).mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(str(Path(profile) / f"{name}.prof"))
    if name != "download":
        stored = int(s3.head_object(Bucket=BUCKET, Key=key)["ContentLength"])
        s3.delete_object(Bucket=BUCKET, Key=key)  # moto keeps objects in memory
    http.close()
    s3.close()
    return {
        "variant": name,
        "seconds": round(seconds, 2),
        "mb_per_s": round(size / 1e6 / seconds, 1),
        "peak_rss_growth_mib": mib(rss.peak - before),
        "rss_before_mib": mib(before),
        "bytes_ok": stored == size,
    }


def _transfer(
    name: str,
    http: httpx.Client,
    storage: Storage,
    s3: Any,
    source: str,
    size: int,
    key: str,
    local: Path,
    work: str,
) -> int:
    if name == "upload_file":
        s3.upload_file(str(local), BUCKET, key)
        return size
    with http.stream("GET", f"{source}/{size}") as response:
        response.raise_for_status()
        if name == "download":
            return sum(len(chunk) for chunk in response.iter_raw())
        if name == "put_stream":
            return storage.put_stream(key, response.iter_raw(), "video/mp4").bytes
        with tempfile.NamedTemporaryFile(dir=work, suffix=".mp4") as tee:
            return storage.put_stream(key, response.iter_raw(), "video/mp4", tee=tee).bytes


def fetch_to_disk(source: str, size: int, path: Path) -> str:
    """The baseline's input: the same bytes on local disk (not timed); answers their sha256."""
    digest = hashlib.sha256()
    with httpx.stream("GET", f"{source}/{size}", timeout=60) as response, path.open("wb") as out:
        for chunk in response.iter_raw():
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


# -- the run ----------------------------------------------------------------------------------


def run(
    megabytes: int, part_mib: int, variants: list[str], profile: str | None = None
) -> dict[str, Any]:
    size = megabytes * 1_000_000
    context = multiprocessing.get_context("spawn")
    port = free_port()
    server = context.Process(target=serve, args=(port,), daemon=True)
    server.start()
    source = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="kling-bench-copy-") as work:
        s3 = EmbeddedS3(Path(work) / "logs").start()
        try:
            _wait_source(source)
            client = sandbox_s3(s3.url)
            client.create_bucket(Bucket=BUCKET)
            sha = fetch_to_disk(source, size, Path(work) / "local.bin")
            results = {}
            for name in variants:
                with context.Pool(1) as pool:
                    args = (name, source, s3.url, size, part_mib, work, profile)
                    results[name] = pool.apply(variant, args)
        finally:
            s3.stop()
            server.terminate()
    return {"size": size, "sha_ok": sha == expected_sha256(size), "results": results}


def _wait_source(source: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{source}/1", timeout=1).raise_for_status()
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError("the blob server did not start")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.copy", description=__doc__)
    parser.add_argument("--megabytes", type=int, default=500)
    parser.add_argument("--part-mib", type=int, default=8, help="put_stream part size")
    parser.add_argument(
        "--variants", default="download,put_stream,put_stream_tee,upload_file",
        help="comma-separated subset, run in this order",
    )  # fmt: skip
    parser.add_argument("--profile", default=None, help="directory for cProfile stats (wall time)")
    args = parser.parse_args(argv)
    measured = run(args.megabytes, args.part_mib, args.variants.split(","), args.profile)
    results = measured["results"]
    base = results.get("upload_file")
    result: dict[str, Any] = {
        "bench": "copy",
        "megabytes": args.megabytes,
        "part_mib": args.part_mib,
        "source_sha256_ok": measured["sha_ok"],
        **{name: figures for name, figures in results.items()},
    }
    for name in ("put_stream", "put_stream_tee"):
        if base and name in results:
            result[f"ratio_{name}_to_upload_file"] = round(
                results[name]["mb_per_s"] / base["mb_per_s"], 3
            )
    stream, tee = results.get("put_stream", {}), results.get("put_stream_tee", {})
    emit(
        result,
        f"| copy | put_stream {stream.get('mb_per_s')} MB/s (+{stream.get('peak_rss_growth_mib')} "
        f"MiB RSS), with tee {tee.get('mb_per_s')} MB/s (+{tee.get('peak_rss_growth_mib')} MiB) "
        f"| upload_file {base and base['mb_per_s']} MB/s (+{base and base['peak_rss_growth_mib']} "
        f"MiB) | x{result.get('ratio_put_stream_to_upload_file')} "
        f"| {args.megabytes} MB, {args.part_mib} MiB parts, moto on loopback |",
    )
    ok = measured["sha_ok"] and all(r["bytes_ok"] for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
