"""Where client commands find their server and credentials: flags, then $CODELANE_* variables,
then a profile of the config file; and errors that name the real cause of a failed connection."""

from __future__ import annotations

import http.server
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from codelane.client import Client
from codelane.commands.common import command_line
from codelane.commands.config import DEFAULT_ADDRESS, ConfigError, resolve
from tests.cli.conftest import cli, cli_env

CONFIG = """
profile = "local"

[profiles.local]
server = "127.0.0.1:1111"

[profiles.prod]
server = "prod.example:443"
token = "prod-token"
tls_ca = "certs/ca.pem"
"""
NO_FLAGS: dict[str, str | None] = {}


@pytest.fixture
def config(tmp_path: Path) -> Path:
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.pem").write_text("not checked here")
    path = tmp_path / "config.toml"
    path.write_text(CONFIG)
    path.chmod(0o600)
    return path


def test_flags_over_environment_over_profile_over_defaults(config: Path) -> None:
    env = {"CODELANE_CONFIG": str(config)}
    local = resolve(NO_FLAGS, None, env)
    assert (local.server, local.token, local.profile) == ("127.0.0.1:1111", None, "local")  # the file's default

    prod = resolve(NO_FLAGS, "prod", env)
    assert (prod.server, prod.token, prod.tls_ca) == ("prod.example:443", "prod-token",
                                                      str(config.parent / "certs" / "ca.pem"))
    assert prod.sources["token"] == f"profile 'prod' of {config}"
    assert resolve(NO_FLAGS, None, {**env, "CODELANE_PROFILE": "prod"}).server == "prod.example:443"

    over = resolve(NO_FLAGS, "prod", {**env, "CODELANE_SERVER": "10.0.0.1:5", "CODELANE_TOKEN": "env-token"})
    assert (over.server, over.token, over.tls_ca) == ("10.0.0.1:5", "env-token", prod.tls_ca)
    assert over.sources["server"] == "$CODELANE_SERVER"

    flagged = resolve({"server": "10.0.0.2:6", "token": "flag-token"}, "prod", {**env, "CODELANE_SERVER": "x:1"})
    assert (flagged.server, flagged.token) == ("10.0.0.2:6", "flag-token")

    # The profile's own server named again, its credentials go with it.
    same = resolve({"server": "prod.example:443"}, "prod", env)
    assert (same.server, same.token) == ("prod.example:443", "prod-token")

    none = resolve(NO_FLAGS, "", env)  # --profile "": no profile, not the file's default
    assert (none.server, none.profile) == (DEFAULT_ADDRESS, "")
    # and a command printed for another terminal keeps it so
    printed = command_line("codelane chat", "--session", "s_1", connection=none)
    assert printed == "codelane chat --profile '' --session s_1"

    nothing = resolve(NO_FLAGS, None, {"CODELANE_CONFIG": str(config.parent / "absent.toml")})
    assert (nothing.server, nothing.token, nothing.profile) == (DEFAULT_ADDRESS, None, None)


@pytest.mark.parametrize("elsewhere", ["flag", "env"])
def test_a_profiles_credentials_never_go_to_another_server(
    config: Path, capsys: pytest.CaptureFixture[str], elsewhere: str
) -> None:
    # `CODELANE_SERVER=other:50051 codelane sessions` sent the default profile's token (and client
    # certificate) to `other`: a production token handed to whatever answers there.
    env = {"CODELANE_CONFIG": str(config), "CODELANE_PROFILE": "prod"}
    flags: dict[str, str | None] = {"server": "other.example:50051"} if elsewhere == "flag" else {}
    if elsewhere == "env":
        env["CODELANE_SERVER"] = "other.example:50051"
    other = resolve(flags, None, env)
    assert (other.server, other.token) == ("other.example:50051", None)
    assert other.sources["token"] == "default"
    warning = capsys.readouterr().err
    assert "not sending the token of profile 'prod'" in warning and "prod.example:443" in warning
    assert "prod-token" not in warning
    # Given for this call, a token goes wherever the call goes.
    assert resolve({**flags, "token": "mine"}, None, env).token == "mine"


