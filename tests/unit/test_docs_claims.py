"""What a platform engineer copies from the docs must work: every command line, flag, make target, port, HTTP
route, metric name and label value the docs name is checked against the code as it is.

tests/unit/test_daemonset_manifests.py already holds the configuration tables to the flags' defaults, the
``AMBIT_*`` variables to the flags and the metrics' label names to the code. This module covers what a reader runs
or types: a command line (``ambitctl lab up --mesh``, ``python -m bench run --only ...``) is parsed against the
argparse parser of the very command it invokes, subcommands included, so a flag that exists elsewhere but not on
that command fails; any other ``--flag`` must exist on some Ambit command; ``make`` targets must be in the Makefile;
ports must be the defaults of some port flag; paths like ``/debug/config_status`` must be routes one of the HTTP
servers registers; metric names must be registered by a metric constructor (with the suffix the exposition gives
them) and label values quoted in a series must be written somewhere in the code. bench/README.md is read too.

Each check is a function over (file name, text) pairs, so the tests at the end prove on planted copies that it
fails when a doc is wrong; the repository's files are never edited.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import os
import re
import shlex
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

from agent.admin import admin_server, metrics_server, readiness_server
from agent.main import AgentConfig
from agent.metrics import Metrics
from agent.state import WorkloadStore
from common import flags
from controller.main import Controller, ControllerConfig

REPO = Path(__file__).resolve().parents[2]
DOC_PATHS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "bench" / "README.md"]

Docs = list[tuple[str, str]]  # (name shown in a failure, text)


def _repo_docs() -> Docs:
    return [(str(p.relative_to(REPO)), p.read_text()) for p in DOC_PATHS]


# --- the commands' parsers -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Command:
    """What one (sub)command accepts: its options, those of them that take a value, and its subcommands."""

    options: frozenset[str]
    takes_value: frozenset[str]
    subcommands: dict[str, Command]

    def every_option(self) -> set[str]:
        out = set(self.options)
        for sub in self.subcommands.values():
            out |= sub.every_option()
        return out


def _tree(parser: argparse.ArgumentParser) -> Command:
    options: set[str] = set()
    takes_value: set[str] = set()
    subcommands: dict[str, Command] = {}
    for action in parser._actions:
        options |= set(action.option_strings)
        if action.option_strings and action.nargs != 0:
            takes_value |= set(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            subcommands = {name: _tree(sub) for name, sub in action.choices.items()}
    return Command(frozenset(options), frozenset(takes_value), subcommands)


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__("parser captured")
        self.parser = parser


def _parser_of(entry: Callable[[list[str]], Any]) -> argparse.ArgumentParser:
    """The parser an entry point builds, taken at its parse_args: the commands whose parser is built inside main()
    are read exactly as they run, with nothing executed past the parsing."""

    def grab(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        raise _Parsed(self)

    # AMBIT_* variables of the environment running the tests are no part of what the commands accept.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AMBIT_")}
    with mock.patch.object(argparse.ArgumentParser, "parse_args", grab), mock.patch.dict(os.environ, clean, clear=True):
        try:
            entry([])
        except _Parsed as parsed:
            return parsed.parser
    raise AssertionError(f"{entry} parsed no arguments")


@functools.cache
def commands() -> dict[tuple[str, ...], Command]:
    """Each way the docs invoke an Ambit command (its leading words) and what it accepts."""
    import bench.agent_memory
    import bench.main
    import bench.soak
    from cli.ambitctl import build_parser
    from controller import ca_rotation

    return {
        ("ambit-agent",): _tree(_parser_of(lambda argv: flags.parse(AgentConfig, argv))),
        ("ambit-controller",): _tree(_parser_of(lambda argv: flags.parse(ControllerConfig, argv))),
        ("ambit-waypoint",): Command(frozenset(), frozenset(), {}),  # takes nothing: it refuses to start
        ("ambitctl",): _tree(build_parser()),
        ("python", "-m", "cli.ambitctl"): _tree(build_parser()),
        ("python", "-m", "bench"): _tree(_parser_of(bench.main.main)),
        ("python", "-m", "bench.soak"): _tree(_parser_of(bench.soak.main)),
        ("python", "-m", "bench.agent_memory"): _tree(_parser_of(bench.agent_memory.main)),
        ("python", "-m", "controller.ca_rotation"): _tree(_parser_of(ca_rotation.main)),
    }


def every_option() -> set[str]:
    out: set[str] = set()
    for command in commands().values():
        out |= command.every_option()
    return out


# Commands of other projects the docs show with their own flags (kubectl, docker, ...): not checked.
FOREIGN_COMMANDS = frozenset(
    {"kubectl", "docker", "setpriv", "nsenter", "iperf3", "envoy", "curl", "ip", "nft", "taskset", "tc", "bpftool"}
)
# Flags of other tools the prose names outside a command line.
FOREIGN_FLAGS = {
    "--socket-exists": "iptables' owner match, which istio-cni uses",
    "--privileged": "docker run's (runc refuses it where root lacks a capability)",
}


@functools.cache
def script_text(path: str) -> str | None:
    """A repository script's source (scripts/build-image.sh): its flags are read from its text, having no parser
    to ask."""
    where = REPO / path
    if path.startswith("scripts/") and where.is_file():
        return where.read_text()
    return None


def script_flags() -> set[str]:
    return {
        flag
        for path in sorted((REPO / "scripts").glob("*"))
        for flag in _flags_in(script_text(str(path.relative_to(REPO))) or "")
    }


@functools.cache
def make_targets() -> frozenset[str]:
    return frozenset(re.findall(r"^([a-z][a-z0-9-]*):", (REPO / "Makefile").read_text(), flags=re.M))


# --- reading the docs: code blocks, code spans, prose -----------------------------------------------------------

_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", flags=re.M | re.S)


@dataclasses.dataclass(frozen=True)
class Parts:
    block_lines: list[str]  # the code of fenced blocks' lines, comments cut off
    spans: list[str]  # inline code spans (in prose, tables and block comments), line breaks as spaces
    prose: str  # the rest


def parts(text: str) -> Parts:
    block_lines: list[str] = []
    comments: list[str] = []
    for block in _FENCE.findall(text):
        for line in block.splitlines():
            code, _, comment = _cut_comment(line)
            block_lines.append(code)
            comments.append(comment)
    rest = "\n".join([_FENCE.sub("", text), *comments])
    spans = [s.replace("\n", " ") for s in re.findall(r"`([^`]+)`", rest)]
    prose = re.sub(r"`[^`]+`", " ", rest)
    return Parts(block_lines, spans, prose)


def _cut_comment(line: str) -> tuple[str, str, str]:
    """A shell line's code and its comment (a ``#`` at the start or after a blank)."""
    m = re.search(r"(^|\s)#(\s|$)", line)
    if m is None:
        return line, "", ""
    return line[: m.start()], "#", line[m.end() :]


