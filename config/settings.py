"""The product's one settings class, read from the environment and validated at start."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal
from urllib.parse import urlsplit

from limits import parse
from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MODEL_ID = "kwaivgi/kling-v2.1-i2v-pro"
# A producer's urgency: the admission gate admits higher ones first (`workers.admission`).
Priority = Literal["high", "normal", "low"]
# Multipart framing around an uploaded image: boundaries, part headers, a long file name.
MULTIPART_OVERHEAD_BYTES = 64 * 1024


Tier = Literal["bronze", "silver", "gold", "ultra"]


@dataclass(frozen=True)
class TierLimits:
    max_in_flight: int
    submits_per_minute: int


# WaveSpeed's account levels: concurrent tasks and videos started per minute. Its
# account-levels page gives Bronze 3 and 5; the API reference we honour and our producers'
# own reading say 2 and 2. Bronze takes the stricter of each, so a new account never
# meets WaveSpeed's 429.
TIERS: dict[str, TierLimits] = {
    "bronze": TierLimits(max_in_flight=2, submits_per_minute=2),
    "silver": TierLimits(max_in_flight=100, submits_per_minute=60),
    "gold": TierLimits(max_in_flight=2000, submits_per_minute=600),
    "ultra": TierLimits(max_in_flight=5000, submits_per_minute=5000),
}


class Settings(BaseSettings):
    """Every knob of the API, the workers and the CLI. Built once per entrypoint, passed down."""

    # A refusal names the setting, never shows the values: the input holds the secrets too.
    model_config = SettingsConfigDict(
        env_file=None,
        extra="ignore",
        frozen=True,
        hide_input_in_errors=True,
        populate_by_name=True,
    )

    # `production` refuses, at start, settings that only make sense in development.
    environment: Literal["development", "production"] = "development"

    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/kling"
    redis_url: str = "redis://127.0.0.1:6379/0"

    s3_endpoint_url: str | None = None
    s3_bucket: str = "kling-videos"
    aws_access_key_id: str | None = None
    aws_secret_access_key: SecretStr | None = None
    aws_region: str = "us-east-1"

    wavespeed_api_key: SecretStr = SecretStr("")
    wavespeed_base_url: str = "https://api.wavespeed.ai"
    wavespeed_model: str = MODEL_ID
    wavespeed_webhook_secret: SecretStr | None = None
    wavespeed_connect_timeout: float = 5.0
    wavespeed_read_timeout: float = 30.0

    public_base_url: str = "http://127.0.0.1:8000"
    log_format: Literal["console", "json"] = "json"
    log_level: str = "INFO"
    # Where a Celery worker host serves Prometheus metrics; None: not served. The API serves
    # them at /metrics on its own port.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_host: str = "0.0.0.0"  # noqa: S104 - scraped from other machines
    # The bearer token the API's /metrics asks for; none (or empty): open.
    metrics_token: SecretStr | None = None

    # USD per clip, by duration in seconds (the model page's price table).
    price_usd: dict[int, Decimal] = Field(
        default_factory=lambda: {
            5: Decimal("0.45"),
            10: Decimal("0.90"),
            15: Decimal("1.35"),
            20: Decimal("1.80"),
        }
    )
    # The clip lengths a request may ask for. The model page prices 15 and 20 s too, but its
    # parameter table offers only 5 and 10; each one allowed must have a price.
    allowed_durations: list[int] = Field(default_factory=lambda: [5, 10], min_length=1)

    # Adaptive polling: the first check near the expected finish, then a tightening-then-relaxing
    # interval between min and max, so a late clip does not cost a request a second.
    poll_first_delay_seconds: dict[int, float] = Field(default_factory=lambda: {5: 90.0, 10: 180.0})
    poll_min_interval_seconds: float = 3.0
    poll_max_interval_seconds: float = 30.0
    poll_backoff_factor: float = 1.5
    # A job still processing after this long is failed (WaveSpeed drops outputs after 7 days).
    processing_timeout_seconds: float = 3 * 3600.0

    # Admission gate: predictions in flight at once and submissions per minute, by default
    # those of the WaveSpeed account tier (`TIERS`), and the share one tenant may hold.
    wavespeed_tier: Tier = "bronze"
    max_in_flight: int = Field(default=TIERS["bronze"].max_in_flight, ge=1)
    submits_per_minute: int = Field(default=TIERS["bronze"].submits_per_minute, ge=1)
    tenant_max_in_flight: int | None = Field(default=None, ge=1)

    submit_max_attempts: int = 8
    # Tries at deleting the prediction of a stopped job before it is left to WaveSpeed,
    # backing off to `store_retry_max_seconds`: the default outlasts a two-hour outage.
    withdraw_max_attempts: int = Field(default=24, ge=1)
    retry_base_seconds: float = 2.0
    retry_max_seconds: float = 120.0

    # Callbacks to producers: delay before attempt 1, 2, ... (at once, 5 s, 5 min, 30 min, 2 h,
    # 5 h, 10 h, 14 h, 20 h, 24 h), the timeout of one attempt, and how long a rotated-out
    # signing secret keeps signing.
    callback_schedule_seconds: list[float] = Field(
        default_factory=lambda: [0.0, 5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400]
    )
    callback_timeout_seconds: float = 15.0
    # Tries at publishing a broker request's reply (`workers.replies`), backing off to
    # `max_countdown_seconds`: the default outlasts a broker gone for over an hour.
    reply_max_attempts: int = Field(default=20, ge=1)
    # One receiver cannot hold up the others: attempts to one host at a time, and its circuit
    # breaker (opens after that many failures in a row, for a cool-down that doubles with
    # each further failure up to the max; then one attempt probes it).
    callback_host_concurrency: int = Field(default=4, ge=1)
    callback_breaker_failures: int = Field(default=5, ge=1)
    callback_breaker_seconds: float = Field(default=30.0, gt=0.0)
    callback_breaker_max_seconds: float = Field(default=1800.0, gt=0.0)
    secret_rotation_overlap_seconds: float = 24 * 3600.0
    # Fernet keys that seal tenant signing secrets in the database: the first seals, all
    # open. Empty is allowed so that processes which never touch those secrets still start.
    secret_keys: list[SecretStr] = Field(default_factory=list)
    # Waits up to this long are Celery countdowns; longer ones are rows the reconciler finds.
    max_countdown_seconds: float = 300.0

    # Untrusted URLs (images we fetch, callbacks we call) must resolve to public addresses;
    # hosts or CIDRs listed here are let through for local development.
    url_allow_hosts: list[str] = Field(default_factory=list)
    # A DNS lookup of an untrusted host gives up after this long (the system resolver has no
    # timeout of its own that we control).
    url_dns_timeout_seconds: float = Field(default=5.0, gt=0.0)

    # Load bounds of the API: requests per API key (`limits` notation, counted in Redis across
    # every API process; a batch counts each item), and per tenant and API process, batches
    # and image fetches running at once.
    rate_limit: str = "1200/minute"
    tenant_max_batches: int = Field(default=2, ge=1)
    tenant_max_image_fetches: int = Field(default=8, ge=1)
    # Long-polls (`Prefer: wait=N`) and event streams one tenant may hold open per API
    # process (each costs a little memory and a read per change of its job), and the
    # longest wait a request may ask for.
    tenant_max_waiters: int = Field(default=1000, ge=1)
    long_poll_max_seconds: int = Field(default=60, ge=1, le=300)

    image_max_bytes: int = 10 * 1024 * 1024
    image_min_side: int = 300
    # Pixels an input image may have, read from its header before anything is decoded: a PNG of
    # a few KB can claim 20000x20000. 50 Mi covers 12 MP phone photos and 48-50 MP sensors
    # (8000x6000, 8192x6144); decoding a PNG takes up to 4 bytes a pixel (about 210 MB here).
    image_max_pixels: int = Field(default=50 * 1024 * 1024, ge=1)
    image_fetch_timeout_seconds: float = 15.0
    # Request bodies, refused (413) from Content-Length before they are read and cut off while
    # they stream; each bounds what one request makes the API hold and parse. A create is at
    # most about 17 KB of plain JSON (two 2500-character prompts, two 2048-character URLs, 8 KB
    # of metadata), so 1 MiB leaves room for any escaping; a batch of 500 of the largest is
    # 8.6 MB, which 10 MiB holds; WaveSpeed's webhook carries one prediction, a few KB. Uploads
    # may be `image_max_bytes` plus multipart framing (`upload_body_max_bytes`).
    body_max_bytes: int = Field(default=1024 * 1024, ge=1)
    batch_body_max_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    # "Webhook" is WaveSpeed's word for what it sends us, "callback" ours for what we send
    # producers. `WEBHOOK_BODY_MAX_BYTES`, the name before that rule, is still read this release.
    wavespeed_webhook_body_max_bytes: int = Field(
        default=256 * 1024,
        ge=1,
        validation_alias=AliasChoices("wavespeed_webhook_body_max_bytes", "webhook_body_max_bytes"),
    )
    # Presigned input URLs must outlive WaveSpeed's queue and retries.
    input_url_ttl_seconds: int = 24 * 3600
    # Where WaveSpeed reads a submit's input image: a presigned URL of our S3 bucket (which
    # WaveSpeed must be able to reach), or a copy uploaded through WaveSpeed's own media
    # upload, for an S3 it cannot reach (a laptop's embedded stack).
    input_hosting: Literal["s3", "wavespeed"] = "s3"

    s3_part_size: int = 8 * 1024 * 1024
    # Parts of one video uploading at once; a store task holds about (this + 2) parts in memory.
    s3_max_concurrency: int = Field(default=4, ge=1)
    s3_connect_timeout: float = 5.0
    s3_read_timeout: float = 60.0
    download_timeout_seconds: float = 60.0

    # Beat interval for the reconciler, and how long an outbox row may wait before it is resent.
    reconcile_interval_seconds: float = 5.0
    outbox_grace_seconds: float = 10.0
    poll_overdue_grace_seconds: float = 30.0
    # The lease of one store try: a `storing` job whose try has run this long without ending
    # is tried again (the store task's hard time limit ends the old try first: 60 s before,
    # or a quarter of the lease if that is shorter).
    store_stall_seconds: float = Field(default=900.0, ge=10.0)
    # While a sweep's queue still holds messages, work counts as lost only once it is this much
    # later than its grace: it is probably queued behind the backlog, not gone.
    reconcile_backlog_grace_seconds: float = 600.0
    # A step the reconciler had to resend this many times is put aside for an operator
    # (`kling quarantine`), and so is a task whose worker died this many times running it.
    reconcile_max_resends: int = Field(default=50, ge=1)
    poison_max_deliveries: int = Field(default=5, ge=1)
    # Soft and hard time limit of one task (the store's are derived from `store_stall_seconds`):
    # the soft one lets the task clean up, the hard one kills the process.
    task_time_limit_seconds: float = Field(default=300.0, ge=10.0)
    # The submit task's hard time limit, from its claim of the job to the end of its POST: the
    # process is killed past it, so no POST of that attempt can reach WaveSpeed later. A
    # history lookup counts as a miss only after it; longer than the POST's own timeouts.
    submit_time_limit_seconds: float = Field(default=90.0, ge=20.0)

    # Outages that last minutes. An unanswered submit is looked up in WaveSpeed's history in a
    # window around the POST, widened by the clocks' possible disagreement, reading at most
    # `history_max_pages` pages of 100 (a fuller window can prove nothing missing); lookups
    # back off to `recover_max_interval_seconds` and end after `recover_deadline_seconds`,
    # when the job fails as `submit_unconfirmed` (it may be charged).
    history_clock_skew_seconds: float = Field(default=60.0, ge=0.0)
    history_max_pages: int = Field(default=200, ge=1)
    recover_max_interval_seconds: float = Field(default=300.0, gt=0.0)
    recover_deadline_seconds: float = Field(default=24 * 3600.0, gt=0.0)
    # Polls WaveSpeed refuses in a row (404, 400) before the job fails as `prediction_lost`;
    # after each refusal the next poll waits `poll_refusal_base_seconds`, doubling, so a blip
    # of a few seconds does not end a live (and paid) prediction: about 4 to 7 min in all.
    poll_max_rejections: int = Field(default=5, ge=1)
    poll_refusal_base_seconds: float = Field(default=30.0, ge=0.0)
    # WaveSpeed keeps outputs 7 days: a 403/404 before then is a CDN hiccup and is retried,
    # as is any failed store, backing off to `store_retry_max_seconds`, until
    # `store_deadline_seconds` after the output was reported.
    output_retention_seconds: float = Field(default=7 * 86400.0, gt=0.0)
    store_deadline_seconds: float = Field(default=24 * 3600.0, gt=0.0)
    store_retry_max_seconds: float = Field(default=600.0, gt=0.0)
    # Every Retry-After anybody sends us is clamped to this.
    retry_after_max_seconds: float = Field(default=3600.0, gt=0.0)

    # Connection pools and timeouts of every process: a request or task waits at most
    # `db_pool_timeout_seconds` for a connection, and a dead server is noticed within seconds.
    # (A prefork worker process opens only what it uses at once, one or two; the API serves
    # many requests at once.)
    db_pool_size: int = Field(default=10, ge=1)
    db_max_overflow: int = Field(default=20, ge=0)
    db_pool_timeout_seconds: float = Field(default=5.0, gt=0.0)
    db_connect_timeout_seconds: int = Field(default=5, ge=1)
    broker_timeout_seconds: float = Field(default=3.0, gt=0.0)

    @model_validator(mode="before")
    @classmethod
    def _tier_defaults(cls, data: Any) -> Any:
        """The gate's caps default to the account tier's; a value given (not empty: compose
        passes an unset variable as an empty one) wins."""
        if not isinstance(data, dict):
            return data
        data = {k: v for k, v in data.items() if k not in _TIER_FIELDS or v not in ("", None)}
        tier = TIERS.get(str(data.get("wavespeed_tier", "bronze")))
        if tier is not None:
            for name in _TIER_FIELDS:
                data.setdefault(name, getattr(tier, name))
        return data

    @field_validator("rate_limit")
    @classmethod
    def _readable_rate(cls, value: str) -> str:
        parse(value)  # raises ValueError on anything `limits` cannot read, naming it
        return value

    @field_validator("metrics_token")
    @classmethod
    def _empty_is_none(cls, value: SecretStr | None) -> SecretStr | None:
        # Compose passes an unset variable as an empty one; neither asks for a token.
        return value if value is not None and value.get_secret_value() else None

    @model_validator(mode="after")
    def _fit_for_production(self) -> Settings:
        refusals = production_refusals(self) if self.environment == "production" else []
        if refusals:
            raise ValueError("ENVIRONMENT=production refuses: " + "; ".join(refusals))
        return self

    @model_validator(mode="after")
    def _every_duration_priced(self) -> Settings:
        unpriced = [d for d in self.allowed_durations if d not in self.price_usd]
        if unpriced or any(d < 1 for d in self.allowed_durations):
            raise ValueError(
                f"allowed_durations must be whole seconds that PRICE_USD prices: {unpriced} "
                "unpriced"
                if unpriced
                else "allowed_durations must be whole seconds from 1"
            )
        return self

    @model_validator(mode="after")
    def _submit_outlasts_its_post(self) -> Settings:
        if self.submit_time_limit_seconds < self.submit_post_seconds + 10:
            raise ValueError(
                "submit_time_limit_seconds must exceed wavespeed_connect_timeout + "
                f"wavespeed_read_timeout by 10 s or more ({self.submit_post_seconds + 10:.0f})"
            )
        return self

    @property
    def submit_post_seconds(self) -> float:
        """The longest a submit POST waits for WaveSpeed's answer once sent."""
        return self.wavespeed_connect_timeout + self.wavespeed_read_timeout

    @property
    def upload_body_max_bytes(self) -> int:
        """The largest `POST /v1/uploads` body: the largest image and its multipart framing."""
        return self.image_max_bytes + MULTIPART_OVERHEAD_BYTES

    @property
    def wavespeed_webhook_url(self) -> str:
        """Where WaveSpeed pushes completions for this deployment."""
        return f"{self.public_base_url.rstrip('/')}/v1/wavespeed/webhook"


