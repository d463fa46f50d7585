"""Docs that cannot rot: every relative link of README.md and docs/ resolves, nothing links outside the repository or
names an issue tracker's number, every `main.py` command names a config and variant that pass validation, and
every script command names flags the script defines."""
import ast
import glob
import importlib
import os
import re

import pytest

from conftest import ROOT
from clmae_jax.runtime import validate

DOCS = sorted([os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)])
COMMAND = re.compile(r"python (main\.py|-m (?:research|tools|bench)\.\w+|-m clmae_jax\.interop)"
                     r"((?: +--[^ \n\"`]+)*)")
PLACEHOLDER = re.compile(r"NAME|MODEL|\[")  # configs/NAME.py[:variant], cbm_paper.py:MODEL,DATASET[,...]


def text(path: str) -> str:
    """A document's text."""
    with open(path) as f:
        return f.read()


def commands_in(document: str) -> list:
    """[program, "--flag=value", ...] of every command in the shell blocks of a markdown text."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", document, re.S):
        for match in COMMAND.finditer(block.replace("\\\n", " ")):
            found.append([match.group(1), *match.group(2).split()])
    return found


def defined_flags(program: str) -> set:
    """The flags a script defines (absl's DEFINE_*, argparse's add_argument), read from its source and from the
    sources of the bench / research / tools modules it imports (absl flags defined there are its flags too)."""
    module = program.removeprefix("-m ")
    file = {"main.py": "main.py", "clmae_jax.interop": "clmae_jax/interop/__main__.py"}.get(
        module, module.replace(".", "/") + ".py")
    source = text(os.path.join(ROOT, file))
    names = set(re.findall(r'DEFINE_\w+\(\s*"(\w+)"', source)) | set(re.findall(r'add_argument\(\s*"--([\w-]+)"',
                                                                              source))
    for package, imported in re.findall(r"^from (bench|research|tools) import ([\w, ]+)$", source, re.M):
        for name in imported.replace(" ", "").split(","):
            names |= set(re.findall(r'DEFINE_\w+\(\s*"(\w+)"', text(os.path.join(ROOT, package, f"{name}.py"))))
    return names


def config_of(command: list):
    """The config a main.py command names, with its --config.KEY=VALUE overrides applied."""
    values = dict(a[2:].split("=", 1) for a in command[1:] if "=" in a)
    file, _, variant = values.get("config", "configs/mae_fashion_mnist.py").removeprefix("configs/").partition(":")
    config = importlib.import_module(f"configs.{file.removesuffix('.py')}").get_config(variant)
    for key, value in values.items():
        if key.startswith("config."):
            field = key[len("config."):]
            current = validate.get(config, field)
            assert current is not None, f"--{key} is not a field of {values.get('config')}"
            config.update_from_flattened_dict({field: value if isinstance(current, str) else ast.literal_eval(value)})
    return config


def heading_anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_resolves_inside_the_repository(path):
    document = text(path)
    for target in re.findall(r"\]\(([^)\s]+)\)", document):
        if re.match(r"https?://|mailto:", target):
            continue
        file, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        assert resolved.startswith(ROOT + os.sep) and os.path.exists(resolved), (path, target)
        if anchor and resolved.endswith(".md"):
            anchors = {heading_anchor(h) for h in re.findall(r"^#+ (.*)$", text(resolved), re.M)}
            assert anchor in anchors, (path, target)


def test_no_document_or_source_names_an_issue_number_or_a_path_outside_the_repository():
    sources = DOCS + glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True)
    offending = []
    for path in sources:
        if "/.venv/" in path or path.endswith("test_docs.py"):
            continue
        for number, line in enumerate(text(path).splitlines(), 1):
            if re.search(r"\bissue \d+|shared/specs|\.\./shared", line, re.I):
                offending.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()[:80]}")
    assert offending == []


@pytest.mark.parametrize("path", DOCS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_command_names_real_flags_and_every_config_validates(path):
    for command in commands_in(text(path)):
        program, arguments = command[0], command[1:]
        names = {a[2:].split("=", 1)[0] for a in arguments}
        flags = {n for n in names if not n.startswith("config.")}
        assert flags <= defined_flags(program), (path, program, flags - defined_flags(program))
        if program == "main.py" and not PLACEHOLDER.search(" ".join(arguments)):
            validate.check_config(config_of(command))
