"""Raw values from each source — YAML file, environment, flags — with their origin.

Each reader returns ``{key: (raw value, Origin, text)}`` where ``text`` says the raw
value is a string to be parsed (environment, text flags) rather than an already typed
YAML value.  Readers reject unknown keys and malformed input with
:class:`nettracer.errors.ConfigError`; type and range checks happen in
:mod:`nettracer.config.load`, which knows the schema's words for them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from nettracer.config.schema import SCHEMA, SECTIONS, short_repr, shorten
from nettracer.config.settings import Origin
from nettracer.errors import ConfigError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (start-up)
if TYPE_CHECKING:
    import yaml

#: raw values of one source: key -> (value, origin, value is text to parse)
Raw = dict[str, tuple[object, Origin, bool]]

ENV_PREFIX = "NETTRACER_"

#: values that aliases (``*name``) may add to a config file once expanded.  A config
#: of sections and keys never needs many; a "billion laughs" file of 450 bytes
#: (anchors nested 8 deep, each repeated 9 times) expands to 43 million, and every
#: value is checked and described after loading.
MAX_ALIAS_VALUES = 1000
#: largest config file read: a config with every key and its comments is a few KiB,
#: and PyYAML's pure-Python parser (the one that lets aliases be counted) takes
#: 10-25 s per MiB of list items
MAX_FILE_BYTES = 64 << 10


def suggest(path: str) -> str | None:
    """The known key closest to ``path`` (a typo, or a key put in the wrong section)."""
    name = path.rpartition(".")[2]
    same_name = [k for k, key in SCHEMA.items() if key.name == name]
    if same_name:
        return same_name[0]
    import difflib

    close = difflib.get_close_matches(path, list(SCHEMA), n=1, cutoff=0.6)
    if close:
        return close[0]
    by_name = {key.name: k for k, key in SCHEMA.items()}
    close = difflib.get_close_matches(name, list(by_name), n=1, cutoff=0.6)
    return by_name[close[0]] if close else None


def unknown_key(path: str, where: str) -> ConfigError:
    """The error for an unknown key, with the closest known key as a suggestion."""
    hint = suggest(path)
    if hint is not None:
        expected = f"a known key (did you mean {hint}?)"
    else:
        expected = "a known key (see 'nettracer config show')"
    return ConfigError(f"{shorten(path)}: expected {expected}, found an unknown key ({where})")


def unknown_section(section: str, where: str) -> ConfigError:
    import difflib

    close = difflib.get_close_matches(section, list(SECTIONS), n=1, cutoff=0.6)
    if close:
        expected = f"a known section (did you mean {close[0]}?)"
    elif suggest(section) is not None:
        expected = f"a section, not a bare key (did you mean {suggest(section)}?)"
    else:
        expected = "one of the sections " + ", ".join(SECTIONS)
    return ConfigError(
        f"{shorten(section)}: expected {expected}, found an unknown section ({where})"
    )


# -- YAML file ---------------------------------------------------------------------------


def read_file(path: str) -> Raw:
    """Read a YAML file of sections and keys, remembering the line of every key."""
    import yaml

    from nettracer.files import FileTooLarge, NotRegularFile, read_regular

    try:
        text = read_regular(path, MAX_FILE_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path}: expected an existing file, found none (check the --config path)"
        ) from None
    except NotRegularFile as exc:
        raise ConfigError(f"config file {path}: expected a YAML file, found {exc.kind}") from None
    except FileTooLarge as exc:
        raise ConfigError(
            f"config file {path}: expected a YAML file of at most {MAX_FILE_BYTES >> 10} KiB, "
            f"found {exc.size} bytes"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(
            f"config file {path}: expected a readable file, found: {reason}"
        ) from None
    try:
        root = yaml.compose(text, Loader=_alias_bounded_loader())
    except yaml.YAMLError as exc:
        raise _syntax_error(path, exc) from None
    except _AliasError as exc:
        raise ConfigError(f"config file {path}: {exc} (in {path} line {exc.line})") from None
    raw: Raw = {}
    if root is None:
        return raw  # empty file
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(
            f"config file {path}: expected a mapping of sections (network:, drops:, ...), "
            f"found {_node_kind(root)} (in {path} line {root.start_mark.line + 1})"
        )
    constructor = yaml.SafeLoader("")
    seen_sections: dict[str, int] = {}
    for sec_node, body in root.value:
        line = sec_node.start_mark.line + 1
        section = _scalar_key(sec_node, path, "a section name")
        if section in seen_sections:
            raise ConfigError(
                f"{section}: expected each section once, found it again "
                f"(in {path} line {line}, first at line {seen_sections[section]})"
            )
        seen_sections[section] = line
        if section not in SECTIONS:
            raise unknown_section(section, f"in {path} line {line}")
        if isinstance(body, yaml.ScalarNode) and body.tag == "tag:yaml.org,2002:null":
            continue  # "network:" with nothing under it
        if not isinstance(body, yaml.MappingNode):
            raise ConfigError(
                f"{section}: expected a mapping of keys, found {_node_kind(body)} "
                f"(in {path} line {body.start_mark.line + 1})"
            )
        for key_node, value_node in body.value:
            kline = key_node.start_mark.line + 1
            name = _scalar_key(key_node, path, "a key name")
            key = f"{section}.{name}"
            if key not in SCHEMA:
                raise unknown_key(key, f"in {path} line {kline}")
            if key in raw:
                first = raw[key][1].where.rpartition(":")[2]
                raise ConfigError(
                    f"{key}: expected each key once, found it again "
                    f"(in {path} line {kline}, first at line {first})"
                )
            try:
                value = constructor.construct_object(value_node, deep=True)
            except yaml.YAMLError as exc:
                raise _syntax_error(path, exc) from None
            raw[key] = (value, Origin("file", f"{path}:{kline}"), False)
    return raw


class _AliasError(Exception):
    """An alias the config refuses; ``line`` is where it is (1-based)."""

    def __init__(self, message: str, line: int) -> None:
        super().__init__(message)
        self.line = line


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many nodes ``node`` stands for once every alias in it is expanded
    (memoised in ``sizes`` by node identity; the nodes are complete)."""
    import yaml

    stack = [(node, False)]
    while stack:
        n, children_done = stack.pop()
        if id(n) in sizes:
            continue
        if isinstance(n, yaml.ScalarNode):
            sizes[id(n)] = 1
            continue
        kids = [x for pair in n.value for x in pair] if isinstance(n, yaml.MappingNode) else n.value
        if children_done:
            sizes[id(n)] = 1 + sum(sizes[id(k)] for k in kids)
        else:
            stack.append((n, True))
            stack.extend((k, False) for k in kids)
    return sizes[id(node)]