def segments(code: str) -> Iterator[str]:
    """The simple commands of a shell line (split at pipes, ``&&``, ``||`` and ``;``)."""
    for segment in re.split(r"\|\||&&|;|\|", code):
        if segment.strip():
            yield segment.strip()


def _tokens(segment: str) -> list[str]:
    # A synopsis's optional parts ([--quick] [--rounds N]) are read as if given.
    text = segment.replace("[", " ").replace("]", " ")
    try:
        return shlex.split(text)
    except ValueError:
        return text.split()


def _command_word(token: str) -> str:
    where, _, word = token.rpartition("/")
    if where and not where.endswith("bin"):
        return token  # ambit-system/ambit-agent is a service account, .venv/bin/ambitctl the command
    return "python" if re.fullmatch(r"python3?(\.\d+)?", word) else word


def _placeholder(token: str) -> bool:
    """COMMAND, LAB, <step>, ...: a word the reader replaces."""
    return "<" in token or "..." in token or token.upper() == token


def invocation(segment: str) -> tuple[tuple[str, ...], list[str]] | None:
    """(the command's key in :func:`commands`, its arguments) when the segment runs an Ambit command."""
    tokens = _tokens(segment)
    while tokens and (tokens[0] == "sudo" or re.fullmatch(r"[A-Z_]+=\S*", tokens[0])):
        tokens = tokens[1:]
    if not tokens:
        return None
    words = [_command_word(tokens[0]), *tokens[1:]]
    for key in sorted(commands(), key=len, reverse=True):
        if tuple(words[: len(key)]) == key:
            return key, words[len(key) :]
    return None


