"""Every `flax-train` and `xla-infer` command the documentation gives works as written, as far as a
machine without a TPU can tell: it parses with the real command-line parser, and the configs a
`flax-train train | prepare | export` names load and validate (`config.load`, then
`config.validate(cfg, device_count)`) for the device count of the machine it is written for.

Where commands are found: the shell code blocks (bash, sh, shell, console) of README.md and
docs/*.md, inline code spans of those files that start with `flax-train` / `xla-infer` and give an
option (parsed only: they hold placeholders such as `...`), and the indented commands in the
leading comments of the YAML configs. In a block a command may follow `&&` / `;` / `|`, stand
behind `nohup` or `VAR=value`, carry redirections, continue over lines with `\\`, or be the
`--command="..."` that `gcloud compute tpus tpu-vm ssh` runs on the workers. `$VAR` is replaced by
the value the document exported before that line (a reader running it top to bottom); an unset
variable is an error.

The device count of a command: the TPU type named by the nearest heading above it (`v5e-8`: 8
chips; `v5p-32`: 16, since v4 and v5p names count TensorCores, two per chip), else the hardware
preset it loads (`presets/tpu_v5e_8.yaml`: 8), else, for `--config <run_dir>/config.yaml`, the
count of the training command above that wrote that file (the test writes the config that command
resolves in its place). Otherwise the mesh is checked against no particular count.

A command run through `gcloud ... --command` starts in the worker's home directory with no
environment activated: relative config paths need a `cd` into the checkout first, and the program
needs its path (`~/venv/bin/flax-train`) or an activation in the same command.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import dataclasses
import functools
import importlib.metadata
import io
import re
import shlex
import subprocess
import tempfile
from pathlib import Path

import pytest

from flax_train import cli as flax_cli, config as config_lib
from xla_infer import cli as xla_cli

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "tpu_vm.md"
MARKDOWN = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
YAML = [*sorted((REPO / "configs").rglob("*.yaml")), REPO / "flax_train" / "demo" / "demo.yaml"]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
CHECKOUT = "sdxl-tpu"  # the folder the guide unpacks the repository into on a TPU VM
PROGRAMS = {"flax-train": flax_cli.build_parser, "xla-infer": xla_cli.build_parser}
MODULES = {"flax_train.cli": "flax-train", "xla_infer.cli": "xla-infer"}
# A remote shell has these; the document sets everything else it uses.
BASE_ENV = {"HOME": "/home/user", "USER": "user"}

# TPU types: the number in a v4 / v5p name counts TensorCores (two per chip), in v5e / v6e chips.
TPU_TYPE = re.compile(r"\b(v4|v5e|v5litepod|v5p|v6e)-(\d+)\b")
PRESET = re.compile(r"presets/(?:tpu_(v4|v5e|v5p|v6e)_(\d+)|cpu_(\d+))\.yaml$")
CHIPS_PER_HOST = {"v4": 4, "v5p": 4, "v5e": 8, "v5litepod": 8, "v6e": 8}  # the largest single host
RUNTIME = {  # TPU software versions for JAX and PyTorch (https://cloud.google.com/tpu/docs/runtimes)
    "v5e": "v2-alpha-tpuv5-lite", "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e",
}


def chips(generation: str, number: str | int) -> int:
    return int(number) // 2 if generation in ("v4", "v5p") else int(number)


# ----------------------------------------------------------------------------------------------
# Reading documents.


@dataclasses.dataclass
class Block:
    line: int  # 1-based line of the block's first line of code
    language: str
    lines: list[str]
    headings: tuple[str, ...] = ()


def markdown_blocks(text: str) -> tuple[list[Block], str]:
    """The fenced code blocks with the headings above each, and the text outside them (code lines
    blanked, so line numbers stay)."""
    blocks, prose, headings = [], [], []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        heading = re.match(r"^(#{1,6})\s+(.*)", lines[i])
        if fence:
            block = Block(i + 2, fence[2].lower(), [], tuple(title for _, title in headings))
            i += 1
            while i < len(lines) and not lines[i].startswith(fence[1]):
                block.lines.append(lines[i])
                i += 1
            blocks.append(block)
            prose += [""] * (len(block.lines) + 2)  # the block and its two fences
        else:
            if heading:
                level = len(heading[1])
                headings = [(lv, t) for lv, t in headings if lv < level] + [(level, heading[2].strip())]
            prose.append(lines[i])
        i += 1
    return blocks, "\n".join(prose)


def yaml_blocks(text: str) -> list[Block]:
    """The indented lines of a YAML file's leading comment: the commands it says run the file."""
    blocks: list[Block] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.startswith("#"):
            break
        body = line[1:]
        if body.startswith("   ") and body.strip():  # '#' + at least three spaces: code, not prose
            if blocks and blocks[-1].line + len(blocks[-1].lines) == number:
                blocks[-1].lines.append(body)
            else:
                blocks.append(Block(number, "bash", [body]))
    return blocks


