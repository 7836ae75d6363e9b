from decimal import Decimal

import pytest
from pydantic import ValidationError

from config import Settings


def test_defaults_point_at_the_real_wavespeed() -> None:
    settings = Settings()
    assert settings.wavespeed_base_url == "https://api.wavespeed.ai"
    assert settings.price_usd == {5: Decimal("0.45"), 10: Decimal("0.90")}


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://u@db:5432/x")
    monkeypatch.setenv("WAVESPEED_API_KEY", "k-123")
    monkeypatch.setenv("PUBLIC_BASE_URL", "https://kling.example.com/")
    monkeypatch.setenv("POLL_FIRST_DELAY_SECONDS", '{"5": 80, "10": 200}')
    monkeypatch.setenv("LOG_FORMAT", "console")
    settings = Settings()
    assert settings.database_url == "postgresql+psycopg://u@db:5432/x"
    assert settings.wavespeed_api_key.get_secret_value() == "k-123"
    assert settings.webhook_url == "https://kling.example.com/v1/wavespeed/webhook"
    assert settings.poll_first_delay_seconds == {5: 80.0, 10: 200.0}
    assert settings.log_format == "console"


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
