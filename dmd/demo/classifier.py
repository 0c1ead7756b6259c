"""The demo's judge: a small CNN trained on the real digits, scoring samples by class accuracy and a "digits FID".

The digits FID is the Frechet distance between Gaussians fitted to the classifier's penultimate features (64-d) of
generated and real images, computed with dmd.fid's float64 statistics and sqrtm, the way Inception FID is.
"""

import torch
import torch.nn.functional as F
from torch import nn

from dmd.demo.digits import NUM_CLASSES

FEATURE_DIM = 64


# Two conv stages (16x16 -> 8x8 -> 4x4) and a linear feature layer; the head classifies the features after a ReLU.
class DigitClassifier(nn.Module):
    def __init__(
        self,
        channels=16,  # Channels of the first stage; the second has twice as many.
        feature_dim=FEATURE_DIM,  # Width of the penultimate layer (the FID features).
        num_classes=NUM_CLASSES,  # Output logits.
    ):
        super().__init__()
        c = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (N, c, 8, 8)
            nn.Conv2d(c, 2 * c, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (N, 2c, 4, 4)
            nn.Flatten(),
            nn.Linear(2 * c * 16, feature_dim),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x):
        """Penultimate features (N, feature_dim) of images x (N, 1, 16, 16) in [-1, 1], before the ReLU."""
        return self.body(x)

    def forward(self, x):
        return self.head(F.relu(self.body(x)))


def random_shift(x, generator, max_shift=1):
    """Translate each image (N, 1, H, W) by up to `max_shift` pixels per axis, filling with background (-1)."""
    n, _, h, w = x.shape
    windows = F.pad(x, [max_shift] * 4, value=-1.0).unfold(2, h, 1).unfold(3, w, 1)  # (N, 1, 2s+1, 2s+1, H, W)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    return windows[torch.arange(n), :, dy, dx]


def split_holdout(num, holdout, seed):
    """Split indices 0..num-1 into (train, held-out) index tensors by a seeded permutation."""
    perm = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
    n_hold = int(round(num * holdout))
    return perm[n_hold:], perm[:n_hold]


@torch.no_grad()
def predict(classifier, images, batch_size=512):
    """Class predictions (N,) of images (N, 1, 16, 16) in [-1, 1]."""
    classifier.eval()
    return torch.cat([classifier(x).argmax(dim=1) for x in images.float().split(batch_size)])


@torch.no_grad()
def features(classifier, images, batch_size=512):
    """Penultimate features (N, feature_dim) as float64 numpy, the input of the digits FID."""
    classifier.eval()
    return torch.cat([classifier.features(x) for x in images.float().split(batch_size)]).double().numpy()


def train_classifier(images, labels, *, seed=0, epochs=15, batch_size=64, lr=2e-3, holdout=0.2):
    """Train a DigitClassifier on a seeded split of the digits; return it and its held-out accuracy."""
    train_idx, hold_idx = split_holdout(len(images), holdout, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # The initial weights.
        net = DigitClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    for _ in range(epochs):
        net.train()
        for idx in train_idx[torch.randperm(len(train_idx), generator=g)].split(batch_size):
            x = random_shift(images[idx], g)  # Shifts make the judge robust to small offsets of samples.
            loss = F.cross_entropy(net(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    accuracy = (predict(net, images[hold_idx]) == labels[hold_idx]).float().mean().item()
    return net.eval().requires_grad_(False), accuracy
