"""Configuration: precedence with provenance, every error class, kernel adjustment, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import kernel_skip

from nettracer.config import SCHEMA, load_config
from nettracer.config.kernel import ipv6_disabled
from nettracer.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
NOWHERE = "/nonexistent/nettracer.yaml"


def load(tmp_path: Path | None = None, text: str | None = None, **kw):
    """load_config isolated from the machine's environment and /etc file."""
    kw.setdefault("environ", {})
    kw.setdefault("default_path", NOWHERE)
    path = None
    if text is not None:
        assert tmp_path is not None
        path = str(tmp_path / "nettracer.yaml")
        Path(path).write_text(text)
    return load_config(path, kw.pop("overrides", None), **kw)


def fake_proc(root: Path, *, ipv6_dir: bool = True, disable: str = "0", if_inet6: bool = True):
    """A /proc-shaped tree for the parts ipv6_disabled() reads."""
    (root / "net").mkdir(parents=True)
    if ipv6_dir:
        (root / "sys/net/ipv6/conf/all").mkdir(parents=True)
        (root / "sys/net/ipv6/conf/all/disable_ipv6").write_text(disable + "\n")
    if if_inet6:
        (root / "net/if_inet6").write_text("")
    return str(root)


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NETTRACER_")}
    env["PYTHONPATH"] = str(REPO)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, netns: str | None = None):
    cmd = [sys.executable, "-m", "nettracer", *args]
    if netns is not None:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=env or clean_env(), cwd=REPO, timeout=60
    )


# -- values and provenance ---------------------------------------------------------------


def test_defaults_have_default_source(tmp_path):
    cfg = load(proc=fake_proc(tmp_path))
    for path, key in SCHEMA.items():
        assert cfg[path] == key.default, path
        assert cfg.source(path) == "default", path
    assert cfg.notices == []
    assert cfg.file is None
    assert cfg.network.max_tracked_connections == 65536
    assert cfg.drops.group_by == ["location", "device", "reason", "protocol"]


def test_precedence_defaults_file_env_flags(tmp_path):
    text = (
        "# comment\n"
        "network:\n"
        "  max_tracked_connections: 100\n"  # line 3: file only
        "  tcp_conn_timeout_s: 10\n"  # line 4: file, then env
        "  collect_udp: true\n"  # line 5: file, env, then flag
        "drops:\n"
        "  group_by: [device, netns]\n"  # line 7
    )
    env = {
        "NETTRACER_NETWORK__TCP_CONN_TIMEOUT_S": "20.5",
        "NETTRACER_NETWORK__COLLECT_UDP": "false",
        "NETTRACER_DEBUG": "1",  # not a configuration variable
    }
    overrides = {
        "network.collect_udp": ("yes", "--udp"),
        "output.format": ("json", "--json"),
        "offsets.source": (None, "--offsets"),  # flag not given
    }
    cfg = load(tmp_path, text, environ=env, overrides=overrides)
    f = str(tmp_path / "nettracer.yaml")
    assert cfg.file == f
    assert cfg["network.max_tracked_connections"] == 100
    assert cfg.source("network.max_tracked_connections") == f"file {f}:3"
    assert cfg["network.tcp_conn_timeout_s"] == 20.5
    assert cfg.source("network.tcp_conn_timeout_s") == "env NETTRACER_NETWORK__TCP_CONN_TIMEOUT_S"
    assert cfg["network.collect_udp"] is True
    assert cfg.source("network.collect_udp") == "flag --udp"
    assert cfg["drops.group_by"] == ["device", "netns"]
    assert cfg.source("drops.group_by") == f"file {f}:7"
    assert cfg["output.format"] == "json"
    assert cfg.source("output.format") == "flag --json"
    assert cfg["offsets.source"] == "auto"
    assert cfg.source("offsets.source") == "default"
    js = cfg.as_json()
    assert list(js) == list(SCHEMA)
    assert js["network.collect_udp"] == {"value": True, "source": "flag --udp"}


