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

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .gate import Gate, Vocabulary, ZeroShotCheck

MIN_IMAGES = 4
CALIBRATION_SAMPLE = 512  # held-out own features kept for the zero-shot check's calibration (float16: 512 KiB at 512-d)


WHITENER_TILE = 32  # side of the square tiles a whitener is held in: the n(n+1)/2 tiles of its lower triangle, the
# diagonal ones whole, so d²/2 + d·t/2 values (53 % of the square at 512-d), applied as one batched product at any d
SERVED_DTYPE = torch.float16  # a replica's whitener tiles: 272 KiB at 512-d; on the proxy's six domains d² within
# 2.4e-3 relative of float64, gate weights within 0.004, no claim changed; low rank did worse (docs/backbone.md)


@functools.lru_cache(maxsize=None)
def _tile_index(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of each tile of an n×n lower triangle of tiles, row by row (shared by every whitener of that size)."""
    return tuple(torch.tril_indices(n, n))


@dataclass(frozen=True, eq=False)
class TriangularWhitener:
    """A lower-triangular (d, d) matrix W held as the (t, t) tiles of its lower triangle: z = x Wᵀ is one batched
    product (each tile times its column slice of x, summed per row of tiles), so the zeros above the diagonal are not
    stored except inside the diagonal tiles. On a replica the tiles are float16 over a power-of-two `scale` (no
    overflow, and the scale itself rounds nothing), multiplied in the caller's float32."""

    tiles: torch.Tensor  # (n(n+1)/2, t, t): tile (i, j), j <= i, is W[it:(i+1)t, jt:(j+1)t] / scale (W zero-padded to nt)
    dim: int
    scale: float = 1.0

    @classmethod
    def from_square(cls, square: torch.Tensor, dtype: torch.dtype | None = None, tile: int = WHITENER_TILE):
        """From the (d, d) matrix's lower triangle, held in `dtype` (default: the square's)."""
        d = square.shape[0]
        n = -(-d // tile)
        t = -(-d // n)  # the tiles' side: `tile` when it divides d, else a little less, so that padding stays under n
        rows, cols = _tile_index(n)
        padded = F.pad(square.tril(), (0, n * t - d, 0, n * t - d))
        tiles = padded.reshape(n, t, n, t).permute(0, 2, 1, 3)[rows, cols]
        dtype = dtype or square.dtype
        scale = 1.0
        if dtype == torch.float16:  # the largest |value| to [2^14, 2^15): float16 reaches 65504, subnormals 2^-29 lower
            top = tiles.abs().max().item()
            if top > 0 and math.isfinite(top):
                scale = 2.0 ** (math.floor(math.log2(top)) - 14)
        return cls((tiles / scale).to(dtype).contiguous(), d, scale)

    @property
    def nbytes(self) -> int:
        return self.tiles.nbytes

    def _rows_of_tiles(self, x: torch.Tensor) -> torch.Tensor:
        """(n, B, t) x Wᵀ / scale, by row of tiles."""
        b, t = x.shape[0], self.tiles.shape[1]
        n = -(-self.dim // t)
        rows, cols = _tile_index(n)
        if x.device.type != "cpu":
            rows, cols = rows.to(x.device), cols.to(x.device)
        if n * t != self.dim:
            x = F.pad(x, (0, n * t - self.dim))
        parts = x.reshape(b, n, t).transpose(0, 1).index_select(0, cols)  # (tiles, B, t): each tile's slice of x
        products = torch.bmm(parts, self.tiles.to(x.dtype).transpose(1, 2))  # (tiles, B, t)
        return torch.zeros(n, b, t, dtype=products.dtype, device=x.device).index_add_(0, rows, products)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d) rows x -> (B, d) rows x Wᵀ, in x's dtype."""
        z = self._rows_of_tiles(x)
        return z.transpose(0, 1).reshape(x.shape[0], -1)[:, : self.dim] * self.scale

    def norm_sq(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) |x Wᵀ|² (the padding's rows of W are zero)."""
        return self._rows_of_tiles(x).square().sum((0, 2)) * self.scale**2

    def square(self) -> torch.Tensor:
        """W as a (d, d) matrix (float32 from float16 tiles: exactly the values held)."""
        k, t, _ = self.tiles.shape
        n = -(-self.dim // t)
        rows, cols = _tile_index(n)
        dtype = torch.float32 if self.tiles.dtype == torch.float16 else self.tiles.dtype
        out = torch.zeros(n, n, t, t, dtype=dtype)
        out[rows, cols] = self.tiles.to(dtype) * self.scale
        return out.permute(0, 2, 1, 3).reshape(n * t, n * t)[: self.dim, : self.dim].contiguous()


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
        """As a replica holds it: a float32 mean, the whitener's tiles in float16 (`SERVED_DTYPE`), d² in float32."""
        return cls(mean.float(), TriangularWhitener.from_square(whitener, dtype=SERVED_DTYPE), logdet, shrinkage)

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
        d2 = (self.gaussian.mahalanobis_sq(features) if normalized else self.mahalanobis_sq(features)).double()
        return self.gaussian.log_likelihood_of(d2), self.gate(d2).float()

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
