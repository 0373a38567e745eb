"""The docs stay true: every command they show exists with the flags it names, every results
file they cite is in the repository, every module they name (and the code's own prose names)
is where they say, and every table of measured figures names its raw data.

Commands are found in code blocks and inline code of docs/*.md and README.md: ``scout ...``,
``python3 -m ray_scout.cli ...`` (checked against the real parser) and
``python3 bench/<script>.py ...`` (checked against the script's own ``add_argument`` calls,
read from its source so no benchmark is imported).
"""

from __future__ import annotations

import argparse
import ast
import io
import re
import shlex
import tokenize
from functools import cache
from pathlib import Path

import pytest

from ray_scout.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]
COMMAND = re.compile(r"(?<![\w/.-])(scout\s+[a-z]|python3\s+(?:-u\s+)?(?:-m\s+ray_scout\.cli|"
                     r"bench/[\w.]+\.py)\b)")
RESULTS_PATH = re.compile(r"(?:bench|experiments)/results/[\w./<>*{},-]*[\w>*/}]")
# Options whose value is a file the command reads, or (for a benchmark) the raw data it
# wrote and the doc's figures come from: such a file must be committed.
INPUT_OPTIONS = ("--results", "--requests")
RAW_OUTPUT_OPTIONS = ("--out", "--json")