def test_env_values_are_parsed_by_type(tmp_path):
    env = {
        "NETTRACER_NETWORK__MAX_TRACKED_CONNECTIONS": "1000",
        "NETTRACER_NETWORK__COLLECT_TCP": "off",
        "NETTRACER_DROPS__GROUP_BY": "location, module",
        "NETTRACER_DROPS__INTERVAL_S": "0.5",
        "NETTRACER_AGENT__LISTEN": "[::1]:9999",
    }
    cfg = load(environ=env, proc=fake_proc(tmp_path))
    assert cfg["network.max_tracked_connections"] == 1000
    assert cfg["network.collect_tcp"] is False
    assert cfg["drops.group_by"] == ["location", "module"]
    assert cfg["drops.interval_s"] == 0.5
    assert cfg["agent.listen"] == "[::1]:9999"


def test_default_path_read_when_present(tmp_path):
    p = tmp_path / "etc.yaml"
    p.write_text("output:\n  format: prometheus\n")
    cfg = load_config(None, None, environ={}, default_path=str(p))
    assert cfg["output.format"] == "prometheus"
    assert cfg.source("output.format") == f"file {p}:2"
    assert load_config(None, None, environ={}, default_path=NOWHERE).file is None


def test_empty_file_and_empty_section(tmp_path):
    assert load(tmp_path, "").source("output.format") == "default"
    assert load(tmp_path, "network:\n").source("network.collect_tcp") == "default"


# -- errors ------------------------------------------------------------------------------

FILE_ERRORS = [
    # (yaml, key path, expected fragment, found fragment, line)
    ("network:\n  collect_tcp: [\n", "config file", "expected the node content", "", 3),
    ("network:\n\tcollect_tcp: true\n", "config file", "expected valid YAML", "'\\t'", 2),
    (
        "network:\n  max_tracked_conections: 5\n",
        "network.max_tracked_conections",
        "did you mean network.max_tracked_connections?",
        "unknown key",
        2,
    ),
    ("netwrk:\n  collect_tcp: true\n", "netwrk", "did you mean network?", "unknown section", 1),
    ("collect_udp: false\n", "collect_udp", "did you mean network.collect_udp?", "unknown", 1),
    (
        "network:\n  collect_tcp: maybe\n",
        "network.collect_tcp",
        "expected true or false",
        "'maybe'",
        2,
    ),
    (
        "network:\n  max_tracked_connections: 1.5\n",
        "network.max_tracked_connections",
        "expected an integer",
        "1.5",
        2,
    ),
    (
        "\nnetwork:\n  max_tracked_connections: 0\n",
        "network.max_tracked_connections",
        "in 1..10_000_000",
        "found 0",
        3,
    ),
    (
        "network:\n  max_tracked_connections: 10000001\n",
        "network.max_tracked_connections",
        "in 1..10_000_000",
        "found 10000001",
        2,
    ),
    (
        "drops:\n  interval_s: 0\n",
        "drops.interval_s",
        "expected a number in 0.1..86400",
        "found 0",
        2,
    ),
    ("drops:\n  interval_s: -1\n", "drops.interval_s", "in 0.1..86400", "found -1", 2),
    ("drops:\n  group_by: [location, dev]\n", "drops.group_by", "among location", "'dev'", 2),
    ("drops:\n  group_by: []\n", "drops.group_by", "at least one", "empty list", 2),
    ("drops:\n  group_by: [device, device]\n", "drops.group_by", "no repeats", "twice", 2),
    ("output:\n  format: xml\n", "output.format", "one of text, json, prometheus", "'xml'", 2),
    ("offsets:\n  source: maybe\n", "offsets.source", "one of auto, btf, guess", "'maybe'", 2),
    ("offsets:\n  cache_dir: rel\n", "offsets.cache_dir", "absolute path", "'rel'", 2),
    ("agent:\n  listen: localhost\n", "agent.listen", "HOST:PORT", "'localhost'", 2),
    ("network: 5\n", "network", "expected a mapping of keys", "'5'", 1),
    ("network:\n  collect_tcp:\n", "network.collect_tcp", "true or false", "null", 2),
    (
        "network:\n  collect_tcp: true\n  collect_tcp: false\n",
        "network.collect_tcp",
        "each key once",
        "found it again",
        3,
    ),
    (
        "network:\n  collect_tcp: false\n  collect_udp: false\n",
        "network.collect_tcp and network.collect_udp",
        "at least one of them true",
        "both false",
        2,
    ),
    (
        "gateway_lookup:\n  cache_size: 0\n",
        "gateway_lookup.cache_size and gateway_lookup.enabled",
        "cache size >= 1",
        "cache_size 0 with enabled true",
        2,
    ),
]


