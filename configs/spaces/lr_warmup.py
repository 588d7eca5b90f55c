"""Search space: the peak learning rate (log-uniform) and the warmup of the tiny model.

    python -m jaxllm.tune --config=configs/tiny.py --space=configs/spaces/lr_warmup.py \
        --trials=16 --workdir=runs/tune --config.train.num_steps=240 \
        --config.train.eval_every=30 --config.train.sample_tokens=0

A space file defines SPACE: config key -> an Optuna distribution (log=True for scales such as
learning rates). Other keys worth searching: optim.weight_decay (FloatDistribution(0, 0.3)),
optim.b2 (FloatDistribution(0.9, 0.999)), train.global_batch_size (CategoricalDistribution([8,
16, 32])). A file may define GRID instead (config key -> list of values): every combination is
tried once (configs/spaces/lr_grid.py).
"""

from optuna.distributions import FloatDistribution, IntDistribution

SPACE = {
    'optim.peak_lr': FloatDistribution(2e-4, 5e-2, log=True),
    'optim.warmup_steps': IntDistribution(0, 100, step=10),
}