@pytest.mark.parametrize(("text", "profile", "env", "says"), [
    (CONFIG, "staging", {}, "--profile names profile 'staging', which {path} does not define (profiles: local, prod)"),
    (CONFIG, None, {"CODELANE_PROFILE": "nope"}, "$CODELANE_PROFILE names profile 'nope'"),
    (CONFIG, None, {"CODELANE_SERVER": "127.0.0.1"}, "$CODELANE_SERVER: '127.0.0.1' has no port"),
    ("profile = [", None, {}, "config {path}: not valid TOML"),
    ("[profiles.a]\nservr = 'x:1'\n", "a", {}, "profiles.a has unknown setting(s) servr"),
    ("[profiles.a]\nserver = 'x'\n", "a", {}, "profile 'a' of {path}: 'x' has no port"),
    ("[profiles.a]\ntls_ca = 'missing.pem'\n", "a", {}, "tls ca file {dir}/missing.pem is missing or unreadable"),
    ("servers = 1\n", None, {}, "unknown key(s) servers"),
])  # fmt: skip
def test_a_setting_that_cannot_work_says_where_it_came_from(tmp_path: Path, text: str, profile: str | None,
                                                            env: dict[str, str], says: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        resolve(NO_FLAGS, profile, {"CODELANE_CONFIG": str(path), **env})
    assert says.format(path=path, dir=tmp_path) in str(caught.value)


def test_commands_use_the_profile_and_warn_of_a_token_others_can_read(make_server, tmp_path: Path) -> None:
    server = make_server(token="sekrit")
    path = tmp_path / "config.toml"
    path.write_text(f'profile = "dev"\n[profiles.dev]\nserver = "{server.address}"\ntoken = "sekrit"\n')
    path.chmod(0o600)
    ok = cli("sessions", env=cli_env(CODELANE_CONFIG=str(path)))
    assert ok.returncode == 0 and ok.stdout == f"no sessions on {server.address}\n" and ok.stderr == ""

    wrong = cli("sessions", "--token", "nope", env=cli_env(CODELANE_CONFIG=str(path)))  # the flag wins
    assert wrong.returncode == 1 and "refused the token (UNAUTHENTICATED" in wrong.stderr

    path.chmod(0o644)
    exposed = cli("sessions", env=cli_env(CODELANE_CONFIG=str(path)))
    assert exposed.returncode == 0
    assert exposed.stderr == (f"codelane: warning: {path} holds the token of profile 'dev' and others can read it: "
                              f"chmod 600 {path}\n")

    unknown = cli("sessions", "--profile", "prod", env=cli_env(CODELANE_CONFIG=str(path)))
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1
    assert "--profile names profile 'prod'" in unknown.stderr and "(profiles: dev)" in unknown.stderr


# -- connection errors name the real cause --------------------------------------------------------


@pytest.fixture
def http1_port() -> Iterator[int]:
    """A port where an HTTP/1 server answers (as a web server on the wrong port would)."""

    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_an_unknown_host_is_named() -> None:
    out = cli("sessions", "--server", "no-such-host.invalid:50051", timeout=60)
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert out.stderr == ("codelane sessions: cannot resolve the host 'no-such-host.invalid' of "
                          "no-such-host.invalid:50051 (UNAVAILABLE): check the name\n")


def test_a_port_that_speaks_http1_is_named(http1_port: int) -> None:
    out = cli("workers", "--server", f"127.0.0.1:{http1_port}", timeout=60)
    assert out.returncode == 1
    assert out.stderr == (f"codelane workers: 127.0.0.1:{http1_port} does not speak gRPC (it answered as an HTTP/1 "
                          "server, UNAVAILABLE): check the port\n")


def test_tls_mismatches_are_named(make_server, tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    for name in ("server", "other"):
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(tmp_path / f"{name}.key"),
             "-out", str(tmp_path / f"{name}.pem")], check=True, capture_output=True, timeout=60,
        )  # fmt: skip
    tls = make_server(tls_cert=str(tmp_path / "server.pem"), tls_key=str(tmp_path / "server.key"))
    plain = make_server()
    tls_address, plain_address = f"localhost:{tls.port}", f"localhost:{plain.port}"

    without = cli("sessions", "--server", tls_address)
    assert without.stderr == (f"codelane sessions: {tls_address} closed the connection (UNAVAILABLE): if the server "
                              "uses TLS, pass --tls-ca\n")
    other_ca = cli("sessions", "--server", tls_address, "--tls-ca", str(tmp_path / "other.pem"))
    assert other_ca.stderr == (f"codelane sessions: the certificate of {tls_address} is not signed by the CA of "
                               "--tls-ca (TLS handshake failed, UNAVAILABLE)\n")
    needless = cli("sessions", "--server", plain_address, "--tls-ca", str(tmp_path / "server.pem"))
    assert needless.stderr == (f"codelane sessions: the TLS handshake with {plain_address} failed (UNAVAILABLE): does "
                               "the server use TLS? Drop --tls-ca if it does not\n")
    good = cli("sessions", "--server", tls_address, "--tls-ca", str(tmp_path / "server.pem"))
    assert good.returncode == 0 and good.stdout == f"no sessions on {tls_address}\n", good.stderr
    assert all(out.returncode == 1 for out in (without, other_ca, needless))


async def test_the_sdk_refuses_a_client_certificate_it_would_not_use(make_server, tmp_path: Path) -> None:
    # The CLI and the worker refuse these; the SDK took them and connected in plaintext, the
    # certificate unused and the token sent in clear, or gave gRPC a certificate without its key.
    server = make_server()
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / name).write_text("unused: refused before it is read\n", encoding="utf-8")
    ca, cert, key = tmp_path / "ca.pem", tmp_path / "client.pem", tmp_path / "client.key"
    with pytest.raises(ValueError, match=r"a client certificate \(mTLS\) needs TLS: give tls_ca too"):
        Client(server.address, token="secret", tls_cert=cert, tls_key=key)
    for cert_or_key in ({"tls_cert": cert}, {"tls_key": key}):
        with pytest.raises(ValueError, match="a client certificate and its key go together"):
            Client(server.address, tls_ca=ca, **cert_or_key)


@pytest.mark.parametrize("address, problem", [
    ("127.0.0.1", "has no port: give HOST:PORT, e.g. 127.0.0.1:50051"),
    ("http://127.0.0.1:50051", "is a URL: give HOST:PORT without http://"),
    ("::1:50051", "write an IPv6 address in brackets"),
])
async def test_the_sdk_refuses_an_address_grpc_would_misread(address: str, problem: str) -> None:
    # The CLI and the Node client refuse these; the SDK handed them to gRPC, which dials port 443
    # for a bare host, and the first call failed with a connection error much later.
    with pytest.raises(ValueError, match=re.escape(problem)):
        Client(address)