@functools.cache
def _alias_bounded_loader() -> type:
    """``yaml.SafeLoader`` that refuses an alias inside its own anchor, and aliases
    that together add more than :data:`MAX_ALIAS_VALUES` values once expanded
    (counted on the composed nodes, which aliases share: nothing is expanded)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def __init__(self, stream: str) -> None:
            super().__init__(stream)
            self.open_anchors: set[str] = set()
            self.alias_values = 0
            self.sizes: dict[int, int] = {}

        def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
            event = self.peek_event()
            anchor = event.anchor
            line = event.start_mark.line + 1
            if isinstance(event, yaml.AliasEvent):
                if anchor in self.open_anchors:
                    raise _AliasError(
                        f"expected no alias inside its own anchor, found *{anchor}", line
                    )
                if anchor in self.anchors:
                    self.alias_values += _expanded_size(self.anchors[anchor], self.sizes)
                    if self.alias_values > MAX_ALIAS_VALUES:
                        raise _AliasError(
                            f"expected aliases (*name) that add at most {MAX_ALIAS_VALUES} "
                            f"values, found more at *{anchor}",
                            line,
                        )
                return super().compose_node(parent, index)  # type: ignore[no-any-return]
            if anchor is not None:
                self.open_anchors.add(anchor)
            try:
                return super().compose_node(parent, index)  # type: ignore[no-any-return]
            finally:
                self.open_anchors.discard(anchor)

    return Loader


def _scalar_key(node: yaml.Node, path: str, what: str) -> str:
    import yaml

    if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:str":
        found = (
            _node_kind(node) if not isinstance(node, yaml.ScalarNode) else short_repr(node.value)
        )
        raise ConfigError(
            f"config file {path}: expected {what}, found {found} "
            f"(in {path} line {node.start_mark.line + 1})"
        )
    return str(node.value)


def _node_kind(node: yaml.Node) -> str:
    import yaml

    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if node.tag == "tag:yaml.org,2002:null":
        return "nothing (null)"
    return f"the value {short_repr(node.value)}"


def _syntax_error(path: str, exc: yaml.YAMLError) -> ConfigError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    where = f" in {path} line {mark.line + 1} column {mark.column + 1}" if mark else ""
    if problem.startswith("found"):
        problem = f"expected valid YAML, {problem}"
    elif "expected" not in problem:
        problem = f"expected valid YAML, found {problem}"
    tail = f" ({context})" if context else ""
    return ConfigError(f"config file {path}: invalid YAML{where}: {problem}{tail}")


# -- environment -------------------------------------------------------------------------


def read_env(environ: Mapping[str, str]) -> Raw:
    """``NETTRACER_<SECTION>__<KEY>`` variables; others (``NETTRACER_DEBUG``) are not ours."""
    raw: Raw = {}
    for var in sorted(environ):
        if not var.upper().startswith(ENV_PREFIX) or "__" not in var[len(ENV_PREFIX) :]:
            continue
        section, _, name = var[len(ENV_PREFIX) :].partition("__")
        key = f"{section.lower()}.{name.lower()}"
        if key not in SCHEMA:
            raise _unknown_env(key, var)
        raw[key] = (environ[var], Origin("env", var), True)
    return raw


def _unknown_env(key: str, var: str) -> ConfigError:
    hint = suggest(key)
    if hint is not None:
        expected = f"a known key (did you mean {SCHEMA[hint].env_var}?)"
    else:
        expected = "NETTRACER_<SECTION>__<KEY> naming a known key"
    return ConfigError(
        f"{shorten(key)}: expected {expected}, found an unknown key "
        f"(in environment variable {shorten(var)})"
    )


# -- flags -------------------------------------------------------------------------------


def read_flags(overrides: Mapping[str, tuple[object, str]]) -> Raw:
    """``{key: (value, "--flag")}`` from the command line; a value of None was not given."""
    raw: Raw = {}
    for key, (value, flag) in overrides.items():
        if value is None:
            continue
        if key not in SCHEMA:
            raise unknown_key(key, f"from flag {flag}")
        if isinstance(value, tuple):
            value = list(value)
        raw[key] = (value, Origin("flag", flag), isinstance(value, str))
    return raw
