"""A built wheel works on its own: installed (not editable) into a fresh venv and run from
another folder, it finds its configs and Kibana objects as package data, and puts nothing but
`newsbeam` into site-packages."""
from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# One worker builds the wheel for both tests: two builds at once collide in the checkout's build/.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("wheel")]


def _run(*args: str | Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv with only the newsbeam wheel installed in it; its dependencies come from the test
    venv's site-packages through a .pth line (a path in a .pth is not a site dir, so the
    editable checkout's finder there is not loaded)."""
    root = tmp_path_factory.mktemp("wheel")
    built = _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", root / "dist", REPO, cwd=root)
    assert built.returncode == 0, built.stderr
    (wheel,) = (root / "dist").glob("newsbeam-*.whl")
    venv.create(root / "venv", with_pip=False)
    python = root / "venv" / "bin" / "python"
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=root).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel, cwd=root)
    assert done.returncode == 0, done.stderr
    return root


def test_the_wheel_installs_only_the_newsbeam_package(installed):
    site = next((installed / "venv" / "lib").glob("python3*/site-packages"))
    top = {path.name for path in site.iterdir() if not path.name.endswith((".dist-info", ".pth"))}
    assert top == {"newsbeam"}, top
    assert {path.name for path in (site / "newsbeam").iterdir()} >= {"pipeline", "transforms", "configs", "kibana"}
    assert (site / "newsbeam" / "configs" / "pipeline.yaml").is_file()
    generic = _run(installed / "venv" / "bin" / "python", "-c", "import pipeline", cwd=installed)
    assert generic.returncode != 0 and "No module named 'pipeline'" in generic.stderr


def test_the_installed_command_tags_and_reads_its_package_data(installed):
    newsbeam = installed / "venv" / "bin" / "newsbeam"
    text = ("President Donald Trump said the United States would send ventilators to Russia after a "
            "call with Vladimir Putin.")
    tagged = subprocess.run([str(newsbeam), "tag"], input=json.dumps({"id": "a", "title": "", "text": text}),
                            cwd=installed, capture_output=True, text=True, timeout=600)
    assert tagged.returncode == 0, tagged.stderr
    record = json.loads(tagged.stdout)
    assert {"Donald Trump", "Vladimir Putin"} <= set(record["persons"])
    assert str(installed / "venv") in _run(installed / "venv" / "bin" / "python", "-c",
                                           "import newsbeam.pipeline.config as c; print(c.DEFAULT_CONFIG)",
                                           cwd=installed).stdout
    for command in (("run", "--help"), ("kibana", "setup", "--help")):
        result = _run(newsbeam, *command, cwd=installed)
        assert result.returncode == 0, result.stderr
        assert "usage: newsbeam" in result.stdout