def logical_lines(block: Block):
    """(line number, text) of each shell line: `\\`-newlines joined, quotes spanning lines kept."""
    text, start = "", None
    for number, line in enumerate(block.lines, block.line):
        start = number if start is None else start
        if line.endswith("\\") and not line.endswith("\\\\"):
            text += line[:-1]
            continue
        text += line
        try:
            shlex.split(text, comments=True)
        except ValueError:  # a quotation goes on to the next line
            text += "\n"
            continue
        yield start, text
        text, start = "", None
    if text:
        yield start, text


# ----------------------------------------------------------------------------------------------
# A small model of the shell: enough to find the commands and give them their arguments.


class ShellError(ValueError):
    pass


def expand(text: str, env: dict[str, str]) -> str:
    """`$NAME` / `${NAME}` replaced outside single quotes, as the shell would."""
    out, quote, i = [], None, 0
    while i < len(text):
        c = text[i]
        if quote == "'":
            quote = None if c == "'" else quote
        elif c == "\\":
            out.append(text[i : i + 2])
            i += 2
            continue
        elif c == "'" and quote is None:
            quote = "'"
        elif c == '"':
            quote = None if quote == '"' else '"'
        elif c == "$":
            name = re.match(r"\$(?:\{(\w+)\}|(\w+))", text[i:])
            if name:
                key = name[1] or name[2]
                if env.get(key) is None:
                    raise ShellError(f"${key} is not set by the document before this line")
                out.append(env[key])
                i += name.end()
                continue
            if text.startswith("$(", i):
                raise ShellError("a command substitution $(...) cannot be followed here")
        out.append(c)
        i += 1
    return "".join(out)


def words(text: str) -> list[str]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def simple_commands(tokens: list[str]) -> list[list[str]]:
    """Splits at `&&`, `||`, `;`, `|`, `&`; drops redirections (`> file`, `2>&1`, `< /dev/null`)."""
    commands, current, i = [], [], 0
    while i < len(tokens):
        token = tokens[i]
        if token in ("&&", "||", ";", "|", "&"):
            if current:
                commands.append(current)
            current = []
        elif token and set(token) <= set("<>&"):
            if current and current[-1].isdigit():
                current.pop()  # the 2 of 2>&1
            i += 1  # the target
        else:
            current.append(token)
        i += 1
    if current:
        commands.append(current)
    return commands


ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")


@dataclasses.dataclass
class Command:
    where: str  # path:line
    program: str  # flax-train | xla-infer
    argv: list[str]
    headings: tuple[str, ...]
    remote: bool = False  # run by gcloud ... --command on the TPU VM workers
    worker: str | None = None  # that gcloud command's --worker
    in_checkout: bool = True
    located: bool = True  # the program is reachable: a path, or an activated environment
    inline: bool = False  # an inline code span in prose: parsed only
    devices: int | None = None  # the device count its config was validated for
    config: config_lib.Config | None = None


