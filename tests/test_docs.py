"""The Markdown files read as they say: every relative link and #anchor resolves (GitHub's heading anchors), every
documented `make` command is one make accepts (a dry run, `make -n`, that prints only commands whose scripts
exist), and every documented `python <script>` or `python -m tools.<name>` names a file that is there."""
import re
import shlex
import subprocess

import pytest
from conftest import REPO
from test_layout import repo_files

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def markdown_files():
    return repo_files(REPO, ".md")


def prose_and_code(path):
    """(prose lines, code blocks as lists of lines): fenced blocks and indented blocks after a blank line are code."""
    prose, code, block, fenced, previous_blank = [], [], None, False, True
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.strip()):
            if fenced:
                code.append(block)
            fenced, block = not fenced, [] if not fenced else None
            continue
        if fenced:
            block.append(line)
        elif line.startswith("    ") and (previous_blank or block is not None) \
                and not line.lstrip().startswith(("-", "|")):
            block = block if block is not None else []
            block.append(line[4:])
        else:
            if block is not None:
                code.append(block)
                block = None
            prose.append(line)
        previous_blank = not line.strip()
    if block is not None:
        code.append(block)
    return prose, code


def slug(heading):
    """GitHub's anchor of a heading: lowercase, punctuation dropped (letters, digits, _ and - stay), spaces -> -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    found, seen = set(), {}
    for line in prose_and_code(path)[0]:
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            found.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    return found


def test_slug_is_githubs():
    assert slug("Past one GPU: serve the baked checkpoints, evaluate over HTTP (`--endpoint`)") == \
        "past-one-gpu-serve-the-baked-checkpoints-evaluate-over-http---endpoint"
    assert slug("Which experts are real: the null (`02_score.py`)") == "which-experts-are-real-the-null-02_scorepy"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(path):
    broken = []
    for line in prose_and_code(path)[0]:
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                broken.append(f"{target}: no such file")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{target}: no heading with that anchor in {linked.relative_to(REPO)}")
    assert broken == [], f"{path.relative_to(REPO)}: {broken}"


def documented_commands():
    """Every `make ...` and `python ...` command line in the Markdown files: in code blocks (backslash
    continuations joined) and in inline code."""
    commands = set()
    for path in markdown_files():
        prose, code = prose_and_code(path)
        lines = [span for line in prose for span in re.findall(r"`([^`]+)`", line)]
        for block in code:
            lines += re.sub(r"\\\n\s*", " ", "\n".join(block)).splitlines()
        for line in lines:
            line = line.split("  #")[0].split(" # ")[0].strip()
            if re.match(r"^([A-Z_]+=\S+ )*(make|python|\.venv/bin/python) ", line) and "..." not in line:
                commands.add(line)
    return sorted(commands)


def make_commands():
    """The documented make commands as argument lists; `make collect|score|suppress|evaluate` is four of them."""
    runs = []
    for line in documented_commands():
        words = shlex.split(line)
        if "make" not in words:
            continue
        env, args = words[:words.index("make")], words[words.index("make") + 1:]
        if any("<" in word for word in args):  # a placeholder, not a command
            continue
        choices = [word.split("|") if "|" in word else [word] for word in args]
        runs += [env + [*args[:i], choice, *args[i + 1:]]
                 for i, options in enumerate(choices) if len(options) > 1 for choice in options] \
            or [env + args]
    return runs


def test_the_docs_show_the_commands_to_check():
    flat = [" ".join(run) for run in make_commands()]
    for target in ("all", "test", "planted", "tune", "bench", "widthcheck", "sweep", "quick", "browse",
                   "modalities"):
        assert any(re.search(rf"(^| ){target}( |$)", run) for run in flat), target


@pytest.mark.parametrize("run", make_commands(), ids=" ".join)
def test_every_documented_make_command_dry_runs(run):
    # (a leading VAR=value, as in `PYTHON=python3.11 make all`, is passed to make as a variable)
    done = subprocess.run(["make", "-n", "-C", str(REPO), *run], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for line in done.stdout.splitlines():  # what it would run names scripts that exist
        for script in re.findall(r"python3? (\S+\.py)\b", line):
            assert (REPO / script).exists(), f"{' '.join(run)} would run {script}, which is not there"
        for module in re.findall(r"python3? -m (tools\.\w+)", line):
            assert (REPO / (module.replace(".", "/") + ".py")).exists(), f"{' '.join(run)} would run -m {module}"


def test_every_documented_python_command_names_a_script_that_is_there():
    for line in documented_commands():
        for script in re.findall(r"python3? (\S+\.py)\b", line):
            assert (REPO / script).exists(), f"documented `{line}`: {script} is not there"
        for module in re.findall(r"python3? -m (tools\.\w+)", line):
            assert (REPO / (module.replace(".", "/") + ".py")).exists(), f"documented `{line}`: no {module}"


def test_cpu_kernels_pins_all_three_kernel_libraries_or_refuses():
    """`make ... CPU_KERNELS=avx2` exports the pins that sgm.models.numerics records; another value stops make with
    one line naming the fix. (That the pins change the bits is measured, docs/RESULTS.md; not a test's job here.)"""
    from sgm.models import CPU_KERNEL_PINS
    show = "envcheck: ; @echo " + " ".join(f"$${key}" for key in CPU_KERNEL_PINS)
    done = subprocess.run(["make", "-s", "-C", str(REPO), "--eval", show, "envcheck", "CPU_KERNELS=avx2"],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["avx2", "AVX2", "AVX2"], done.stderr
    refused = subprocess.run(["make", "-n", "-C", str(REPO), "all", "CPU_KERNELS=avx512"], capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode != 0 and "CPU_KERNELS=avx2" in refused.stderr
