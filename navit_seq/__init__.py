"""NaViT packed image encoder + Pix2Seq-v2 sequence decoder in JAX/Flax NNX.

Importing the package quiets TensorFlow (TFDS and clu load it; navit_seq uses it only to read
and write files) before it loads: no C++ INFO/WARNING lines (the CPU-instructions banner) and no
oneDNN kernels (nor their "oneDNN custom operations are on" banner). Processes started from here
(grain workers, scene-drawing workers) inherit the settings; a value already set wins.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
