"""The paper's claims as verdicts computed from measured numbers; pure functions, no training and no files.

* C1 with text, reconstruction is better at every token count (``both`` beats ``none`` at every N);
* C2 the gain from text is largest with the fewest tokens (relative gain largest at the smallest N);
* C3 ``both > encoder > decoder > none`` (strictly, at each N);
* C4 a generator over the text tokenizer's tokens gives better samples than one over the no-text tokenizer's
  (the mean sample FD over sampling seeds; a gap within the spread between seeds is "inconclusive").

Every verdict is ``{"holds": True | False | None, "detail": str}``; ``None`` = not testable with the modes and
token counts given, and everything in ``detail`` is computed from the numbers.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from ...eval.compare import higher_is_better, is_better, relative_gain

CLAIMS = {
    "C1": "with text, reconstruction is better at every token count",
    "C2": "the gain from text is largest with the fewest tokens",
    "C3": "both > encoder > decoder > none",
    "C4": "a generator over the text tokenizer's tokens beats one over the no-text tokenizer's",
}
ORDER_C3 = ("both", "encoder", "decoder", "none")  # the paper's ablation order, best first


def primary_metrics(metrics: Sequence[str]) -> list[str]:
    """The headline metrics: rFID (when the real Inception ran), the FD-opennsfw family, and PSNR."""
    return [m for m in metrics if m == "rFID" or m.startswith("FD-opennsfw")] + [m for m in metrics if m == "PSNR"]


def token_list(ns) -> str:
    """Token counts as text: ``1, 4, 16``."""
    return ", ".join(str(n) for n in ns)


def judge(values: dict[str, dict[int, float]], higher: bool) -> dict[str, dict[str, Any]]:
    """Verdicts on C1-C3 for one metric, from ``values[mode][N]``, and the relative gain of text at each N."""
    out: dict[str, dict[str, Any]] = {}
    both, none = values.get("both", {}), values.get("none", {})
    ns = sorted(set(both) & set(none))
    # C1: both beats none at every N
    if not ns:
        out["C1"] = {"holds": None, "detail": "needs the modes both and none"}
    else:
        wins = [n for n in ns if is_better(both[n], none[n], higher)]
        losses = [n for n in ns if n not in wins]
        if not losses:
            detail = f"text beats no text at every N ({token_list(ns)})"
        elif wins:
            detail = f"text beats no text at N={token_list(wins)}; not at N={token_list(losses)}"
        else:
            detail = f"text beats no text at no N ({token_list(ns)})"
        out["C1"] = {"holds": not losses, "detail": detail}
    # C2: the relative gain is largest at the smallest N
    gains = {n: relative_gain(both[n], none[n], higher) for n in ns}
    if len(ns) < 2:
        out["C2"] = {"holds": None, "detail": "needs both and none at two or more token counts"}
    else:
        smallest, rest = ns[0], ns[1:]
        g0 = gains[smallest]
        best_other = max(rest, key=lambda n: gains[n] if math.isfinite(gains[n]) else -math.inf)
        largest = math.isfinite(g0) and all(math.isfinite(gains[n]) and g0 > gains[n] for n in rest)
        listing = ", ".join(f"N={n}: {gains[n] * 100:+.1f}%" for n in ns)
        if not (math.isfinite(g0) and g0 > 0):  # a "largest" loss is no gain
            detail = f"text does not help at N={smallest} ({listing})"
        elif largest:
            detail = f"largest gain at N={smallest} ({listing})"
        else:
            detail = f"the gain at N={smallest} is not the largest (N={best_other} has more; {listing})"
        out["C2"] = {"holds": largest and g0 > 0, "detail": detail}
    # C3: both > encoder > decoder > none, strictly, at each N
    n3 = sorted(set.intersection(*(set(values.get(m, {})) for m in ORDER_C3)))
    if not n3:
        out["C3"] = {"holds": None, "detail": "needs the modes both, encoder, decoder and none"}
    else:
        ok, orders = [], {}
        for n in n3:
            chain = all(is_better(values[a][n], values[b][n], higher) for a, b in zip(ORDER_C3, ORDER_C3[1:]))
            if chain:
                ok.append(n)
            else:
                ranked = sorted(ORDER_C3, key=lambda m: values[m][n], reverse=higher)
                orders[n] = " > ".join(ranked)
        bad = [n for n in n3 if n not in ok]
        if not bad:
            detail = f"holds at every N ({token_list(n3)})"
        else:
            seen = "; ".join(f"N={n}: {o}" for n, o in orders.items())
            detail = (f"holds at N={token_list(ok)}; fails at N={token_list(bad)} ({seen})" if ok else
                      f"holds at no N (measured order {seen})")
        out["C3"] = {"holds": not bad, "detail": detail, "holds_at": ok}
    out["gains"] = {str(n): gains[n] for n in ns}
    return out


def verdicts(cells: dict[str, dict[int, dict[str, float]]], metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per metric: :func:`judge` over ``cells[mode][N][metric]`` (metrics missing in a cell are left out)."""
    result = {}
    for metric in metrics:
        values = {mode: {n: float(m[metric]) for n, m in per_n.items() if metric in m} for mode, per_n in cells.items()}
        result[metric] = judge(values, higher_is_better(metric))
    return result


