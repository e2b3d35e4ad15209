"""try_paths: candidates in order against an exists check, final =CODE, wmproxy rewrites."""

from __future__ import annotations

import pytest

from wmproxy_tw.config import load_text
from wmproxy_tw.config.load import ConfigError
from wmproxy_tw.reverse.trypaths import TryPaths


def expander(path: str):
    return lambda t: t.replace("{path}", path).replace("$path", path)


def test_first_existing_candidate_wins() -> None:
    """The first candidate the handler says exists is served; later ones are not tried."""
    tp = TryPaths.parse("{path}/ {path}.html /fallback.html =404")
    existing = {"/doc.html", "/fallback.html"}
    out = tp.evaluate(expander("/doc"), existing.__contains__)
    assert out.path == "/doc.html" and out.status is None
    assert out.tried == ("/doc/", "/doc.html")


def test_final_status_when_nothing_exists() -> None:
    """With no candidate found the =CODE is answered (404 when none is written)."""
    assert TryPaths.parse("{path} =410").evaluate(expander("/x"), lambda p: False).status == 410
    assert TryPaths.parse("{path} /a").evaluate(expander("/x"), lambda p: False).status == 404


def test_fallback_candidate() -> None:
    """A literal fallback path is chosen when the variable candidates miss."""
    tp = TryPaths.parse("{path} {path}/ /index.html")
    assert tp.evaluate(expander("/app/route"), {"/index.html"}.__contains__).path == "/index.html"


def test_wmproxy_rewrite_item() -> None:
    """wmproxy's 'REGEX INPUT REPLACEMENT' item rewrites with $1; no match → skipped."""
    tp = TryPaths.parse("{path}/ '/ro(\\w+)/(.*) {path} /ro$1/Cargo.toml' /root/README.md")
    got = tp.evaluate(expander("/root/x/y"), {"/root/Cargo.toml"}.__contains__)
    assert got.path == "/root/Cargo.toml"
    assert list(tp.paths(expander("/other"))) == ["/other/", "/root/README.md"]


@pytest.mark.parametrize("text", ["{path} =99", "{path} =abc", "'(( {path} /x'", "'a b'", "'unclosed"])
def test_bad_values_rejected(text: str) -> None:
    """Bad statuses, bad regexes, two-word items and bad quoting are errors."""
    with pytest.raises(ValueError):
        TryPaths.parse(text)


def test_config_checks_rewrite_regex() -> None:
    """The config loader reports a bad rewrite regex at its key path."""
    bad = '[http]\n[[http.server]]\nbind_addr = "127.0.0.1:0"\n[[http.server.location]]\n' \
          "try_paths = \"'(( {path} /x' /y\"\n"
    with pytest.raises(ConfigError, match=r"location\[0\]\.try_paths"):
        load_text(bad, "t.toml")