# --- the checks ---------------------------------------------------------------------------------------------------


def command_line_problems(name: str, segment: str) -> list[str]:
    """An Ambit command line: every subcommand exists and every flag is one of the (sub)command it follows."""
    found = invocation(segment)
    if found is None:
        return []
    key, args = found
    command, path = commands()[key], list(key)
    problems: list[str] = []
    skip_value = False
    for token in args:
        if skip_value:
            skip_value = False
            continue
        if token == "--":
            break  # what follows is another program's command line (ambitctl lab exec POD -- CMD...)
        if token.startswith("--"):
            flag = token.split("=", 1)[0]
            if flag not in command.options:
                problems.append(f"{name}: `{segment}`: `{' '.join(path)}` has no {flag}")
            skip_value = flag in command.takes_value and "=" not in token
        elif token.startswith("-"):
            continue
        elif command.subcommands:
            if token in command.subcommands:
                command = command.subcommands[token]
                path.append(token)
            elif _placeholder(token):
                break  # the reader picks the subcommand: nothing more to check
            else:
                problems.append(f"{name}: `{segment}`: `{' '.join(path)}` has no subcommand {token!r}")
                break
    return problems


def _flags_in(text: str) -> Iterator[str]:
    for m in re.finditer(r"(?<![\w-])--[a-z][a-z0-9-]*\*?", text):
        yield m.group(0)


def _known_flag(flag: str, known: set[str]) -> bool:
    if flag.endswith("-*"):  # a family of flags: `--token-review-*`
        return any(option.startswith(flag[:-1]) for option in known)
    return flag in known or flag in FOREIGN_FLAGS


def script_line_problems(name: str, segment: str) -> list[str]:
    """`scripts/build-image.sh --save FILE`: every flag is one the script's text handles."""
    tokens = _tokens(segment)
    text = script_text(tokens[0].removeprefix("./")) if tokens else None
    if text is None:
        return []
    return [
        f"{name}: `{segment}`: {tokens[0]} handles no {flag}"
        for token in tokens[1:]
        if token.startswith("--") and (flag := token.split("=", 1)[0]) not in set(_flags_in(text))
    ]


def flag_problems(docs: Docs) -> list[str]:
    """Command lines against their own command (a repository script against its text); every other ``--flag``
    against every Ambit command's and script's."""
    known = every_option() | script_flags()
    problems: list[str] = []
    for name, text in docs:
        p = parts(text)
        loose: list[str] = [p.prose]
        for code in [*p.block_lines, *p.spans]:
            for segment in segments(code):
                tokens = _tokens(segment)
                if tokens and _command_word(tokens[0]) in FOREIGN_COMMANDS:
                    continue
                if invocation(segment) is not None:
                    problems += command_line_problems(name, segment)
                elif tokens and script_text(tokens[0].removeprefix("./")) is not None:
                    problems += script_line_problems(name, segment)
                else:
                    loose.append(segment)
        for flag in _flags_in("\n".join(loose)):
            if not _known_flag(flag, known):
                problems.append(f"{name}: {flag} is a flag of no Ambit command")
    return problems


def make_problems(docs: Docs) -> list[str]:
    problems = []
    for name, text in docs:
        p = parts(text)
        for code in [*p.block_lines, *p.spans]:
            for segment in segments(code):
                tokens = _tokens(segment)
                if tokens[:1] == ["make"]:
                    for target in tokens[1:]:
                        if not target.startswith("-") and "=" not in target and target not in make_targets():
                            problems.append(f"{name}: `{segment}`: the Makefile has no target {target!r}")
    return problems


