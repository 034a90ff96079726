"""A task's fingerprint: a Gaussian over its L2-normalised frozen image features, router keys and a calibrated gate.

The covariance is Ledoit-Wolf shrunk towards a scaled identity, so it stays well conditioned with fewer images
than feature dimensions. The gate is calibrated on cross-fitted distances: each image's distance is measured with
a Gaussian fitted without it, so the calibration sees what unseen images of the task look like.

A distance to the task alone cannot say "this task, or nothing" (a diffuse task is close to unrelated images, issue
16), so the fingerprint also keeps a held-out sample of the task's own features, with their cross-fitted similarity
to the class means: the service calibrates on it, per task, a zero-shot check against its open vocabulary
(`ZeroShotCheck`), which is only known when the task is served.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .gate import Gate, Vocabulary, ZeroShotCheck

MIN_IMAGES = 4
CALIBRATION_SAMPLE = 512  # held-out own features kept for the zero-shot check's calibration (float16: 512 KiB at 512-d)


WHITENER_BLOCKS = 4  # row blocks of a served whitener: (k + 1) / 2k of the square's floats (62.5 %); more blocks
# save little memory and cost a matrix product each (measured at batch 1, 512-d: 4 blocks 1.2x the square's time, 8 1.9x)


@dataclass(frozen=True, eq=False)
class TriangularWhitener:
    """A lower-triangular (d, d) matrix W held as row blocks, each only as wide as the triangle is at its last row, so
    the zeros above the diagonal are mostly not stored, and `apply` stays a few BLAS products: z = x Wᵀ."""

    blocks: tuple[torch.Tensor, ...]  # block i: rows [lo_i, hi_i) and columns [0, hi_i) of W

    @classmethod
    def from_square(cls, square: torch.Tensor, n_blocks: int = WHITENER_BLOCKS, dtype: torch.dtype | None = None):
        d = square.shape[0]
        bounds = sorted({round(i * d / n_blocks) for i in range(n_blocks + 1)})
        return cls(tuple(square[lo:hi, :hi].to(dtype or square.dtype).contiguous() for lo, hi in zip(bounds, bounds[1:])))

    @property
    def dim(self) -> int:
        return self.blocks[-1].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d) rows x -> (B, d) rows x Wᵀ."""
        return torch.cat([x[:, : b.shape[1]] @ b.T for b in self.blocks], dim=1)

    def norm_sq(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) |x Wᵀ|²."""
        return self.apply(x).square().sum(-1)

    def square(self) -> torch.Tensor:
        out = torch.zeros(self.dim, self.dim, dtype=self.blocks[0].dtype)
        lo = 0
        for b in self.blocks:
            out[lo : lo + b.shape[0], : b.shape[1]] = b
            lo += b.shape[0]
        return out.tril()


@dataclass(frozen=True)
class Gaussian:
    mean: torch.Tensor  # (d,)
    whitener: TriangularWhitener  # inverse Cholesky factor of the covariance: z = whitener @ (f - mean)
    logdet: float  # log |Σ|
    shrinkage: float  # Ledoit-Wolf weight of the identity target, in [0, 1]

    @classmethod
    def fit(cls, features: torch.Tensor) -> "Gaussian":
        x = features.double()
        mean = x.mean(0)
        cov, shrinkage = ledoit_wolf(x - mean)
        chol = torch.linalg.cholesky(cov)
        eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        whitener = torch.linalg.solve_triangular(chol, eye, upper=False)
        logdet = 2.0 * chol.diagonal().log().sum().item()
        return cls(mean=mean, whitener=TriangularWhitener.from_square(whitener), logdet=logdet, shrinkage=shrinkage)

    @classmethod
    def served(cls, mean: torch.Tensor, whitener: torch.Tensor, logdet: float, shrinkage: float) -> "Gaussian":
        """As a replica holds it: float32 (d² is summed from terms of about 1, so float32 keeps 6 significant digits)."""
        return cls(mean.float(), TriangularWhitener.from_square(whitener, dtype=torch.float32), logdet, shrinkage)

    @property
    def nbytes(self) -> int:
        return self.mean.nbytes + self.whitener.nbytes

    def mahalanobis_sq(self, features: torch.Tensor) -> torch.Tensor:
        return self.whitener.norm_sq(features.to(self.mean) - self.mean)

    def log_likelihood(self, features: torch.Tensor) -> torch.Tensor:
        return self.log_likelihood_of(self.mahalanobis_sq(features))

    def log_likelihood_of(self, d2: torch.Tensor) -> torch.Tensor:
        """log N from the squared distance (float64)."""
        d = self.mean.shape[0]
        return -0.5 * (d * math.log(2 * math.pi) + self.logdet + d2.double())


def ledoit_wolf(centered: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Shrunk covariance (1-s)·S + s·μ·I with the Ledoit-Wolf optimal s, from centred samples (n, d)."""
    n, d = centered.shape
    emp = centered.T @ centered / n  # (d, d)
    mu = emp.diagonal().mean()
    x2 = centered.square()
    beta_ = (x2.T @ x2).sum() / n - emp.square().sum()  # Ledoit & Wolf (2004); same estimator as scikit-learn's
    delta = (emp - mu * torch.eye(d, dtype=emp.dtype, device=emp.device)).square().sum()
    shrinkage = 0.0 if delta <= 0 else float(min(beta_ / n, delta) / delta)
    floor = 1e-6 * mu + 1e-12  # keeps the Cholesky finite even for identical images
    eye = torch.eye(d, dtype=emp.dtype, device=emp.device)
    return (1 - shrinkage) * emp + (shrinkage * mu + floor) * eye, shrinkage