@dataclasses.dataclass
class Doc:
    path: Path
    commands: list[Command] = dataclasses.field(default_factory=list)
    # Every other simple command: (where, words, headings).
    others: list[tuple[str, list[str], tuple[str, ...]]] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)


def flag(command: list[str], name: str) -> str | None:
    """The value of `--name=value` or `--name value` in a command's words."""
    for i, word in enumerate(command):
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
        if word == name and i + 1 < len(command):
            return command[i + 1]
    return None


def read_shell_line(doc: Doc, where: str, text: str, env: dict[str, str], headings: tuple[str, ...],
                    remote: bool = False, worker: str | None = None) -> None:
    mentions = re.search(r"\b(flax-train|xla-infer|flax_train\.cli|xla_infer\.cli)\b", text)
    try:
        tokens = words(expand(text, env))
    except (ShellError, ValueError) as e:
        assignments = re.fullmatch(r"\s*(export\s+)?((?:[A-Za-z_]\w*=\S*\s*)+)", text.split("#")[0])
        if assignments:  # NAME=$(...): unknown from here on
            for name in re.findall(r"([A-Za-z_]\w*)=", assignments[2]):
                env[name] = None
        elif mentions:
            doc.problems.append(f"{where}: {e}: {text.strip()}")
        return
    found = 0
    in_checkout, activated = not remote, not remote
    for command in simple_commands(tokens):
        if command[0] == "export" or all(ASSIGNMENT.match(w) for w in command):
            for word in command[1:] if command[0] == "export" else command:
                name, _, value = word.partition("=")
                env[name] = value
            continue
        while command and (ASSIGNMENT.match(command[0]) or command[0] in ("nohup", "env", "time", "exec", "sudo")):
            command = command[1:]
        if not command:
            continue
        if command[0] == "cd":
            in_checkout = len(command) > 1 and command[1].rstrip("/").endswith(CHECKOUT)
            continue
        if command[0] in ("source", ".") and len(command) > 1 and command[1].endswith("/bin/activate"):
            activated = True
            continue
        name = command[0].rsplit("/", 1)[-1]
        argv = None
        if name in PROGRAMS:
            argv = command[1:]
        elif name.startswith("python") and command[1:2] == ["-m"] and command[2:3] and command[2] in MODULES:
            name, argv = MODULES[command[2]], command[3:]
        if argv is not None:
            found += 1
            doc.commands.append(Command(
                where, name, argv, headings, remote=remote, worker=worker, in_checkout=in_checkout,
                located=activated or "/" in command[0],
            ))
            continue
        doc.others.append((where, command, headings))
        remote_command = flag(command, "--command") if command[0] == "gcloud" else None
        if remote_command is not None:
            before = len(doc.commands)
            # What the workers' shell receives; its own variables are not the workstation's.
            read_shell_line(doc, where, remote_command, dict(BASE_ENV), headings, remote=True,
                            worker=flag(command, "--worker"))
            found += len(doc.commands) - before
    if mentions and not found:
        doc.problems.append(f"{where}: names {mentions[1]} but no command was recognised: {text.strip()}")


def inline_commands(doc: Doc, prose: str) -> None:
    for span in re.finditer(r"`([^`]+)`", prose):
        text = " ".join(span[1].split())
        if re.match(r"(flax-train|xla-infer) ", text) and " -" in text:
            line = prose.count("\n", 0, span.start()) + 1
            program, *argv = shlex.split(text)
            doc.commands.append(Command(f"{shown(doc.path)}:{line}", program, argv, (), inline=True))


def shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name