def _port_defaults() -> set[int]:
    return {
        f.default
        for config in (AgentConfig, ControllerConfig)
        for f in dataclasses.fields(config)
        if f.name.endswith("_port") and isinstance(f.default, int)
    }


def port_problems(docs: Docs) -> list[str]:
    """Istio's 150xx ports the docs name are the defaults of Ambit's port flags."""
    ports = _port_defaults()
    return [
        f"{name}: port {port} is the default of no port flag"
        for name, text in docs
        for port in sorted({int(p) for p in re.findall(r"(?<![\d.])(150\d\d)(?![\d.])", text)})
        if port not in ports
    ]


# Spans that start with these are files on a node, not HTTP routes.
FILE_ROOTS = frozenset({"sys", "run", "var", "proc", "etc", "lib", "usr", "tmp", "host", "dev"})


@functools.cache
def served_routes() -> dict[int | None, set[tuple[str, str]]]:
    """(method, path) of every HTTP route the agent and the controller register, by their default port."""
    import tempfile

    agent = AgentConfig()
    with tempfile.TemporaryDirectory() as tmp:
        controller_cfg = flags.parse(ControllerConfig, ["--config-dir", tmp])
        controller = Controller(controller_cfg).monitoring.routes
    servers: dict[int | None, set[tuple[str, str]]] = {
        agent.admin_port: set(
            admin_server(dict, list, lambda: None, store=WorkloadStore(), trust_domain="cluster.local").routes
        ),
        agent.metrics_port: set(metrics_server(Metrics()).routes),
        agent.ready_port: set(readiness_server(lambda: (True, "")).routes),
        controller_cfg.monitoring_port: set(controller),
    }
    return {**servers, None: set().union(*servers.values())}


def route_problems(docs: Docs) -> list[str]:
    """`/config_dump`, `POST /quitquitquit`, `:15021/healthz/ready`: a route of some server (of that port)."""
    routes = served_routes()
    problems = []
    for name, text in docs:
        for span in parts(text).spans:
            m = re.fullmatch(r"(?:(GET|POST) )?(?:[\w.]*:(\d+))?(/[a-z_]+(?:/[a-z_]+)*)(?:\?\S*)?", span.strip())
            if m is None or m.group(3).split("/")[1] in FILE_ROOTS:
                continue
            method, port, path = m.group(1), m.group(2), m.group(3)
            served = routes.get(int(port) if port else None)
            if served is None:
                problems.append(f"{name}: `{span}`: no Ambit process serves HTTP on {port}")
            elif not any(p == path and method in (None, meth) for meth, p in served):
                problems.append(f"{name}: `{span}`: no {method or 'GET/POST'} route {path} on {port or 'any port'}")
    return problems


_METRIC = re.compile(r"(?<![\w])((?:istio|ambit|pilot|citadel|process)_[a-z0-9_]*[a-z0-9])(?![\w*])(\{[^}]*\})?")
_EXPOSED = {  # what the exposition adds to a registered name (prometheus_client and agent/prometheus.py alike)
    "Counter": ("", "_total"),
    "counter_family": ("", "_total"),
    "Gauge": ("",),
    "gauge_family": ("",),
    "Histogram": ("", "_bucket", "_sum", "_count"),
}


def _python_trees() -> Iterator[ast.AST]:
    for package in ("agent", "controller", "common"):
        for path in sorted((REPO / package).rglob("*.py")):
            yield ast.parse(path.read_text())


