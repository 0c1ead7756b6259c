#!/usr/bin/env bash
# Download the port's released teacher pairs into data/ and the CIFAR-10 teacher it distilled into models/.
#
#   bash scripts/download_data.sh        # run from the repository root
#
# data/cifar.hdf5      100,000 pairs (10,000 seeds reused for each class), the port's /data/{i} layout
# data/cifar_toy.hdf5  the port's small subset, same layout
# models/edm-cifar10-32x32-cond-vp.pkl  EDM's conditional CIFAR-10 VP teacher (the port trained from this pickle)
#
# The pair files read directly with dmd.data.PairDataset; `python -m dmd convert-pairs data/cifar.hdf5
# data/cifar-pairs.h5` rewrites them in our faster layout. Files already present are kept.
set -euo pipefail

PAIRS_URL="https://huggingface.co/datasets/Devrim/dmd_cifar10_edm_distillation_dataset/resolve/main"
TEACHER_URL="https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl"

fail() {
    echo "error: $*" >&2
    exit 1
}

# Download $1 to $2 through a .part file, so an interrupted download never leaves a truncated $2.
fetch() {
    local url=$1 dest=$2
    if [[ -s "$dest" ]]; then
        echo "$dest exists, keeping it"
        return
    fi
    mkdir -p "$(dirname "$dest")"
    echo "downloading $url -> $dest"
    local ok=0
    if command -v curl >/dev/null 2>&1; then
        curl --fail --location --retry 3 --connect-timeout 20 --output "$dest.part" "$url" || ok=$?
    elif command -v wget >/dev/null 2>&1; then
        wget --tries=3 --timeout=20 --output-document="$dest.part" "$url" || ok=$?
    else
        fail "neither curl nor wget is installed"
    fi
    if [[ $ok -ne 0 ]]; then
        rm -f "$dest.part"
        fail "could not download $url (offline, or the file moved?)"
    fi
    mv "$dest.part" "$dest"
}

fetch "$PAIRS_URL/cifar.hdf5?download=true" data/cifar.hdf5
fetch "$PAIRS_URL/cifar_toy.hdf5?download=true" data/cifar_toy.hdf5
fetch "$TEACHER_URL" models/edm-cifar10-32x32-cond-vp.pkl
echo "done: data/cifar.hdf5, data/cifar_toy.hdf5, models/edm-cifar10-32x32-cond-vp.pkl"
