from pathlib import Path

from core.settings import Settings


def test_home_defaults_to_dot_newslora_not_home(monkeypatch):
    monkeypatch.delenv("NEWSLORA_HOME", raising=False)
    monkeypatch.setenv("HOME", "/somewhere/else")
    s = Settings(_env_file=None)
    assert s.home.name == ".newslora" and s.home != Path("/somewhere/else")


def test_embedded_default_and_urls(monkeypatch, tmp_path):
    for v in ("DATABASE_URL", "BROKER_URL"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("NEWSLORA_HOME", str(tmp_path))
    s = Settings(_env_file=None)
    assert s.embedded
    assert s.resolved_database_url == f"sqlite:///{tmp_path / 'newslora.sqlite'}"
    assert s.resolved_broker_url.startswith("sqla+sqlite:///")
    monkeypatch.setenv("BROKER_URL", "redis://127.0.0.1:6379/0")
    assert not Settings(_env_file=None).embedded