@pytest.mark.parametrize(("text", "key", "expected", "found", "line"), FILE_ERRORS)
def test_file_errors_name_key_expected_found_where(tmp_path, text, key, expected, found, line):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    msg = str(info.value)
    f = str(tmp_path / "nettracer.yaml")
    assert "\n" not in msg
    assert msg.startswith(f"{key}:") or msg.startswith(f"config file {f}:"), msg
    assert key in msg
    assert expected in msg, msg
    assert found in msg, msg
    assert f"in {f} line {line}" in msg, msg


def test_conflict_names_every_source(tmp_path):
    env = {"NETTRACER_NETWORK__COLLECT_UDP": "0"}
    with pytest.raises(ConfigError) as info:
        load(tmp_path, "network:\n  collect_tcp: false\n", environ=env)
    msg = str(info.value)
    assert "line 2" in msg
    assert "in environment variable NETTRACER_NETWORK__COLLECT_UDP" in msg
    # disabling the lookups resolves the cache-size conflict
    cfg = load(tmp_path, "gateway_lookup:\n  cache_size: 0\n  enabled: false\n")
    assert cfg["gateway_lookup.cache_size"] == 0


def test_env_errors():
    with pytest.raises(ConfigError) as info:
        load(environ={"NETTRACER_NETWORK__MAX_TRACKED_CONNECTIONS": "many"})
    msg = str(info.value)
    assert msg.startswith("network.max_tracked_connections: expected an integer in 1..")
    assert "found the string 'many'" in msg
    assert "in environment variable NETTRACER_NETWORK__MAX_TRACKED_CONNECTIONS" in msg

    with pytest.raises(ConfigError) as info:
        load(environ={"NETTRACER_NETWORK__MAX_TRACKED_CONNS": "5"})
    msg = str(info.value)
    assert "did you mean NETTRACER_NETWORK__MAX_TRACKED_CONNECTIONS?" in msg
    assert "found an unknown key" in msg
    assert "in environment variable NETTRACER_NETWORK__MAX_TRACKED_CONNS" in msg


def test_flag_errors():
    with pytest.raises(ConfigError) as info:
        load(overrides={"drops.interval_s": (0, "--interval")})
    msg = str(info.value)
    assert (
        msg == "drops.interval_s: expected a number in 0.1..86400, found 0 (from flag --interval)"
    )
    with pytest.raises(ConfigError) as info:
        load(overrides={"drops.intervals": (1, "--interval")})
    assert "did you mean drops.interval_s?" in str(info.value)
    assert "from flag --interval" in str(info.value)


