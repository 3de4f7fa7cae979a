"""The DiT/ADM Gaussian diffusion training loss: eps-MSE plus the VB term for a learned variance.

Plain tensor math, no diffusers: diffusers' schedulers sample, they do not train DiT's loss.
"""

from __future__ import annotations

import math

import torch


class GaussianDiffusion:
    """Linear beta schedule (1e-4 -> 0.02, 1000 steps), epsilon prediction (DiT defaults)."""

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        ac = torch.cumprod(1 - betas, 0)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        self.num_timesteps = num_timesteps
        self.betas = betas
        self.alphas_cumprod = ac
        self.sqrt_ac = ac.sqrt()
        self.sqrt_one_minus_ac = (1 - ac).sqrt()
        self.sqrt_recip_ac = (1 / ac).sqrt()
        self.sqrt_recipm1_ac = (1 / ac - 1).sqrt()
        post_var = betas * (1 - ac_prev) / (1 - ac)
        # log of the posterior variance, clipped because it is 0 at t = 0 (ADM)
        self.post_log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
        self.post_coef1 = betas * ac_prev.sqrt() / (1 - ac)
        self.post_coef2 = (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac)
        self.log_betas = torch.log(betas)

    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """table[t] broadcast to x's shape and dtype."""
        return table.to(t.device)[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ac_t) x0 + sqrt(1 - ac_t) eps."""
        return self._at(self.sqrt_ac, t, x0) * x0 + self._at(self.sqrt_one_minus_ac, t, x0) * noise

    def predict_x0(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Predicted clean latent from the epsilon prediction (docs/method.md §1.5)."""
        return self._at(self.sqrt_recip_ac, t, xt) * xt - self._at(self.sqrt_recipm1_ac, t, xt) * eps

    def losses(self, model_out: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
               noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample DiT loss: MSE(eps) + VB (learned variance, mean branch detached), and x0-hat."""
        c = x0.shape[1]
        eps = model_out[:, :c]
        mse = ((eps - noise) ** 2).mean(dim=tuple(range(1, x0.dim())))
        out = {"mse": mse, "pred_x0": self.predict_x0(xt, t, eps)}
        if model_out.shape[1] == 2 * c:
            out["vb"] = self._vb(eps.detach(), model_out[:, c:], x0, xt, t)
            out["loss"] = mse + out["vb"]
        else:
            out["loss"] = mse
        return out

    def _vb(self, eps: torch.Tensor, var_out: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor,
            t: torch.Tensor) -> torch.Tensor:
        """The variational bound term in bits per dimension (ADM's learned-range variance)."""
        min_log = self._at(self.post_log_var, t, xt)
        max_log = self._at(self.log_betas, t, xt)
        frac = (var_out + 1) / 2
        model_log_var = frac * max_log + (1 - frac) * min_log
        pred_x0 = self.predict_x0(xt, t, eps)
        model_mean = self._at(self.post_coef1, t, xt) * pred_x0 + self._at(self.post_coef2, t, xt) * xt
        true_mean = self._at(self.post_coef1, t, xt) * x0 + self._at(self.post_coef2, t, xt) * xt
        true_log_var = min_log
        kl = 0.5 * (-1.0 + model_log_var - true_log_var + torch.exp(true_log_var - model_log_var)
                    + (true_mean - model_mean) ** 2 * torch.exp(-model_log_var))
        dims = tuple(range(1, x0.dim()))
        kl = kl.mean(dim=dims) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var).mean(dim=dims)
        return torch.where(t == 0, nll / math.log(2.0), kl)


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """A fast approximation of the standard normal CDF (ADM)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor,
                                         log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of a Gaussian discretised to 256 bins on [-1, 1] (ADM decoder term)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
