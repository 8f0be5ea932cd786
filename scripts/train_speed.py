"""Training step time, fp32 against --train-precision bf16, measured in one run.

For each model (the study's BagCert rf 7 and column smoothing s 4 configurations, random
weights) the two precisions take turns, a few steps each, so that both see the same machine
load; the median over rounds is printed with the ratio. Usage: python scripts/train_speed.py
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from patchbench.defense import get_defense
from patchbench.running.train import augment

MODELS = (("bagcert", {"rf": 7}), ("ds-column", {"ablation_size": 4, "width": 48}))
BATCH, STEPS, ROUNDS = 128, 3, 7


def step_time(defense, model, optimizer, images, labels, bf16: bool) -> float:
    """Seconds per training step, as ``train.train`` takes it (augment, loss, update)."""
    layout = torch.channels_last if bf16 else torch.contiguous_format
    start = time.perf_counter()
    for _ in range(STEPS):
        batch = augment(images, 2, False).contiguous(memory_format=layout)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = defense.loss(model, batch, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / STEPS


def main() -> None:
    torch.manual_seed(0)
    images, labels = torch.rand(BATCH, 1, 28, 28), torch.randint(0, 10, (BATCH,))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}")
    for name, params in MODELS:
        defense = get_defense(name)(**params)
        fp32 = defense.build_model((1, 28, 28), 10)
        bf16 = copy.deepcopy(fp32).to(memory_format=torch.channels_last)
        runs = {False: (fp32, defense.optimizer(fp32)), True: (bf16, defense.optimizer(bf16))}
        times: dict[bool, list[float]] = {False: [], True: []}
        for round_ in range(ROUNDS + 1):  # the first round warms up
            for is_bf16, (model, optimizer) in runs.items():
                seconds = step_time(defense, model, optimizer, images, labels, is_bf16)
                if round_:
                    times[is_bf16].append(seconds)
        a, b = statistics.median(times[False]), statistics.median(times[True])
        print(f"{name} {params}: fp32 {a * 1000:.0f} ms/step, bf16 {b * 1000:.0f} ms/step, "
              f"x{a / b:.2f}")


if __name__ == "__main__":
    main()