def test_missing_explicit_file_is_an_error(tmp_path):
    missing = str(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(missing, None, environ={}, default_path=NOWHERE)
    assert missing in str(info.value)
    assert "expected an existing file" in str(info.value)


# -- kernel adjustment -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "reason"),
    [
        ({"ipv6_dir": False}, "sys/net/ipv6 is missing"),
        ({"disable": "1"}, "net.ipv6.conf.all.disable_ipv6 = 1"),
        ({"if_inet6": False}, "net/if_inet6 is missing"),
    ],
)
def test_ipv6_forced_off_with_notice(tmp_path, layout, reason):
    proc = fake_proc(tmp_path / "proc", **layout)
    cfg = load(tmp_path, "network:\n  collect_ipv6: true\n", proc=proc)
    assert cfg["network.collect_ipv6"] is False
    assert cfg.source("network.collect_ipv6").startswith("kernel IPv6 is disabled")
    assert reason in cfg.source("network.collect_ipv6")
    assert len(cfg.notices) == 1
    assert "network.collect_ipv6 set to false" in cfg.notices[0]
    assert "was file" in cfg.notices[0]
    # already off: nothing to adjust, nothing to say
    cfg = load(overrides={"network.collect_ipv6": (False, "--no-ipv6")}, proc=proc)
    assert cfg.source("network.collect_ipv6") == "flag --no-ipv6"
    assert cfg.notices == []


def test_ipv6_enabled_proc_tree(tmp_path):
    assert ipv6_disabled(fake_proc(tmp_path)) is None


def _netns(name: str) -> None:
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)


@pytest.mark.kernel
def test_ipv6_disabled_in_a_real_namespace():
    """A namespace with disable_ipv6=1 (its own /proc/sys/net): collect_ipv6 goes off."""
    if not os.path.isdir("/proc/sys/net/ipv6"):
        kernel_skip("this kernel has no IPv6 to disable")
    ns = f"ntcfg{os.getpid()}"
    _netns(ns)
    try:
        subprocess.run(
            ["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
            check=True,
            capture_output=True,
        )
        r = run_cli("config", "show", "--json", "--set", "network.collect_ipv6=true", netns=ns)
        assert r.returncode == 0, r.stderr
        js = json.loads(r.stdout)
        assert js["network.collect_ipv6"]["value"] is False
        assert "net.ipv6.conf.all.disable_ipv6 = 1" in js["network.collect_ipv6"]["source"]
        assert r.stderr.startswith("nettracer: notice: network.collect_ipv6 set to false")
        assert "was flag --set network.collect_ipv6=true" in r.stderr
        # the host namespace answers for itself
        host = run_cli("config", "show", "--json", "--config", os.devnull)
        expect_off = ipv6_disabled() is not None
        assert json.loads(host.stdout)["network.collect_ipv6"]["value"] is (not expect_off)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


# -- the command line --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("network:\n  collect_tcp: [\n", "invalid YAML in"),
        ("network:\n  max_tracked_conections: 5\n", "did you mean"),
        ("network:\n  max_tracked_connections: 0\n", "found 0"),
    ],
)
def test_cli_error_is_one_line_exit_2(tmp_path, text, needle):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    r = run_cli("config", "show", "--config", str(bad))
    assert r.returncode == 2
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("nettracer: ")
    assert needle in lines[0]
    assert f"{bad} line" in lines[0]


