"""Read a configuration file, validate it, report every problem at once."""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ValidationError

from .model import COMMON_DEFAULTS, COMMON_KEYS, Config, HttpServer, Location

__all__ = ["ConfigError", "Loaded", "load_config", "load_text", "keypath"]


class ConfigError(Exception):
    """Invalid configuration; ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class Loaded:
    """A validated configuration, with the warnings found on the way."""

    config: Config
    path: str | None
    warnings: tuple[str, ...] = field(default=())
    source_hash: str = ""
    text: str = field(default="", repr=False)  # the source, for worker processes


def keypath(loc: Iterable[Any]) -> str:
    """``('http', 'server', 1, 'rule')`` → ``http.server[1].rule``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _parse_text(text: str, name: str) -> Any:
    suffix = Path(name).suffix.lower()
    if suffix in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError([f"{name}:{where}: not valid YAML: {getattr(e, 'problem', e)}"]) from None
        if data is None:
            data = {}
    elif suffix == ".toml" or suffix == "":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError([f"{name}: not valid TOML: {e}"]) from None
    else:
        raise ConfigError([f"{name}: unknown file type {suffix!r}: expected .toml, .yaml or .yml"])
    if not isinstance(data, dict):
        raise ConfigError([f"{name}: expected a table of settings at the top level, found {type(data).__name__}"])
    return data


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _format_errors(name: str, err: ValidationError) -> list[str]:
    lines = []
    errors = err.errors(include_url=False)
    for e in errors:
        if e["type"] == "too_short" and any(
            len(o["loc"]) > len(e["loc"]) and o["loc"][: len(e["loc"])] == e["loc"] for o in errors
        ):
            # A list whose items all failed is also "too short": the item errors say it.
            continue
        loc = [p for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))]
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        found = ""
        if e["type"] not in ("value_error", "missing") and "found" not in msg:
            found = f" (found {_short(e.get('input'))})"
        lines.append(f"{name}: {keypath(loc)}: {msg}{found}")
    return lines


def _field_names(model: type[BaseModel]) -> list[str]:
    names = []
    for fname, info in model.model_fields.items():
        names.append(fname)
        alias = info.validation_alias
        choices = getattr(alias, "choices", None)
        if choices:
            names.extend(c for c in choices if isinstance(c, str))
    return names


def _unknown_keys(name: str, obj: Any, loc: tuple[Any, ...]) -> list[str]:
    out: list[str] = []
    if isinstance(obj, BaseModel):
        for key in sorted(obj.model_extra or {}):
            path = keypath(loc + (key,))
            near = difflib.get_close_matches(key, _field_names(type(obj)), n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            out.append(f"{name}: {path}: unknown key {key!r} ignored{hint}")
        for fname in type(obj).model_fields:
            out.extend(_unknown_keys(name, getattr(obj, fname), loc + (fname,)))
    elif isinstance(obj, tuple):
        for i, item in enumerate(obj):
            if isinstance(item, BaseModel):
                out.extend(_unknown_keys(name, item, loc + (i,)))
    elif isinstance(obj, dict):
        for k, item in obj.items():
            if isinstance(item, BaseModel):
                out.extend(_unknown_keys(name, item, loc + (k,)))
    return out


def _inherit(parent: Any, child: Any, defaults: dict[str, Any] | None = None) -> Any:
    update = {}
    for key in COMMON_KEYS:
        if getattr(child, key) is None:
            value = getattr(parent, key, None)
            if value is None and defaults is not None:
                value = defaults.get(key)
            if value is not None:
                update[key] = value
    return child.model_copy(update=update) if update else child


def resolve(config: Config) -> Config:
    """Fill each location's common keys from its server, then http, then defaults."""
    if config.http is None:
        return config
    http = config.http
    servers = []
    for server in http.server:
        srv: HttpServer = _inherit(http, server)
        locations = tuple(_inherit(srv, loc, COMMON_DEFAULTS) for loc in srv.location)
        if not locations:
            # A server without locations proxies or serves by its own keys.
            locations = (_inherit(srv, Location.model_validate({"rule": "/"}), COMMON_DEFAULTS),)
        servers.append(_inherit({}, srv.model_copy(update={"location": locations}), COMMON_DEFAULTS))
    return config.model_copy(update={"http": http.model_copy(update={"server": tuple(servers)})})


def _semantic_checks(name: str, config: Config) -> list[str]:
    errors: list[str] = []
    if config.http is not None:
        zones = config.http.limit_req_zone

        def check_zone(path: str, node: Any) -> None:
            # Checked where it is written: http and server values reach locations by inheritance.
            if node.limit_req is not None and node.limit_req.zone not in zones:
                errors.append(f"{name}: {path}.limit_req: zone {node.limit_req.zone!r} is not defined in "
                              f"http.limit_req_zone (defined: {', '.join(sorted(zones)) or 'none'})")

        if config.fleet is None:
            errors += [f"{name}: http.limit_req_zone.{zname}: 'shared' needs a [fleet] section (the Redis "
                       "that the nodes share)" for zname, z in zones.items() if z.shared]
        check_zone("http", config.http)
        groups = {u.name for u in config.http.upstream}
        for si, srv in enumerate(config.http.server):
            check_zone(f"http.server[{si}]", srv)
            sgroups = groups | {u.name for u in srv.upstream}
            for li, loc in enumerate(srv.location):
                path = f"http.server[{si}].location[{li}]"
                check_zone(path, loc)
                if isinstance(loc.rule, str) and loc.rule.startswith("@"):
                    label = loc.rule[1:]
                    if label not in config.http.match_names and label != "ws":
                        errors.append(f"{name}: {path}.rule: {loc.rule!r} names no entry of http.match_names")
                _ = sgroups
    if config.stream is not None:
        groups = {u.name for u in config.stream.upstream}
        for si, ss in enumerate(config.stream.server):
            if not ss.proxy_url and ss.up_name not in groups:
                errors.append(f"{name}: stream.server[{si}].up_name: no stream.upstream named {ss.up_name!r} "
                              f"(defined: {', '.join(sorted(groups)) or 'none'})")
    return errors


def load_text(text: str, name: str = "<config>.toml") -> Loaded:
    """Parse and validate configuration text; ``name`` chooses the format by extension."""
    import hashlib

    data = _parse_text(text, name)
    return replace(_validate(data, name, hashlib.sha256(text.encode()).hexdigest()), text=text)


def _validate(data: dict[str, Any], name: str, digest: str) -> Loaded:
    try:
        config = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(name, e)) from None
    warnings = _unknown_keys(name, config, ())
    if config.model_extra and not any(
        getattr(config, s) is not None for s in ("proxy", "http", "stream")
    ):
        keys = ", ".join(sorted(config.model_extra))
        raise ConfigError([f"{name}: nothing to serve: no [proxy], [http] or [stream] section, and the "
                           f"top-level keys {keys} are not part of this format (an old wmproxy schema?)"])
    errors = _semantic_checks(name, config)
    if errors:
        raise ConfigError(errors)
    return Loaded(resolve(config), name, tuple(warnings), digest)


def load_config(path: str) -> Loaded:
    """Read and validate the file at ``path``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{path}: cannot read the configuration file: {e.strerror or e}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: the configuration file is not UTF-8 text"]) from None
    return load_text(text, path)
