"""A 12-point grid of peak learning rates, 2e-4 to 5e-2 evenly spaced in log (a factor of 1.65
apart), every point trained to the end: the reference for configs/spaces/lr_warmup.py's study.

    python -m jaxllm.tune --config=configs/tiny.py --space=configs/spaces/lr_grid.py \
        --trials=12 --pruner=none --workdir=runs/lr_grid --config.train.num_steps=240 \
        --config.train.eval_every=30 --config.train.sample_tokens=0
"""

GRID = {'optim.peak_lr': [float(f'{2e-4 * 250 ** (i / 11):.3g}') for i in range(12)]}