def _code_texts(text: str) -> list[str]:
    """Fenced and indented code lines and inline code spans, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", text)
    pieces, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith("    "):
            pieces.append(re.split(r"\s#\s", line)[0].strip())  # a shell comment is prose
        else:
            pieces += re.findall(r"`([^`]+)`", line)
    return pieces


def doc_commands(path: Path) -> list[str]:
    commands = []
    for piece in _code_texts(path.read_text()):
        for match in COMMAND.finditer(piece):
            command = piece[match.start():]
            command = re.split(r"\s+#|\s*\||\s*;|\s*&&|\s*\)", command)[0]
            commands.append(command.strip())
    return commands


ALL_COMMANDS = sorted({(path.relative_to(REPO).as_posix(), c)
                       for path in DOCS for c in doc_commands(path)})


def _words(command: str) -> list[str]:
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    # Placeholders (`<spec>`, `...`) and optional-argument brackets are the doc's notation.
    return [w.strip("[]") for w in words if "<" not in w and w not in ("...", "…")]


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for action in parser._actions for o in action.option_strings}


def _check_scout(words: list[str]) -> list[str]:
    parser, problems = build_parser(), []
    for word in words:
        if word == "--":  # what follows is another command's (scout net lab-kernel -- ...)
            break
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)),
                   None)
        if sub is not None and not word.startswith("-"):
            if word not in sub.choices:
                return [f"no subcommand {word!r} (known: {', '.join(sub.choices)})"]
            parser = sub.choices[word]
        elif word.startswith("--") and word.split("=")[0] not in _options(parser):
            problems.append(f"{parser.prog} has no option {word.split('=')[0]}")
    return problems


@cache
def _script_arguments(script: Path) -> tuple[set[str], set[str]]:
    """(option strings, subcommand names and positional choices) of a benchmark script,
    including those a helper module beside it adds (``bench/gpu_common.py``)."""
    options, names = set(), set()
    tree = ast.parse(script.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            helper = script.parent / f"{node.module}.py"
            if helper.is_file() and helper != script:
                more_options, more_names = _script_arguments(helper)
                options |= more_options
                names |= more_names
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        strings = [a.value for a in node.args if isinstance(a, ast.Constant)
                   and isinstance(a.value, str)]
        if node.func.attr == "add_argument":
            options.update(s for s in strings if s.startswith("-"))
            for keyword in node.keywords:
                if keyword.arg == "choices" and isinstance(keyword.value, (ast.List, ast.Tuple)):
                    names.update(e.value for e in keyword.value.elts
                                 if isinstance(e, ast.Constant))
        elif node.func.attr == "add_parser":
            names.update(strings[:1])
    return options, names


def _check_bench(words: list[str]) -> list[str]:
    script = REPO / words[0]
    if not script.is_file():
        return [f"{words[0]} does not exist"]
    options, names = _script_arguments(script)
    problems = [f"{words[0]} has no option {w.split('=')[0]}" for w in words[1:]
                if w.startswith("--") and w.split("=")[0] not in options]
    if names and len(words) > 1 and not words[1].startswith("-") and words[1] not in names:
        problems.append(f"{words[0]} has no subcommand {words[1]!r} ({sorted(names)})")
    return problems


def _check_paths(words: list[str], bench: bool) -> list[str]:
    problems = []
    checked = INPUT_OPTIONS + (RAW_OUTPUT_OPTIONS if bench else ())
    for option, value in zip(words, words[1:]):
        if option in checked and not (REPO / value).exists():
            problems.append(f"{option} {value} is not in the repository (a fresh clone "
                            "cannot reproduce the figure)")
    return problems


def check_command(command: str) -> list[str]:
    words = _words(command)
    if words[:3] == ["python3", "-m", "ray_scout.cli"]:
        return _check_scout(words[3:]) + _check_paths(words, bench=False)
    if words[0] == "scout":
        return _check_scout(words[1:]) + _check_paths(words, bench=False)
    words = words[1:] if words[1] != "-u" else words[2:]
    return _check_bench(words) + _check_paths(words, bench=True)


def test_the_docs_show_commands_at_all():
    assert len(ALL_COMMANDS) > 50  # the extractor still finds them


@pytest.mark.parametrize("doc, command", ALL_COMMANDS)
def test_every_command_in_the_docs_exists_with_its_flags(doc, command):
    assert check_command(command) == [], f"{doc}: {command}"


def test_a_wrong_command_is_caught():
    assert check_command("scout run x.yaml --fidelty simulated")
    assert check_command("scout calibrat --n 3")
    assert check_command("python3 bench/testbed_figures.py overhead --results results/x")
    assert check_command("python3 bench/transport_overhead.py --json /tmp/t.json")
    assert check_command("python3 bench/no_such.py")
    assert check_command("python3 bench/links_figures.py goodput --rate 3") != []


def test_every_results_file_a_doc_cites_is_in_the_repository():
    missing = []
    for path in DOCS:
        for cited in set(RESULTS_PATH.findall(path.read_text())):
            pattern = re.sub(r"<[^>]*>", "*", cited)
            head, _, rest = pattern.partition("{")  # `x.{csv,parquet}`: each must exist
            choices, _, tail = rest.partition("}")
            for each in ([head + c + tail for c in choices.split(",")] if rest else [pattern]):
                if not list(REPO.glob(each)):
                    missing.append(f"{path.name}: {cited}")
    assert missing == []


# --- modules named ----------------------------------------------------------------------
# A module by path (`core/llm/wire.py`, `bench/x.py`), a package's folder
# (`ray_scout/core/llm/kvcodec/`) or a dotted name (`core.llm.wire.payload_size_bytes`,
# `ray_scout.net.profiles`), the name after a module included. Paths of `core/`, `actors/`,
# `net/` and `transport/` are the package's, under ray_scout/; `experiments/` at the root is
# the specs' folder, so the package's modules there are `ray_scout/experiments/...`. Other
# folders are left alone: the docs name some that a run makes (`experiments/submitted/`).
MODULE_PATH = re.compile(r"(?<![\w./<-])((?:ray_scout|core|actors|net|transport|experiments|bench"
                         r"|tests|scripts)/[\w/]*\w\.py\b|(?:ray_scout|core|actors|transport)"
                         r"/(?:\w+/)+)")
MODULE_NAME = re.compile(r"(?<![\w./-])((?:ray_scout\.)?(?:core|actors|net|transport|experiments)"
                         r"(?:\.[A-Za-z_]\w*)+)")
# In the code only names of the package are checked, and in the tests only their docstrings
# and comments: there `net.`, `bench/` and the like also name local variables, and a test
# names modules that do not exist on purpose.
CODE_MODULE_PATH = re.compile(r"(?<![\w./<-])((?:ray_scout|core)/[\w/]*\w\.py)\b")
CODE_MODULE_NAME = re.compile(r"(?<![\w./-])((?:ray_scout|core)(?:\.[A-Za-z_]\w*)+)")
CODE = sorted((REPO / "ray_scout").rglob("*.py")) + sorted((REPO / "bench").glob("*.py"))
TESTS = sorted((REPO / "tests").glob("*.py"))


def prose(source: str) -> str:
    """The comments and docstrings of ``source``, each on its own line; other lines blank."""
    lines = [""] * len(source.splitlines())
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            lines[token.start[0] - 1] = token.string
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) \
                and ast.get_docstring(node) is not None:
            doc = node.body[0]
            for row in range(doc.lineno, doc.end_lineno + 1):
                lines[row - 1] = source.splitlines()[row - 1]
    return "\n".join(lines)


def _top_level_names(body: list[ast.stmt]) -> dict[str, ast.AST]:
    names: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update((n.id, node) for t in targets for n in ast.walk(t)
                         if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update(((a.asname or a.name).split(".")[0], node) for a in node.names)
        elif isinstance(node, (ast.If, ast.Try, ast.With)):  # TYPE_CHECKING, optional imports
            for block in ("body", "orelse", "handlers", "finalbody"):
                for inner in getattr(node, block, []):
                    names.update(_top_level_names(getattr(inner, "body", [inner])
                                                  if isinstance(inner, ast.ExceptHandler)
                                                  else [inner]))
    return names


@cache
def _defined(module: Path) -> dict[str, ast.AST]:
    return _top_level_names(ast.parse(module.read_text()).body)


def check_module_name(name: str) -> str | None:
    """Why ``name`` (dotted) names nothing in the package, or None where it does."""
    parts = name.split(".")
    parts = parts if parts[0] == "ray_scout" else ["ray_scout", *parts]
    for i in range(len(parts), 1, -1):
        base = REPO.joinpath(*parts[:i])
        module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else (
            base / "__init__.py")
        if not module.is_file():
            continue
        rest = parts[i:]
        if not rest:
            return None
        defined = _defined(module)
        if rest[0] not in defined:
            return f"{module.relative_to(REPO)} defines no {rest[0]}"
        node = defined[rest[0]]
        if len(rest) > 1 and isinstance(node, ast.ClassDef) and rest[1] not in \
                _top_level_names(node.body):
            return f"{module.relative_to(REPO)}: {rest[0]} has no {rest[1]}"
        return None
    return "no such module"


def check_module_path(path: str) -> str | None:
    """Why ``path`` names no file or folder of the repository, or None where it does."""
    root = path.split("/")[0]
    where = REPO / path if root in ("ray_scout", "experiments", "bench", "tests", "scripts") \
        else REPO / "ray_scout" / path
    return None if where.exists() else f"{where.relative_to(REPO)} does not exist"


def stale_module_references(text: str, names: re.Pattern, paths: re.Pattern) -> list[str]:
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        for name in names.findall(line):
            if (why := check_module_name(name)) is not None:
                problems.append(f"{number}: {name}: {why}")
        for path in paths.findall(line):
            if (why := check_module_path(path)) is not None:
                problems.append(f"{number}: {path}: {why}")
    return problems


def test_every_module_the_docs_name_exists():
    """One hop from the README to any concept: a module the docs name is where they say."""
    stale = [f"{path.name}:{p}" for path in DOCS
             for p in stale_module_references(path.read_text(), MODULE_NAME, MODULE_PATH)]
    assert stale == [], "\n".join(stale)


def test_every_module_the_code_names_in_its_prose_exists():
    """Docstrings, comments and messages point at the package's modules as they are now (a
    module that moved leaves no old path behind)."""
    texts = [(path, path.read_text()) for path in CODE] + [
        (path, prose(path.read_text())) for path in TESTS]
    stale = [f"{path.relative_to(REPO)}:{p}" for path, text in texts
             for p in stale_module_references(text, CODE_MODULE_NAME, CODE_MODULE_PATH)]
    assert stale == [], "\n".join(stale)


@pytest.mark.parametrize("text", [
    "`core/pipeline.py`", "`core.metrics.paired_test`", "(``core.allocation.delivered_ratio``)",
    "`experiments/plan.py`", "`core.llm.wire.no_such_function`", "`ray_scout/core/nowhere/`",
    "`core.stages.full.FullEdge.no_such_method`", "`actors/compute.py`",
])
def test_a_stale_module_reference_is_caught(text):
    assert stale_module_references(text, MODULE_NAME, MODULE_PATH)


def test_a_module_reference_that_holds_passes():
    text = ("`core.llm.wire.payload_size_bytes`, `ray_scout/core/llm/kvcodec/`, "
            "`core.stages.full.FullEdge.handle`, `ray_scout.net.profiles`, `bench/codec_cpu.py`, "
            "`experiments/demo.yaml`, `net/ipv4/ip_forward`")
    assert stale_module_references(text, MODULE_NAME, MODULE_PATH) == []


# --- figure tables ----------------------------------------------------------------------
RAW = re.compile(r"(?:bench|experiments)/results/|\.(?:json|csv|log|txt|jsonl)\b")
MEASURED = re.compile(r"(?<![\w.])\d+\.\d+\s*(?:%|ms|s|x|Mbit/s|Gbit/s|GB/s|MB/s|MB|kB)?"
                      r"(?![\w.])")


def figure_tables(text: str) -> list[tuple[int, str]]:
    """(first line, header) of each Markdown table under a heading of measured figures
    whose body holds decimal numbers."""
    lines, tables, section = text.splitlines(), [], ""
    i = 0
    while i < len(lines):
        if lines[i].startswith("#"):
            section = lines[i]
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|-"):
            start = i
            while i < len(lines) and lines[i].startswith("|"):
                i += 1
            body = "\n".join(lines[start + 2:i])
            if len(MEASURED.findall(body)) >= 2:
                tables.append((start, section))
            continue
        i += 1
    return tables


def _figure_tables_without_raw_data(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    missing = []
    for start, section in figure_tables(path.read_text()):
        # The raw file is named in the table's section: from the level-2 heading above it
        # to the table's last line.
        head = max((j for j in range(start) if lines[j].startswith("## ")), default=0)
        end = start
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        if not RAW.search("\n".join(lines[head:end])):
            missing.append(f"{path.name}:{start + 1} ({section.strip('# ')}): {lines[start]}")
    return missing


def test_every_table_of_measured_figures_names_its_raw_data():
    missing = [m for path in DOCS for m in _figure_tables_without_raw_data(path)]
    assert missing == [], "\n".join(missing)
