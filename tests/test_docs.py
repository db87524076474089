"""The docs check: every command in README.md and docs/*.md names something that exists, so none goes stale.

No service is needed. Each simple command of a fenced shell block (pipelines and `$(...)` split into their
commands, continuation lines joined, comments dropped), and each inline code span that starts with `make ` or
`python`, is checked by what it runs:

- `make X`: X is a target of the Makefile; `VAR=value` arguments are variables of the Makefile.
- `make run DEPLOYMENT=flow/name PARAMS="k=v ..."` and `python -m deployments.start_run flow/name k=v ...`: the
  deployment is in prefect.yaml, and the parameters validate against that flow's parameter schema as the server
  validates them; a name the flow does not have fails.
- `python -m pkg.mod [subcommand] --option ...` (or `python script.py ...`): the same with `--help` in place of
  the rest exits 0 and shows every `--option` used; `python3 -c CODE` compiles; a `.py` argument exists.
- `curl ... $API/path`: the path and method exist in the Prefect server's OpenAPI, and the JSON body validates
  against its request schema (the parameters of a `create_flow_run` against the deployment fetched before it).
- `NAME=value cmd` and `export NAME=value`: NAME is read by the project's settings (or is a Prefect setting),
  and the value is accepted.

Python blocks compile, their imports resolve and their `run_deployment` calls validate like `make run`; YAML
blocks' deployment steps import. Links between the pages point at existing files and headings. A block or a
command this check cannot verify is listed below with its reason.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
PYTHONS = {".venv/bin/python", "python", "python3"}

# Fenced blocks that hold no command of this project, by language, with the reason they are not checked.
NOT_CHECKED_BLOCKS = {
    "nginx": "configuration of another server (a reverse proxy over the shared files), shown for reference",
}
# Programs a shell block may run that this check cannot verify, with the reason. Keep it tiny.
NOT_CHECKED_PROGRAMS: dict[str, str] = {}
# Names the docs use ahead of the changes that add them, merged separately: each case naming one is an expected
# failure (strict: as soon as the name exists the case passes, fails the suite, and its entry must go).
# Options put before `--help` of a module: pytest configures the session to print its help, which would start
# the suite's services through tests/conftest.py.
HELP_OPTIONS = {"pytest": ["--noconftest"]}
PUNCTUATION = {"|", "||", "&&", ";", "&", "(", ")"}
REDIRECTIONS = {"<", ">", ">>", "2>", "2>&1"}
IDENTIFIER = re.compile(r"^[a-z][a-z0-9_-]*$")
ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.S)


# ---------------------------------------------------------------------------------------------- reading the docs


@dataclass
class Block:
    path: Path
    line: int
    language: str
    text: str


@dataclass
class Command:
    """One simple command: its words, where it is, and what the block defined before it."""

    path: Path
    line: int
    words: list[str]
    context: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def fenced_blocks(path: Path) -> Iterator[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    inside, start, language, body = False, 0, "", []
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            if not inside:
                inside, start, language, body = True, number, line[3:].strip(), []
            else:
                inside = False
                yield Block(path, start, language, "\n".join(body))
        elif inside:
            body.append(line)
    assert not inside, f"{path.relative_to(ROOT)}:{start}: a fenced block is not closed"


def prose(path: Path) -> str:
    """The file's text with its fenced blocks blanked (line numbers kept)."""
    out, inside = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            inside = not inside
            out.append("")
        else:
            out.append("" if inside else line)
    return "\n".join(out)


def logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """Lines with their continuations (a trailing backslash) joined, numbered from 0 by their first line."""
    pending, first = "", 0
    for offset, line in enumerate(text.splitlines()):
        if not pending:
            first = offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield first, pending + line
        pending = ""
    if pending:
        yield first, pending


def simple_commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line: pipelines, lists and `$(...)` split, redirections dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands: list[list[str]] = [[]]
    tokens = list(lexer)
    skip_next = False
    for token in tokens:
        if skip_next:
            skip_next = False
        elif token in PUNCTUATION:
            commands.append([])
        elif token in REDIRECTIONS:
            skip_next = True
        elif token.endswith("=$"):  # NAME=$(...): a shell variable set from a command substitution
            commands[-1].append(token[:-1])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def shell_commands() -> list[Command]:
    found = []
    for path in DOC_FILES:
        for block in fenced_blocks(path):
            if block.language not in SHELL_LANGUAGES:
                continue
            deployment = None  # the deployment the block fetched last ($DEP of a later create_flow_run)
            for offset, line in logical_lines(block.text):
                for words in simple_commands(line):
                    for word in words:
                        if words[0] == "curl" and "/deployments/name/" in word:
                            deployment = "/".join(word.split("/deployments/name/")[1].split("/")[:2])
                    found.append(Command(path, block.line + 1 + offset, words, {"deployment": deployment}))
    return found


