"""What `pip install loraserve` installs: one package, `loraserve`, whose base install is the
client (no torch), with the server and the trainer in extras. The slowest test builds a fresh
virtualenv from the registry and talks to a real server from it."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from loraserve.cli import EXTRA_MODULES

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _folders_as_packages() -> set[str]:
    mapping = PYPROJECT["tool"]["setuptools"]["package-dir"]
    found = set()
    for package, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            relative = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *relative.parts]))
    return found


def test_the_package_list_is_every_folder_of_the_one_namespace():
    packages = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert packages == _folders_as_packages()
    assert all(p == "loraserve" or p.startswith("loraserve.") for p in packages)
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"loraserve": "server", "loraserve.trainer": "trainer"}


def _requirement_names(extra: str) -> set[str]:
    """Distribution names an extra installs, self-references resolved."""
    names = set()
    for requirement in PYPROJECT["project"]["optional-dependencies"][extra]:
        name = re.split(r"[\[<>=! ]", requirement, maxsplit=1)[0].lower()
        if name == "loraserve":
            for inner in re.search(r"\[(.*)\]", requirement).group(1).split(","):
                names |= _requirement_names(inner.strip())
        else:
            names.add(name)
    return names


def test_the_base_install_is_the_client_and_extras_hold_the_rest():
    base = {re.split(r"[<>=! ]", r, maxsplit=1)[0].lower() for r in PYPROJECT["project"]["dependencies"]}
    assert base == {"grpcio", "grpcio-health-checking", "protobuf", "pyyaml"}
    distributions = importlib.metadata.packages_distributions()
    for extra, modules in EXTRA_MODULES.items():  # what `loraserve serve|train` checks is what the extra installs
        declared = _requirement_names(extra)
        for module in modules:
            owners = {d.lower().replace("_", "-") for d in distributions.get(module, [])}
            assert owners & declared, f"{module} ({owners}) is not in the {extra!r} extra"
    assert {"serve", "train", "all", "test"} <= set(PYPROJECT["project"]["optional-dependencies"])
    assert _requirement_names("all") >= _requirement_names("serve") | _requirement_names("train")


def test_the_root_conftest_and_the_deploy_tests_need_no_torch():
    blocked = ", ".join(repr(m) for m in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"))
    code = (f"import sys\nfor m in ({blocked},): sys.modules[m] = None\nimport pytest\n"
            "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/deploy/test_helm_chart.py', "
            "'-k', 'every_serve_setting or renders']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_a_client_only_install_talks_to_a_server(tmp_path, tmp_path_factory):
    """A fresh virtualenv, `pip install .` with no extras (from the registry): no torch, the client
    imports, `import server` does not, the client commands reach a real server, and `loraserve
    serve` says in one line which extra it needs."""
    from loraserve.devtools.server_process import running_server
    from loraserve.devtools.synthetic_base import init_model

    venv = tmp_path / "client-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python, loraserve = venv / "bin" / "python", venv / "bin" / "loraserve"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", str(ROOT)], capture_output=True, text=True,
                             timeout=900, env=env)
    assert install.returncode == 0, install.stderr[-3000:]
    installed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                               env=env, check=True).stdout.lower()
    for heavy in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "numpy"):
        assert f"\n{heavy}==" not in f"\n{installed}", f"{heavy} is in a client-only install"

    def run(*args, cwd=tmp_path) -> subprocess.CompletedProcess:
        return subprocess.run([*args], capture_output=True, text=True, timeout=120, env=env, cwd=cwd)
    assert run(str(python), "-c", "import loraserve.client; from loraserve.client import AsyncLoraserveClient").returncode == 0
    for absent in ("server", "trainer"):
        assert "ModuleNotFoundError" in run(str(python), "-c", f"import {absent}").stderr
    serve = run(str(loraserve), "serve", "--model", "x")
    assert serve.returncode == 2 and serve.stderr.count("\n") == 1, serve.stderr
    assert "pip install 'loraserve[serve]'" in serve.stderr and "Traceback" not in serve.stderr

    root = tmp_path_factory.mktemp("client-server")
    base = init_model(root / "base", "deepseek-llm", "tiny", seed=3)
    with running_server(root, base, root / "store", "--quantization", "none", "--max-new-tokens", "8") as srv:
        target = ("--server", srv.target)
        generated = run(str(loraserve), "generate", "--no-stream", "--max-new-tokens", "4", *target, "hello")
        assert generated.returncode == 0 and generated.stdout.strip(), generated.stderr
        streamed = run(str(loraserve), "generate", "--max-new-tokens", "4", "--json", *target, "hello")
        assert streamed.returncode == 0 and '"completion_tokens": 4' in streamed.stdout, streamed.stdout + streamed.stderr
        listed = run(str(loraserve), "adapters", "list", "--json", *target)
        assert listed.returncode == 0 and listed.stdout.strip().startswith("["), listed.stderr
        assert run(str(loraserve), "health", *target).returncode == 0
        info = run(str(loraserve), "info", "--json", *target)
        assert info.returncode == 0 and '"max_input_bytes"' in info.stdout, info.stderr
