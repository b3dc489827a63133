"""Packaging: the Dockerfile passes hadolint, its install steps give a working
``tokend`` from the wheel, and the ``tokend-client`` distribution imports with the
standard library alone.

No container engine runs here, so the image's steps are run as they are written, with
two differences that keep the test fast: the wheel is built without build isolation,
and the fresh virtualenv finds the dependencies already installed in this one (a
``.pth`` file) instead of downloading and byte-compiling 20 wheels. What is checked is
what can rot: the wheel's contents, its entry point, and a run away from the source
tree.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO
from tokend._version import __version__

BIN = Path(sys.executable).parent
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]


def run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=120)
    assert done.returncode == 0, f"{argv}:\n{done.stdout}\n{done.stderr}"
    return done


def test_dockerfile_passes_hadolint() -> None:
    done = subprocess.run(
        [str(BIN / "hadolint"), "--no-color", str(REPO / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def dockerfile(instruction: str) -> list[str]:
    """The arguments of the Dockerfile's ``instruction`` lines, continuations joined."""
    joined = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    prefix = instruction + " "
    return [
        " ".join(line[len(prefix) :].split())
        for line in joined.splitlines()
        if line.startswith(prefix)
    ]


def test_image_install_steps_give_a_working_tokend(tmp_path: Path) -> None:
    wheels, venv, src = tmp_path / "wheels", tmp_path / "opt-tokend", tmp_path / "src"
    build, install = (cmd for cmd in dockerfile("RUN") if "/wheels" in cmd)
    # The build stage: the files it copies (nothing else), then the wheel; only
    # tokend's own, and without isolation.
    for copy in dockerfile("COPY"):
        if copy.startswith("--from"):
            continue
        *sources, dest = copy.split()
        for source in sources:
            target = src / dest / source if dest.endswith("/") else src / dest
            if (REPO / source).is_dir():
                shutil.copytree(REPO / source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(REPO / source, target)
    assert build.startswith("pip wheel ") and build.endswith(" --wheel-dir /wheels .")
    run(
        [*PIP, "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(wheels), "."],
        cwd=src,
    )
    [wheel] = wheels.glob("tokend-*.whl")
    assert wheel.name == f"tokend-{__version__}-py3-none-any.whl"

    # The final stage: venv, pip install from /wheels, tokend --version.
    assert install.startswith("python -m venv /opt/tokend && /opt/tokend/bin/pip install")
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    steps = install.split(" && ")
    pip_install = steps[1].replace("/opt/tokend/bin/pip", "").replace("/wheels", str(wheels))
    run(
        [
            *PIP,
            "--python",
            str(venv / "bin" / "python"),
            *pip_install.split()[:-1],
            "--no-deps",
            str(wheel),
        ]
    )
    assert steps[-1] == "/opt/tokend/bin/tokend --version"
    tokend = venv / "bin" / "tokend"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert run([str(tokend), "--version"], cwd=elsewhere).stdout == f"tokend {__version__}\n"
    # The installed package, not the checkout, and the shipped config checks out.
    where = run(
        [str(venv / "bin" / "python"), "-c", "import tokend; print(tokend.__file__)"], cwd=elsewhere
    ).stdout
    assert where.startswith(str(venv))
    (elsewhere / "secret").write_text("s3cret-value\n")
    config = elsewhere / "config.yaml"
    config.write_text(
        "providers:\n  p:\n    token_endpoint: https://idp.example/token\n"
        "    client_id: c\n    client_secret_file: secret\n"
        "accounts:\n  a: {provider: p, grant: client_credentials}\n"
    )
    checked = run([str(tokend), "check", "-c", str(config)], cwd=elsewhere)
    assert checked.stdout.startswith(f"{config}: ok: 1 provider, 1 account")
    assert "s3cret" not in checked.stdout + checked.stderr


def test_tokend_client_distribution_needs_only_the_standard_library(tmp_path: Path) -> None:
    # Built from a copy (the module is a link into tokend/).
    client = tmp_path / "client"
    client.mkdir()
    for name in ("pyproject.toml", "README.md", "tokend_client.py"):
        shutil.copy(REPO / "client" / name, client / name)
    meta = tomllib.loads((client / "pyproject.toml").read_text())["project"]
    assert meta["version"] == __version__ and meta["dependencies"] == []
    run(
        [*PIP, "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(tmp_path), "."],
        cwd=client,
    )
    [wheel] = tmp_path.glob("tokend_client-*.whl")
    target = tmp_path / "site"
    run([*PIP, "install", "--no-deps", "--target", str(target), str(wheel)])
    installed = sorted(
        p.name for p in target.iterdir() if p.suffix != ".dist-info" and p.name != "__pycache__"
    )
    assert installed == ["tokend_client.py"], installed
    # No site-packages at all (-S -I): only the standard library and the module.
    probe = (
        f"import sys; sys.path.insert(0, {str(target)!r}); import tokend_client as c; "
        "print(c.get_token.__module__, sorted(m for m in sys.modules if m.startswith('tokend')))"
    )
    out = run([sys.executable, "-S", "-I", "-c", probe], cwd=tmp_path).stdout
    assert out.split()[0] == "tokend_client" and "['tokend_client']" in out
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run(
            [
                sys.executable,
                "-S",
                "-I",
                "-c",
                probe.replace(
                    "import tokend_client as c", "import tokend_client as c; c.TokendAuth"
                ),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
