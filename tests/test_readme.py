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


@pytest.mark.parametrize("section_title", ["## Example", "## torch.compile and CUDA graphs"])
def test_readme_example_runs(tmp_path, section_title):
    text = README.read_text()
    section = text.split(section_title, 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code)
    package_root = str(Path(hybrid_ep_infer.__file__).resolve().parent.parent)  # the copy under test
    env = dict(os.environ, MASTER_PORT=str(free_port()),
               PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