@functools.lru_cache(maxsize=None)
def read(path: Path) -> Doc:
    """All commands of a file, in order; `problems` holds what could not be read. Relative config
    paths are the repository's."""
    doc = Doc(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".md":
        blocks, prose = markdown_blocks(text)
    else:
        blocks, prose = yaml_blocks(text), ""
    env = dict(BASE_ENV)
    for block in blocks:
        if block.language not in SHELL_LANGUAGES:
            continue
        for line, shell_line in logical_lines(block):
            read_shell_line(doc, f"{shown(path)}:{line}", shell_line, env, block.headings)
    inline_commands(doc, prose)
    return doc


# ----------------------------------------------------------------------------------------------
# Checking commands.


def parse(program: str, argv: list[str]) -> tuple[argparse.Namespace | None, str | None]:
    """The real parser's result, or its error message (argparse exits 2 and prints usage)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            return PROGRAMS[program]().parse_args(argv), None
        except SystemExit:
            return None, stderr.getvalue().strip().splitlines()[-1]


def altered_urls(argv: list[str], args: argparse.Namespace) -> list[str]:
    """URLs (gs://...) on the command line that do not reach the program unchanged."""
    values = set()
    for value in vars(args).values():
        values.update(str(v) for v in (value if isinstance(value, list) else [value]))
    problems = []
    for word in argv:
        url = word.split("=", 1)[1] if word.startswith("--") and "=" in word else word
        if "://" in url and url not in values and word not in values:
            became = str(Path(url)) if str(Path(url)) in values else "something else"
            problems.append(f"{url} reaches the program as {became} (a pathlib.Path argument type merges the //)")
    return problems


def command_devices(command: Command, configs: list[str]) -> int | None:
    for title in reversed(command.headings):
        tpu = TPU_TYPE.search(title)
        if tpu:
            return chips(*tpu.groups())
    for path in configs:
        preset = PRESET.search(path)
        if preset:
            return chips(preset[1], preset[2]) if preset[1] else int(preset[3])
    return None


def check(doc: Doc) -> list[str]:
    """Every command of `doc` parsed, and its configs loaded and validated; one line per problem."""
    problems = list(doc.problems)
    runs: dict[str, tuple[config_lib.Config, int | None]] = {}  # run_dir -> (config, devices) of `train`s above
    with tempfile.TemporaryDirectory() as tmp:
        for number, command in enumerate(doc.commands):
            given = f"{command.program} {shlex.join(command.argv)}"
            if command.remote and not command.located:
                problems.append(f"{command.where}: {command.program} runs through gcloud --command, where no "
                                f"environment is active: give its path (e.g. ~/venv/bin/{command.program}): {given}")
            args, error = parse(command.program, command.argv)
            if error:
                problems.append(f"{command.where}: {error}: {given}")
                continue
            problems += [f"{command.where}: {p}: {given}" for p in altered_urls(command.argv, args)]
            if command.inline or command.program != "flax-train" or args.command == "sample":
                continue
            paths, devices = [], None
            for path in args.config or []:  # the files `flax-train` would read, or a problem and `break`
                written = runs.get(path.removesuffix("/config.yaml")) if path.endswith("/config.yaml") else None
                if written:
                    saved = Path(tmp) / f"config_{number}.yaml"
                    config_lib.save(written[0], saved)
                    paths.append(saved)
                    devices = written[1]
                elif "://" in path or path.startswith(("/", "~")):
                    problems.append(f"{command.where}: --config {path} is neither a file of this repository nor "
                                    f"the config.yaml of a training run above: {given}")
                    break
                elif command.remote and not command.in_checkout:
                    problems.append(f"{command.where}: --config {path} is relative, but the command runs in the "
                                    f"worker's home directory: cd ~/{CHECKOUT} first: {given}")
                    break
                else:
                    paths.append(REPO / path)
            else:  # no break: every file found
                devices = command_devices(command, args.config or []) or devices
                try:
                    cfg = config_lib.load(paths, args.overrides)
                    if args.command == "export" and args.raw:
                        cfg = config_lib.apply_overrides(cfg, ["export.use_ema=false"])
                    config_lib.validate(cfg, devices)
                except config_lib.ConfigError as e:
                    problems.append(f"{command.where}: {e} (validated for {devices} devices): {given}")
                    continue
                command.config, command.devices = cfg, devices
                if args.command == "train":
                    runs[cfg.run_dir.rstrip("/")] = (cfg, devices)
    return problems


@functools.lru_cache(maxsize=None)
def checked(path: Path) -> tuple[Doc, tuple[str, ...]]:
    doc = read(path)
    return doc, tuple(check(doc))


# ----------------------------------------------------------------------------------------------
# The tests.


@pytest.mark.parametrize("path", MARKDOWN + YAML, ids=lambda p: str(p.relative_to(REPO)))
def test_every_documented_command_parses_and_its_config_validates(path):
    doc, problems = checked(path)
    assert not problems, "\n" + "\n".join(problems)


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_shell_blocks_are_valid_shell(path):
    blocks, _ = markdown_blocks(path.read_text(encoding="utf-8"))
    for block in blocks:
        if block.language in SHELL_LANGUAGES:
            code = "\n".join(block.lines) + "\n"
            result = subprocess.run(["bash", "-n"], input=code, capture_output=True, text=True)
            assert result.returncode == 0, f"{path.relative_to(REPO)}:{block.line}: {result.stderr}"


def test_the_commands_are_found():
    # The README's TPU example, its xla-infer example, and the guide's remote commands.
    readme = checked(REPO / "README.md")[0]
    assert {c.program for c in readme.commands} == {"flax-train", "xla-infer"}
    train = [c for c in readme.commands if c.argv[:1] == ["train"] and c.config is not None]
    assert train and train[0].devices == 8 and train[0].config.run_dir == "gs://my-bucket/runs/sdxl-ft"
    guide = checked(GUIDE)[0]
    assert any(c.remote and c.worker == "all" for c in guide.commands)


def creates(doc: Doc) -> list[tuple[str, str, str | None, tuple[str, ...]]]:
    """(where, accelerator type, runtime version, headings) of each TPU the document creates."""
    found = []
    for where, command, headings in doc.others:
        if command[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and command[4:5] == ["create"]:
            found.append((where, flag(command, "--accelerator-type"), flag(command, "--version"), headings))
        if command[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]:
            found.append((where, flag(command, "--accelerator-type"), flag(command, "--runtime-version"), headings))
    return found


def multi_host(accelerator: str) -> bool:
    generation, number = TPU_TYPE.fullmatch(accelerator).groups()
    return chips(generation, number) > CHIPS_PER_HOST[generation]


def guide_gaps(doc: Doc) -> list[str]:
    """The steps the TPU guide must give that `doc` lacks (or gives wrongly)."""
    gaps = []
    made = creates(doc)
    for where, accelerator, runtime, _ in made:
        generation = TPU_TYPE.fullmatch(accelerator or "")
        if not generation:
            gaps.append(f"{where}: --accelerator-type {accelerator!r} is not a TPU type")
        elif runtime != RUNTIME[generation[1]]:
            needed = RUNTIME[generation[1]]
            gaps.append(f"{where}: {accelerator} needs --version / --runtime-version {needed}, not {runtime}")
    made = [m for m in made if TPU_TYPE.fullmatch(m[1] or "")]
    if not any(not multi_host(accelerator) for _, accelerator, _, _ in made):
        gaps.append("no single-host TPU VM is created")
    sizes = {accelerator: chips(*TPU_TYPE.fullmatch(accelerator).groups()) for _, accelerator, _, _ in made}
    pods = {n for accelerator, n in sizes.items() if multi_host(accelerator)}
    if not pods:
        gaps.append("no multi-host slice is created")

    for subcommand in ("prepare", "train", "export"):
        runs = [c for c in doc.commands if c.program == "flax-train" and c.argv[:1] == [subcommand]
                and c.remote and c.worker == "all" and c.config is not None]
        if not runs:
            gaps.append(f"no `flax-train {subcommand}` on all workers of a slice (gcloud ... --worker=all)")
        for command in runs:
            if command.devices not in pods:
                gaps.append(f"{command.where}: validated for {command.devices} devices: no slice created has as many")
            if "://" not in command.config.run_dir:
                gaps.append(f"{command.where}: a pod slice's run_dir must be a gs:// URL: {command.config.run_dir}")
    hosts = {n for accelerator, n in sizes.items() if not multi_host(accelerator)}
    for subcommand in ("prepare", "train"):
        on_host = [c for c in doc.commands if c.argv[:1] == [subcommand] and not c.remote and c.config is not None]
        if not any(c.devices in hosts for c in on_host):
            gaps.append(f"no `flax-train {subcommand}` for the single host created")

    runs = {c.config.run_dir.rstrip("/") for c in doc.commands if c.argv[:1] == ["train"] and c.config is not None}
    logdirs = [flag(command, "--logdir") for _, command, _ in doc.others if command[0] == "tensorboard"]
    if not any(d and d.rstrip("/").removesuffix("/tensorboard") in runs for d in logdirs):
        gaps.append(f"no `tensorboard --logdir <run_dir>/tensorboard` of a training run (found: {logdirs})")

    # Resuming: a section about it recreates the TPU and gives a training command from above, unchanged.
    def resuming(headings: tuple[str, ...]) -> bool:
        return any(re.search(r"resum", title, re.I) for title in headings)

    trained = [c.argv for c in doc.commands if c.argv[:1] == ["train"] and not resuming(c.headings)]
    if not any(c.argv[:1] == ["train"] and c.argv in trained for c in doc.commands if resuming(c.headings)):
        gaps.append("no section on resuming reruns a training command given above")
    if not any(resuming(headings) for *_, headings in made):
        gaps.append("no section on resuming recreates the TPU")

    if not any(c.program == "xla-infer" for c in doc.commands):
        gaps.append("no `xla-infer` command")
    return gaps


def test_the_tpu_guide_has_every_step():
    doc, problems = checked(GUIDE)
    assert not problems, "\n" + "\n".join(problems)
    assert not guide_gaps(doc), "\n" + "\n".join(guide_gaps(doc))


@pytest.mark.parametrize(
    "removed, replacement, gap",
    [
        ("tpu-vm create $TPU_NAME", "tpu-vm describe $TPU_NAME", "no single-host TPU VM"),
        ("queued-resources create", "queued-resources describe", "no multi-host slice"),
        ("--version=v2-alpha-tpuv5-lite", "--version=v2-alpha-tpuv5",
         "v5litepod-8 needs --version / --runtime-version v2-alpha-tpuv5-lite"),
        ("~/venv/bin/flax-train prepare", "echo", "no `flax-train prepare` on all workers"),
        ("--worker=all --command=\"\\\n    cd ~/sdxl-tpu && nohup",
         "--worker=0 --command=\"\\\n    cd ~/sdxl-tpu && nohup", "no `flax-train train` on all workers"),
        ("~/venv/bin/flax-train export", "echo", "no `flax-train export` on all workers"),
        ("tensorboard --logdir", "echo --logdir", "no `tensorboard --logdir"),
        ("## Resume after a preemption", "## After a preemption", "no section on resuming"),
        ("~/venv-xla/bin/xla-infer", "echo", "no `xla-infer` command"),
    ],
    ids=["create-host", "create-slice", "runtime", "prepare", "train", "export", "tensorboard", "resume", "xla-infer"],
)
def test_a_guide_without_a_step_fails(tmp_path, removed, replacement, gap):
    text = GUIDE.read_text(encoding="utf-8")
    assert removed in text
    page = tmp_path / "tpu_vm.md"
    page.write_text(text.replace(removed, replacement), encoding="utf-8")
    doc = read(page)
    check(doc)
    assert any(gap in line for line in guide_gaps(doc)), guide_gaps(doc)


def extras() -> dict[str, list[str]]:
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    return {name: value.split() for name, value in setup["options.extras_require"].items()}


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_pip_installs_name_what_exists(path):
    # `-e '.[x]'` names an extra of setup.cfg, `-c FILE` a file of the repository, and a pinned
    # requirement agrees with the pin in constraints.txt.
    pins = dict(line.split("==", 1) for line in (REPO / "constraints.txt").read_text().split() if "==" in line)
    for where, command, _ in read(path).others:
        if "pip" not in command[0] or command[1:2] != ["install"]:
            continue
        for word in command[2:]:
            extra = re.fullmatch(r"\.\[([\w,-]+)\]", word)
            if extra:
                assert set(extra[1].split(",")) <= set(extras()), f"{where}: no extra {extra[1]} in setup.cfg"
            pin = re.fullmatch(r"([\w.-]+)(?:\[[\w,-]+\])?==(\S+)", word)
            if pin and pin[1] in pins:
                assert pins[pin[1]] == pin[2], f"{where}: {word}, but constraints.txt pins {pin[1]}=={pins[pin[1]]}"
        constraints = flag(command, "-c")
        assert constraints is None or (REPO / constraints).is_file(), f"{where}: no file {constraints}"


def test_the_libtpu_versions_the_guide_names_are_the_pins():
    # The guide explains the second environment for xla-infer by two pins; both must still hold.
    text = GUIDE.read_text(encoding="utf-8")
    ours = [r for r in extras()["tpu"] if r.startswith("libtpu")]
    theirs = [  # torch_xla's `tpu` extra
        requirement.split(";")[0].replace(" ", "")
        for requirement in importlib.metadata.requires("torch_xla") or []
        if requirement.startswith("libtpu") and '"tpu"' in requirement
    ]
    assert ours and theirs
    for requirement in ours + theirs:
        assert f"`{requirement}`" in text, requirement
    assert set(re.findall(r"`(libtpu==[^`]+)`", text)) == set(ours + theirs)


def test_the_readme_tpu_section_links_the_guide():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Training on a TPU VM", 1)[1].split("\n## ", 1)[0]
    assert "](docs/tpu_vm.md)" in section


def test_a_broken_command_is_reported_with_its_file_line_and_error(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# On a v5e-8\n\n"
        "```bash\n"
        "export RUN=gs://b/runs/x\n"
        "flax-train sample --model $RUN/export --prompt 'a cat'\n"
        "flax-train train --config configs/sdxl_base.yaml train.lerning_rate=1e-5 run_dir=$RUN\n"
        "flax-train train --config configs/sdxl_base.yaml train.global_batch_size=12 run_dir=$RUN\n"
        "flax-train export --config $UNSET/config.yaml\n"
        "gcloud compute tpus tpu-vm ssh t --worker=all --command='flax-train prepare --config configs/sdxl_base.yaml'\n"
        "```\n"
    )
    problems = check(read(page))
    missing_out = "page.md:5: flax-train sample: error: the following arguments are required: --out"
    assert any(p.startswith(missing_out) for p in problems)
    assert any(p.startswith("page.md:6: ") and "did you mean 'train.learning_rate'?" in p for p in problems)
    assert any(p.startswith("page.md:7: ") and "not divisible by the data-parallel size 8" in p for p in problems)
    assert any(p.startswith("page.md:8: ") and "$UNSET is not set" in p for p in problems)
    assert any(p.startswith("page.md:9: ") and "give its path" in p for p in problems)
    assert any(p.startswith("page.md:9: ") and "cd ~/sdxl-tpu first" in p for p in problems)


def test_a_url_changed_by_argument_parsing_is_reported():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    parser.add_argument("--model")
    argv = ["--out", "gs://bucket/images", "--model=gs://bucket/model"]
    assert altered_urls(argv, parser.parse_args(argv)) == [
        "gs://bucket/images reaches the program as gs:/bucket/images (a pathlib.Path argument type merges the //)"
    ]
