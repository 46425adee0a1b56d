"""What a freshly initialised student predicts, per seed: why some demo seeds collapsed.

    python benchmarks/bench_prostate_init.py [--data runs/demo/data/prostate] [--seeds 5]

For each seed (``seed_everything`` as ``distill fit`` does it, then the demo's width-4 slim U-Net,
built by :class:`~distill.modules.SegmentationModule`), one 48x48 training batch of 16 slices:
the mean foreground probability and the fraction of pixels predicted foreground, with the random
output layer (``foreground_prior=None``), with zero output weights under the 1 % prior bias (the
old default, ``foreground_prior_weight_std=0``) and with the default (the network's own random
output weights under the prior bias). Writes the synthetic demo data first when ``--data`` does
not exist.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch

from data_modules.prostate import ProstateDataModule
from data_modules.synth_prostate import write_synthetic_prostate
from distill.modules import SegmentationModule

INITIALISATIONS = {
    "random": {"foreground_prior": None},
    "prior 0.01, zero weights": {"foreground_prior": 0.01, "foreground_prior_weight_std": 0.0},
    "prior 0.01, own weights (default)": {},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("runs/demo/data/prostate"))
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    if not args.data.exists():
        write_synthetic_prostate(args.data, seed=0, scale=1.0, size=96)
    data = ProstateDataModule(data_root=str(args.data), image_size=48, batch_size=16, num_workers=0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    print(f"batch: {batch['label'].float().mean():.2%} of the pixels are gland")
    print("seed | output layer | mean p(gland) | pixels predicted gland")
    for seed in range(args.seeds):
        for layer, init in INITIALISATIONS.items():
            L.seed_everything(seed, verbose=False)
            module = SegmentationModule(network="slim_unet", network_kwargs={"width": 4}, **init)
            with torch.no_grad():
                p = module.train()(batch["image"]).softmax(1)[:, 1]
            print(f"{seed} | {layer} | {p.mean():.3f} | {(p > 0.5).float().mean():.1%}")


if __name__ == "__main__":
    main()
