"""The README's example runs as written (in a fresh process)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import hybrid_ep_infer

from dist_utils import free_port

README = Path(__file__).resolve().parent.parent / "README.md"
FINISHED = "README example finished"
# torch 2.13 (CPU) with gloo now and then aborts a process at interpreter exit, after all its
# work, with exactly this message (seen once in ~30 runs of the compile example, and in spawned
# gloo ranks: tests/dist_utils.py). The example counts as run if it reached its last line.
TEARDOWN_ABORT = "terminate called without an active exception"


@pytest.mark.parametrize("section_title", ["## Example", "## torch.compile and CUDA graphs"])
def test_readme_example_runs(tmp_path, section_title):
    text = README.read_text()
    section = text.split(section_title, 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code + f"print({FINISHED!r}, flush=True)\n")  # flushed before any exit-time abort
    package_root = str(Path(hybrid_ep_infer.__file__).resolve().parent.parent)  # the copy under test
    env = dict(os.environ, MASTER_PORT=str(free_port()),
               PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert FINISHED in done.stdout, done.stderr
    exit_abort = done.returncode == -6 and done.stderr.strip() == TEARDOWN_ABORT
    assert done.returncode == 0 or exit_abort, done.stderr


def _normalized(command: str) -> str:
    """A pip or pytest command without what does not change what it installs or runs."""
    command = re.sub(r"^python3? -m ", "", command.strip())
    command = re.sub(r" -q\b| --timeout \d+| --retries \d+", "", command)
    return " ".join(command.split())


def test_ci_runs_the_readme_commands():
    """.ci/run installs and tests with the README's commands (Install, vLLM on CPUs, Test)."""
    ci = (README.parent / ".ci" / "run").read_text()
    readme_commands = set()
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            readme_commands.add(_normalized(line.split("  #")[0].split(" # ")[0]))
    ci_commands = [_normalized(line.split(" # ")[0]) for line in ci.splitlines()
                   if re.match(r"\s*python3? -m (pip (install|uninstall)|pytest)", line)]
    ci_commands = [c for c in ci_commands if c != "pip install --upgrade pip"]
    assert len(ci_commands) >= 4, ci_commands
    missing = [c for c in ci_commands if c not in readme_commands]
    assert not missing, f".ci/run runs commands the README does not give: {missing}"
