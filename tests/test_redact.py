"""Unit tests for mnist_track.redact: passwords out of URLs and out of error messages."""

from __future__ import annotations

import pytest

from mnist_track.redact import MASK, SECRET_QUERY_KEYS, redact_text, redact_url

# --- redact_url: user:password@ ------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "postgresql://alice:s3cr3t@db.example:5432/optuna",
            "postgresql://alice:***@db.example:5432/optuna",
        ),
        (
            "postgresql+psycopg2://alice:s3cr3t@db.example/optuna?sslmode=require",
            "postgresql+psycopg2://alice:***@db.example/optuna?sslmode=require",
        ),
        (
            "mysql+pymysql://bob:p%40ss@10.0.0.5:3306/studies?charset=utf8mb4",
            "mysql+pymysql://bob:***@10.0.0.5:3306/studies?charset=utf8mb4",
        ),
        ("http://user:pw@mlflow.internal:5000/", "http://user:***@mlflow.internal:5000/"),
        ("https://user:pw@mlflow.internal/api#frag", "https://user:***@mlflow.internal/api#frag"),
        # An '@' left unencoded in the password: the host is after the last '@'.
        ("postgresql://alice:p@ss@db/optuna", "postgresql://alice:***@db/optuna"),
        # An empty password is still a password field: masked, the user kept.
        ("postgresql://alice:@db/optuna", "postgresql://alice:***@db/optuna"),
    ],
)
def test_redact_url_masks_the_userinfo_password(url, expected):
    assert redact_url(url) == expected


# --- redact_url: secrets in the query --------------------------------------------------


@pytest.mark.parametrize("key", sorted(SECRET_QUERY_KEYS))
def test_redact_url_masks_every_secret_query_key(key):
    url = f"postgresql://db.example/optuna?user=alice&{key}=hunter2&sslmode=require"
    assert redact_url(url) == (
        f"postgresql://db.example/optuna?user=alice&{key}={MASK}&sslmode=require"
    )


def test_redact_url_secret_query_keys_are_case_insensitive():
    url = "mysql://bob:pw@h/db?PASSWORD=one&Api_Key=two&charset=utf8"
    assert redact_url(url) == "mysql://bob:***@h/db?PASSWORD=***&Api_Key=***&charset=utf8"


def test_redact_url_masks_password_and_query_secret_together():
    url = "http://user:pw@host:5000/path?token=abc&page=2"
    assert redact_url(url) == "http://user:***@host:5000/path?token=***&page=2"


# --- redact_url: nothing to hide -------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///rel.db",
        "sqlite:////abs/path/optuna.db",
        "sqlite:///optuna.db?timeout=30",
        "sqlite://",
        "file:///tmp/mlruns",
        "./mlruns",
        "http://mlflow.internal:5000",
        "http://h/?q=a%20b&x=1&x=2",  # an encoding urlencode would rewrite
        "postgresql://alice@db.example/optuna",  # a user, no password
        "postgresql://db.example/optuna?user=alice&sslmode=require",
        "databricks",
    ],
)
def test_redact_url_without_secrets_is_unchanged_byte_for_byte(url):
    assert redact_url(url) == url


@pytest.mark.parametrize("url", [None, ""])
def test_redact_url_of_nothing_is_empty(url):
    assert redact_url(url) == ""


# --- redact_text ------------------------------------------------------------------------


def test_redact_text_masks_an_unnamed_url_in_a_driver_error():
    message = (
        "(psycopg2.OperationalError) connection to server failed\n"
        "(Background on this error at: https://sqlalche.me/e/20/e3q8) "
        "[url: postgresql://alice:s3cr3t@db.example:5432/optuna]"
    )
    redacted = redact_text(message)
    assert "s3cr3t" not in redacted
    assert "postgresql://alice:***@db.example:5432/optuna" in redacted
    # Everything else is left as it was.
    assert redacted.replace("alice:***@", "alice:s3cr3t@") == message


def test_redact_text_masks_the_named_url_query_secret():
    url = "postgresql://db.example/optuna?password=hunter2"
    message = f"cannot connect to {url}: timeout"
    assert redact_text(message, url) == (
        "cannot connect to postgresql://db.example/optuna?password=***: timeout"
    )


def test_redact_text_masks_each_named_url_and_ignores_none():
    first = "mysql://u:one@h1/db"
    second = "http://h2/?token=two"
    message = f"tried {first} then {second}"
    assert redact_text(message, first, None, "", second) == (
        "tried mysql://u:***@h1/db then http://h2/?token=***"
    )


def test_redact_text_without_secrets_is_unchanged():
    message = "no such table: trials (sqlite:///optuna.db, http://host:5000/api)"
    assert redact_text(message, "sqlite:///optuna.db") == message


# --- the password never comes out --------------------------------------------------------

PASSWORD = "Tr0ub4dor.3-xyzzy"

NEVER_SHOWN = [
    f"postgresql://alice:{PASSWORD}@db:5432/optuna",
    f"postgresql+psycopg2://alice:{PASSWORD}@db/optuna?sslmode=require",
    f"mysql+pymysql://root:{PASSWORD}@127.0.0.1/optuna",
    f"https://bot:{PASSWORD}@mlflow.example.com/",
    f"postgresql://db/optuna?user=alice&password={PASSWORD}",
    f"http://mlflow:5000/?api_key={PASSWORD}&x=1",
    f"mysql://u:{PASSWORD}@h/db?token={PASSWORD}",
]


@pytest.mark.parametrize("url", NEVER_SHOWN)
def test_the_password_never_appears_in_redacted_output(url):
    assert PASSWORD in url  # the case really carries the secret
    assert PASSWORD not in redact_url(url)
    message = f"OperationalError: could not connect to {url!r} (attempt 3)"
    assert PASSWORD not in redact_text(message, url)
    # What redaction keeps is still usable to tell stores apart: scheme and host stay.
    assert redact_url(url).split("://")[0] == url.split("://")[0]


# SQLAlchemy's make_url accepts these unencoded passwords and connects with them, though
# urlsplit would end the host at the first '/', '?' or '#' and see no password at all.
UNENCODED = [
    "postgresql://alice:pa/ss@db/optuna",
    "postgresql://alice:pa?ss@db/optuna",
    "postgresql://alice:pa#ss@db/optuna",
]


@pytest.mark.parametrize("url", UNENCODED)
def test_an_unencoded_special_character_does_not_leak_the_password(url):
    from sqlalchemy.engine import make_url

    password = make_url(url).password
    assert password and password.startswith("pa")
    assert password not in redact_url(url)


# --- secrets in the query of a URL nobody named ------------------------------------------


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            "cannot open sqlite:////tmp/o.db?timeout=2&password=hunter2: no such table",
            "cannot open sqlite:////tmp/o.db?timeout=2&password=***: no such table",
        ),
        ("'http://h/api?token=ab:cd&x=1'", "'http://h/api?token=***&x=1'"),
        ("(at postgresql://h/db?PWD=p.w.)", "(at postgresql://h/db?PWD=***)"),
        (
            "already masked: sqlite:///o.db?password=***.",
            "already masked: sqlite:///o.db?password=***.",
        ),
    ],
)
def test_redact_text_masks_query_secrets_of_an_unnamed_url(message, expected):
    assert redact_text(message) == expected


def test_redact_url_keeps_an_absolute_sqlite_path():
    # urlunsplit would turn sqlite:////abs into sqlite://abs: another database.
    url = "sqlite:////srv/studies/optuna.db?timeout=30&password=hunter2"
    assert redact_url(url) == "sqlite:////srv/studies/optuna.db?timeout=30&password=***"