def word(holds: bool | None) -> str:
    """A verdict in a word: holds, does not hold, not testable."""
    return {True: "holds", False: "does not hold", None: "not testable"}[holds]


def verdict_lines(claims: dict[str, dict[str, Any]], primary: Sequence[str], generation: str | None = None) -> list[str]:
    """One line per claim over the primary metrics, e.g. ``C1 (...): FD-opennsfw@64 holds (...); PSNR ...``."""
    lines = []
    for cid in ("C1", "C2", "C3"):
        parts = [f"{m} {word(claims[m][cid]['holds'])} ({claims[m][cid]['detail']})" for m in primary if m in claims]
        lines.append(f"{cid} — {CLAIMS[cid]}: " + ("; ".join(parts) if parts else "no metric to judge"))
    lines.append(f"C4 — {CLAIMS['C4']}: " + (generation or "not run (pass --generation)"))
    return lines


def judge_generation(text: dict[str, Any], base: dict[str, Any], text_mode: str, n: int) -> dict[str, Any]:
    """C4's verdict from the two generator runs' per-seed sample FDs (lower is better)."""
    metric = text["metric"]
    ts, bs = text["sample_fd"], base["sample_fd"]
    tm, bm = statistics.fmean(ts), statistics.fmean(bs)
    spread = max(max(ts) - min(ts), max(bs) - min(bs))
    gain = (bm - tm) / abs(bm) if bm else float("nan")
    if len(ts) > 1 and abs(tm - bm) <= spread:
        holds = None
        verdict = "inconclusive"
    else:
        holds = tm < bm
        verdict = "holds" if holds else "does not hold"
    seeds = f"; per sampling seed {_join(ts)} vs {_join(bs)}" if len(ts) > 1 else ""
    detail = (f"{metric} of samples at N={n}: text ({text_mode}) {tm:.2f} vs no text {bm:.2f} "
              f"({gain * 100:+.1f}% for text){seeds}; the tokenizers' own reconstructions of the same images: "
              f"{text['recon_fd']:.2f} vs {base['recon_fd']:.2f}")
    if holds is None:
        detail += f"; the gap {abs(tm - bm):.2f} is within the spread between sampling seeds ({spread:.2f})"
    return {"metric": metric, "holds": holds, "verdict": verdict, "detail": detail, "relative_gain": gain}


def _join(values: list[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


__all__ = ["CLAIMS", "ORDER_C3", "judge", "judge_generation", "primary_metrics", "token_list", "verdict_lines",
           "verdicts", "word"]
