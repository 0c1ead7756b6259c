"""f-distill (Xu et al. 2025, "One-step Diffusion Models with f-Divergence Distribution Matching"): DMD2's
distribution-matching term weighted per sample by h(r), which turns its reverse KL into another f-divergence.

r = p_data / p_G at a noised generated sample is read off DMD2's own discriminator: r = exp(logit) of the GAN head at
the very x_t and sigma the DM loss drew (the logit clamped to [-10, 10] first), clipped to [0.1, 20], without
gradient. As NVIDIA FastGen does, r is made relative within a noise level first: the DM loss's index range
[t_min T, t_max T) is cut into 10 equal bins and each r divided by its bin's mean r over the global batch (optionally
an EMA of those means); then the weights h(r) are divided by their mean over the global batch, so they average 1.
The DM term becomes mean_i(w_i DM_i). Under DDP every rank holds its rows of the global batch; the bin sums and
counts, the sum of h and its extremes are all-reduced, so K processes weight as one does.
"""

from typing import Dict, Tuple

import torch

from dmd.utils import distributed as dist

# The weighting h(r) of each divergence of dmd.config.DIVERGENCES, which names them with their formulas.
WEIGHTINGS = {
    "rkl": torch.ones_like,  # reverse KL: DMD2's own DM term
    "kl": lambda r: r,
    "js": lambda r: 1 - 1 / (1 + r),  # Jensen-Shannon: the paper's best
    "hellinger": torch.sqrt,  # squared Hellinger
    "jeffreys": lambda r: 1 + r,
    "neyman": lambda r: 1 / r,  # Neyman chi^2
    "sf": lambda r: 1 / (1 + r),  # forward-KL-like
}
LOGIT_CLAMP = 10.0  # |logit| bound before exp, so that r stays finite
RATIO_CLIP = (0.1, 20.0)  # the range r is clipped to (the paper's and FastGen's)
NUM_BINS = 10  # noise-level bins of the ratio normalisation
EPS = 1e-6  # added to every normaliser (FastGen's)


def weighting(divergence: str):
    """h(r) of a divergence name; ValueError naming the known ones."""
    if divergence not in WEIGHTINGS:
        raise ValueError(f"unknown divergence {divergence!r}; known: {', '.join(WEIGHTINGS)}")
    return WEIGHTINGS[divergence]


def density_ratio(logits: torch.Tensor) -> torch.Tensor:
    """r = exp(clamp(logit, -10, 10)) clipped to [0.1, 20], without gradient: (N,) -> (N,) float32."""
    r = logits.detach().float().clamp(-LOGIT_CLAMP, LOGIT_CLAMP).exp()
    return r.clamp(*RATIO_CLIP)


def bin_of(index: torch.Tensor, first: int, stop: int, bins: int = NUM_BINS) -> torch.Tensor:
    """The bin (N,) int64 of grid indices in [first, stop) cut into `bins` equal parts."""
    return torch.div((index - first) * bins, stop - first, rounding_mode="floor").clamp(0, bins - 1)


# The per-sample weights w_i = h(r_i / m_bin(i)) / mean_j h(r_j / m_bin(j)) of one generator step, with the bin
# means m (an EMA of them at rate > 0) kept as state.
class FDistillWeights:
    """The f-distill weights of the DM term from the discriminator's logits at the DM loss's noised samples.

    `FDistillWeights(divergence, index_range, ema=0.0)`: `divergence` is a key of WEIGHTINGS, `index_range` the DM
    loss's [first, stop) grid index range (KarrasGrid.index_range(t_min, t_max)), cut into 10 bins. Called on one
    rank's logits (B,) and the grid indices (B,) of its rows, it returns the weights (B,) and a dict h_min, h_mean,
    h_max (0-d, global batch: the weights' extremes and the mean of h(r) they were divided by). `bins` (10,) holds the
    bin means the ratios were divided by: bins <- ema bins + (1 - ema) mean for the bins with samples this step
    (from 1), a state `state_dict` / `load_state_dict` save and restore.
    """

    def __init__(
        self,
        divergence: str,  # a key of WEIGHTINGS
        index_range: Tuple[int, int],  # the DM loss's grid indices [first, stop)
        ema: float = 0.0,  # EMA rate of the bin means; 0 = this step's means alone
        device: torch.device = torch.device("cpu"),
    ) -> None:
        if not 0 <= ema < 1:
            raise ValueError(f"the ratio EMA rate must be in [0, 1), got {ema}")
        self.h = weighting(divergence)
        self.first, self.stop = index_range
        self.ema = ema
        self.bins = torch.ones(NUM_BINS, device=device)

    def __call__(self, logits: torch.Tensor, index: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Weights (B,) of this rank's rows from their logits (B,) and grid indices (B,), and the step's stats."""
        r = density_ratio(logits)
        b = bin_of(index, self.first, self.stop)
        sums = torch.zeros(2, NUM_BINS, device=r.device)  # per bin: sum of r, count
        sums[0].index_add_(0, b, r)
        sums[1].index_add_(0, b, torch.ones_like(r))
        sums = dist.all_reduce_sum(sums)
        seen = sums[1] > 0
        means = sums[0] / sums[1].clamp(min=1)
        self.bins = torch.where(seen, self.ema * self.bins + (1 - self.ema) * means, self.bins)
        h = self.h(r / (self.bins[b] + EPS))
        totals = dist.all_reduce_sum(torch.stack([h.sum(), torch.tensor(float(len(h)), device=h.device)]))
        h_mean = totals[0] / totals[1]
        w = h / (h_mean + EPS)
        extremes = dist.all_reduce_max(torch.stack([w.max(), -w.min()]))
        return w, dict(h_min=-extremes[1], h_mean=h_mean, h_max=extremes[0])

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"bins": self.bins.detach().cpu().clone()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        bins = state["bins"]
        if not isinstance(bins, torch.Tensor) or bins.shape != (NUM_BINS,):
            raise ValueError(f"the f-distill ratio bins must be a tensor of {NUM_BINS} values")
        self.bins = bins.to(device=self.bins.device, dtype=torch.float32).clone()
