"""Timestep respacing: sample a 1000-step model with fewer steps (improved DDPM, used by DiT with 250).

A subset S of the original timesteps defines a shorter Markov chain with the SAME ᾱ at the kept steps:
β'_i = 1 − ᾱ_{S_i} / ᾱ_{S_{i−1}}. The model is still called with the original timestep S_i.
"""

from __future__ import annotations

from ..errors import ConfigError


def space_timesteps(num_timesteps: int, spec: int | str) -> list[int]:
    """The kept timesteps (sorted) for a respacing ``spec``.

    ``spec``: an int or "250" (evenly spread, first and last step included); "10,15,20" (the range split into
    equal sections, with that many steps each); "ddim50" (a fixed integer stride from 0, as the DDIM paper).
    """
    text = str(spec).strip().lower()
    if text.startswith("ddim"):
        try:
            want = int(text[4:])
        except ValueError:
            raise ConfigError(f"respacing {spec!r}: expected 'ddim<N>', e.g. 'ddim50'") from None
        for stride in range(1, num_timesteps + 1):
            steps = list(range(0, num_timesteps, stride))
            if len(steps) == want:
                return steps
        raise ConfigError(f"respacing {spec!r}: no integer stride gives exactly {want} of {num_timesteps} steps; try another N")
    try:
        counts = [int(c) for c in text.split(",")]
    except ValueError:
        raise ConfigError(f"respacing {spec!r}: expected an int, 'a,b,c' or 'ddim<N>'") from None
    size, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        section = size + (1 if i < extra else 0)
        if count < 1 or count > section:
            raise ConfigError(f"respacing {spec!r}: cannot take {count} steps from a section of {section} steps")
        stride = 1.0 if count == 1 else (section - 1) / (count - 1)
        kept.extend(start + round(stride * j) for j in range(count))
        start += section
    return sorted(set(kept))


def respaced_betas(alphas_cumprod: "list[float] | object", use_timesteps: list[int]) -> list[float]:
    """β' of the shorter chain through ``use_timesteps`` whose ᾱ' equals the original ᾱ at those steps."""
    betas = []
    last = 1.0
    for t in use_timesteps:
        ac = float(alphas_cumprod[t])
        betas.append(1.0 - ac / last)
        last = ac
    return betas


__all__ = ["space_timesteps", "respaced_betas"]
