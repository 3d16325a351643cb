"""Where the client commands find their server and credentials.

Each setting comes from, first found: its flag (`--server`, `--token`, `--tls-ca`, `--tls-cert`,
`--tls-key`); its environment variable (`$CODELANE_SERVER`, `$CODELANE_TOKEN`,
`$CODELANE_TLS_CA`, `$CODELANE_TLS_CERT`, `$CODELANE_TLS_KEY`); the profile in use of the config
file; the built-in default (127.0.0.1:50051, no token, no TLS). A profile's token and client
certificate are sent only to the profile's own server (`_keep_credentials_home`).

The config file is `$CODELANE_CONFIG`, else `$XDG_CONFIG_HOME/codelane/config.toml`, else
`~/.config/codelane/config.toml`; it is optional. The profile in use is the one named by
`--profile`, else `$CODELANE_PROFILE`, else the file's `profile` key; none when none is named:

    profile = "local"                 # the profile used when none is named

    [profiles.local]
    server = "127.0.0.1:50051"

    [profiles.prod]
    server = "codelane.internal:50051"
    token = "..."
    tls_ca = "~/certs/codelane-ca.pem"  # relative paths are relative to this file
"""

from __future__ import annotations

import os
import stat
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from codelane.client import DEFAULT_ADDRESS
from codelane.transport import parse_address

CONFIG_ENV = "CODELANE_CONFIG"
PROFILE_ENV = "CODELANE_PROFILE"
# setting -> its environment variable
ENV_VARS = {
    "server": "CODELANE_SERVER",
    "token": "CODELANE_TOKEN",
    "tls_ca": "CODELANE_TLS_CA",
    "tls_cert": "CODELANE_TLS_CERT",
    "tls_key": "CODELANE_TLS_KEY",
}
_FILES = ("tls_ca", "tls_cert", "tls_key")
# What proves who the client is: sent only to the server of the profile that holds them.
_CREDENTIALS = ("token", "tls_cert", "tls_key")


class ConfigError(Exception):
    """A setting cannot be used; the message names where it came from and what is wrong."""


@dataclass(frozen=True)
class Connection:
    """The settings a client command connects with, and where each came from (for messages)."""

    server: str = DEFAULT_ADDRESS
    token: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    profile: str | None = None
    # setting -> "--flag", "$VAR", "profile NAME" or "default"
    sources: dict[str, str] = field(default_factory=dict)


def config_path(env: Mapping[str, str]) -> Path:
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV]).expanduser()
    base = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    return base / "codelane" / "config.toml"


def load_profiles(path: Path) -> tuple[str | None, dict[str, dict[str, str]]]:
    """The file's default profile name and its profiles; (None, {}) when the file does not exist."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config {path}: cannot read it: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: not valid TOML: {exc}") from None
    unknown = set(data) - {"profile", "profiles"}
    if unknown:
        raise ConfigError(f"config {path}: unknown key(s) {', '.join(sorted(unknown))}: use `profile` and "
                          "[profiles.NAME] tables")
    default = data.get("profile")
    if default is not None and not isinstance(default, str):
        raise ConfigError(f"config {path}: `profile` must be a profile's name (a string)")
    profiles = data.get("profiles", {})
    if not isinstance(profiles, dict):
        raise ConfigError(f"config {path}: `profiles` must hold [profiles.NAME] tables")
    checked: dict[str, dict[str, str]] = {}
    for name, settings in profiles.items():
        if not isinstance(settings, dict):
            raise ConfigError(f"config {path}: profiles.{name} must be a table of settings")
        unknown = set(settings) - set(ENV_VARS)
        if unknown:
            raise ConfigError(f"config {path}: profiles.{name} has unknown setting(s) {', '.join(sorted(unknown))}; "
                              f"known: {', '.join(ENV_VARS)}")
        for key, value in settings.items():
            if not isinstance(value, str):
                raise ConfigError(f"config {path}: profiles.{name}.{key} must be a string")
        checked[name] = dict(settings)
    return default, checked


def _warn_if_exposed(path: Path, profile: str) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        print(f"codelane: warning: {path} holds the token of profile {profile!r} and others can read it: "
              f"chmod 600 {path}", file=sys.stderr)


def _keep_credentials_home(profile: Mapping[str, str], name: str, server: str, values: dict[str, str | None],
                           sources: dict[str, str]) -> None:
    """A profile's token and client certificate are for the profile's server: when a flag or a
    variable points the call at another, they stay home (said on stderr), as a browser keeps a
    site's cookies from another site. Otherwise `CODELANE_SERVER=other:50051 codelane sessions`
    handed the default profile's token to whatever answered at `other`."""
    home = profile.get("server")
    if not home or sources["server"].startswith("profile"):
        return
    try:
        if parse_address(home) == server:
            return
    except ValueError:
        pass  # a profile server that cannot be used is not this one
    withheld = [setting for setting in _CREDENTIALS if sources[setting].startswith("profile")]
    for setting in withheld:
        values[setting], sources[setting] = None, "default"
    if withheld:
        what = " and ".join(setting.replace("_", " ") for setting in withheld)
        print(f"codelane: not sending the {what} of profile {name!r} to {server}: the profile is for {home}; "
              "give --token (or the TLS flags) for this server, or use a profile that names it", file=sys.stderr)


