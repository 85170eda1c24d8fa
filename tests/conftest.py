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


@pytest.fixture
def word_squares():
    """``word_squares(n, generator, size)``: a grounding batch of ``n`` dark ``size`` px images on
    a 4 x 4 patch grid, each with two bright squares (one a colour channel) in random cells, and
    the caption [CLS] w1 w2 [SEP] whose word k names the square of channel k (``grounding``
    targets (n, 4, 16))."""
    def make(n: int, generator: torch.Generator, size: int) -> dict:
        cells = torch.randint(0, 16, (n, 2), generator=generator)
        cell = size // 4
        pixels = torch.full((n, 3, size, size), -1.0)
        ids = torch.tensor([[2, 10, 11, 3]] * n)
        targets = torch.zeros(n, 4, 16)
        for j in range(n):
            for w in range(2):
                r, c = divmod(int(cells[j, w]), 4)
                pixels[j, w, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = 1.0  # channel = word
                targets[j, 1 + w, int(cells[j, w])] = 1.0
        return {"pixel_values": pixels, "input_ids": ids, "attention_mask": torch.ones_like(ids),
                "grounding": targets}
    return make
