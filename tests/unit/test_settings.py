from decimal import Decimal

import pytest
from pydantic import ValidationError

from config import Settings
from config.settings import settings_from


def test_defaults_point_at_the_real_wavespeed() -> None:
    settings = Settings()
    assert settings.wavespeed_base_url == "https://api.wavespeed.ai"
    assert settings.price_usd == {
        5: Decimal("0.45"),
        10: Decimal("0.90"),
        15: Decimal("1.35"),
        20: Decimal("1.80"),
    }
    assert settings.allowed_durations == [5, 10]


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://u@db:5432/x")
    monkeypatch.setenv("WAVESPEED_API_KEY", "k-123")
    monkeypatch.setenv("PUBLIC_BASE_URL", "https://kling.example.com/")
    monkeypatch.setenv("POLL_FIRST_DELAY_SECONDS", '{"5": 80, "10": 200}')
    monkeypatch.setenv("LOG_FORMAT", "console")
    settings = Settings()
    assert settings.database_url == "postgresql+psycopg://u@db:5432/x"
    assert settings.wavespeed_api_key.get_secret_value() == "k-123"
    assert settings.wavespeed_webhook_url == "https://kling.example.com/v1/wavespeed/webhook"
    assert settings.poll_first_delay_seconds == {5: 80.0, 10: 200.0}
    assert settings.log_format == "console"


def test_a_setting_renamed_this_release_is_read_by_its_old_name_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WEBHOOK_BODY_MAX_BYTES", "4096")
    assert Settings().wavespeed_webhook_body_max_bytes == 4096
    monkeypatch.setenv("WAVESPEED_WEBHOOK_BODY_MAX_BYTES", "8192")  # the new name wins
    assert Settings().wavespeed_webhook_body_max_bytes == 8192


def test_secrets_do_not_show_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WAVESPEED_API_KEY", "very-secret-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    text = repr(Settings())
    assert "very-secret-key" not in text
    assert "aws-secret" not in text


def test_invalid_values_are_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_FORMAT", "xml")
    with pytest.raises(ValidationError, match="log_format"):
        Settings()


def test_input_hosting_is_s3_or_wavespeed_and_nothing_else() -> None:
    assert Settings().input_hosting == "s3"
    assert settings_from({"INPUT_HOSTING": "wavespeed"}).input_hosting == "wavespeed"
    with pytest.raises(ValidationError, match="input_hosting") as refused:
        settings_from({"INPUT_HOSTING": "cloudinary"})
    assert "'s3' or 'wavespeed'" in str(refused.value)


# Production settings that follow every rule production mode has.
PRODUCTION = {
    "ENVIRONMENT": "production",
    "WAVESPEED_API_KEY": "ws-key-for-the-test",
    "WAVESPEED_WEBHOOK_SECRET": "whsec_dGVzdA",
    "PUBLIC_BASE_URL": "https://kling.example.com",
    "METRICS_TOKEN": "metrics-token-for-the-test",
}


def test_production_takes_settings_that_follow_its_rules() -> None:
    assert settings_from(PRODUCTION).environment == "production"
    # Development starts without any of them.
    assert settings_from({}).environment == "development"


@pytest.mark.parametrize(
    ("name", "value", "rule"),
    [
        ("WAVESPEED_API_KEY", "", "must not be empty"),
        ("WAVESPEED_API_KEY", None, "must not be empty"),
        ("WAVESPEED_WEBHOOK_SECRET", "", "must be set"),
        ("WAVESPEED_WEBHOOK_SECRET", None, "must be set"),
        ("PUBLIC_BASE_URL", "http://kling.example.com", "must be https"),
        ("PUBLIC_BASE_URL", "https://", "must be https"),
        ("PUBLIC_BASE_URL", None, "must be https"),  # the default is a loopback http URL
        ("METRICS_TOKEN", "", "must be set"),
        ("METRICS_TOKEN", None, "must be set"),
    ],
)
def test_production_refuses_each_unfit_setting_by_name_and_rule(
    name: str, value: str | None, rule: str
) -> None:
    env = {key: v for key, v in PRODUCTION.items() if key != name}
    if value is not None:
        env[name] = value
    with pytest.raises(ValidationError) as refused:
        settings_from(env)
    message = str(refused.value)
    assert f"{name} {rule}" in message
    assert message.count(" must ") == 1, message  # that one setting, no other


def test_production_names_every_refusal_at_once_and_shows_no_value() -> None:
    env = {"ENVIRONMENT": "production", "WAVESPEED_API_KEY": "ws-very-secret-key"}
    with pytest.raises(ValidationError) as refused:
        settings_from(env)
    message = str(refused.value)
    for name in ("WAVESPEED_WEBHOOK_SECRET", "PUBLIC_BASE_URL", "METRICS_TOKEN"):
        assert f"{name} must" in message
    assert "ws-very-secret-key" not in message


def test_an_empty_metrics_token_is_no_token() -> None:
    assert settings_from({"METRICS_TOKEN": ""}).metrics_token is None
    token = settings_from({"METRICS_TOKEN": "t"}).metrics_token
    assert token is not None and token.get_secret_value() == "t"


@pytest.mark.parametrize(
    ("env", "caps"),
    [
        ({}, (2, 2)),  # bronze-safe by default
        ({"WAVESPEED_TIER": "gold"}, (2000, 600)),
        ({"WAVESPEED_TIER": "silver", "MAX_IN_FLIGHT": "7"}, (7, 60)),  # a given value wins
        ({"WAVESPEED_TIER": "ultra", "SUBMITS_PER_MINUTE": ""}, (5000, 5000)),  # compose's unset
    ],
)
def test_the_gate_takes_the_tiers_limits_unless_given(
    env: dict[str, str], caps: tuple[int, int]
) -> None:
    settings = settings_from(env)
    assert (settings.max_in_flight, settings.submits_per_minute) == caps


def test_an_unknown_tier_is_refused_naming_it() -> None:
    with pytest.raises(ValidationError, match="wavespeed_tier"):
        settings_from({"WAVESPEED_TIER": "platinum"})


def test_allowed_durations_must_each_have_a_price() -> None:
    assert settings_from({"ALLOWED_DURATIONS": "[5, 10, 15]"}).allowed_durations == [5, 10, 15]
    with pytest.raises(ValidationError, match=r"PRICE_USD prices: \[25\] unpriced"):
        settings_from({"ALLOWED_DURATIONS": "[5, 25]"})