@functools.cache
def registered_names() -> frozenset[str]:
    """Every series name a metric constructor registers, as scraped, and the BPF maps' pin names (`ambit_wl_home`
    is a map the docs name in the same style)."""
    names: set[str] = set()
    for tree in _python_trees():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)):
                continue
            value = node.args[0].value
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if not isinstance(value, str):
                continue
            if func == "MapSpec":
                names.add(value)
            elif func in _EXPOSED:
                base = value.removesuffix("_total") if func in ("Counter", "counter_family") else value
                names |= {base + suffix for suffix in _EXPOSED[func]}
    # The traffic families are built from a table of names (Metrics.FAMILIES): read them from a live registry.
    kinds = {"counter": "counter_family", "gauge": "gauge_family", "histogram": "Histogram"}
    for family in Metrics().registry.collect():
        names |= {family.name + suffix for suffix in _EXPOSED[kinds[family.type]]}
    return frozenset(names)


@functools.cache
def code_strings() -> frozenset[str]:
    return frozenset(
        node.value
        for tree in _python_trees()
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    )


def metric_problems(docs: Docs) -> list[str]:
    """Metric names are registered as written; a label value quoted in a series is one the code writes."""
    names, strings = registered_names(), code_strings()
    problems = []
    for name, text in docs:
        for span in parts(text).spans:
            for m in _METRIC.finditer(span):
                metric, labels = m.group(1), m.group(2) or ""
                if metric not in names:
                    problems.append(f"{name}: `{span}`: no metric {metric} is registered")
                for label, value in re.findall(r'(\w+)="([^"]*)"', labels):
                    if value not in strings:
                        problems.append(f"{name}: `{span}`: {metric}'s {label}={value!r} is written by no code")
    return problems


_TOP = frozenset(p.name for p in REPO.iterdir() if p.is_dir() and not p.name.startswith("."))


def block_path_problems(docs: Docs) -> list[str]:
    """Repository paths a code block passes to a command (``kubectl apply -k daemonset/base``) exist."""
    problems = []
    for name, text in docs:
        for line in parts(text).block_lines:
            for token in _tokens(line):
                repo_path = token.split("/")[0] in _TOP and "/" in token and not re.search(r"[A-Z<]", token)
                if repo_path and not (REPO / token).exists():
                    problems.append(f"{name}: `{line.strip()}`: {token} does not exist")
    return problems


def named_test_problems(docs: Docs) -> list[str]:
    """`tests/x.py::test_name`: the docs send readers to a test by name, which must be defined in that file."""
    problems = []
    for name, text in docs:
        for path, test in sorted(set(re.findall(r"(tests/[\w/]+\.py)::(\w+)", text))):
            file = REPO / path
            if not file.is_file() or not re.search(rf"^(async )?def {test}\(", file.read_text(), flags=re.M):
                problems.append(f"{name}: {path}::{test} is no test")
    return problems


CHECKS: Sequence[Callable[[Docs], list[str]]] = (
    flag_problems,
    make_problems,
    port_problems,
    route_problems,
    metric_problems,
    block_path_problems,
    named_test_problems,
)


# --- the docs as they are ---------------------------------------------------------------------------------------


def test_docs_read_every_doc() -> None:
    names = [name for name, _ in _repo_docs()]
    assert {"README.md", "docs/operations.md", "docs/configuration.md", "bench/README.md"} <= set(names)


def test_command_lines_in_docs_parse_against_their_own_command() -> None:
    assert flag_problems(_repo_docs()) == []


def test_make_targets_in_docs_exist() -> None:
    assert make_problems(_repo_docs()) == []


def test_ports_in_docs_are_port_flag_defaults() -> None:
    assert port_problems(_repo_docs()) == []


def test_http_routes_in_docs_are_served() -> None:
    assert route_problems(_repo_docs()) == []


def test_metric_names_and_label_values_in_docs_are_registered() -> None:
    assert metric_problems(_repo_docs()) == []


def test_paths_in_doc_code_blocks_exist() -> None:
    assert block_path_problems(_repo_docs()) == []


def test_tests_the_docs_name_exist() -> None:
    assert named_test_problems(_repo_docs()) == []