_TIER_FIELDS = ("max_in_flight", "submits_per_minute")


def production_refusals(settings: Settings) -> list[str]:
    """What production mode refuses in `settings`: each names the setting and its rule."""
    refusals = []
    if not settings.wavespeed_api_key.get_secret_value():
        refusals.append("WAVESPEED_API_KEY must not be empty")
    secret = settings.wavespeed_webhook_secret
    if secret is None or not secret.get_secret_value():
        refusals.append("WAVESPEED_WEBHOOK_SECRET must be set, to verify WaveSpeed's webhooks")
    public = urlsplit(settings.public_base_url)
    if public.scheme != "https" or not public.hostname:
        refusals.append("PUBLIC_BASE_URL must be https: WaveSpeed sends its webhooks there")
    if settings.metrics_token is None:
        refusals.append("METRICS_TOKEN must be set, so that /metrics is not open")
    return refusals


def settings_from(env: Mapping[str, str], **overrides: Any) -> Settings:
    """Settings as a process started with `env` would read them (complex fields arrive as
    JSON, as pydantic-settings expects), with overrides; the OS environment is not read."""
    values: dict[str, Any] = {}
    for name in Settings.model_fields:
        raw = env.get(name.upper())
        if raw is not None:
            values[name] = json.loads(raw) if raw.startswith(("{", "[")) else raw
    values.update(overrides)
    return Settings.model_validate(values)
