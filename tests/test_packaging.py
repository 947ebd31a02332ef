"""`pip install .` (not editable): the wheel carries the configs (package data, found with
importlib.resources), and the installed package runs from a folder outside the repository: the
CLI, and config resolution by name / by the `configs/...` path users know."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, blindseg_dist, blindseg_dist.engine.trainer
from blindseg_dist.config import find_config, load_config, shipped_config_names
from blindseg_dist.tools.ablate import load_grid
from blindseg_dist.tools.demo import demo_config_path
print("PROBE " + json.dumps({
    "file": blindseg_dist.__file__, "trainer": blindseg_dist.engine.trainer.__file__,
    "by_path": str(find_config("configs/demo.yaml")), "by_name": str(find_config("demo")),
    "scaling": load_config("configs/scaling/resnet50.yaml").model.backbone,
    "demo_backbone": load_config("demo").model.backbone, "demo_path": str(demo_config_path()),
    "grid": load_grid("tiny")[0], "names": shipped_config_names()}))
"""


def _run(cmd, cwd, pythonpath):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(pythonpath), "HOME": str(cwd), "PYTHONNOUSERSITE": "1"}
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{cmd}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def test_wheel_installs_and_runs_outside_the_repository(tmp_path):
    # build from a copy of the sources, so the checkout gets no build/ or *.egg-info
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "blindseg_dist", "configs"):
        from_, to = ROOT / name, src / name
        if from_.is_dir():
            shutil.copytree(from_, to, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(from_, to)
    assert (src / "blindseg_dist" / "configs").is_symlink()  # the package links to the top-level configs/
    wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels)], check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("blindseg_dist-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    shipped = sorted(p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.yaml"))
    installed = sorted(p.relative_to(site / "blindseg_dist" / "configs").as_posix()
                       for p in (site / "blindseg_dist" / "configs").rglob("*.yaml"))
    assert installed == shipped and "scaling/resnet50.yaml" in installed and "ablation/tiny.yaml" in installed
    assert not (site / "blindseg_dist" / "configs").is_symlink()  # real files in the installed package

    out = _run([sys.executable, "-c", PROBE], elsewhere, site)
    probe = json.loads(out.split("PROBE ", 1)[1])
    for key in ("file", "trainer", "by_path", "by_name", "demo_path"):
        assert probe[key].startswith(str(site)) and not probe[key].startswith(str(ROOT)), (key, probe[key])
    assert probe["by_path"] == probe["by_name"] == probe["demo_path"] == str(site / "blindseg_dist/configs/demo.yaml")
    assert probe["scaling"] == "resnet50" and probe["demo_backbone"] == "resnet18" and probe["grid"]
    assert "demo" in probe["names"] and "scaling/resnet50" in probe["names"]

    help_text = _run([sys.executable, "-m", "blindseg_dist", "demo", "--help"], elsewhere, site)
    assert "--steps" in help_text and "--processes" in help_text
    script = _run([str(site / "bin" / "blindseg"), "demo", "--help"], elsewhere, site)
    assert script == help_text


def test_one_distribution_provides_cv2():
    """imagecorruptions-imaug declares opencv-python; installed without its dependencies (launch/setup.sh,
    requirements/nodeps.txt) cv2 stays opencv-python-headless's alone: two packages writing one cv2
    leave whichever was installed last."""
    import importlib.metadata as md

    owners = sorted(set(md.packages_distributions().get("cv2", [])))
    assert owners == ["opencv-python-headless"], owners
    assert md.version("imagecorruptions-imaug")  # the corruption package is installed
    nodeps = (ROOT / "requirements" / "nodeps.txt").read_text()
    assert "imagecorruptions-imaug==" in nodeps and "--no-deps -r requirements/nodeps.txt" in \
        (ROOT / "launch" / "setup.sh").read_text()
