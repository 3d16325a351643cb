"""Every option value is checked when the command line is parsed, and a bad one is one line on
stderr and exit 2, before anything starts; a server refuses at start what would fail later."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

from codelane.commands.args import parse_size
from codelane.transport import parse_address
from tests.certs import Certs, make_certs
from tests.cli.conftest import cli, cli_env

MISSING = "/no/such/file.pem"


@pytest.mark.parametrize(("argv", "says"), [
    (["sessions", "--server", "127.0.0.1"], "'127.0.0.1' has no port: give HOST:PORT, e.g. 127.0.0.1:50051"),
    (["run", "--server", "http://127.0.0.1:50051", "hi"], "is a URL: give HOST:PORT without http://"),
    (["workers", "--server", "127.0.0.1:0"], "the port must be a number from 1 to 65535"),
    (["sessions", "--tls-ca", MISSING], f"argument --tls-ca: {MISSING}: no such file"),
    (["sessions", "--limit", "-1"], "argument --limit: -1 is too small: it must be 0 or more"),
    (["watch", "--after", "x", "s_1"], "argument --after: 'x' is not a whole number"),
    (["run", "--label", "a=b c", "hi"], "label value 'b c' (in 'a=b c') may not hold spaces"),
    (["run", "--lane", "execute=outside", "hi"], "is not LANE=MODE"),
    (["run", "--max-turns", "-2", "hi"], "argument --max-turns: -2 is too small"),
    (["run", "--session", "s_1", "--model", "openai:x", "hi"],
     "--model set up a new session; --session continues one whose settings are fixed"),
    (["run", "--session", "s_1", "--continue", "hi"], "not allowed with argument --session"),
    # Silently ignored, it looked as if the session had moved to the workspace named.
    (["run", "--session", "s_1", "--workspace", "/tmp", "hi"],
     "--workspace picks where a new session (or --continue) works; --session continues one whose workspace is fixed"),
    (["confirm", "s_1", "c_1"], "one of the arguments --approve --reject is required"),
    (["demo", "--local-workers", "-1"], "argument --local-workers: -1 is too small"),
    (["server", "--listen", "127.0.0.1"], "argument --listen: '127.0.0.1' has no port"),
    (["server", "--log-level", "LOUD"], "'LOUD' is not a log level: use one of DEBUG, INFO, WARNING, ERROR"),
    (["server", "--tls-cert", MISSING, "--tls-key", MISSING], f"argument --tls-cert: {MISSING}: no such file"),
    (["server", "--heartbeat-timeout", "0"], "must be a positive finite number"),
    # nan was taken (and -1 refused without the pointer to --help).
    (["server", "--shutdown-grace", "nan"], "argument --shutdown-grace: 'nan' must be a non-negative finite number"),
    (["server", "--shutdown-grace", "-1"], "argument --shutdown-grace: '-1' must be a non-negative finite number"),
    # Workers were lost before their first heartbeat, and came back, for ever.
    (["server", "--heartbeat-timeout", "0.001"], "argument --heartbeat-timeout: 0.001 s is too short: it must be "
                                                 "at least 1 s"),
    # Taken, and every snapshot's upload failed; the instance name went unused.
    (["server", "--cas", "http://cas:8980"], "argument --cas: 'http://cas:8980' is a URL: give HOST:PORT without http://"),
    (["server", "--cas", "grpc://cas"], "argument --cas: 'cas' has no port"),
    (["server", "--cas-instance", "main"], "--cas-instance names an instance of the CAS of --cas: give --cas too"),
    (["server", "--max-sessions", "-1"], "argument --max-sessions: -1 is too small: it must be 0 or more"),
    (["server", "--listen", "127.0.0.1:50051", "--listen", "127.0.0.1:50051"], "--listen gives 127.0.0.1:50051 twice"),
    # Empty, it was the current directory, which got the store.
    (["server", "--data-dir", ""], "argument --data-dir: the directory is empty"),
    (["server", "--data-dir", "/dev/null"], "argument --data-dir: /dev/null: not a directory"),
    (["server", *["--sandbox-deny-read", "/secret"] * 1025], "--sandbox-deny-read is given 1,025 times; at most"),
    # workspace.proto, rule 2: the server sends workers no pattern the rule calls invalid. These
    # were refused after parsing, without the pointer to --help, and one not UTF-8 ended the
    # server's start in a traceback (the Welcome's ContentSource could not hold it).
    (["server", "--snapshot-exclude", "/abs"], "argument --snapshot-exclude: exclusion pattern '/abs' begins "
                                               "with '/', and patterns match paths relative to the workspace root"),
    (["server", "--snapshot-exclude", ""], "argument --snapshot-exclude: an exclusion pattern may not be empty"),
    (["server", "--snapshot-exclude", "build/\udce9"], "is not valid UTF-8"),
    (["worker", "--connect", "127.0.0.1:1", "--labels", "a=b c=d,,g=h"], "may not hold spaces"),
    (["worker", "--connect", "127.0.0.1:1", "--labels", "a=b,,g=h"], "has an empty label"),
    (["worker", "--connect", "127.0.0.1:1", "--root", "/no/such/dir"], "argument --root: /no/such/dir: no such "
                                                                      "directory"),
    (["worker", "--connect", "127.0.0.1:1", "--slots", "0"], "argument --slots: 0 is too small"),
    # Empty, synced copies went into the current directory; a file failed every synced call.
    (["worker", "--connect", "127.0.0.1:1", "--cache-dir", ""], "argument --cache-dir: the directory is empty"),
    (["worker", "--connect", "127.0.0.1:1", "--cache-dir", "/dev/null"], "argument --cache-dir: /dev/null: not a "
                                                                          "directory"),
    (["worker", "--connect", "gpu-host"], "'gpu-host' has no port: give HOST:PORT, e.g. gpu-host:50051"),
    (["mock-llm", "--script", "x.yaml", "--port", "70000"], "70000 is not a port"),
    # A token gRPC cannot put in a header: local workers retried forever, clients had a traceback.
    (["server", "--worker-token", "s3cret\n"], "argument --worker-token: the token holds a line end"),
    (["server", "--token", "s3cret\t"], "argument --token: the token holds '\\t'"),
    (["worker", "--connect", "127.0.0.1:1", "--token", "s3cret\r\n"], "argument --token: the token holds a line end"),
    (["completion", "fish"], "invalid choice: 'fish'"),
    # Sizes are spelled alike everywhere (the server refused 4GiB), and none is 0: every synced
    # workspace was then refused for want of room.
    (["worker", "--connect", "127.0.0.1:1", "--cache-size", "0"], "argument --cache-size: '0' is no size"),
    (["worker", "--connect", "127.0.0.1:1", "--cache-size", "10GB!"], "'10GB!' is not a size such as 10GiB"),
    (["server", "--subscriber-buffer-bytes", "0K"], "argument --subscriber-buffer-bytes: '0K' is no size"),
    (["server", "--sandbox-max-memory", "lots"], "argument --sandbox-max-memory: 'lots' is not a size"),
    # Taken, and no span ever left.
    (["server", "--otlp-endpoint", "garbage"], "argument --otlp-endpoint: 'garbage' has no port"),
    (["worker", "--connect", "127.0.0.1:1", "--otlp-endpoint", "ftp://collector:4317"],
     "argument --otlp-endpoint: 'ftp://collector:4317' is not an OTLP/gRPC endpoint such as http://collector:4317"),
    (["server", "--otlp-endpoint", "http://collector:port"], "is not an OTLP/gRPC endpoint"),
])  # fmt: skip
def test_a_bad_value_is_one_line_and_exit_2(argv: list[str], says: str) -> None:
    out = cli(*argv, timeout=30)
    assert out.returncode == 2, out
    assert out.stdout == "" and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith(f"codelane {argv[0]}: ") and says in out.stderr, out.stderr
    assert out.stderr.endswith(f"(see codelane {argv[0]} --help)\n")


@pytest.mark.parametrize(("text", "size"), [("10GiB", 10 * 1024**3), ("512MB", 512 * 10**6), ("2G", 2 * 1024**3),
                                            ("4gib", 4 * 1024**3), ("1000", 1000), ("1.5KiB", 1536)])
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_a_bad_size_says_what_is_expected() -> None:
    with pytest.raises(ValueError, match="10GiB"):
        parse_size("lots")


@pytest.mark.parametrize(("text", "listen", "error"), [
    ("127.0.0.1:50051", False, None),
    ("localhost:1", False, None),
    ("[::1]:50051", False, None),
    ("unix:/tmp/codelane.sock", False, None),
    ("0.0.0.0:0", True, None),
    ("127.0.0.1:0", False, "from 1 to 65535"),
    ("::1:50051", False, "in brackets"),
    ("[::1]", False, "has no port"),
    (":50051", False, "has no host"),
    ("host:port", False, "must be a number"),
    ("grpc://host:1", False, "is a URL"),
    ("", False, "is empty"),
    ("unix:", False, "names no socket"),
])  # fmt: skip
def test_parse_address(text: str, listen: bool, error: str | None) -> None:
    if error is None:
        assert parse_address(text, listen=listen) == text
    else:
        with pytest.raises(ValueError, match=error):
            parse_address(text, listen=listen)


@pytest.mark.parametrize(("model", "says"), [
    ("foo:bar", "default model: unknown model provider 'foo' in 'foo:bar'"),
    ("scripted:/no/such/script.yaml", "default model: script file not found: /no/such/script.yaml"),
    ("gpt-4o", "default model: model 'gpt-4o' is not of the form provider:name"),
])  # fmt: skip
def test_the_server_checks_its_default_model_at_start(model: str, says: str, tmp_path: Path) -> None:
    out = cli("server", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data"), "--local-workers", "0",
              "--model", model, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == f"codelane server: {says}" + out.stderr.split(says, 1)[1]
    assert out.stderr.count("\n") == 1
    assert not (tmp_path / "data").exists()  # refused before anything was created


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.mark.parametrize(("command", "files", "says"), [
    ("server", {"--tls-cert": "garbage", "--tls-key": "garbage"},
     "TLS certificate {garbage}: holds no PEM certificate"),
    ("server", {"--tls-cert": "server_cert", "--tls-key": "garbage"}, "TLS key {garbage}: holds no PEM private key"),
    ("server", {"--tls-cert": "server_cert", "--tls-key": "client_key"},
     "TLS key {client_key}: does not match the certificate {server_cert}"),
    ("server", {"--tls-cert": "server_cert", "--tls-key": "server_key", "--tls-ca": "garbage"},
     "TLS client CA {garbage}: holds no PEM certificate"),
    ("worker", {"--tls-ca": "garbage"}, "TLS CA {garbage}: holds no PEM certificate"),
    ("worker", {"--tls-ca": "ca", "--tls-cert": "client_cert", "--tls-key": "server_key"},
     "TLS key {server_key}: does not match the certificate {client_cert}"),
    # It connected in plaintext, the certificate unused: the operator asked for mTLS.
    ("worker", {"--tls-cert": "client_cert", "--tls-key": "client_key"},
     "a client certificate (mTLS) needs TLS: give --tls-ca too"),
])  # fmt: skip
def test_tls_files_that_do_not_load_are_refused_in_one_line(
    command: str, files: dict[str, str], says: str, certs: Certs, tmp_path: Path,
) -> None:
    # gRPC had logged its own lines, then the server said the port was in use and the worker
    # retried a hub it called unreachable, forever.
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("garbage\n")
    paths = {"garbage": str(garbage), **{name: str(getattr(certs, name)) for name in
                                         ("ca", "server_cert", "server_key", "client_cert", "client_key")}}
    flags = [item for flag, name in files.items() for item in (flag, paths[name])]
    if command == "server":
        argv = ["server", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data"), "--local-workers", "0"]
    else:
        argv = ["worker", "--connect", "127.0.0.1:1", "--cache-dir", str(tmp_path / "cache")]
    out = cli(*argv, *flags, timeout=60)
    assert out.returncode == 2 and out.stdout == "", out
    assert out.stderr.startswith(f"codelane {command}: {says.format(**paths)}"), out.stderr
    assert out.stderr.count("\n") == 1
    assert not (tmp_path / "data").exists()  # refused before anything was created


def test_busy_ports_are_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = cli("server", "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "data"),
                     "--local-workers", "0", timeout=60)
        script = tmp_path / "s.json"
        script.write_text('{"responses": [{"text": "hi"}]}')
        mock = cli("mock-llm", "--script", str(script), "--port", str(port), timeout=60)
        metrics = cli("server", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data2"),
                      "--local-workers", "0", "--metrics-listen", f"127.0.0.1:{port}", timeout=60)
    assert server.returncode == 1 and server.stderr.count("\n") == 1
    assert server.stderr.startswith(f"codelane server: cannot listen on 127.0.0.1:{port}: the address is in use")
    assert mock.returncode == 1 and mock.stderr.count("\n") == 1
    assert mock.stderr.startswith(f"mock-llm: cannot listen on 127.0.0.1:{port}") and "in use" in mock.stderr
    # Found once the gRPC server had started: gRPC's traceback followed the line, at exit.
    assert metrics.returncode == 1 and metrics.stderr.count("\n") == 1, metrics.stderr
    assert metrics.stderr.startswith(f"codelane server: cannot serve metrics on 127.0.0.1:{port}")
    assert not (tmp_path / "data2").exists()  # refused before its store was made


@pytest.mark.parametrize(("argv", "variable"), [
    (["worker", "--connect", "127.0.0.1:1"], "CODELANE_WORKER_TOKEN"),
    (["sessions", "--server", "127.0.0.1:1"], "CODELANE_TOKEN"),
])  # fmt: skip
def test_a_token_from_the_environment_with_a_line_end_is_a_usage_error(argv: list[str], variable: str) -> None:
    # As a secret read from a file leaves it: the worker retried the hub forever in gRPC's words
    # ("Illegal header value"), the client command ended in a traceback.
    out = cli(*argv, env=cli_env(**{variable: "s3cret\n"}), timeout=30)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out
    assert out.stderr.startswith(f"codelane {argv[0]}: ") and "the token holds a line end" in out.stderr


@pytest.mark.parametrize(("listen", "says"), [
    ("nosuchhost.invalid:0", "cannot listen on nosuchhost.invalid:0: nosuchhost.invalid: "),
    ("192.0.2.1:0", "cannot listen on 192.0.2.1:0: 192.0.2.1 is not an address of this host"),
])  # fmt: skip
def test_an_address_the_server_cannot_listen_on_is_one_line(listen: str, says: str, tmp_path: Path) -> None:
    # gRPC logged its own line, then the server said the address was in use, its data dir made.
    out = cli("server", "--listen", listen, "--worker-token", "t", "--data-dir", str(tmp_path / "data"),
              "--local-workers", "0", timeout=60)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out
    assert out.stderr.startswith(f"codelane server: {says}"), out.stderr
    assert not (tmp_path / "data").exists()


def test_a_data_dir_that_cannot_be_created_says_which_and_why(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    out = cli("server", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "file" / "data"),
              "--local-workers", "0", timeout=60)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out
    assert out.stderr == f"codelane server: cannot create the data directory {tmp_path}/file/data: Not a directory\n"


@pytest.mark.parametrize("command", ["server", "worker"])
def test_a_busy_health_port_is_one_line(command: str, tmp_path: Path) -> None:
    # gRPC raised RuntimeError at the bind: a traceback, after gRPC's own log line.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        if command == "server":
            argv = ["server", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data"), "--local-workers", "0"]
        else:
            argv = ["worker", "--connect", "127.0.0.1:1", "--cache-dir", str(tmp_path / "cache")]
        out = cli(*argv, "--health-listen", f"127.0.0.1:{port}", timeout=60)
    # Exit 1, a failure, not a usage error (the worker exited 2).
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out
    assert out.stderr.startswith(f"codelane {command}: cannot serve gRPC health on 127.0.0.1:{port}: "), out.stderr
    assert "in use" in out.stderr
    assert not (tmp_path / "data").exists()  # refused before the server's store was made


@pytest.mark.parametrize("command", ["server", "worker"])
def test_ctrl_c_while_starting_exits_130_without_a_traceback(command: str, tmp_path: Path) -> None:
    # Before the server or worker set its own handler (importing, loading --tools), Ctrl-C
    # ended it in a KeyboardInterrupt traceback.
    if command == "server":
        argv = ["server", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data"), "--local-workers", "0"]
    else:
        argv = ["worker", "--connect", "127.0.0.1:1", "--cache-dir", str(tmp_path / "cache")]
    out = cli(*argv, "--tools", "tests.interrupting_plugin", timeout=60)
    assert out.returncode == 130, out
    assert "Traceback" not in out.stderr and out.stdout == "", out


def test_help_shows_defaults_and_says_what_each_option_is() -> None:
    server = cli("server", "--help").stdout
    assert "(default: .codelane)" in server and "(default: 6.0)" in server  # --data-dir, --heartbeat-timeout
    assert "what the server logs to stderr: DEBUG, INFO, WARNING, ERROR (local workers log" in " ".join(server.split())
    assert "(default: INFO)" in server
    run = " ".join(cli("run", "--help").stdout.split())
    assert "prompt what to ask, in quotes" in run
    assert "--workers" not in run  # the old spelling works, but is not advertised
    watch = " ".join(cli("watch", "--help").stdout.split())
    assert "--no-follow stop once caught up instead of following new events --json" in watch  # no "default: True"
    worker = " ".join(cli("worker", "--help").stdout.split())
    assert "e.g. gpu=true,zone=eu --root" in worker  # no "default: {}"


def test_old_spellings_still_work_with_a_deprecation_line(model: str, workspace: Path) -> None:
    out = cli("run", "--embedded", "--workers", "0", "--workspace", str(workspace), "--model", model, "--json", "go")
    assert out.returncode == 0, out.stderr
    assert out.stderr == "codelane run: --workers is deprecated: use --local-workers\n"


# A tool module (`--tools`) whose own code fails, as a third party's may: each was a traceback and
# exit 1 (the worker's with a Tool whose schema JSON cannot hold, only once it said Hello).
BROKEN_PLUGINS = {
    "syntax": ("def x(:\n", "failed to import: SyntaxError"),
    "raises": ("raise RuntimeError('no licence file')\n", "failed to import: RuntimeError: no licence file (at "),
    "load_tools": ("def load_tools(host):\n    raise OSError('no GPU')\n", "load_tools failed: OSError: no GPU"),
    "labels": ("def load_tools(host):\n    host.add_labels({'gpu': True})\n    return []\n",
               "load_tools failed: ValueError: label 'gpu': True is not a str key and a str value"),
    "not_json": (
        "from tool_worker.tools.base import Lane, Tool, ToolSpec\n"
        "TOOLS = [Tool(ToolSpec('t', 'd', {'type': 'object', 'default': {1}}, Lane.QUERY, True), None)]\n",
        "tool 't' cannot be offered: its parameters cannot be written as JSON (TypeError",
    ),
    "bad_name": (
        "from tool_worker.tools.base import Lane, Tool, ToolSpec\n"
        "TOOLS = [Tool(ToolSpec('look up', 'd', {'type': 'object'}, Lane.QUERY, True), None)]\n",
        "tool 'look up' cannot be offered: its name is not 1-64 letters, digits, '_' or '-'",
    ),
    "bad_lane": (
        "from tool_worker.tools.base import Tool, ToolSpec\n"
        "TOOLS = [Tool(ToolSpec('t', 'd', {'type': 'object'}, 'Query', True), None)]\n",
        "tool 't' cannot be offered: its lane is 'Query', not a Lane",
    ),
}


# The server never calls load_tools (tool_worker.plugins): only workers load what it loads.
@pytest.mark.parametrize(("command", "plugin"), [
    (command, plugin) for command in ("worker", "server") for plugin in sorted(BROKEN_PLUGINS)
    if command == "worker" or plugin not in ("load_tools", "labels")
])  # fmt: skip
def test_a_tool_module_that_fails_is_one_line_and_exit_2(command: str, plugin: str, tmp_path: Path) -> None:
    source, says = BROKEN_PLUGINS[plugin]
    module = f"broken_{plugin}"
    (tmp_path / f"{module}.py").write_text(source, encoding="utf-8")
    env = cli_env(PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    if command == "worker":
        argv = ["worker", "--connect", "127.0.0.1:1", "--cache-dir", str(tmp_path / "cache")]
    else:
        argv = ["server", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data"), "--local-workers", "0"]
    out = cli(*argv, "--tools", module, timeout=60, env=env)
    assert out.returncode == 2, out
    assert out.stderr.startswith(f"codelane {command}: cannot load tools: ") and says in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
