"""A recipe for the toy objective (tests/train/toy.py): `--config tests/train/toy_recipe.py`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: `train.toy`

from train import toy  # noqa: E402

from navit_seq import config_common  # noqa: E402


def get_config(arg=None):
    config = toy.toy_config()
    config.trainer = "train.toy"  # a module path: navit_seq.main calls its objective(config)
    config.num_train_steps = 6
    config.eval_every_steps = 3
    config.checkpoint_every_steps = 2
    config.log_batch_fingerprint = True
    config.data.sleep_s = 0.0  # > 0 lets the preemption tests catch the run mid-way
    options = config_common.recipe_options(arg, known=("steps", "sleep"))  # "steps=40,sleep=0.05"
    config.num_train_steps = int(options.get("steps", config.num_train_steps))
    config.data.sleep_s = float(options.get("sleep", 0.0))
    return config
