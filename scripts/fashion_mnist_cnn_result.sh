#!/usr/bin/env bash
# The README's convolutional result: MHD, isolated training and FedAvg on Fashion-MNIST, 20
# clients with Dirichlet(0.1) label mixes, a small CNN (configs/fashion_mnist_cnn.toml), then
# one table of the three.
#   scripts/fashion_mnist_cnn_result.sh [OUT] [extra run flags, e.g. --device cuda --data-dir D]
# OUT defaults to runs/fashion_mnist_cnn; OUT/result.md holds the table.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/fashion_mnist_cnn}"
shift || true
for method in mhd isolated fedavg; do
    start=$SECONDS
    python -m mhd_fast run --config configs/fashion_mnist_cnn.toml --method "$method" \
        --name "fashion_mnist_cnn-$method" --out "$out/$method" "$@"
    echo "$method: $((SECONDS - start)) s wall"
done
python scripts/method_table.py "$out"/{mhd,isolated,fedavg}/metrics.json --out "$out/result.md"