def test_cli_missing_config_file(tmp_path):
    r = run_cli("config", "show", "--config", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2
    assert len(r.stderr.splitlines()) == 1
    assert "nope.yaml" in r.stderr


def test_cli_show_json_matches_load_config(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("drops:\n  interval_s: 2\n")
    env = clean_env()
    env["NETTRACER_NETWORK__MAX_TRACKED_CONNECTIONS"] = "4096"
    r = run_cli(
        "config", "show", "--json", "--config", str(f), "--set", "output.format=json", env=env
    )
    assert r.returncode == 0, r.stderr
    js = json.loads(r.stdout)
    expected = load_config(
        str(f),
        {"output.format": ("json", "--set output.format=json")},
        environ={"NETTRACER_NETWORK__MAX_TRACKED_CONNECTIONS": "4096"},
    ).as_json()
    assert js == expected
    assert js["drops.interval_s"] == {"value": 2.0, "source": f"file {f}:2"}
    assert js["network.max_tracked_connections"] == {
        "value": 4096,
        "source": "env NETTRACER_NETWORK__MAX_TRACKED_CONNECTIONS",
    }
    assert js["output.format"]["source"] == "flag --set output.format=json"


def test_cli_show_text_lists_every_key_and_source(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("network:\n  collect_udp: false\n")
    r = run_cli("config", "show", "--config", str(f))
    assert r.returncode == 0, r.stderr
    rows = {}
    for line in r.stdout.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) == 3 and cells[0] in SCHEMA:
            rows[cells[0]] = cells
    assert set(rows) == set(SCHEMA)
    assert rows["network.collect_udp"][1:] == ["false", f"file {f}:2"]
    assert rows["drops.group_by"][1:] == ["[location, device, reason, protocol]", "default"]


# -- hostile files: bounded in time and memory -------------------------------------------


def alias_bomb(depth: int, width: int = 9) -> str:
    """A "billion laughs" config: anchors nested ``depth`` deep under drops.group_by,
    each repeating the one before ``width`` times (``width ** depth`` strings)."""
    items = ", ".join(["x"] * width)
    lines = ["drops:", "  group_by:", f"    - &a0 [{items}]"]
    for i in range(1, depth + 1):
        refs = ", ".join([f"*a{i - 1}"] * width)
        lines.append(f"    - &a{i} [{refs}]")
    return "\n".join(lines) + "\n"


def run_cli_bounded(*args: str, memory_mb: int = 512):
    """``run_cli`` with an address-space limit: a blow-up fails instead of swapping."""
    import resource

    def limit() -> None:
        size = memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (size, size))

    return subprocess.run(
        [sys.executable, "-m", "nettracer", *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=REPO,
        timeout=30,
        preexec_fn=limit,
    )


@pytest.mark.parametrize("depth", [8, 9, 30])
def test_cli_alias_bomb_refused(tmp_path, depth):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb(depth))
    r = run_cli_bounded("config", "show", "--config", str(bomb))
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
    assert "MemoryError" not in r.stderr and "internal error" not in r.stderr
    assert "expected aliases (*name) that add at most 1000 values, found more" in r.stderr
    assert f"{bomb} line" in r.stderr


def test_recursive_alias_refused(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, "drops:\n  group_by: &a [device, *a]\n")
    assert "expected no alias inside its own anchor, found *a" in str(info.value)
    assert "line 2" in str(info.value)


def test_small_aliases_are_fine(tmp_path):
    text = (
        "network:\n  tcp_conn_timeout_s: &t 30\n  udp_conn_timeout_s: *t\n"
        "drops:\n  group_by: &g [device, reason]\n"
    )
    cfg = load(tmp_path, text)
    assert cfg["network.udp_conn_timeout_s"] == 30
    assert cfg["drops.group_by"] == ["device", "reason"]


def test_long_values_are_described_briefly(tmp_path):
    long = "y" * 10_000
    for text in (
        f"drops:\n  group_by: [device, {long}]\n",
        f"output:\n  format: {long}\n",
        f"drops:\n  group_by: {[long] * 5}\n",
    ):
        with pytest.raises(ConfigError) as info:
            load(tmp_path, text)
        assert "yyy..." in str(info.value) or "found a list (in" in str(info.value)
        assert len(str(info.value)) < 400, str(info.value)[:400]
    # names too: YAML's explicit keys ("? key") and environment variables have no limit
    for text in (f"network:\n  ? {long}\n  : 1\n", f"? {long}\n: {{a: 1}}\n"):
        with pytest.raises(ConfigError) as info:
            load(tmp_path, text)
        assert "yyy..." in str(info.value) and len(str(info.value)) < 400
    with pytest.raises(ConfigError) as info:
        load(environ={f"NETTRACER_DROPS__{long}": "1"})
    assert len(str(info.value)) < 400