@dataclass(frozen=True, eq=False)
class TaskStats:
    gaussian: Gaussian
    keys: torch.Tensor  # (k, d) router keys: L2-normalised class means
    gate: Gate
    n_images: int
    calibration: torch.Tensor | None = None  # (m, d) float16: a seeded sample of the task's own normalised features (None: old artifact)
    calibration_key_cos: torch.Tensor | None = None  # (m,) their max cosine to class means fitted without them
    _checks: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # memo of zero_shot_check

    def mahalanobis_sq(self, features: torch.Tensor) -> torch.Tensor:
        return self.gaussian.mahalanobis_sq(F.normalize(features.to(self.gaussian.mean.dtype), dim=-1))

    def likelihood_and_weight(self, features: torch.Tensor, normalized: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) log-likelihood (float64) and (B,) gate w (float32), from one distance computation; `normalized`: the
        rows are L2-normalised already (the router's are)."""
        d2 = self.gaussian.mahalanobis_sq(features) if normalized else self.mahalanobis_sq(features)
        return self.gaussian.log_likelihood_of(d2), self.gate(d2.double()).float()

    def log_likelihood(self, features: torch.Tensor) -> torch.Tensor:
        return self.gaussian.log_likelihood_of(self.mahalanobis_sq(features))

    def weight(self, features: torch.Tensor) -> torch.Tensor:
        """Gate w in (0, 1) per sample: near 1 on the task's own images, near 0 far from them."""
        return self.gate(self.mahalanobis_sq(features).double()).float()

    def zero_shot_check(self, class_names, class_text: torch.Tensor, vocabulary: Vocabulary) -> ZeroShotCheck | None:
        """The task's check against `vocabulary`, calibrated on its held-out sample; None when it cannot have one (an
        artifact made before the sample was kept, or no vocabulary name other than the task's own). Memoised per
        (class text, vocabulary) object, so a router rebuilt on every hot swap recalibrates only new tasks."""
        key = (id(class_text), id(vocabulary))
        hit = self._checks.get(key)
        if hit is not None and hit[0] is class_text and hit[1] is vocabulary:
            return hit[2]
        check = None
        if self.calibration is not None and self.calibration_key_cos is not None and self.calibration.shape[0] >= 2:
            others = vocabulary.others(class_names)
            if others.any():
                check = ZeroShotCheck.calibrate(
                    self.calibration.float(), self.calibration_key_cos, self.keys, F.normalize(class_text.float(), dim=-1),
                    vocabulary.text, others, vocabulary.logit_scale,
                )
                if not math.isfinite(check.threshold):  # a sample with NaN/inf would reject every image: distance alone
                    check = None
        self._checks[key] = (class_text, vocabulary, check)  # holds both, so their ids cannot be reused while memoised
        return check

    def release_calibration(self) -> None:
        """Let the calibration sample go once the checks it is needed for are calibrated and memoised: a replica has one
        vocabulary for its lifetime, and the sample is most of a task's resident bytes (512 KiB at 512-d). A check
        asked for afterwards against another vocabulary is None (the distance gate alone)."""
        object.__setattr__(self, "calibration", None)
        object.__setattr__(self, "calibration_key_cos", None)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors held (Gaussian, keys, calibration sample if still held)."""
        sample = 0 if self.calibration is None else self.calibration.nbytes + self.calibration_key_cos.nbytes
        return self.gaussian.nbytes + self.keys.nbytes + sample

    def to_tensors(self) -> dict[str, torch.Tensor]:
        g = self.gaussian
        return {
            "mean": g.mean.float().contiguous(),
            "whitener_tril": pack_tril(g.whitener.square().float()),  # lower triangular: half the bytes of the square
            "logdet": torch.tensor([g.logdet], dtype=torch.float64),
            "shrinkage": torch.tensor([g.shrinkage], dtype=torch.float64),
            "keys": self.keys.float().contiguous(),
            "gate": self.gate.to_tensor(),
            "n_images": torch.tensor([self.n_images], dtype=torch.int64),
            **({} if self.calibration is None or self.calibration_key_cos is None else {
                "calibration": self.calibration.half().contiguous(),
                "calibration_key_cos": self.calibration_key_cos.float().contiguous(),
            }),
        }

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "TaskStats":
        whitener = unpack_tril(t["whitener_tril"], t["mean"].shape[0]) if "whitener_tril" in t else t["whitener"]
        gaussian = Gaussian.served(t["mean"], whitener, t["logdet"].item(), t["shrinkage"].item())
        calibration, key_cos = t.get("calibration"), t.get("calibration_key_cos")
        if calibration is not None and key_cos is not None:
            d = t["mean"].shape[0]
            if calibration.ndim != 2 or calibration.shape[1] != d or key_cos.shape != (calibration.shape[0],):
                raise ValueError(f"calibration sample of shape {tuple(calibration.shape)} with {tuple(key_cos.shape)} similarities "
                                 f"does not fit {d}-d statistics")
            calibration, key_cos = calibration.half(), key_cos.float()
        else:
            calibration = key_cos = None
        return cls(gaussian=gaussian, keys=t["keys"].float(), gate=Gate.from_tensor(t["gate"]), n_images=int(t["n_images"]),
                   calibration=calibration, calibration_key_cos=key_cos)


def pack_tril(square: torch.Tensor) -> torch.Tensor:
    """The lower triangle of a (d, d) matrix, row by row: (d(d+1)/2,)."""
    rows, cols = torch.tril_indices(*square.shape)
    return square[rows, cols].contiguous()


def unpack_tril(packed: torch.Tensor, d: int) -> torch.Tensor:
    if packed.shape != (d * (d + 1) // 2,):
        raise ValueError(f"a packed lower triangle of a {d}x{d} matrix has {d * (d + 1) // 2} values, got {tuple(packed.shape)}")
    out = torch.zeros(d, d, dtype=packed.dtype)
    rows, cols = torch.tril_indices(d, d)
    out[rows, cols] = packed
    return out


def class_means(features: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    if labels is None:
        return F.normalize(features.mean(0, keepdim=True), dim=-1)
    classes = labels.unique()
    return F.normalize(torch.stack([features[labels == c].mean(0) for c in classes]), dim=-1)


def folds(n: int, n_folds: int, seed: int):
    """(held-out indices, mask of the rest) for each of `n_folds` seeded folds of n samples."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    for fold in order.chunk(min(n_folds, n)):
        rest = torch.ones(n, dtype=torch.bool)
        rest[fold] = False
        yield fold, rest


def cross_fitted_distances(features: torch.Tensor, n_folds: int = 5, seed: int = 0) -> torch.Tensor:
    """d² of every sample under a Gaussian fitted on the other folds."""
    d2 = torch.empty(features.shape[0], dtype=torch.float64)
    for fold, rest in folds(features.shape[0], n_folds, seed):
        d2[fold] = Gaussian.fit(features[rest]).mahalanobis_sq(features[fold])
    return d2


def cross_fitted_key_cos(
    features: torch.Tensor, labels: torch.Tensor | None, n_folds: int = 5, seed: int = 0
) -> torch.Tensor:
    """Max cosine of every sample to the class means of the other folds (the same folds as `cross_fitted_distances`)."""
    out = torch.empty(features.shape[0], dtype=torch.float64)
    for fold, rest in folds(features.shape[0], n_folds, seed):
        keys = class_means(features[rest], None if labels is None else labels[rest])
        out[fold] = (features[fold] @ keys.T).amax(-1).double()
    return out


def fit_task_stats(
    features: torch.Tensor, labels: torch.Tensor | None = None, n_folds: int = 5, seed: int = 0
) -> TaskStats:
    """Fingerprint a task from the frozen image features of its training images (one row per image)."""
    if features.ndim != 2 or features.shape[0] < MIN_IMAGES:
        raise ValueError(f"a task fingerprint needs at least {MIN_IMAGES} feature rows, got shape {tuple(features.shape)}")
    if labels is not None and labels.shape[0] != features.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {features.shape[0]} feature rows")
    f = F.normalize(features.detach().double().cpu(), dim=-1)
    y = None if labels is None else labels.cpu()
    gate = Gate.calibrate(cross_fitted_distances(f, n_folds, seed))
    keys = class_means(f, y).float()
    key_cos = cross_fitted_key_cos(f, y, n_folds, seed)
    sample = torch.randperm(f.shape[0], generator=torch.Generator().manual_seed(seed + 1))[:CALIBRATION_SAMPLE].sort().values
    return TaskStats(gaussian=Gaussian.fit(f), keys=keys, gate=gate, n_images=f.shape[0],
                     calibration=f[sample].half(), calibration_key_cos=key_cos[sample].float())
