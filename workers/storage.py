"""S3-compatible storage on boto3: streamed multipart uploads, presigned reads, and nothing else."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

# S3 refuses multipart parts under 5 MiB (except the last one).
MIN_PART_SIZE = 5 * 1024 * 1024


class StorageError(Exception):
    """An S3 call failed; the message never carries credentials or presigned queries."""


@dataclass(frozen=True)
class StoredObject:
    bucket: str
    key: str
    bytes: int
    sha256: str


def make_s3_client(
    *,
    endpoint_url: str | None,
    region: str,
    access_key_id: str | None,
    secret_access_key: str | None,
    connect_timeout: float = 5.0,
    read_timeout: float = 60.0,
) -> Any:
    """The boto3 client a process shares, with explicit timeouts and standard retries."""
    config = Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"mode": "standard", "max_attempts": 5},
        signature_version="s3v4",
        s3={"addressing_style": "path"},
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        config=config,
    )


def _parts(chunks: Iterable[bytes], part_size: int) -> Iterator[bytes]:
    """Regroup arbitrary chunks into parts of exactly `part_size` (the last may be shorter)."""
    buffer = bytearray()
    for chunk in chunks:
        buffer += chunk
        while len(buffer) >= part_size:
            yield bytes(buffer[:part_size])
            del buffer[:part_size]
    if buffer:
        yield bytes(buffer)


class Storage:
    """One bucket. Takes a boto3 S3 client built by the caller."""

    def __init__(self, s3: Any, bucket: str, *, part_size: int = 8 * 1024 * 1024) -> None:
        self._s3 = s3
        self.bucket = bucket
        self._part_size = max(part_size, MIN_PART_SIZE)

    def close(self) -> None:
        self._s3.close()

    def check(self) -> None:
        """Raise unless the bucket answers."""
        self._s3.head_bucket(Bucket=self.bucket)

    def ensure_bucket(self) -> None:
        try:
            self._s3.head_bucket(Bucket=self.bucket)
        except ClientError:
            self._s3.create_bucket(Bucket=self.bucket)

    def put_bytes(self, key: str, body: bytes, content_type: str) -> StoredObject:
        try:
            self._s3.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=content_type)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"put {key}: {exc}") from exc
        return StoredObject(self.bucket, key, len(body), hashlib.sha256(body).hexdigest())

    def put_stream(
        self, key: str, chunks: Iterable[bytes], content_type: str, *, tee: IO[bytes] | None = None
    ) -> StoredObject:
        """Stream chunks into a multipart upload in constant memory (one part at a time),
        hashing as they pass. `tee` receives a copy of every byte (e.g. a temp file to probe).
        The upload is aborted on any failure, so a half-written object never appears."""
        upload_id = self._s3.create_multipart_upload(
            Bucket=self.bucket, Key=key, ContentType=content_type
        )["UploadId"]
        digest, size, etags = hashlib.sha256(), 0, []
        try:
            for number, part in enumerate(_parts(chunks, self._part_size), start=1):
                digest.update(part)
                size += len(part)
                if tee is not None:
                    tee.write(part)
                answer = self._s3.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=part
                )
                etags.append({"PartNumber": number, "ETag": answer["ETag"]})
            if not etags:  # S3 needs at least one part, even for an empty body.
                answer = self._s3.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=b""
                )
                etags.append({"PartNumber": 1, "ETag": answer["ETag"]})
            self._s3.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": etags}
            )
        except BaseException:
            self._s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise
        return StoredObject(self.bucket, key, size, digest.hexdigest())

    def copy(self, source_key: str, key: str) -> None:
        try:
            self._s3.copy_object(
                Bucket=self.bucket, Key=key, CopySource={"Bucket": self.bucket, "Key": source_key}
            )
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"copy {source_key} -> {key}: {exc}") from exc

    def head(self, key: str) -> dict[str, Any] | None:
        try:
            return dict(self._s3.head_object(Bucket=self.bucket, Key=key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise StorageError(f"head {key}: {exc}") from exc

    def get_bytes(self, key: str) -> bytes:
        return bytes(self._s3.get_object(Bucket=self.bucket, Key=key)["Body"].read())

    def presign_get(self, key: str, expires_in: int) -> str:
        return str(
            self._s3.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_in
            )
        )