def resolve(flags: Mapping[str, str | None], profile_flag: str | None, env: Mapping[str, str] | None = None
            ) -> Connection:
    """The settings to connect with: `flags` (setting -> the flag's value, None when not given)
    over the environment over the profile over the defaults. ConfigError when a value cannot be
    used (an unknown profile, an address without a port, a missing TLS file...)."""
    env = os.environ if env is None else env
    path = config_path(env)
    default_profile, profiles = load_profiles(path)
    # `--profile ""` asks for none: it fell back to the file's default, the one it meant to avoid.
    name = profile_flag if profile_flag is not None else (env.get(PROFILE_ENV) or default_profile)
    profile: dict[str, str] = {}
    if name:
        if name not in profiles:
            known = ", ".join(sorted(profiles)) or "none"
            where = ("--profile" if profile_flag else f"${PROFILE_ENV}" if env.get(PROFILE_ENV)
                     else f"`profile` in {path}")
            raise ConfigError(f"{where} names profile {name!r}, which {path} does not define (profiles: {known})")
        profile = profiles[name]
    values: dict[str, str | None] = {}
    sources: dict[str, str] = {}
    for setting, var in ENV_VARS.items():
        flag = "--" + setting.replace("_", "-")
        if flags.get(setting):
            values[setting], sources[setting] = flags[setting], flag
        elif env.get(var):
            values[setting], sources[setting] = env[var], f"${var}"
        elif profile.get(setting):
            value = profile[setting]
            if setting in _FILES:
                value = str((path.parent / Path(value).expanduser()).resolve())
            values[setting], sources[setting] = value, f"profile {name!r} of {path}"
        else:
            values[setting], sources[setting] = None, "default"
    if sources["token"].startswith("profile"):
        _warn_if_exposed(path, str(name))
    server = values["server"] or DEFAULT_ADDRESS
    try:
        server = parse_address(server)
    except ValueError as exc:
        raise ConfigError(f"{sources['server']}: {exc}") from None
    _keep_credentials_home(profile, str(name), server, values, sources)
    for setting in _FILES:
        value = values[setting]
        if value is not None and not (os.path.isfile(value) and os.access(value, os.R_OK)):
            raise ConfigError(f"{sources[setting]}: {setting.replace('_', ' ')} file {value} is missing or unreadable")
    if (values["tls_cert"] is None) != (values["tls_key"] is None):
        raise ConfigError("a client certificate and its key go together: give both --tls-cert and --tls-key")
    if values["tls_cert"] is not None and values["tls_ca"] is None:
        raise ConfigError("a client certificate (mTLS) needs TLS: give --tls-ca too")
    return Connection(server, values["token"], values["tls_ca"], values["tls_cert"], values["tls_key"], name,
                      sources)