def bench_configuration_problems(text: str) -> list[str]:
    """bench/README.md's table of configurations names exactly what `--only` takes (bench/options.py)."""
    from bench.options import ALL_CONFIGS

    section = text[text.index("## Configurations") :]
    section = section[: section.index("\n## ", 1)]
    documented = re.findall(r"^\| `([a-z-]+)` \|", section, flags=re.M)
    problems = [
        f"bench/README.md: configuration {c} is not run by the bench" for c in documented if c not in ALL_CONFIGS
    ]
    problems += [f"bench/README.md: configuration {c} is not described" for c in ALL_CONFIGS if c not in documented]
    return problems


def test_bench_readme_describes_every_configuration() -> None:
    assert bench_configuration_problems((REPO / "bench" / "README.md").read_text()) == []


# --- the checks fail on a wrong doc (a planted copy; the repository's files are not touched) ---------------------


def _planted(doc: str, old: str, new: str) -> Docs:
    """The repository's docs with one of them changed in memory."""
    out = []
    for name, text in _repo_docs():
        if name == doc:
            assert old in text, f"{doc} no longer holds {old!r}: pick another plant"
            text = text.replace(old, new, 1)
        out.append((name, text))
    return out


def _only_new(check: Callable[[Docs], list[str]], docs: Docs) -> list[str]:
    return sorted(set(check(docs)) - set(check(_repo_docs())))


def test_a_wrong_flag_in_a_command_line_fails() -> None:
    docs = _planted("docs/operations.md", "ambitctl lab up --mesh", "ambitctl lab up --meshes")
    assert _only_new(flag_problems, docs) == [
        "docs/operations.md: `.venv/bin/ambitctl lab up --meshes`: `ambitctl lab up` has no --meshes"
    ]


def test_a_flag_of_another_subcommand_fails() -> None:
    """--mesh exists (on `lab up`), so only reading the command line against its own subcommand catches this."""
    docs = _planted("docs/operations.md", "ambitctl lab status", "ambitctl lab status --mesh")
    assert _only_new(flag_problems, docs) == [
        "docs/operations.md: `.venv/bin/ambitctl lab status --mesh`: `ambitctl lab status` has no --mesh"
    ]


def test_a_wrong_subcommand_fails() -> None:
    docs = _planted("docs/operations.md", "ambitctl lab status", "ambitctl lab state")
    assert _only_new(flag_problems, docs) == [
        "docs/operations.md: `.venv/bin/ambitctl lab state`: `ambitctl lab` has no subcommand 'state'"
    ]


def test_a_wrong_flag_in_prose_or_a_table_fails() -> None:
    docs = _planted("docs/configuration.md", "| `--drain-seconds` |", "| `--drain-secs` |")
    assert _only_new(flag_problems, docs) == ["docs/configuration.md: --drain-secs is a flag of no Ambit command"]
    bench = _planted("bench/README.md", "[--max-steal F]", "[--max-stolen F]")
    assert _only_new(flag_problems, bench) == [
        "bench/README.md: `.venv/bin/python -m bench run [--quick] [--rounds N] [--only nomesh,envoy,...,config-scale]"
        " [--out DIR] [--pin] [--max-stolen F]`: `python -m bench run` has no --max-stolen"
    ]


def test_a_flag_a_repository_script_does_not_handle_fails() -> None:
    docs = [("doc.md", "```sh\nscripts/setup.sh --force   # no such option\n```\nthen `scripts/setup.sh --yes`\n")]
    assert flag_problems(docs) == [
        "doc.md: `scripts/setup.sh --force`: scripts/setup.sh handles no --force",
        "doc.md: `scripts/setup.sh --yes`: scripts/setup.sh handles no --yes",
    ]


def test_a_foreign_commands_flags_are_not_ours_to_check() -> None:
    docs = _planted("docs/operations.md", "--timeout=120s", "--timeout=120s --no-such-kubectl-flag")
    assert _only_new(flag_problems, docs) == []


def test_a_wrong_make_target_fails() -> None:
    docs = _planted("README.md", "make demo ", "make demos ")
    assert _only_new(make_problems, docs) == ["README.md: `make demos`: the Makefile has no target 'demos'"]