def inline_commands() -> list[Command]:
    found = []
    for path in DOC_FILES:
        text = prose(path)
        for match in re.finditer(r"`([^`]+)`", text):
            span = " ".join(match.group(1).split())
            if re.match(r"^(make [a-z]|(\.venv/bin/)?python3? (-m [a-z]|[\w/]+\.py))", span):
                line = text.count("\n", 0, match.start()) + 1
                for words in simple_commands(span):
                    found.append(Command(path, line, words, {}))
    return found


def links() -> list[tuple[Path, int, str]]:
    found = []
    for path in DOC_FILES:
        text = prose(path)
        for match in re.finditer(r"\[[^\]]*\]\(([^)\s]+)\)", text):
            target = match.group(1)
            if not re.match(r"^[a-z]+:", target):
                found.append((path, text.count("\n", 0, match.start()) + 1, target))
    return found


def other_blocks() -> list[Block]:
    return [b for path in DOC_FILES for b in fenced_blocks(path) if b.language not in SHELL_LANGUAGES]


# --------------------------------------------------------------------------------------- what the commands name


@cache
def makefile() -> tuple[set[str], set[str]]:
    """The Makefile's targets and variables."""
    text = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.M))
    variables = set(re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)\s*[?:+]?=", text, re.M))
    variables |= set(re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", text))  # used by a recipe: given on the command line
    return targets, variables


@cache
def makefile_default(variable: str) -> str:
    match = re.search(rf"^{variable}\s*\??=\s*(.*)$", (ROOT / "Makefile").read_text(), re.M)
    return match.group(1).strip() if match else ""


@cache
def deployments() -> dict[str, str]:
    """`flow-name/deployment-name` -> the flow's entrypoint, from prefect.yaml."""
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return {f"{flow(d['entrypoint']).name}/{d['name']}": d["entrypoint"] for d in spec["deployments"]}


@cache
def flow(entrypoint: str):
    from prefect.flows import load_flow_from_entrypoint

    return load_flow_from_entrypoint(str(ROOT / entrypoint))


@cache
def openapi() -> dict:
    """The Prefect server's OpenAPI: served by the session's server when one runs on this machine (the suite's,
    tests/conftest.py), else built here (`--noconftest`), which imports the whole server (~6 s of CPU)."""
    api = os.environ.get("PREFECT_API_URL", "")
    if re.match(r"^http://(127\.0\.0\.1|localhost)(:\d+)?/api$", api):
        import httpx

        try:
            served = httpx.get(f"{api}/openapi.json", timeout=60)
            if served.status_code == 200:
                return {key: value for key, value in served.json().items() if key != "servers"}  # the mount, /api
        except httpx.HTTPError:
            pass
    from prefect.server.api.server import create_api_app

    return create_api_app().openapi()


def help_key(words: list[str]) -> tuple[str, ...]:
    """`python -m module ...` or `python script.py ...` -> what `--help` is asked of: `-m` and the module, or the
    script, then the subcommand words."""
    module_at = words.index("-m") + 1 if "-m" in words else 1
    key = ["-m", words[module_at]] if "-m" in words else [words[module_at]]
    for word in words[module_at + 1:]:
        if not IDENTIFIER.match(word):
            break
        key.append(word)
    return tuple(key)


@cache
def help_text(key: tuple[str, ...]) -> str:
    """What `python <key> --help` prints (asked by `_help_texts` for every command at once, else here)."""
    if key in _HELP_TEXTS:
        code, stdout, stderr = _HELP_TEXTS[key]
    else:
        extra = HELP_OPTIONS.get(key[key[0] == "-m"], [])
        result = subprocess.run(
            [sys.executable, *key, *extra, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300,
            env={**os.environ, "COLUMNS": "200"},
        )
        code, stdout, stderr = result.returncode, result.stdout, result.stderr
    assert code == 0, f"`python {' '.join(key)} --help` exited {code}: {stderr[-800:]}"
    return stdout


def shows_option(help_output: str, option: str) -> bool:
    """The option appears whole in a help text (`--idempotency` is not `--idempotency-key`)."""
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", help_output) is not None


def check_parameters(deployment: str, parameters: dict, where: str) -> None:
    """The deployment exists and the server would accept these parameters (and the flow has every name)."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    assert deployment in deployments(), (
        f"{where}: no deployment {deployment!r} in prefect.yaml ({', '.join(sorted(deployments()))})"
    )
    the_flow = flow(deployments()[deployment])
    schema = parameter_schema(the_flow).model_dump_for_openapi()
    unknown = sorted(set(parameters) - set(schema["properties"]))
    assert not unknown, f"{where}: {deployment} has no parameter {', '.join(unknown)}"
    try:
        validate(parameters, schema, raise_on_error=True)
    except ValidationError as exc:
        pytest.fail(f"{where}: {deployment} refuses {parameters}: {exc}")
    the_flow.validate_parameters(parameters)


def check_start_run(arguments: list[str], where: str) -> None:
    """`deployments.start_run`'s arguments: FLOW/DEPLOYMENT, KEY=VALUE pairs and its options."""
    from deployments.start_run import parse_parameters

    positional, parameters_json, at = [], None, 0
    options = help_text(("-m", "deployments.start_run"))
    while at < len(arguments):
        word = arguments[at]
        if word.startswith("--"):
            name, _, inline = word.partition("=")
            assert shows_option(options, name), f"{where}: start_run has no option {name}"
            value = inline or arguments[at + 1]
            at += 0 if inline else 1
            if name == "--parameters":
                parameters_json = value
        else:
            positional.append(word)
        at += 1
    assert positional, f"{where}: start_run needs FLOW/DEPLOYMENT"
    check_parameters(positional[0], parse_parameters(positional[1:], parameters_json), where)


def check_make(command: Command) -> None:
    targets, variables = makefile()
    assignments = dict(ASSIGNMENT.match(w).groups() for w in command.words[1:] if ASSIGNMENT.match(w))
    goals = [w for w in command.words[1:] if not ASSIGNMENT.match(w)]
    assert goals, f"{command.where}: name the make target"
    for goal in goals:
        assert goal in targets, f"{command.where}: the Makefile has no target {goal!r}"
    for name in assignments:
        assert name in variables, f"{command.where}: {name} is no variable of the Makefile"
    if "run" in goals:
        deployment = assignments.get("DEPLOYMENT", makefile_default("DEPLOYMENT"))
        check_start_run([deployment, *shlex.split(assignments.get("PARAMS", ""))], command.where)


def check_python(command: Command) -> None:
    words = command.words
    if "-c" in words:
        compile(words[words.index("-c") + 1], command.where, "exec")
        return
    if "-m" not in words:
        assert len(words) > 1 and words[1].endswith(".py"), f"{command.where}: run `python -m module` or a script"
        assert (ROOT / words[1]).is_file(), f"{command.where}: no script {words[1]}"
    key = help_key(words)
    text = help_text(key)
    arguments = words[words.index("-m") + 2:] if "-m" in words else words[2:]
    for word in arguments:
        if word.startswith("--"):
            option = word.partition("=")[0]
            assert shows_option(text, option), f"{command.where}: `python {' '.join(key)} --help` shows no {option}"
        elif word.endswith(".py"):
            assert (ROOT / word.split("::")[0]).exists(), f"{command.where}: no file {word}"
    if key[:2] == ("-m", "deployments.start_run"):
        check_start_run(arguments, command.where)


def openapi_operation(method: str, url: str, where: str) -> dict:
    path = re.sub(r"^(\$\{?API\}?|https?://[^/]+/api)", "", url).split("?")[0]
    assert path.startswith("/"), f"{where}: curl URL {url!r} is not under $API"
    wanted = path.strip("/").split("/")
    matches = []  # (literal segments matched, template): /artifacts/filter before /artifacts/{id}
    for template in openapi()["paths"]:
        parts = template.strip("/").split("/")
        if len(parts) == len(wanted) and all(
            p.startswith("{") or (p == w and not w.startswith(("$", "<"))) for p, w in zip(parts, wanted)
        ):
            matches.append((sum(not p.startswith("{") for p in parts), template))
    assert matches, f"{where}: the Prefect API has no path {path}"
    template = max(matches)[1]
    operations = openapi()["paths"][template]
    assert method.lower() in operations, f"{where}: {template} has no {method} ({sorted(operations)})"
    return operations[method.lower()]


def check_curl(command: Command) -> None:
    import jsonschema

    words, method, body, url, at = command.words[1:], None, None, None, 0
    while at < len(words):
        word = words[at]
        if word in ("-X", "--request"):
            method, at = words[at + 1], at + 1
        elif word in ("-d", "--data", "--data-raw"):
            body, at = words[at + 1], at + 1
        elif word in ("-H", "--header", "-u", "--user"):
            at += 1
        elif not word.startswith("-"):
            url = word
        at += 1
    assert url, f"{command.where}: curl without a URL"
    method = method or ("POST" if body is not None else "GET")
    operation = openapi_operation(method, url, command.where)
    if body is None:
        return
    document = json.loads(body)
    reference = operation["requestBody"]["content"]["application/json"]["schema"]
    schema = {**reference, "components": openapi()["components"]}
    target = openapi()["components"]["schemas"][reference["$ref"].rsplit("/", 1)[1]]
    unknown = sorted(set(document) - set(target.get("properties", {})))
    assert not unknown, f"{command.where}: the request body has no field {', '.join(unknown)}"
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(document), key=str)
    assert not errors, f"{command.where}: the request body is refused: {errors[0].message}"
    if url.rstrip("/").endswith("/create_flow_run"):
        assert command.context.get("deployment"), f"{command.where}: no deployment fetched before create_flow_run"
        check_parameters(command.context["deployment"], document.get("parameters", {}), command.where)


def check_settings(assignments: dict[str, str], where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each name is read by the project's settings (a probe value changes them or is refused) or is one of
    Prefect's settings; the documented values, placeholders aside, are accepted together."""
    import prefect.settings
    from pydantic import ValidationError

    from operations.settings import Settings

    with tempfile.TemporaryDirectory() as no_env_file:
        monkeypatch.chdir(no_env_file)  # the settings read `.env` from the working directory: none here
        baseline = Settings().model_dump()
        for name in assignments:
            if name.startswith("PREFECT_"):
                assert hasattr(prefect.settings, name), f"{where}: {name} is no Prefect setting"
                continue
            with monkeypatch.context() as env:
                env.setenv(name, "__docs_check__")
                try:
                    read = Settings().model_dump() != baseline
                except ValidationError:
                    read = True
            assert read, f"{where}: the project's settings do not read {name}"
        with monkeypatch.context() as env:
            for name, value in assignments.items():
                if not name.startswith("PREFECT_") and "..." not in value and "<" not in value:
                    env.setenv(name, value)
            try:
                Settings()
            except ValidationError as exc:
                pytest.fail(f"{where}: the settings refuse {assignments}: {exc}")
        monkeypatch.chdir(ROOT)


def check_command(command: Command, monkeypatch: pytest.MonkeyPatch) -> None:
    words = list(command.words)
    assignments: dict[str, str] = {}
    while words and ASSIGNMENT.match(words[0]):
        name, value = ASSIGNMENT.match(words.pop(0)).groups()
        assignments[name] = value
    if not words:  # NAME=value alone: a shell variable of the example (API, DEP, RUN)
        return
    if words[0] == "export":
        assignments.update(ASSIGNMENT.match(w).groups() for w in words[1:] if ASSIGNMENT.match(w))
        words = []
    if assignments:
        check_settings(assignments, command.where, monkeypatch)
    if not words:
        return
    program, command = words[0], Command(command.path, command.line, words, command.context)
    if program == "make":
        check_make(command)
    elif program in PYTHONS:
        check_python(command)
    elif program == "curl":
        check_curl(command)
    elif program not in NOT_CHECKED_PROGRAMS:
        pytest.fail(f"{command.where}: no check for `{program}`: add one, or list it in NOT_CHECKED_PROGRAMS with why")


# -------------------------------------------------------------------------------------------------- the cases


def _case(subject: str, value, id_: str):
    return pytest.param(value, id=id_)


SHELL = shell_commands()
INLINE = inline_commands()
LINKS = links()
BLOCKS = other_blocks()


# Runs `--help` of each command given (JSON: [[argv...], ...]) in a fork of one Python that has imported what
# most of them import, so that Prefect and its dependencies load once instead of once per command; each fork runs
# the module or script as `python ...` would (`__main__`, its own argv) and writes its output and exit status to
# files of the folder given.
_HELP_IN_FORKS = r"""
import json, os, runpy, sys, traceback
import prefect, prefect.cli, prefect.client.orchestration, prefect.flows, sqlalchemy  # noqa: E401,F401
folder, commands = sys.argv[1], json.loads(sys.argv[2])
for i, argv in enumerate(commands):
    pid = os.fork()
    if pid == 0:
        out = os.open(os.path.join(folder, f"{i}.out"), os.O_WRONLY | os.O_CREAT)
        err = os.open(os.path.join(folder, f"{i}.err"), os.O_WRONLY | os.O_CREAT)
        os.dup2(out, 1)
        os.dup2(err, 2)
        code = 0
        try:
            if argv[0] == "-m":
                sys.argv = [argv[1], *argv[2:]]
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = list(argv)
                sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
                runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as exc:
            if isinstance(exc.code, int) or exc.code is None:
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    with open(os.path.join(folder, f"{i}.code"), "w") as handle:
        handle.write(str(os.waitstatus_to_exitcode(status)))
"""


def _help_in_forks(keys: list[tuple[str, ...]]) -> None:
    """`help_text` of every key at once (`_HELP_IN_FORKS`): one Python start-up instead of one per key. A key
    whose fork did not answer is left to `help_text`'s own process."""
    commands = [[*key, *HELP_OPTIONS.get(key[key[0] == "-m"], []), "--help"] for key in keys]
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run([sys.executable, "-c", _HELP_IN_FORKS, folder, json.dumps(commands)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
        for i, key in enumerate(keys):
            try:
                code = int(Path(folder, f"{i}.code").read_text())
                stdout = Path(folder, f"{i}.out").read_text()
                stderr = Path(folder, f"{i}.err").read_text()
            except (OSError, ValueError):
                continue
            _HELP_TEXTS[key] = (code, stdout, stderr)


_HELP_TEXTS: dict[tuple[str, ...], tuple[int, str, str]] = {}  # key -> (exit status, stdout, stderr)


@pytest.fixture(scope="module", autouse=True)
def _help_texts() -> None:
    """Every `--help` the commands need, asked once in forks of one Python (`_help_in_forks`)."""
    keys = {help_key(c.words) for c in SHELL + INLINE if c.words[0] in PYTHONS and "-c" not in c.words}
    keys = {key for key in keys if key[0] == "-m" or (ROOT / key[0]).is_file()}
    keys.add(("-m", "deployments.start_run"))
    _help_in_forks(sorted(keys))


def test_the_docs_have_commands() -> None:
    assert len(SHELL) > 40 and any(c.words[0] == "curl" for c in SHELL) and any(c.words[0] == "make" for c in SHELL)
    assert {p.name for p in DOC_FILES} >= {"README.md", "operations.md", "benchmarks.md", "tests.md"}


def test_the_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 350, f"README.md has {lines} lines (at most 350: the rest goes to docs/)"


@pytest.mark.parametrize(
    "command", [_case(" ".join(c.words), c, f"{c.where} {' '.join(c.words)[:60]}") for c in SHELL]
)
def test_shell_command(command: Command, monkeypatch: pytest.MonkeyPatch) -> None:
    check_command(command, monkeypatch)


@pytest.mark.parametrize(
    "command", [_case(" ".join(c.words), c, f"{c.where} {' '.join(c.words)[:60]}") for c in INLINE]
)
def test_inline_command(command: Command, monkeypatch: pytest.MonkeyPatch) -> None:
    check_command(command, monkeypatch)


@pytest.mark.parametrize(
    "link", [_case(t, (p, n, t), f"{p.relative_to(ROOT)}:{n} {t}") for p, n, t in LINKS]
)
def test_link(link: tuple[Path, int, str]) -> None:
    path, line, target = link
    file_part, _, anchor = target.partition("#")
    destination = (path.parent / file_part).resolve() if file_part else path
    assert destination.exists(), f"{path.relative_to(ROOT)}:{line}: {target} names no file"
    if anchor:
        headings = re.findall(r"^#+\s+(.*)$", prose(destination), re.M)
        slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
        assert anchor in slugs, f"{path.relative_to(ROOT)}:{line}: {destination.name} has no heading #{anchor}"


@pytest.mark.parametrize(
    "block", [_case(b.text, b, f"{b.path.relative_to(ROOT)}:{b.line} {b.language}") for b in BLOCKS]
)
def test_block(block: Block) -> None:
    where = f"{block.path.relative_to(ROOT)}:{block.line}"
    if block.language in NOT_CHECKED_BLOCKS:
        return
    if block.language == "python":
        tree = ast.parse(block.text, where)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{where}: {node.module} has no {alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    importlib.import_module(alias.name)
            elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "run_deployment":
                keywords = {k.arg: k.value for k in node.keywords}
                parameters = ast.literal_eval(keywords["parameters"]) if "parameters" in keywords else {}
                check_parameters(ast.literal_eval(node.args[0]), parameters, where)
    elif block.language == "yaml":
        spec = yaml.safe_load(block.text)
        for section in ("build", "push", "pull"):
            for step in spec.get(section) or []:
                for dotted in step:
                    module, _, name = dotted.rpartition(".")
                    assert hasattr(importlib.import_module(module), name), f"{where}: no step {dotted}"
    else:
        pytest.fail(f"{where}: a ```{block.language or '(no language)'} block: tag it bash, python or yaml, "
                    "or list its language in NOT_CHECKED_BLOCKS with why")


STALE = [
    ("make deploy", "no target"),
    ("make run DEPLOYMENT=generate-games/on-demand PARAMS=\"quantiy=100\"", "no parameter quantiy"),
    ("make run DEPLOYMENT=generate-games/on-demand PARAMS=\"quantity=0\"", "refuses"),
    ("make run DEPLOYMENT=generate-games/nightly", "no deployment"),
    ("make run DEPLOYMENT=sync-marketplace/on-demand PARAMS=\"resources=everything\"", "refuses"),
    ("make up FOO=1", "no variable"),
    (".venv/bin/python -m deployments.start_run cleanup-runs/on-demand dry_run=true --idempotency k",
     "shows no --idempotency"),
    (".venv/bin/python -m benchmarks.run --skip-everything", "shows no --skip-everything"),
    (".venv/bin/python -m deployments.dealers load dealers.csv --replace", "shows no --replace"),
    ("curl -s -X DELETE $API/deployments/name/generate-games/on-demand", "has no DELETE"),
    ("curl -s $API/flow_runs/$RUN/progress", "no path"),
    ("curl -s -X POST $API/deployments/$DEP/create_flow_run -d '{\"parameters\": {}, \"idempotency\": \"k\"}'",
     "no field idempotency"),
    ("curl -s -X POST $API/artifacts/filter -d '{\"artifacts\": {\"key\": {\"starts_with\": \"games\"}}}'", "refused"),
    ("export NOT_A_SETTING_OF_THIS_PROJECT=1", "do not read"),
    ("GAMES_CONCURRENCY_LIMIT=many make up", "refuse"),
    ("export PREFECT_API_URLS=http://127.0.0.1:4200/api", "no Prefect setting"),
    ("redis-cli XLEN products.staged", "no check for `redis-cli`"),
    (".venv/bin/python tests/no_such_tool.py --check", "no script"),
    (".venv/bin/python -m pytest tests/test_no_such_module.py -q", "no file"),
]


@pytest.mark.parametrize(("line", "message"), STALE, ids=[line[:60] for line, _ in STALE])
def test_the_check_refuses_stale_commands(line: str, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    [words] = simple_commands(line)
    command = Command(ROOT / "README.md", 1, words, {"deployment": "generate-games/on-demand"})
    with pytest.raises((AssertionError, pytest.fail.Exception)) as refused:
        check_command(command, monkeypatch)
    assert message in str(refused.value)


def test_the_check_refuses_broken_links_and_blocks(tmp_path: Path) -> None:
    page = ROOT / "docs" / "operations.md"
    with pytest.raises(AssertionError, match="names no file"):
        test_link((page, 1, "missing.md"))
    with pytest.raises(AssertionError, match="has no heading"):
        test_link((page, 1, "benchmarks.md#no-such-heading"))
    with pytest.raises(pytest.fail.Exception, match="block"):
        test_block(Block(page, 1, "", "redis-cli PING"))
    with pytest.raises(AssertionError, match="has no parameter quantiy"):
        test_block(Block(page, 1, "python", 'run_deployment("generate-games/on-demand", parameters={"quantiy": 1})'))
