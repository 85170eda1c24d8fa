"""Test-wide settings."""
import os

import pytest
import torch

# The suite runs many tiny models: one intra-op thread avoids OpenMP spin-waiting against the
# other processes of a shared 2-core machine (it was up to 80x slower with 2 threads).
torch.set_num_threads(1)
os.environ.setdefault("VLKIT_NO_PROGRESS", "1")


# architecture overrides that make each model's tiny preset smaller still (a few seconds to build)
_TINIER = {
    "clip": {"vision": '{"image_size": 32, "patch_size": 16, "dim": 32, "depth": 1, "heads": 2, "mlp_dim": 64}',
             "embed_dim": "16",
             "text": '{"dim": 32, "depth": 1, "heads": 2, "mlp_dim": 64, "context_length": 48, "act": "gelu"}'},
    "blip": {"dim": 32, "heads": 2, "mlp_dim": 64, "layers": 2, "embed_dim": 16, "queue_size": 8,
             "vision.dim": 32, "vision.depth": 1, "vision.heads": 2, "vision.mlp_dim": 64},
    "albef": {"dim": 32, "heads": 2, "mlp_dim": 64, "text_layers": 1, "fusion_layers": 1, "embed_dim": 16,
              "queue_size": 32, "vision.dim": 32, "vision.depth": 1, "vision.heads": 2, "vision.mlp_dim": 64},
}


@pytest.fixture(scope="session")
def untrained_run(tmp_path_factory):
    """``untrained_run("clip")``: a run folder (config, tokenizer, weights) of a very small,
    untrained model (``vlkit train --steps 0`` exports the initial weights), made once a session."""
    from vlkit.data.synthetic import write_dataset
    from vlkit.train.run import RunArgs, train
    made = {}
    data = tmp_path_factory.mktemp("untrained-data") / "world"  # a small world: a quick vocabulary
    write_dataset(data, sizes={"train": 40, "val": 2, "test": 2})

    def make(name: str):
        if name not in made:
            run = tmp_path_factory.mktemp(f"untrained-{name}") / "run"
            train(RunArgs(model=name, data=str(data), out=str(run), steps=0, batch_size=8, progress=False,
                          overrides=dict(_TINIER[name])))
            made[name] = run
        return made[name]
    return make
