"""The Gaussian diffusion of DDPM: forward process q, reverse process p_theta, losses and the bound.

Conventions (see shared/PAPER.md):
- code timestep t runs 0..T-1 and is paper step t+1;
- images live in [-1, 1]; every schedule array is float64 and is cast to float32 only when gathered;
- "bits/dim" terms are means over all non-batch dimensions divided by ln 2.

The model is any callable ``model(x_t, t) -> output``; it is always called with timesteps of the
original (un-respaced) chain, so a model trained on T steps can be sampled on a strided subset.
The paper's sampler, Algorithm 2, is here (``p_sample``, ``ancestral_progressive`` and
``GaussianDiffusion.p_sample_loop``); the other samplers and the registry of all of them are in
:mod:`ddpm.samplers`, which builds on this module.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConfigError
from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .rng import randn, randn_like

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Called by every sampling loop after each step: (the step's number from 0, the chain timestep it started
# from, the new x, the x0 prediction the step used). For figures and previews; it must not change x.
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], object]


class MeanType(str, enum.Enum):
    """What the network predicts."""

    EPSILON = "eps"  # the noise (the paper's choice, Eq. 11)
    START_X = "x0"  # the clean image
    PREVIOUS_X = "xprev"  # the posterior mean mu directly ("mu-prediction" in the paper's Table 2)
    VELOCITY = "v"  # v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022), an extension
    # EDM's preconditioned network output F (Karras et al. 2022, Table 1), an extension: see edm_coefficients
    EDM = "edm"


class VarType(str, enum.Enum):
    """How the reverse-process variance Sigma_theta(x_t, t) is chosen."""

    FIXED_SMALL = "fixedsmall"  # sigma^2 = beta-tilde_t (posterior variance)
    FIXED_LARGE = "fixedlarge"  # sigma^2 = beta_t, with beta-tilde_1 at t = 0
    LEARNED = "learned"  # extra output channels are the log variance (the paper's Table 2)
    LEARNED_RANGE = "learned_range"  # Improved DDPM: interpolate log beta and log beta-tilde

    @property
    def learned(self) -> bool:
        """Whether the network outputs the variance (as extra channels)."""
        return self in (VarType.LEARNED, VarType.LEARNED_RANGE)


class LossType(str, enum.Enum):
    SIMPLE = "mse"  # L_simple: MSE on the prediction target (Algorithm 1)
    KL = "kl"  # the true variational bound L_t, in bits/dim
    HYBRID = "hybrid"  # Improved DDPM: L_simple + lambda * L_vlb, the vlb term with the mean detached


def parse_option(enum_type: type[enum.Enum], value: object, what: str) -> enum.Enum:
    """``value`` as a member of ``enum_type``, or a ConfigError listing the choices."""
    try:
        return enum_type(value)
    except ValueError:
        choices = ", ".join(e.value for e in enum_type)
        raise ConfigError(f"unknown {what} {value!r}; choose one of {choices}") from None


def space_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
    """`num_steps` timesteps of 0..T-1, evenly strided, always including 0 and T-1 (Improved DDPM)."""
    if not 1 <= num_steps <= num_timesteps:
        raise ConfigError(f"number of sampling steps must be in 1..{num_timesteps}, got {num_steps}")
    if num_steps == 1:
        return [num_timesteps - 1]
    stride = (num_timesteps - 1) / (num_steps - 1)
    return sorted({round(i * stride) for i in range(num_steps)})


@dataclass
class PMeanVar:
    """The reverse-process Gaussian p_theta(x_{t-1} | x_t) and the x0 it implies."""

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_x0: torch.Tensor


class GaussianDiffusion:
    """Forward and reverse processes for one beta schedule.

    ``timestep_map`` maps this chain's indices to the model's timesteps; it is the identity except for
    a chain respaced onto a subset of the steps (see :meth:`respaced`).
    """

    def __init__(
        self,
        betas: np.ndarray,
        mean_type: MeanType | str = MeanType.EPSILON,
        var_type: VarType | str = VarType.FIXED_LARGE,
        loss_type: LossType | str = LossType.SIMPLE,
        hybrid_lambda: float = 0.001,
        timestep_map: np.ndarray | None = None,
        loss_weighting: str = "none",
        min_snr_gamma: float = 5.0,
        sigma_data: float = 0.5,
    ):
        self.mean_type = parse_option(MeanType, mean_type, "mean type")
        self.var_type = parse_option(VarType, var_type, "variance type")
        self.loss_type = parse_option(LossType, loss_type, "loss type")
        learned = self.var_type.learned
        if learned and self.loss_type == LossType.SIMPLE:
            raise ConfigError("a learned variance gets no gradient from L_simple; use loss 'kl' or 'hybrid'")
        if not learned and self.loss_type == LossType.HYBRID:
            raise ConfigError(
                "the hybrid loss trains a learned variance; use var_type learned_range or loss mse"
            )
        self.hybrid_lambda = hybrid_lambda
        if not sigma_data > 0:
            raise ConfigError(f"sigma_data must be positive, got {sigma_data}")
        self.sigma_data = sigma_data
        self.loss_weighting, self.min_snr_gamma = loss_weighting, min_snr_gamma
        if loss_weighting not in ("none", "min-snr"):
            raise ConfigError(f"loss weighting must be none or min-snr, got {loss_weighting!r}")
        if loss_weighting != "none" and (
            self.loss_type == LossType.KL or self.mean_type == MeanType.PREVIOUS_X
        ):
            raise ConfigError(
                "min-snr weights L_simple's eps, x0 or v prediction: not the kl loss or an xprev model"
            )

        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0 or not np.all((betas > 0) & (betas <= 1)):
            raise ConfigError("betas must be a non-empty 1-D array with values in (0, 1]")
        self.num_timesteps = T = len(betas)
        self.timestep_map = np.arange(T) if timestep_map is None else np.asarray(timestep_map)

        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        # beta-tilde is 0 at t = 0; its log is clipped to the value at t = 1 (as in the original code).
        posterior_log_variance_clipped = np.log(np.append(posterior_variance[1:2], posterior_variance[1:]))
        if T == 1:
            posterior_log_variance_clipped = np.log(betas)
        self.np = dict(
            betas=betas,
            alphas_cumprod=ac,
            alphas_cumprod_prev=ac_prev,
            sqrt_alphas_cumprod=np.sqrt(ac),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
            one_minus_alphas_cumprod=1.0 - ac,
            log_one_minus_alphas_cumprod=np.log(1.0 - ac),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=posterior_log_variance_clipped,
            posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
            # "fixed large": sigma^2 = beta_t, but beta-tilde_1 at t = 0 for a better decoder likelihood.
            fixed_large_variance=np.append(posterior_variance[1:2], betas[1:]) if T > 1 else betas,
        )
        self.np["fixed_large_log_variance"] = np.log(self.np["fixed_large_variance"])
        self.np.update(edm_coefficients(ac, sigma_data))
        self.np["loss_weight"] = self._loss_weights()
        # Cast once to float32 tensors: each sampling step then costs one gather per coefficient.
        self._coef = {k: torch.from_numpy(v).float() for k, v in self.np.items()}
        self._model_t = torch.from_numpy(self.timestep_map).long()
        # the whole diffusion this chain was respaced from (itself unless respaced): EDM's sampler rounds
        # its churned noise levels to the nearest of all T (ddpm.samplers.edm_churn_sample_loop)
        self.full_chain = self

    def _loss_weights(self) -> np.ndarray:
        """L_simple's weight at each timestep. Min-SNR-gamma (Hang et al. 2023) weights the loss on x0 by
        min(SNR_t, gamma), SNR_t = abar_t / (1 - abar_t); the same loss on the eps prediction, whose
        error is SNR_t times smaller per unit of x0 error, takes min(SNR_t, gamma) / SNR_t, and on v
        (error SNR_t + 1 times smaller) min(SNR_t, gamma) / (SNR_t + 1)."""
        ac = self.np["alphas_cumprod"]
        if self.loss_weighting == "none":
            return np.ones_like(ac)
        snr = ac / (1.0 - ac)
        clipped = np.minimum(snr, self.min_snr_gamma)
        return {
            MeanType.EPSILON: clipped / snr,
            MeanType.START_X: clipped,
            MeanType.VELOCITY: clipped / (snr + 1.0),
            # F's error is x0's divided by c_out
            MeanType.EDM: clipped * self.np["edm_c_out"] ** 2,
        }[self.mean_type]

    @property
    def betas(self) -> np.ndarray:
        return self.np["betas"]

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return self.np["alphas_cumprod"]

    def coef(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """Schedule coefficient ``name`` (a key of ``self.np``, e.g. "alphas_cumprod") at timesteps t
        (shape [B]), as float32 shaped [B, 1, ...] to broadcast over an x with ``ndim`` dimensions."""
        values = self._coef[name]
        if values.device != t.device:
            values = self._coef[name] = values.to(t.device)
        return values[t].reshape(-1, *([1] * (ndim - 1)))

    def respaced(self, timesteps: list[int] | int) -> GaussianDiffusion:
        """The chain restricted to a subset of timesteps (Improved DDPM's respacing).

        New betas are chosen so that alphabar at the kept steps is unchanged: beta_i = 1 - abar_i/abar_{i-1}.
        An int asks for that many evenly strided steps.
        """
        if isinstance(timesteps, int):
            timesteps = space_timesteps(self.num_timesteps, timesteps)
        kept = sorted(set(int(t) for t in timesteps))
        if not kept or kept[0] < 0 or kept[-1] >= self.num_timesteps:
            raise ConfigError(f"respaced timesteps must lie in 0..{self.num_timesteps - 1}")
        ac = self.alphas_cumprod[kept]
        new_betas = 1.0 - ac / np.append(1.0, ac[:-1])
        chain = GaussianDiffusion(
            new_betas,
            self.mean_type,
            self.var_type,
            self.loss_type,
            self.hybrid_lambda,
            timestep_map=self.timestep_map[kept],
            loss_weighting=self.loss_weighting,
            min_snr_gamma=self.min_snr_gamma,
            sigma_data=self.sigma_data,
        )
        chain.full_chain = self.full_chain
        return chain

    # ---- forward process q ----

    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log variance of q(x_t | x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I)."""
        mean = self.coef("sqrt_alphas_cumprod", t, x0.ndim) * x0
        variance = self.coef("one_minus_alphas_cumprod", t, x0.ndim)
        return mean, variance, self.coef("log_one_minus_alphas_cumprod", t, x0.ndim)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Eq. 4)."""
        return (
            self.coef("sqrt_alphas_cumprod", t, x0.ndim) * x0
            + self.coef("sqrt_one_minus_alphas_cumprod", t, x0.ndim) * noise
        )

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0) (Eqs. 6-7)."""
        mean = (
            self.coef("posterior_mean_coef1", t, x_t.ndim) * x0
            + self.coef("posterior_mean_coef2", t, x_t.ndim) * x_t
        )
        variance = self.coef("posterior_variance", t, x_t.ndim)
        return mean, variance, self.coef("posterior_log_variance_clipped", t, x_t.ndim)

    # ---- conversions between parameterisations ----

    def pred_x0_from_eps(self, x_t, t, eps):
        return (
            self.coef("sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t
            - self.coef("sqrt_recipm1_alphas_cumprod", t, x_t.ndim) * eps
        )

    def pred_eps_from_x0(self, x_t, t, pred_x0):
        return (self.coef("sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t - pred_x0) / self.coef(
            "sqrt_recipm1_alphas_cumprod", t, x_t.ndim
        )

    def pred_x0_from_xprev(self, x_t, t, xprev):
        coef1 = self.coef("posterior_mean_coef1", t, x_t.ndim)
        coef2 = self.coef("posterior_mean_coef2", t, x_t.ndim)
        return (xprev - coef2 * x_t) / coef1

    def pred_x0_from_v(self, x_t, t, v):
        return (
            self.coef("sqrt_alphas_cumprod", t, x_t.ndim) * x_t
            - self.coef("sqrt_one_minus_alphas_cumprod", t, x_t.ndim) * v
        )

    def pred_x0_from_edm(self, x_t, t, out):
        """EDM's D = c_skip x + c_out F, with x = x_t / sqrt(abar_t) = x0 + sigma_t eps."""
        x = self.coef("sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t
        return self.coef("edm_c_skip", t, x_t.ndim) * x + self.coef("edm_c_out", t, x_t.ndim) * out

    def edm_target(self, x0, t, noise):
        """The F that makes D = x0 exactly: (x0 - c_skip (x0 + sigma eps)) / c_out."""
        x = x0 + self.coef("sqrt_recipm1_alphas_cumprod", t, x0.ndim) * noise
        return (x0 - self.coef("edm_c_skip", t, x0.ndim) * x) / self.coef("edm_c_out", t, x0.ndim)

    def v_target(self, x0, t, noise):
        return (
            self.coef("sqrt_alphas_cumprod", t, x0.ndim) * noise
            - self.coef("sqrt_one_minus_alphas_cumprod", t, x0.ndim) * x0
        )

    # ---- reverse process p ----

    def network(self, model: Model, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's output at x_t, timesteps t of this chain: EDM's input is scaled by c_in."""
        if self.mean_type == MeanType.EDM:
            x_t = self.coef("edm_c_in", t, x_t.ndim) * x_t
        return model(x_t, self.model_timesteps(t))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The original-chain timesteps the model is called with."""
        if self._model_t.device != t.device:
            self._model_t = self._model_t.to(t.device)
        return self._model_t[t]

    def p_mean_variance(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True
    ) -> PMeanVar:
        """p_theta(x_{t-1} | x_t) from the network output (Eq. 11 for eps-prediction).

        ``clip_denoised`` clips the implied x0 to [-1, 1] before forming the posterior mean.
        """
        C = x_t.shape[1]
        if self.var_type.learned:
            if model_output.shape[1] != 2 * C:
                raise ValueError(
                    f"learned variance needs {2 * C} output channels, got {model_output.shape[1]}"
                )
            model_output, var_values = model_output.split(C, dim=1)
            if self.var_type == VarType.LEARNED:
                log_variance = var_values
            else:
                min_log = self.coef("posterior_log_variance_clipped", t, x_t.ndim)
                max_log = torch.log(self.coef("betas", t, x_t.ndim))
                frac = (var_values + 1) / 2  # the network output in [-1, 1] -> [0, 1]
                log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            if self.var_type == VarType.FIXED_SMALL:
                names = ("posterior_variance", "posterior_log_variance_clipped")
            else:
                names = ("fixed_large_variance", "fixed_large_log_variance")
            variance = self.coef(names[0], t, x_t.ndim).expand_as(x_t)
            log_variance = self.coef(names[1], t, x_t.ndim).expand_as(x_t)

        def maybe_clip(x):
            return x.clamp(-1, 1) if clip_denoised else x

        if self.mean_type == MeanType.PREVIOUS_X:
            pred_x0 = maybe_clip(self.pred_x0_from_xprev(x_t, t, model_output))
            mean = model_output
        else:
            if self.mean_type == MeanType.EPSILON:
                pred_x0 = self.pred_x0_from_eps(x_t, t, model_output)
            elif self.mean_type == MeanType.START_X:
                pred_x0 = model_output
            elif self.mean_type == MeanType.EDM:
                pred_x0 = self.pred_x0_from_edm(x_t, t, model_output)
            else:
                pred_x0 = self.pred_x0_from_v(x_t, t, model_output)
            pred_x0 = maybe_clip(pred_x0)
            mean, _, _ = self.q_posterior(pred_x0, x_t, t)
        return PMeanVar(mean=mean, variance=variance, log_variance=log_variance, pred_x0=pred_x0)

    def predict(
        self, model: Model, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True
    ) -> PMeanVar:
        """Call the network on x_t at timesteps t of this chain and form p_theta(x_{t-1} | x_t)."""
        return self.p_mean_variance(self.network(model, x_t, t), x_t, t, clip_denoised)

    # ---- Algorithm 2 on this chain (see ancestral_progressive below) ----

    def p_sample_loop_progressive(
        self, model: Model, shape: tuple[int, ...], *args, **kwargs
    ) -> Iterator[SampleStep]:
        """Every step of Algorithm 2 on this chain: :func:`ancestral_progressive` (same arguments)."""
        return ancestral_progressive(self, model, shape, *args, **kwargs)

    @torch.inference_mode()
    def p_sample_loop(
        self, model: Model, shape: tuple[int, ...], *, callback: StepCallback | None = None, **options
    ) -> torch.Tensor:
        """The final sample of Algorithm 2 on this chain (in [-1, 1] when x0 is clipped). ``options`` are
        those of :func:`ancestral_progressive`; ``callback`` (a :data:`StepCallback`) sees every step."""
        last = None
        for n, step in enumerate(ancestral_progressive(self, model, shape, **options)):
            if callback is not None:
                callback(n, step.t, step.sample, step.pred_x0)
            last = step  # the earlier steps are dropped as they come
        return last.sample

    # ---- losses and the variational bound ----

    def vb_terms_bpd(
        self,
        model_output: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The bound term L_{t} in bits/dim per example: KL(q(x_{t-1}|x_t,x0) || p) for t > 0, the
        discretised decoder NLL -log p(x0 | x_1) at t = 0. Also returns the predicted x0."""
        true_mean, _, true_log_variance = self.q_posterior(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out.mean, out.log_variance)) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(x0, out.mean, 0.5 * out.log_variance)
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl), out.pred_x0

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x0) || N(0, I)) in bits/dim per example (the L_T term; no parameters)."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device, dtype=torch.long)
        mean, _, log_variance = self.q_mean_variance(x0, t)
        zeros = torch.zeros_like(mean)
        return mean_flat(normal_kl(mean, log_variance.expand_as(mean), zeros, zeros)) / math.log(2.0)

    @torch.no_grad()
    def calc_bpd_loop(
        self,
        model: Model,
        x0: torch.Tensor,
        clip_denoised: bool = True,
        generator: torch.Generator | None = None,
        timesteps: list[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The variational bound on -log p(x0) in bits/dim, per example, term by term (Eq. 5).

        For every t a fresh x_t ~ q(x_t | x0) is drawn and L_t computed (the decoder NLL at t = 0, a KL
        otherwise); the prior term L_T is added. ``timesteps`` restricts the KL terms to a subset: each
        kept term then stands for the terms nearest to it (``kl_weights``), a quadrature *estimate* of
        the bound, not the bound. Also returns the MSE of the predicted x0 at each t (the distortion).
        """
        T = self.num_timesteps
        kept = list(range(T)) if timesteps is None else sorted(set(int(t) for t in timesteps) | {0})
        if kept[0] < 0 or kept[-1] >= T:
            raise ConfigError(f"timesteps must lie in 0..{T - 1}")
        weights = kl_weights(kept, T)
        B = x0.shape[0]
        vb = torch.zeros(B, len(kept), device=x0.device)
        x0_mse = torch.zeros(B, len(kept), device=x0.device)
        for j in reversed(range(len(kept))):
            t = torch.full((B,), kept[j], device=x0.device, dtype=torch.long)
            x_t = self.q_sample(x0, t, randn_like(x0, generator))
            output = self.network(model, x_t, t)
            vb[:, j], pred_x0 = self.vb_terms_bpd(output, x0, x_t, t, clip_denoised)
            x0_mse[:, j] = mean_flat((pred_x0 - x0) ** 2)
        prior = self.prior_bpd(x0)
        total = prior + vb @ weights.to(vb.device)
        return {
            "total_bpd": total,
            "prior_bpd": prior,
            "vb_bpd": vb,
            "x0_mse": x0_mse,
            "timesteps": torch.tensor(kept),
            "kl_weights": weights,
        }

    def training_losses(
        self, model: Model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-example losses at timesteps t (Algorithm 1 for L_simple). Keys: loss, and mse / vb."""
        x_t = self.q_sample(x0, t, noise)
        model_output = self.network(model, x_t, t)
        terms: dict[str, torch.Tensor] = {}
        if self.loss_type == LossType.KL:
            # The true bound: the VLB term with gradients through mean and variance; no x0 clipping.
            terms["loss"] = self.vb_terms_bpd(model_output, x0, x_t, t, clip_denoised=False)[0]
            return terms

        C = x0.shape[1]
        prediction = model_output[:, :C] if self.var_type.learned else model_output
        if self.mean_type == MeanType.EPSILON:
            target = noise
        elif self.mean_type == MeanType.START_X:
            target = x0
        elif self.mean_type == MeanType.PREVIOUS_X:
            target = self.q_posterior(x0, x_t, t)[0]
        elif self.mean_type == MeanType.EDM:
            target = self.edm_target(x0, t, noise)
        else:
            target = self.v_target(x0, t, noise)
        terms["mse"] = mean_flat((target - prediction) ** 2)
        terms["loss"] = terms["mse"]
        if self.loss_weighting != "none":  # (the reported mse stays the plain one, comparable across runs)
            terms["loss"] = self.coef("loss_weight", t, 1).reshape(-1) * terms["mse"]
        if self.loss_type == LossType.HYBRID:
            # Only the variance learns from the bound: the mean is trained by L_simple alone.
            frozen = torch.cat([prediction.detach(), model_output[:, C:]], dim=1)
            vb = self.vb_terms_bpd(frozen, x0, x_t, t, clip_denoised=False)[0]
            # L_vlb = sum over T terms = T * E_t[L_t]; lambda * L_vlb with one sampled t.
            terms["vb"] = vb * self.num_timesteps * self.hybrid_lambda
            terms["loss"] = terms["loss"] + terms["vb"]
        return terms


def edm_coefficients(alphas_cumprod: np.ndarray, sigma_data: float) -> dict[str, np.ndarray]:
    """EDM's preconditioning (Karras et al. 2022, Table 1) at each timestep of a variance-preserving chain.

    EDM's noisy image is x = x0 + sigma n; here x = x_t / sqrt(abar_t), sigma_t = sqrt((1 - abar_t) / abar_t).
    The denoiser is D(x) = c_skip x + c_out F(c_in x), with c_skip = sd^2 / (sigma^2 + sd^2),
    c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2) (sd: sigma_data). EDM's loss
    weight lambda = 1 / c_out^2 makes the loss on F unweighted, which is how it is trained here. The network
    is given x_t, so its input factor is c_in / sqrt(abar_t) (edm_c_in). With sd = 1 F is -v.
    """
    sigma2 = (1.0 - alphas_cumprod) / alphas_cumprod
    sd2 = sigma_data**2
    return {
        "edm_c_skip": sd2 / (sigma2 + sd2),
        "edm_c_out": np.sqrt(sigma2 * sd2 / (sigma2 + sd2)),
        "edm_c_in": np.sqrt((1.0 + sigma2) / (sigma2 + sd2)),
    }


def lognormal_timesteps(
    alphas_cumprod: np.ndarray, n: int, generator: torch.Generator | None, mean: float, std: float
) -> torch.Tensor:
    """``n`` training timesteps drawn as EDM draws its noise levels (Karras et al. 2022, Table 1:
    ln sigma ~ N(mean, std), -1.2 and 1.2 for images), each taken to the timestep whose
    sigma_t = sqrt((1 - abar_t) / abar_t) is nearest in ln sigma (a draw beyond the chain's ends takes
    the end). One normal draw per timestep, from ``generator``."""
    log_sigma = 0.5 * (np.log1p(-alphas_cumprod) - np.log(alphas_cumprod))  # increasing in t
    between = torch.from_numpy((log_sigma[1:] + log_sigma[:-1]) / 2)  # where the nearest one changes
    drawn = mean + std * torch.randn(n, generator=generator, dtype=torch.float64)
    return torch.bucketize(drawn, between)


def kl_weights(kept: list[int], T: int) -> torch.Tensor:
    """How many of the terms t = 1..T-1 each kept timestep stands for (each term goes to the nearest
    kept t >= 1); the decoder term t = 0 counts once. All ones when every t is kept."""
    weights = torch.zeros(len(kept))
    weights[0] = 1.0
    kl_kept = np.array(kept[1:])
    if len(kl_kept):
        all_t = np.arange(1, T)
        nearest = np.abs(all_t[:, None] - kl_kept[None, :]).argmin(1)
        weights[1:] = torch.from_numpy(np.bincount(nearest, minlength=len(kl_kept))).float()
    return weights


# ---- the reverse chain: Algorithm 2, and what every sampling loop starts from ----


@dataclass
class SampleStep:
    """One step of the reverse chain: the timestep just taken, the new sample and the x0 prediction."""

    t: int
    sample: torch.Tensor
    pred_x0: torch.Tensor


def initial_sample(shape, generator, device, x_start: torch.Tensor | None) -> torch.Tensor:
    """x_T ~ N(0, I) from the generator, or the given starting point."""
    return randn(shape, generator, device) if x_start is None else x_start.to(device)


def reverse_indices(first: int, progress: bool):
    """A chain's indices from ``first`` down to 0, with a progress bar when asked."""
    steps = range(first, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="sampling", unit="step", leave=False)
    return steps


def timestep_batch(i: int, batch: int, device) -> torch.Tensor:
    """Chain index ``i`` for every example of a batch (int64 [batch])."""
    return torch.full((batch,), i, device=device, dtype=torch.long)


def p_sample(
    chain: GaussianDiffusion,
    model: Model,
    x_t: torch.Tensor,
    t: torch.Tensor,
    clip_denoised: bool = True,
    generator: torch.Generator | None = None,
    shared_noise: bool = False,
    index: int | None = None,
) -> SampleStep:
    """One step of Algorithm 2: x_{t-1} = mean + sigma z, with no noise at t = 0.
    ``shared_noise`` uses the same z for every example of the batch (for interpolations); ``index``, the
    step's timestep when the caller knows it, spares reading it back from the device."""
    out = chain.predict(model, x_t, t, clip_denoised)
    noise = randn_like(x_t[:1], generator).expand_as(x_t) if shared_noise else randn_like(x_t, generator)
    nonzero = (t != 0).float().reshape(-1, *([1] * (x_t.ndim - 1)))
    sample = out.mean + nonzero * torch.exp(0.5 * out.log_variance) * noise
    return SampleStep(t=int(t[0]) if index is None else index, sample=sample, pred_x0=out.pred_x0)


def ancestral_progressive(
    chain: GaussianDiffusion,
    model: Model,
    shape: tuple[int, ...],
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    clip_denoised: bool = True,
    x_start: torch.Tensor | None = None,
    t_start: int | None = None,
    progress: bool = False,
    shared_noise: bool = False,
) -> Iterator[SampleStep]:
    """Algorithm 2, yielding every step. Starts from x_T ~ N(0, I), or from ``x_start`` at ``t_start``."""
    x = initial_sample(shape, generator, device, x_start)
    first = chain.num_timesteps - 1 if t_start is None else t_start
    for i in reverse_indices(first, progress):
        t = timestep_batch(i, shape[0], device)
        step = p_sample(chain, model, x, t, clip_denoised, generator, shared_noise, index=i)
        x = step.sample
        yield step
