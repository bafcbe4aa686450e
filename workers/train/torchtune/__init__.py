"""The torchtune training backend: torchtune's LoRA recipe in its own environment, behind one function.

    from workers.train.torchtune import train_torchtune
    result = train_torchtune(spec, dataset_dir, out_dir, ctx)     # spec.backend == "torchtune"

By role: `env.py` (the isolated environment), `recipe.py` (steps, sample order, builder, the recipe's
config), `process.py` (the recipe subprocess, its output, cancel and orphans), `convert.py` (torchtune's
adapter as a PEFT adapter folder), `backend.py` (`train_torchtune`), and `entry.py`, which runs inside
the torchtune environment and imports nothing of the project.
"""
from workers.train.torchtune.backend import train_torchtune
from workers.train.torchtune.env import TORCHTUNE_VERSION, TorchtuneEnvMissing, torchtune_python
from workers.train.torchtune.process import TorchtuneRunFailed

__all__ = ["train_torchtune", "torchtune_python", "TorchtuneEnvMissing", "TorchtuneRunFailed", "TORCHTUNE_VERSION"]
