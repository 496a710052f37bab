"""The README and docs/: the README stays short, every `gptctl` command line in a ```bash block names a
real command and real options, and every relative link resolves. Imports only the CLI (no torch, no network)."""

import re
import shlex
from pathlib import Path

import typer

from gptctl.cli import app, kebab_args

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_LIMIT = 12 * 1024

_SEPARATORS = {"|", "||", "&&", ";", "&"}
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def bash_lines(text: str) -> list[str]:
    """The logical lines of every ```bash block, continuation lines (ending in a backslash) joined."""
    lines, block, pending = [], False, ""
    for line in text.splitlines():
        if line.startswith("```"):
            block = line.strip() == "```bash" if not block else False
            continue
        if not block:
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    return lines


def invocations(line: str) -> list[list[str]]:
    """The arguments after `gptctl` of each invocation on a shell line (comments, pipes and `&&` cut it)."""
    lexer = shlex.shlex(line, posix=False)  # keeps the quotes: a quoted "--x" is a value, never an option
    lexer.whitespace_split, lexer.commenters = True, "#"
    try:
        tokens = list(lexer)
    except ValueError:
        tokens = line.split()
    segments, current, depth = [], [], 0
    for token in tokens:
        if token in _SEPARATORS and depth == 0:
            segments.append(current)
            current = []
            continue
        depth += token.count("[") - token.count("]")
        if token in _SEPARATORS:  # `[--run RUN | --all]`: alternatives, not a pipe
            continue
        current.append(token.strip("[]"))
    segments.append(current)
    out = []
    for segment in segments:
        for i, token in enumerate(segment):
            if token == "gptctl" or token.endswith("/gptctl"):
                out.append([t for t in segment[i + 1:] if t])
                break
    return out


def _is_group(command) -> bool:
    return hasattr(command, "list_commands")


def _params(command) -> list:
    return [p for p in command.get_params(typer.Context(command)) if p.param_type_name == "option"]


def _option_names(command) -> set[str]:
    names = set()
    for param in _params(command):
        names.update(param.opts)
        names.update(param.secondary_opts)
    return names


def _is_option(token: str) -> bool:
    return token.startswith("-") and token not in ("-", "--") and not re.match(r"^-[\d.]", token)


def problems(args: list[str]) -> list[str]:
    """What is wrong with `gptctl ARGS`: an unknown command or an option its command does not take."""
    args = kebab_args(args)  # the snake_case aliases and the old scripts' flags, as the CLI rewrites them
    root = typer.main.get_command(app)
    command, path, found = root, ["gptctl"], []
    index = 0
    while _is_group(command):
        # options of the group itself (`--home DIR`, `--help`) come before its command's name
        while index < len(args) and _is_option(args[index]):
            name = args[index].split("=", 1)[0]
            if name not in _option_names(command):
                return [f"{' '.join(path)}: no option {name}"]
            option = next(p for p in _params(command) if name in p.opts + p.secondary_opts)
            index += 1 if option.is_flag or "=" in args[index] else 2
        if index >= len(args):
            return found
        name = args[index]
        if name in ("...", "…"):
            return found
        sub = command.get_command(typer.Context(command), name)
        if sub is None:
            return [f"{' '.join(path)}: no command {name!r}"]
        command, index = sub, index + 1
        path.append(name)
    options = {name: param for param in _params(command) for name in param.opts + param.secondary_opts}
    rest = args[index:]
    while rest:
        token, rest = rest[0], rest[1:]
        if token == "--":  # what follows belongs to no gptctl option
            break
        if _is_option(token):
            name = token.split("=", 1)[0]
            if name not in options:
                found.append(f"{' '.join(path)}: no option {name}")
            elif not options[name].is_flag and "=" not in token:
                rest = rest[max(options[name].nargs, 1):]  # its value, whatever it looks like
    return found


def test_readme_is_short():
    size = README.stat().st_size
    assert size <= README_LIMIT, f"README.md is {size} bytes; move detail into docs/ (limit {README_LIMIT})"


def test_the_checker_rejects_what_is_wrong():
    def check(line):
        return [p for args in invocations(line) for p in problems(args)]

    assert check("gptctl pretrain --no-such-option 3")
    assert check("gptctl pretrain --max-stepz 3")
    assert check("gptctl runz list")
    assert check("gptctl runs lizt")
    assert check("gptctl runs list --home x")  # a global option belongs before the command
    assert check("gptctl sample RUN --prompt x | gptctl runs list --bogus")
    assert not check("gptctl pretrain --max_steps 3 --decay_lr --log_gradients --max-lr=3e-4")
    assert not check("gptctl --home runs runs list [--json]")
    assert not check("gptctl ckpt prune [--run RUN | --all] [--keep-last N] --yes")
    assert not check("gptctl serve RUN & curl -s localhost:8000 --max-time 3")
    assert not check('gptctl sample RUN --prompt "--not-an-option" -- --ignored')
    assert not check("gptctl sample RUN --prompt --looks-like-an-option")
    assert not check("gptctl sample RUN '--quoted'")
    assert not check("echo --anything")


def test_every_command_line_in_the_docs_exists():
    bad, checked = [], 0
    for page in PAGES:
        for line in bash_lines(page.read_text()):
            for args in invocations(line):
                checked += 1
                bad += [f"{page.relative_to(ROOT)}: {line.strip()}\n    {p}" for p in problems(args)]
    assert checked > 50, f"only {checked} gptctl command lines found: is the parser still reading the docs?"
    assert not bad, "\n".join(bad)


def _anchors(page: Path) -> set[str]:
    anchors, block = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            block = not block
        elif not block and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return anchors


def test_every_relative_link_resolves():
    bad = []
    for page in PAGES:
        for target in _LINK.findall(page.read_text()):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                bad.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                bad.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not bad, "\n".join(bad)


def test_every_doc_links_back_to_the_readme_and_is_listed_in_it():
    readme = README.read_text()
    assert DOCS
    for page in DOCS:
        lines = page.read_text().splitlines()
        assert lines[0].startswith("# "), page.name
        assert "](../README.md)" in page.read_text(), page.name
        assert f"(docs/{page.name})" in readme, f"README's Documentation list lacks docs/{page.name}"