def test_a_wrong_port_fails() -> None:
    docs = _planted("docs/operations.md", "`:15021/healthz/ready`", "`:15022/healthz/ready`")
    assert _only_new(port_problems, docs) == ["docs/operations.md: port 15022 is the default of no port flag"]
    assert "no Ambit process serves HTTP on 15022" in " ".join(_only_new(route_problems, docs))


def test_a_wrong_route_fails() -> None:
    docs = _planted("docs/operations.md", "`/debug/config_status`", "`/debug/configstatus`")
    assert _only_new(route_problems, docs) == [
        "docs/operations.md: `/debug/configstatus`: no GET/POST route /debug/configstatus on any port"
    ]
    wrong_port = _planted("docs/operations.md", "`:15020/metrics`", "`:15020/healthz/ready`")
    assert _only_new(route_problems, wrong_port) == [
        "docs/operations.md: `:15020/healthz/ready`: no GET/POST route /healthz/ready on 15020"
    ]


def test_a_wrong_metric_name_suffix_or_label_value_fails() -> None:
    name = _planted("docs/operations.md", "`ambit_cert_fetch_errors_total`", "`ambit_cert_fetch_failures_total`")
    assert _only_new(metric_problems, name) == [
        "docs/operations.md: `ambit_cert_fetch_failures_total`: no metric ambit_cert_fetch_failures_total is registered"
    ]
    # a gauge has no _total series: only the exposition's own suffixes are accepted
    suffix = _planted("docs/operations.md", "`ambit_relay_buffered_bytes`", "`ambit_relay_buffered_bytes_total`")
    assert len(_only_new(metric_problems, suffix)) == 1
    value = _planted("docs/operations.md", 'event="drop_spoofed"', 'event="spoofed_drop"')
    assert _only_new(metric_problems, value) == [
        'docs/operations.md: `ambit_capture_events_total{event="spoofed_drop"}`: ambit_capture_events_total\'s '
        "event='spoofed_drop' is written by no code"
    ]


def test_a_wrong_path_in_a_code_block_fails() -> None:
    docs = _planted("docs/operations.md", "kubectl apply -k daemonset/cleanup ", "kubectl apply -k daemonset/clean ")
    assert _only_new(block_path_problems, docs) == [
        "docs/operations.md: `kubectl apply -k daemonset/clean`: daemonset/clean does not exist"
    ]


def test_a_renamed_test_fails() -> None:
    docs = _planted(
        "docs/ca-rotation.md", "::test_root_rotation_keeps_both_sides_verifying", "::test_root_rotation_works"
    )
    assert _only_new(named_test_problems, docs) == [
        "docs/ca-rotation.md: tests/integration/test_identity_ca.py::test_root_rotation_works is no test"
    ]


def test_a_configuration_missing_from_the_bench_readme_fails() -> None:
    text = (REPO / "bench" / "README.md").read_text().replace("| `pytls` |", "| `py-tls` |")
    assert bench_configuration_problems(text) == [
        "bench/README.md: configuration py-tls is not run by the bench",
        "bench/README.md: configuration pytls is not described",
    ]


def _all(docs: Iterable[tuple[str, str]]) -> list[str]:
    listed = list(docs)
    return [problem for check in CHECKS for problem in check(listed)]


def test_the_checks_find_the_command_lines_they_claim_to() -> None:
    """Guards the readers themselves: if parsing the docs silently found nothing, every check would pass."""
    lines = [
        segment
        for _, text in _repo_docs()
        for code in (parts(text).block_lines + parts(text).spans)
        for segment in segments(code)
        if invocation(segment) is not None
    ]
    keys = {found[0] for segment in lines if (found := invocation(segment)) is not None}
    assert {("ambitctl",), ("ambit-agent",), ("ambit-controller",), ("python", "-m", "bench")} <= keys, keys
    assert len(lines) >= 20, lines
    assert any("bench.soak" in line for line in lines)
    assert _all(_repo_docs()) == []
